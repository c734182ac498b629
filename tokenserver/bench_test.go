package tokenserver

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// switchAttester answers either from the kernel or, as the baseline, from a
// map of source addresses: the old server's way, without the kernel's cost.
type switchAttester struct {
	kernel  Attester
	trivial atomic.Bool
	byAddr  map[netip.Addr]bpf.Record
}

func (s *switchAttester) Lookup(c syscall.Conn) (bpf.Record, error) {
	if !s.trivial.Load() {
		return s.kernel.Lookup(c)
	}
	remote := c.(net.Conn).RemoteAddr().(*net.TCPAddr).AddrPort()
	rec, ok := s.byAddr[remote.Addr().Unmap()]
	if !ok {
		return bpf.Record{}, bpf.ErrNoRecord
	}
	return rec, nil
}

// BenchmarkIssuance measures token issuance from two sandboxed clients,
// each request on a new connection (so each pays for attestation), with the
// kernel attesting callers and with a trivial in-memory lookup by source
// address, interleaved in blocks within one run. b.N counts requests per
// configuration.
//
//	go test -run '^$' -bench Issuance -benchtime 2000x -count 3 ./tokenserver/
//
// Reported per algorithm: requests/s and p50/p99 latency for both, and
// attested-throughput-ratio (target >= 0.9).
func BenchmarkIssuance(b *testing.B) {
	for _, alg := range []string{RS256, ES256, EdDSA} {
		b.Run(alg, func(b *testing.B) { benchmarkIssuance(b, alg) })
	}
}

func benchmarkIssuance(b *testing.B, alg string) {
	e := newEnv(b, envOptions{alg: alg})
	sbA, a, secretA := e.sandbox("a", "web", "")
	sbB, c, secretB := e.sandbox("b", "web", "")
	sw := &switchAttester{kernel: e.in, byAddr: map[netip.Addr]bpf.Record{
		sbA.Addr4: {CgroupID: sbA.CgroupID, NetnsCookie: sbA.NetnsCookie},
		sbB.Addr4: {CgroupID: sbB.CgroupID, NetnsCookie: sbB.NetnsCookie},
	}}
	e.stop()
	e.serve(envOptions{attester: sw, rate: rate.Inf, burst: 1})
	endpoints := []netip.AddrPort{netip.AddrPortFrom(e.w.Router4, port), netip.AddrPortFrom(e.w.Router6, port)}

	type clientLoad struct {
		c      *sandboxtest.Client
		secret string
	}
	clients := []clientLoad{{a, secretA}, {c, secretB}}
	type stats struct {
		lat     []time.Duration
		elapsed time.Duration
	}
	var results [2]stats // [trivial]
	const block = 100
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; done, round = done+block, round+1 {
		n := min(block, b.N-done)
		for _, trivial := range [2]bool{round%2 == 0, round%2 != 0} {
			sw.trivial.Store(trivial)
			// Without attestation the kernel need not publish anything.
			eps := endpoints
			if trivial {
				eps = nil
			}
			if err := e.in.SetEndpoints(eps); err != nil {
				b.Fatal(err)
			}
			var mu sync.Mutex
			var wg sync.WaitGroup
			start := time.Now()
			for i, cl := range clients {
				// Split the block between the clients.
				share := n / len(clients)
				if i == 0 {
					share += n % len(clients)
				}
				wg.Go(func() {
					res, err := cl.c.Load(sandboxtest.HTTPRequest{Method: "GET", URL: e.issuer + "/v1/token",
						Header: map[string]string{"Authorization": bearer(cl.secret)}}, share)
					if err != nil || res.Failures > 0 {
						b.Errorf("load (trivial=%v): %v, %d failures", trivial, err, res.Failures)
						return
					}
					mu.Lock()
					results[b2i(trivial)].lat = append(results[b2i(trivial)].lat, res.Latencies...)
					mu.Unlock()
				})
			}
			wg.Wait()
			results[b2i(trivial)].elapsed += time.Since(start)
		}
	}
	b.StopTimer()

	name := [2]string{"attested", "trivial"}
	for i := range results {
		r := &results[i]
		slices.Sort(r.lat)
		rps := float64(len(r.lat)) / r.elapsed.Seconds()
		b.ReportMetric(rps, "req/s-"+name[i])
		b.ReportMetric(ms(percentile(r.lat, 0.50)), "p50-ms-"+name[i])
		b.ReportMetric(ms(percentile(r.lat, 0.99)), "p99-ms-"+name[i])
	}
	ratio := (float64(len(results[0].lat)) / results[0].elapsed.Seconds()) /
		(float64(len(results[1].lat)) / results[1].elapsed.Seconds())
	b.ReportMetric(ratio, "attested-throughput-ratio")
}

