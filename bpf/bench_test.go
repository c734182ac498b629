package bpf

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// BenchmarkConnectAccept measures loopback connect+accept+close with the
// programs installed and not installed, for a token endpoint and for some
// other port. All configurations are interleaved in blocks within one run,
// so that the ratios compare like with like on a noisy machine. b.N counts
// connections per configuration.
//
//	go test -run '^$' -bench ConnectAccept -benchtime 40000x -count 6 ./bpf/
//
// Install runs once; between blocks the same loaded programs are attached to
// and detached from the cgroup root. Installing and uninstalling every block
// would also measure the kernel freeing programs and the 131,072-entry LRU
// map in the background, work a host does once, not per connection.
//
// Reported: ns/conn per configuration and installed/uninstalled rate ratios:
// other-rate-ratio (target >= 0.97), token-rate-ratio for connect+accept
// (target >= 0.90), and token+lookup-rate-ratio, which adds the server's
// Lookup of every accepted connection (its cost alone is BenchmarkLookup).
func BenchmarkConnectAccept(b *testing.B) {
	token := listenLoopback(b)
	other := listenLoopback(b)
	in, opts := install(b)
	if err := in.SetEndpoints([]netip.AddrPort{addrOf(token)}); err != nil {
		b.Fatal(err)
	}
	ours := detachPrograms(b, opts)

	type config struct {
		name      string
		ln        *net.TCPListener
		installed bool
		lookup    bool
	}
	configs := []config{
		{"other-uninstalled", other, false, false},
		{"token-uninstalled", token, false, false},
		{"other-installed", other, true, false},
		{"token-installed", token, true, false},
		{"token+lookup-installed", token, true, true},
	}
	elapsed := make([]time.Duration, len(configs))

	const block = 250
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; done, round = done+block, round+1 {
		n := min(block, b.N-done)
		// Alternate which state goes first, so neither always follows the
		// other's attach or detach.
		for _, installed := range [2]bool{round%2 == 0, round%2 != 0} {
			b.StopTimer()
			var detach func()
			if installed {
				detach = attachPrograms(b, opts, ours)
			}
			b.StartTimer()
			for i, c := range configs {
				if c.installed != installed {
					continue
				}
				var lookup *Installation
				if c.lookup {
					lookup = in
				}
				start := time.Now()
				for range n {
					connectAccept(b, c.ln, lookup)
				}
				elapsed[i] += time.Since(start)
			}
			if detach != nil {
				detach()
			}
		}
	}
	b.StopTimer()

	per := make(map[string]float64)
	for i, c := range configs {
		per[c.name] = float64(elapsed[i].Nanoseconds()) / float64(b.N)
		b.ReportMetric(per[c.name], "ns/conn-"+c.name)
	}
	// A rate ratio is the inverse of the time ratio.
	b.ReportMetric(per["other-uninstalled"]/per["other-installed"], "other-rate-ratio")
	b.ReportMetric(per["token-uninstalled"]/per["token-installed"], "token-rate-ratio")
	b.ReportMetric(per["token-uninstalled"]/per["token+lookup-installed"], "token+lookup-rate-ratio")
}

// detachPrograms takes the installed programs off the cgroup root, keeping
// them loaded and the maps pinned, and returns them by program name.
func detachPrograms(b *testing.B, opts Options) map[string]*ebpf.Program {
	progs := make(map[string]*ebpf.Program)
	for _, h := range hooks() {
		pin := linkPin(opts.PinDir, h.program)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			b.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			b.Fatal(err)
		}
		p, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.Close() })
		progs[h.program] = p
		if err := detachPinned(pin); err != nil {
			b.Fatal(err)
		}
	}
	return progs
}

// attachPrograms attaches progs (by program name) at their hooks on the
// cgroup root without pinning, and returns the function that detaches them.
func attachPrograms(b *testing.B, opts Options, progs map[string]*ebpf.Program) func() {
	opts, err := opts.withDefaults()
	if err != nil {
		b.Fatal(err)
	}
	var links []link.Link
	for _, h := range hooks() {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: opts.CgroupRoot, Attach: h.attach, Program: progs[h.program]})
		if err != nil {
			b.Fatal(err)
		}
		links = append(links, l)
	}
	return func() {
		for _, l := range links {
			l.Close()
		}
	}
}

func addrOf(ln *net.TCPListener) netip.AddrPort { return ln.Addr().(*net.TCPAddr).AddrPort() }

