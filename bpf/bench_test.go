package bpf

import (
	"context"
	"net"
	"net/netip"
	"os"
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
//	go test -run '^$' -bench ConnectAccept -benchtime 20000x -count 5 ./bpf/
//
// Reported: ns/conn per configuration and installed/uninstalled rate ratios:
// other-rate-ratio (target >= 0.97), token-rate-ratio for connect+accept
// (target >= 0.90), and token+lookup-rate-ratio, which adds the server's
// Lookup of every accepted connection (its cost alone is BenchmarkLookup).
func BenchmarkConnectAccept(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to load BPF programs")
	}
	token := listenLoopback(b)
	other := listenLoopback(b)
	opts := Options{PinDir: testPinDir(b), Logger: quiet}
	b.Cleanup(func() { Uninstall(context.Background(), opts) })

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
		// other's install or uninstall.
		for _, installed := range [2]bool{round%2 == 0, round%2 != 0} {
			var in *Installation
			if installed {
				b.StopTimer()
				var err error
				if in, err = Install(context.Background(), opts); err != nil {
					b.Fatal(err)
				}
				if err := in.SetEndpoints([]netip.AddrPort{addrOf(token)}); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
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
			if installed {
				b.StopTimer()
				in.Close()
				if err := Uninstall(context.Background(), opts); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
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

func b2i(v bool) int {
	if v {
		return 1
	}
	return 0
}

func listenLoopback(b *testing.B) *net.TCPListener {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
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
		local := s.LocalAddr().(*net.TCPAddr).AddrPort()
		remote := s.RemoteAddr().(*net.TCPAddr).AddrPort()
		if _, err := in.Lookup(local, remote); err != nil {
			b.Fatal(err)
		}
	}
	c.SetLinger(0)
	c.Close()
	s.Close()
}

// BenchmarkLookup measures Lookup of a present record (the cost the server
// pays once per accepted connection) and of an absent one.
func BenchmarkLookup(b *testing.B) {
	in, _ := install(b)
	server := netip.MustParseAddrPort("10.0.0.1:7123")
	client := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 2, byte(i >> 8), byte(i)}), uint16(1024+i%60000))
	}

	b.Run("hit", func(b *testing.B) {
		const batch = 50000
		rec := attribRecord{CgroupId: 1}
		for done := 0; done < b.N; done += batch {
			n := min(batch, b.N-done)
			b.StopTimer()
			rec.ConnectBootNs = uint64(bootTime())
			for i := range n {
				key := connKey(client(i), server)
				if err := in.conns.Put(key[:], rec); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
			for i := range n {
				if _, err := in.Lookup(server, client(i)); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("miss", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			in.Lookup(server, client(i))
		}
	})
}

// BenchmarkHookCost splits the installed overhead on connections to other
// ports by hook: each configuration swaps one or both of our programs for
// one that only returns, through the same links. Interleaved per round like
// BenchmarkConnectAccept; b.N counts rounds of 250 connections each.
//
//	go test -run '^$' -bench HookCost -benchtime 80x -count 3 ./bpf/
func BenchmarkHookCost(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to load BPF programs")
	}
	other := listenLoopback(b)
	opts := Options{PinDir: testPinDir(b), Logger: quiet}
	b.Cleanup(func() { Uninstall(context.Background(), opts) })
	noopOwner := noopProgram(b, ebpf.CGroupSock)
	noopConnect := noopProgram(b, ebpf.SockOps)

	configs := []struct {
		name                 string
		installed            bool
		realOwner, realConns bool
	}{
		{"uninstalled", false, false, false},
		{"noop-programs", true, false, false},
		{"real-sock_create", true, true, false},
		{"real-sockops", true, false, true},
		{"real-both", true, true, true},
	}
	elapsed := make([]time.Duration, len(configs))
	const block = 250
	for range b.N {
		for i, c := range configs {
			var in *Installation
			if c.installed {
				var err error
				if in, err = Install(context.Background(), opts); err != nil {
					b.Fatal(err)
				}
				if !c.realOwner {
					swapPinned(b, opts, attribProgRecordOwner, noopOwner)
				}
				if !c.realConns {
					swapPinned(b, opts, attribProgRecordConnect, noopConnect)
				}
			}
			start := time.Now()
			for range block {
				connectAccept(b, other, nil)
			}
			elapsed[i] += time.Since(start)
			if in != nil {
				in.Close()
				if err := Uninstall(context.Background(), opts); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	for i, c := range configs {
		b.ReportMetric(float64(elapsed[i].Nanoseconds())/float64(block*b.N), "ns/conn-"+c.name)
	}
}

func noopProgram(b *testing.B, typ ebpf.ProgramType) *ebpf.Program {
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

func swapPinned(b *testing.B, opts Options, program string, with *ebpf.Program) {
	l, err := link.LoadPinnedLink(linkPin(opts.PinDir, program), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	if err := l.Update(with); err != nil {
		b.Fatal(err)
	}
}