func b2i(v bool) int {
	if v {
		return 1
	}
	return 0
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

// BenchmarkTokenCache measures issuance with the token cache (the default)
// and without it (every request signed), per algorithm, from two sandboxed
// clients through the kernel's attestation, on a new connection per request
// and on keep-alive connections. Both servers run at once on two ports of
// the router and are asked in alternate blocks, so that a busy machine
// weighs on both alike. Every request asks for the default audience and
// lifetime: with the cache, all but the first are reuses. b.N counts
// requests per configuration.
//
//	go test -run '^$' -bench TokenCache -benchtime 2000x -count 5 ./tokenserver/
//
// Reported: requests/s for both, p50/p99 latency (new connections only),
// and cached/uncached throughput.
func BenchmarkTokenCache(b *testing.B) {
	for _, alg := range []string{RS256, ES256, EdDSA} {
		for _, mode := range []string{"newconn", "keepalive"} {
			b.Run(alg+"/"+mode, func(b *testing.B) { benchmarkTokenCache(b, alg, mode == "keepalive") })
		}
	}
}

func benchmarkTokenCache(b *testing.B, alg string, keepAlive bool) {
	e := newEnv(b, envOptions{alg: alg})
	_, a, secretA := e.sandbox("a", "web", "")
	_, c, secretB := e.sandbox("b", "web", "")
	e.stop()
	e.serve(envOptions{rate: rate.Inf, burst: 1})
	const uncachedPort = port + 1
	uncached, err := New(Config{Issuer: e.issuer, Attester: e.in, Registry: e.reg, Secrets: e.secrets, Keys: e.keys,
		Logger: quiet, RateLimit: rate.Inf, Burst: 1, DisableTokenCache: true})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := e.w.Listen("tcp", fmt.Sprintf(":%d", uncachedPort))
	if err != nil {
		b.Fatal(err)
	}
	hs := uncached.HTTPServer()
	go hs.Serve(uncached.Listener(ln))
	b.Cleanup(func() { ln.Close(); hs.Close() })
	if err := e.in.SetEndpoints([]netip.AddrPort{netip.AddrPortFrom(e.w.Router4, port), netip.AddrPortFrom(e.w.Router4, uncachedPort)}); err != nil {
		b.Fatal(err)
	}
	urls := [2]string{ // [cached, uncached]
		fmt.Sprintf("http://%s/v1/token", netip.AddrPortFrom(e.w.Router4, port)),
		fmt.Sprintf("http://%s/v1/token", netip.AddrPortFrom(e.w.Router4, uncachedPort)),
	}

	type clientLoad struct {
		c      *sandboxtest.Client
		secret string
	}
	clients := []clientLoad{{a, secretA}, {c, secretB}}
	type stats struct {
		n       int
		lat     []time.Duration
		elapsed time.Duration
	}
	var results [2]stats
	const block = 100
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; done, round = done+block, round+1 {
		n := min(block, b.N-done)
		for _, which := range [2]int{round % 2, 1 - round%2} {
			var mu sync.Mutex
			var wg sync.WaitGroup
			start := time.Now()
			for i, cl := range clients {
				share := n / len(clients)
				if i == 0 {
					share += n % len(clients)
				}
				if share == 0 {
					continue
				}
				wg.Go(func() {
					req := sandboxtest.HTTPRequest{Method: "GET", URL: urls[which],
						Header: map[string]string{"Authorization": bearer(cl.secret)}}
					var lat []time.Duration
					if keepAlive {
						req.Repeat = share
						resps, err := cl.c.HTTP(req)
						if err != nil || len(resps) != share {
							b.Errorf("keep-alive load: %v, %d responses", err, len(resps))
							return
						}
						for _, r := range resps {
							if r.Status != 200 {
								b.Errorf("keep-alive load: status %d: %s", r.Status, r.Body)
								return
							}
						}
					} else {
						res, err := cl.c.Load(req, share)
						if err != nil || res.Failures > 0 {
							b.Errorf("load: %v, %d failures", err, res.Failures)
							return
						}
						lat = res.Latencies
					}
					mu.Lock()
					results[which].n += share
					results[which].lat = append(results[which].lat, lat...)
					mu.Unlock()
				})
			}
			wg.Wait()
			results[which].elapsed += time.Since(start)
		}
	}
	b.StopTimer()

	name := [2]string{"cached", "uncached"}
	var rps [2]float64
	for i := range results {
		r := &results[i]
		rps[i] = float64(r.n) / r.elapsed.Seconds()
		b.ReportMetric(rps[i], "req/s-"+name[i])
		if !keepAlive {
			slices.Sort(r.lat)
			b.ReportMetric(ms(percentile(r.lat, 0.50)), "p50-ms-"+name[i])
			b.ReportMetric(ms(percentile(r.lat, 0.99)), "p99-ms-"+name[i])
		}
	}
	b.ReportMetric(rps[0]/rps[1], "cached/uncached")
}

// BenchmarkSignOrReuse is the server's own part of an issuance, without
// HTTP or the kernel: a signature per request (cache off) against a reuse
// from the cache, per algorithm.
//
//	go test -run '^$' -bench SignOrReuse -count 5 ./tokenserver/
func BenchmarkSignOrReuse(b *testing.B) {
	for _, alg := range []string{RS256, ES256, EdDSA} {
		keys, err := OpenKeys(filepath.Join(b.TempDir(), alg), alg, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, cached := range []bool{false, true} {
			name := alg + "/sign"
			if cached {
				name = alg + "/cached"
			}
			b.Run(name, func(b *testing.B) {
				s, err := New(Config{Issuer: "http://10.0.0.1:7123", Attester: fakeAttester{}, Registry: fakeRegistry{},
					Secrets: fakeSecrets{}, Keys: keys, Logger: quiet, Node: "n", DisableTokenCache: !cached})
				if err != nil {
					b.Fatal(err)
				}
				sb := registry.Sandbox{ID: "sb-a", App: "web", CgroupID: 10, NetnsCookie: 20}
				aud := []string{"miren"}
				b.ReportAllocs()
				for b.Loop() {
					if _, err := s.signOrReuse(sb, fuzzSecret, aud, DefaultTTL, s.cacheGeneration()); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkServeToken measures the token handler alone, from an attested
// request to the written answer, with the token cache answering: what a
// workload refreshing its token costs beside HTTP. Its allocations are what
// the garbage collector pays for per request.
//
//	go test -run '^$' -bench ServeToken -benchmem ./tokenserver/
func BenchmarkServeToken(b *testing.B) {
	keys, err := OpenKeys(filepath.Join(b.TempDir(), ES256), ES256, nil)
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{Issuer: "http://10.0.0.1:7123", Attester: fakeAttester{ok: true}, Registry: fakeRegistry{},
		Secrets: fakeSecrets{}, Keys: keys, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Node: "n",
		RateLimit: rate.Inf})
	if err != nil {
		b.Fatal(err)
	}
	h := s.Handler()
	ctx := context.WithValue(context.Background(), attestationKey{}, &attestation{rec: bpf.Record{CgroupID: 10, NetnsCookie: 20}})
	req := httptest.NewRequestWithContext(ctx, http.MethodGet, "/v1/token?audience=bench", nil)
	req.Header.Set("Authorization", "Bearer "+fuzzSecret)
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("HTTP %d: %s", w.Code, w.Body)
		}
	}
}
