package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"
)

// BenchmarkFleetScale simulates a fleet: scaleNodes Stores (the daemon's
// code path, each with its own etcd client, leases, renewals and watch)
// against a 3-member cluster, each publishing one key. It reports:
//
//   - steady_revisions/s and renewals/s: the raft writes and lease renewals
//     the idle fleet costs etcd;
//   - reach_all_p50_ms / reach_all_p99_ms: from the start of one node's
//     PublishKey until every node's JWKS holds the key, over propagation
//     rounds; reach_each_p50_ms / reach_each_p99_ms per (round, node);
//   - wave_writes/s and wave_reach_all_ms: every node rotating at once;
//   - jwks_keys and jwks_bytes (the JSON served) after the wave.
//
// It is a benchmark so `make test` never runs it; run it with
//
//	go test -run '^$' -bench BenchmarkFleetScale -benchtime 1x ./fleet/
func BenchmarkFleetScale(b *testing.B) {
	const (
		scaleNodes = 300
		rounds     = 30
		idleWindow = 6 * time.Second
		// waveConcurrency publications in flight at once: a fleet's
		// rotations are spread in time; this is a burst well above that.
		waveConcurrency = 16
	)
	f := newTestFleet(b)
	ctx := context.Background()
	cli := f.c.Client(b)
	b.ReportMetric(putRate(b, cli, f.prefix+"baseline/", waveConcurrency, 3*time.Second), "raw_puts/s")
	stores := make([]*Store, scaleNodes)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range stores {
		g.Go(func() error {
			o := f.options(b, fmt.Sprintf("node-%03d", i))
			o.KeyLifetime = time.Hour // production-like: renewals every 2 s
			o.Logger = slog.New(slog.DiscardHandler)
			s, err := f.openErr(b, o)
			if err != nil {
				return err
			}
			stores[i] = s
			pub, _ := newKey(b)
			return s.PublishKey(gctx, pub)
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	waitAll(b, stores, func(s *Store) bool { return s.jwksKeys() == scaleNodes })

	// The idle fleet: raft writes (revisions) and renewals per second.
	rev0 := revision(b, cli)
	ren0 := renewals(stores)
	time.Sleep(idleWindow)
	b.ReportMetric(float64(revision(b, cli)-rev0)/idleWindow.Seconds(), "steady_revisions/s")
	b.ReportMetric((renewals(stores)-ren0)/idleWindow.Seconds(), "renewals/s")

	// Propagation of one new key to every node.
	var all, each []time.Duration
	for r := 0; r < rounds; r++ {
		pub, _ := newKey(b)
		src := stores[(r*37)%scaleNodes]
		start := time.Now()
		waits := waitKid(stores, pub.KeyID, start)
		if err := src.PublishKey(ctx, pub); err != nil {
			b.Fatal(err)
		}
		ds := collect(b, waits)
		each = append(each, ds...)
		all = append(all, slices.Max(ds))
		src.RetireKey(pub.KeyID)
	}
	b.ReportMetric(ms(pct(all, 50)), "reach_all_p50_ms")
	b.ReportMetric(ms(pct(all, 99)), "reach_all_p99_ms")
	b.ReportMetric(ms(pct(each, 50)), "reach_each_p50_ms")
	b.ReportMetric(ms(pct(each, 99)), "reach_each_p99_ms")

	// A rotation wave: every node publishes a new key at once.
	want := len(stores[0].JWKS().Keys) + scaleNodes
	rev0 = revision(b, cli)
	cpu0 := cpuTime(b)
	start := time.Now()
	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(waveConcurrency)
	for _, s := range stores {
		g.Go(func() error {
			pub, _ := newKey(b)
			return s.PublishKey(gctx, pub)
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	took := time.Since(start)
	b.ReportMetric(float64(revision(b, cli)-rev0)/took.Seconds(), "wave_writes/s")
	waitAll(b, stores, func(s *Store) bool { return s.jwksKeys() >= want })
	b.ReportMetric(ms(time.Since(start)), "wave_reach_all_ms")
	// CPU the simulating process spent in the wave (300 nodes' clients
	// and watches share this machine's cores with etcd).
	b.ReportMetric((cpuTime(b) - cpu0).Seconds(), "wave_sim_cpu_s")

	set := stores[0].JWKS()
	body, err := json.Marshal(set)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(len(set.Keys)), "jwks_keys")
	b.ReportMetric(float64(len(body)), "jwks_bytes")
}

// BenchmarkJWKSBuild measures, for fleets of several sizes, applying one
// watch event, building the JWKS (once per change, on the first read) and
// encoding it (JWKSJSON, cached likewise).
func BenchmarkJWKSBuild(b *testing.B) {
	for _, n := range []int{100, 300, 1000, 3000} {
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) {
			s := &Store{m: newMetrics(), prefix: DefaultPrefix, log: slog.New(slog.DiscardHandler)}
			s.jwks.byKey = make(map[string]jose.JSONWebKey, n)
			s.jwks.kids = make(map[string]int, n)
			for i := 0; i < n; i++ {
				pub, _ := newKey(b)
				value, err := json.Marshal(pub)
				if err != nil {
					b.Fatal(err)
				}
				s.putLocked(s.keyKey(fmt.Sprintf("node-%04d", i), pub.KeyID), value)
			}
			// One watch event: every node pays this for every key published
			// anywhere in the fleet.
			b.Run("apply", func(b *testing.B) {
				pub, _ := newKey(b)
				value, err := json.Marshal(pub)
				if err != nil {
					b.Fatal(err)
				}
				key := s.keyKey("node-x", pub.KeyID)
				for b.Loop() {
					s.putLocked(key, value)
				}
			})
			b.Run("build", func(b *testing.B) {
				for b.Loop() {
					s.buildLocked()
				}
			})
			b.Run("json", func(b *testing.B) {
				set := s.buildLocked()
				var size int
				for b.Loop() {
					body, err := json.Marshal(set)
					if err != nil {
						b.Fatal(err)
					}
					size = len(body)
				}
				b.ReportMetric(float64(size), "bytes")
			})
		})
	}
}

// putRate is how many plain puts per second etcd takes from conc writers,
// the baseline for the fleet's figures on this machine.
func putRate(b *testing.B, cli *clientv3.Client, prefix string, conc int, d time.Duration) float64 {
	b.Helper()
	var mu sync.Mutex
	n := 0
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				if _, err := cli.Put(ctx, fmt.Sprintf("%s%d/%d", prefix, w, i), "x"); err == nil {
					mu.Lock()
					n++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return float64(n) / d.Seconds()
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func revision(b *testing.B, cli *clientv3.Client) int64 {
	b.Helper()
	resp, err := cli.Get(context.Background(), "/")
	if err != nil {
		b.Fatal(err)
	}
	return resp.Header.Revision
}

func (s *Store) jwksKeys() int {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	return len(s.jwks.kids)
}

func renewals(stores []*Store) float64 {
	var n float64
	for _, s := range stores {
		n += testutil.ToFloat64(s.m.renewals.WithLabelValues(renewOK))
	}
	return n
}

// waitKid starts one waiter per store; each sends how long after start its
// store's JWKS first held kid.
func waitKid(stores []*Store, kid string, start time.Time) []chan time.Duration {
	out := make([]chan time.Duration, len(stores))
	for i, s := range stores {
		out[i] = make(chan time.Duration, 1)
		go func() {
			timeout := time.After(30 * time.Second)
			for {
				ch := s.Changed()
				if s.HasKey(kid) {
					out[i] <- time.Since(start)
					return
				}
				select {
				case <-ch:
				case <-timeout:
					out[i] <- -1
					return
				}
			}
		}()
	}
	return out
}

func collect(b *testing.B, waits []chan time.Duration) []time.Duration {
	ds := make([]time.Duration, len(waits))
	for i, w := range waits {
		ds[i] = <-w
		if ds[i] < 0 {
			b.Fatalf("node %d never saw the key", i)
		}
	}
	return ds
}

func waitAll(b *testing.B, stores []*Store, cond func(*Store) bool) {
	b.Helper()
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			deadline := time.After(60 * time.Second)
			for {
				ch := s.Changed()
				if cond(s) {
					return
				}
				select {
				case <-ch:
				case <-deadline:
					b.Errorf("%s: condition not met within 60 s (%d keys)", s.Node(), s.jwksKeys())
					return
				}
			}
		}()
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
}

func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