// connectAccept makes one connection to ln, accepts it, attributes it when in
// is not nil, and closes both ends. The client resets instead of closing so
// that no TIME_WAIT sockets pile up over a long run.
func connectAccept(b *testing.B, ln *net.TCPListener, in *Installation) {
	c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		b.Fatal(err)
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		b.Fatal(err)
	}
	if in != nil {
		if _, err := in.Lookup(s); err != nil {
			b.Fatal(err)
		}
	}
	c.SetLinger(0)
	c.Close()
	s.Close()
}

// BenchmarkLookup measures Lookup of an accepted connection that carries a
// record (the cost the server pays once per accepted connection) and of one
// that carries none. The record stays on the socket, so one connection is
// looked up again and again.
func BenchmarkLookup(b *testing.B) {
	in, _ := install(b)
	token, other := listenLoopback(b), listenLoopback(b)
	if err := in.SetEndpoints([]netip.AddrPort{addrOf(token)}); err != nil {
		b.Fatal(err)
	}
	accepted := func(ln *net.TCPListener) *net.TCPConn {
		c, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		s, err := ln.AcceptTCP()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		return s
	}
	hit, miss := accepted(token), accepted(other)

	b.Run("hit", func(b *testing.B) {
		for b.Loop() {
			if _, err := in.Lookup(hit); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("miss", func(b *testing.B) {
		for b.Loop() {
			in.Lookup(miss)
		}
	})
}

// BenchmarkHookCost splits the installed overhead on connections to other
// ports by hook: each configuration attaches, for each hook, either our
// program or one that only returns. Interleaved per round like
// BenchmarkConnectAccept; b.N counts rounds of 250 connections each.
//
//	go test -run '^$' -bench HookCost -benchtime 80x -count 3 ./bpf/
func BenchmarkHookCost(b *testing.B) {
	other := listenLoopback(b)
	_, opts := install(b)
	ours := detachPrograms(b, opts)
	noop := map[string]*ebpf.Program{
		attribProgRecordConnector4: noopProgram(b, ebpf.CGroupSockAddr, ebpf.AttachCGroupInet4Connect),
		attribProgRecordConnector6: noopProgram(b, ebpf.CGroupSockAddr, ebpf.AttachCGroupInet6Connect),
		attribProgRecordConnect:    noopProgram(b, ebpf.SockOps, ebpf.AttachCGroupSockOps),
		attribProgLinkLocalPeer4:   noopProgram(b, ebpf.CGroupSockAddr, ebpf.AttachCgroupInet4GetPeername),
		attribProgLinkLocalPeer6:   noopProgram(b, ebpf.CGroupSockAddr, ebpf.AttachCgroupInet6GetPeername),
	}
	pick := func(connect, sockops bool) map[string]*ebpf.Program {
		choose := func(real bool, name string) *ebpf.Program {
			if real {
				return ours[name]
			}
			return noop[name]
		}
		return map[string]*ebpf.Program{
			attribProgRecordConnector4: choose(connect, attribProgRecordConnector4),
			attribProgRecordConnector6: choose(connect, attribProgRecordConnector6),
			attribProgRecordConnect:    choose(sockops, attribProgRecordConnect),
			// getpeername runs on every Dial too; it goes with connect.
			attribProgLinkLocalPeer4: choose(connect, attribProgLinkLocalPeer4),
			attribProgLinkLocalPeer6: choose(connect, attribProgLinkLocalPeer6),
		}
	}

	configs := []struct {
		name  string
		progs map[string]*ebpf.Program // nil: nothing attached
	}{
		{"uninstalled", nil},
		{"noop-programs", pick(false, false)},
		{"real-connect", pick(true, false)},
		{"real-sockops", pick(false, true)},
		{"real-all", pick(true, true)},
	}
	elapsed := make([]time.Duration, len(configs))
	const block = 250
	for round := range b.N {
		for j := range configs {
			// Rotate the order so that no configuration always follows
			// the same one.
			i := (j + round) % len(configs)
			c := configs[i]
			detach := func() {}
			if c.progs != nil {
				detach = attachPrograms(b, opts, c.progs)
			}
			start := time.Now()
			for range block {
				connectAccept(b, other, nil)
			}
			elapsed[i] += time.Since(start)
			detach()
		}
	}
	for i, c := range configs {
		b.ReportMetric(float64(elapsed[i].Nanoseconds())/float64(block*b.N), "ns/conn-"+c.name)
	}
}

func noopProgram(b *testing.B, typ ebpf.ProgramType, attach ebpf.AttachType) *ebpf.Program {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		AttachType:   attach,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}
