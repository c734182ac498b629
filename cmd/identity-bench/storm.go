package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// stormResult is what a storm measured.
type stormResult struct {
	Kind      string `json:"kind"`
	Sandboxes int    `json:"sandboxes"`
	// Served is how many sandboxes got their token.
	Served int `json:"served"`
	// Last is the time until the last sandbox had its token: from the
	// storm's start (start storm) or from the restarted daemon's readiness
	// (restart storm); P50 the median sandbox's.
	Last float64 `json:"last_s"`
	P50  float64 `json:"p50_s"`
	// Floor is N x the one-core cost of a signature of the algorithm
	// divided by the cores.
	Floor     float64 `json:"sign_floor_s"`
	PerSignUS float64 `json:"per_sign_us"`
	Cores     int     `json:"cores"`
	// FloorAllCores is N over the signing rate measured with a goroutine
	// per core: Floor as these cores really scale (two vCPUs are seldom
	// two whole cores).
	FloorAllCores float64 `json:"sign_floor_all_cores_s"`
	// Restart storm: how long the daemon was dead and took to be ready.
	Down       float64  `json:"down_s,omitempty"`
	AskEvery   float64  `json:"ask_every_s,omitempty"`
	ReadyAfter float64  `json:"ready_after_start_s,omitempty"`
	Errors     []string `json:"errors,omitempty"`
	// Start storm: every round against every target, and per target over
	// the rounds (Last and P50 above are then identityd's medians).
	Rounds  []stormRound   `json:"rounds,omitempty"`
	Targets []stormSummary `json:"targets,omitempty"`
}

func (s *stormResult) print() {
	fmt.Printf("%s storm, %d sandboxes: %d served; last %.3fs, median %.3fs", s.Kind, s.Sandboxes, s.Served, s.Last, s.P50)
	if s.Kind == "restart" {
		fmt.Printf(" after readiness (daemon dead %.1fs, ready %.2fs after its start)", s.Down, s.ReadyAfter)
	} else {
		fmt.Print(" after the storm began")
	}
	fmt.Printf("\nsignature floor: %d x %.0fus / %d cores = %.3fs; last / floor = %.2f\n",
		s.Sandboxes, s.PerSignUS, s.Cores, s.Floor, s.Last/max(s.Floor, 1e-9))
	if s.FloorAllCores > 0 {
		fmt.Printf("signing %d tokens at the rate measured on all cores: %.3fs; last / that = %.2f\n",
			s.Sandboxes, s.FloorAllCores, s.Last/s.FloorAllCores)
	}
	for _, t := range s.Targets {
		fmt.Printf("  %-9s last %.3fs [%.3f-%.3f], median sandbox %.3fs, %.0f us CPU per token, %d failed; last / floor = %.2f\n",
			t.Target, t.Last[1], t.Last[0], t.Last[2], t.P50[1], t.CPUPerToken, t.Failures, t.Last[1]/max(s.Floor, 1e-9))
	}
	for _, e := range s.Errors {
		fmt.Printf("storm error: %s\n", e)
	}
}

// measureFloor measures the one-core signature cost and the rate on all
// cores, once.
func measureFloor(h *harness, alg string) (signFloor, error) {
	return measureSign(filepath.Join(h.dir, "storm"), alg, time.Second)
}

// setFloor sets the storm's floor, a signature per sandbox spread over the
// cores, from the medians of the sign-only loops fs (one per round of a
// start storm, interleaved with them: as noisy as any figure here).
func (s *stormResult) setFloor(fs []signFloor) {
	var perSign, rates []float64
	for _, f := range fs {
		perSign, rates = append(perSign, f.PerSignUS), append(rates, f.Rate)
		s.Cores = f.Cores
	}
	slices.Sort(perSign)
	slices.Sort(rates)
	s.PerSignUS = median(perSign)
	s.Floor = float64(s.Sandboxes) * s.PerSignUS / 1e6 / float64(max(s.Cores, 1))
	if r := median(rates); r > 0 {
		s.FloorAllCores = float64(s.Sandboxes) / r
	}
}

// stormRound is one start storm against one target.
type stormRound struct {
	Target string  `json:"target"`
	Round  int     `json:"round"`
	Served int     `json:"served"`
	Last   float64 `json:"last_s"`
	P50    float64 `json:"p50_s"`
	// CPU is the target server's CPU seconds from the storm's start until
	// the last token (identityd's process, or the server process's).
	CPU    float64  `json:"cpu_s"`
	Errors []string `json:"errors,omitempty"`
}

// stormSummary is a target's start storms over the rounds.
type stormSummary struct {
	Target string     `json:"target"`
	Last   [3]float64 `json:"last_s_min_med_max"`
	P50    [3]float64 `json:"p50_s_min_med_max"`
	// CPUPerToken is the server's CPU per sandbox's first token (median).
	CPUPerToken float64 `json:"cpu_us_per_token_median"`
	Failures    int     `json:"failures"`
}

// startStorm: every sandbox (made, its client started) asks for its first
// token at the same moment, with the client package's backoff; round by
// round against each target in turn, each round with an audience of its
// own so that it is a first token for identityd's cache too. The bare
// handler's storm is what the same clients cost without a token server:
// beside the signature floor, the other part a storm cannot go below.
func startStorm(ctx context.Context, h *harness, r *runCmd, p *progressLine) (*stormResult, error) {
	s := &stormResult{Kind: "start", Sandboxes: len(h.sandboxes)}
	srv, err := startServerProcess(h, r.Alg)
	if err != nil {
		return nil, err
	}
	defer srv.close()
	var floors []signFloor
	for round := 1; round <= max(r.Rounds, 1); round++ {
		f, err := measureFloor(h, r.Alg)
		if err != nil {
			return nil, err
		}
		floors = append(floors, f)
		for _, target := range r.Targets {
			sr, err := oneStartStorm(ctx, h, srv, r, target, round, p)
			if err != nil {
				return nil, err
			}
			s.Rounds = append(s.Rounds, sr)
			// A pause, so that one storm's stragglers (closing
			// connections, exiting goroutines) are not the next one's load.
			if err := sleep(ctx, time.Second); err != nil {
				return nil, err
			}
		}
	}
	s.setFloor(floors)
	s.summarize(r.Targets)
	return s, ctx.Err()
}

func oneStartStorm(ctx context.Context, h *harness, srv *serverProc, r *runCmd, target string, round int, p *progressLine) (stormRound, error) {
	sr := stormRound{Target: target, Round: round}
	pid := srv.pid()
	if target == "identityd" {
		pid = h.daemon.Process.Pid
	}
	aud := fmt.Sprintf("storm-%d", round)
	var start time.Time
	cpu0 := make(chan time.Duration, 1)
	var t0 *time.Timer
	waitProfile := func() error { return nil }
	defer func() {
		if err := waitProfile(); err != nil {
			fmt.Fprintf(os.Stderr, "identity-bench: %v\n", err)
		}
	}()
	// startAt sets the storm's start, when the server's CPU time is read.
	startAt := func(wait time.Duration) time.Time {
		start = time.Now().Add(wait)
		t0 = time.AfterFunc(wait, func() {
			c, _ := procCPU(pid)
			cpu0 <- c
		})
		if h.pprof != "" && target == "identityd" && round == 1 {
			file := filepath.Join(r.Profile, fmt.Sprintf("identityd-%s-start-storm-n%d-%s-cpu.pprof", r.Alg, len(h.sandboxes), r.StormClients))
			waitProfile = h.profile(ctx, 2*time.Second, file)
		}
		return start
	}
	var times []float64
	var errs []error
	progress := func(served int64) {
		p.show(false, "[round %d/%d] start storm, %-9s %d/%d sandboxes have a token", round, r.Rounds, target, served, len(h.sandboxes))
	}
	if r.StormClients == "shared" {
		var err error
		times, errs, err = sharedFirstTokens(ctx, h, target, aud, r.Parallelism, func() time.Time { return startAt(200 * time.Millisecond) }, progress)
		if err != nil {
			return sr, err
		}
	} else {
		times, errs = ownFirstTokens(h, target, aud, startAt(200*time.Millisecond+time.Duration(len(h.sandboxes))*50*time.Microsecond), progress)
	}
	cpu1, _ := procCPU(pid)
	if !t0.Stop() { // (it ran, or runs: every client waits for start)
		sr.CPU = (cpu1 - <-cpu0).Seconds()
	}
	var one stormResult
	one.fill(times, errs)
	sr.Served, sr.Last, sr.P50, sr.Errors = one.Served, one.Last, one.P50, one.Errors
	return sr, ctx.Err()
}

// ownFirstTokens has each sandbox's client process ask for its first token
// at start, as workloads starting at once would.
func ownFirstTokens(h *harness, target, aud string, start time.Time, progress func(served int64)) ([]float64, []error) {
	times := make([]float64, len(h.sandboxes))
	errs := make([]error, len(h.sandboxes))
	for i, sb := range h.sandboxes {
		if err := sb.client.send(job{Kind: "first", URL: targetURL(target, h.router, sb), Secret: sb.secret, Start: start.UnixNano(),
			Duration: 2 * time.Minute, Audience: aud}); err != nil {
			errs[i] = err
		}
	}
	var served atomic.Int64
	var wg sync.WaitGroup
	for i, sb := range h.sandboxes {
		if errs[i] != nil {
			continue
		}
		wg.Go(func() {
			rep, err := sb.client.wait(func(report) {})
			switch {
			case err != nil:
				errs[i] = err
			case len(rep.Successes) == 0:
				errs[i] = fmt.Errorf("no token: %s", rep.Error)
			default:
				times[i] = time.Unix(0, rep.Successes[0]).Sub(start).Seconds()
				progress(served.Add(1))
			}
		})
	}
	wg.Wait()
	return times, errs
}

// summarize fills the per-target summaries, and the result's own figures
// with identityd's medians.
func (s *stormResult) summarize(targets []string) {
	for _, t := range targets {
		var last, p50, cpu []float64
		sum := stormSummary{Target: t}
		for _, sr := range s.Rounds {
			if sr.Target != t {
				continue
			}
			sum.Failures += s.Sandboxes - sr.Served
			if sr.Served == 0 {
				continue
			}
			last, p50 = append(last, sr.Last), append(p50, sr.P50)
			cpu = append(cpu, sr.CPU/float64(sr.Served)*1e6)
		}
		sum.Last, sum.P50 = minMedMax(last), minMedMax(p50)
		slices.Sort(cpu)
		sum.CPUPerToken = median(cpu)
		s.Targets = append(s.Targets, sum)
		if t == "identityd" {
			// Served: what every round served at least.
			s.Last, s.P50, s.Served = sum.Last[1], sum.P50[1], s.Sandboxes
			for _, sr := range s.Rounds {
				if sr.Target == t {
					s.Served = min(s.Served, sr.Served)
					s.Errors = append(s.Errors, sr.Errors...)
				}
			}
		}
	}
}

// restartStorm: every sandbox asks for a token every interval, each ask
// retrying with the client package's backoff; the daemon is killed with
// SIGKILL, stays dead r.StormDown, and is started again. The figure is the
// time from its readiness until every sandbox has had a token since.
func restartStorm(ctx context.Context, h *harness, r *runCmd, p *progressLine) (*stormResult, error) {
	s := &stormResult{Kind: "restart", Sandboxes: len(h.sandboxes)}
	f, err := measureFloor(h, r.Alg)
	if err != nil {
		return nil, err
	}
	s.setFloor([]signFloor{f})
	n := len(h.sandboxes)
	// Spread the asks over the interval, as workloads started at different
	// times would.
	interval := r.askEvery()
	s.AskEvery = interval.Seconds()
	start := time.Now().Add(200*time.Millisecond + time.Duration(n)*50*time.Microsecond)
	for i, sb := range h.sandboxes {
		at := start.Add(interval * time.Duration(i) / time.Duration(n))
		if err := sb.client.send(job{Kind: "keep", URL: sb.url, Secret: sb.secret, Start: at.UnixNano(), Interval: interval}); err != nil {
			return nil, err
		}
	}
	var mu sync.Mutex
	var killedAt, readyAt time.Time
	first := make([]time.Time, n) // first token after the kill
	var served atomic.Int64
	allServed := make(chan struct{})
	reports := make([]report, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, sb := range h.sandboxes {
		wg.Go(func() {
			reports[i], errs[i] = sb.client.wait(func(rep report) {
				mu.Lock()
				defer mu.Unlock()
				if killedAt.IsZero() || len(rep.Successes) == 0 || !first[i].IsZero() {
					return
				}
				if t := time.Unix(0, rep.Successes[0]); t.After(killedAt) {
					first[i] = t
					if served.Add(1) == int64(n) {
						close(allServed)
					}
					p.show(false, "restart storm: %d/%d sandboxes served since the restart", served.Load(), n)
				}
			})
		})
	}
	stopAll := func() {
		for _, sb := range h.sandboxes {
			sb.client.stop()
		}
		wg.Wait()
	}
	// Everyone has asked at least once before the kill.
	p.show(true, "restart storm: %d sandboxes asking every %s", n, interval)
	if err := sleep(ctx, interval+time.Second); err != nil {
		stopAll()
		return nil, err
	}
	mu.Lock()
	killedAt = time.Now()
	mu.Unlock()
	h.killDaemon(syscall.SIGKILL)
	p.show(true, "restart storm: identityd killed with SIGKILL; down for %s", r.StormDown)
	if err := sleep(ctx, r.StormDown); err != nil {
		stopAll()
		return nil, err
	}
	s.Down = time.Since(killedAt).Seconds()
	restartBegin := time.Now()
	ready, err := h.startDaemon(ctx)
	if err != nil {
		stopAll()
		return nil, fmt.Errorf("restart identityd: %w", err)
	}
	readyAt = restartBegin.Add(ready)
	s.ReadyAfter = ready.Seconds()
	p.show(true, "restart storm: identityd ready again after %s", ready.Round(time.Millisecond))
	select {
	case <-allServed:
	case <-time.After(90 * time.Second):
	case <-ctx.Done():
	}
	stopAll()
	times := make([]float64, n)
	for i := range first {
		if !first[i].IsZero() {
			// A token between the kill and the readiness cannot be: the
			// daemon was dead. Count from readiness.
			times[i] = max(first[i].Sub(readyAt).Seconds(), 0)
		} else if errs[i] == nil {
			errs[i] = errors.New("no token after the restart within 90s")
		}
	}
	s.fill(times, errs)
	return s, ctx.Err()
}

func (s *stormResult) fill(times []float64, errs []error) {
	var ok []float64
	for i, t := range times {
		if errs[i] != nil {
			if len(s.Errors) < 10 {
				s.Errors = append(s.Errors, errs[i].Error())
			}
			continue
		}
		ok = append(ok, t)
	}
	s.Served = len(ok)
	if len(ok) > 0 {
		slices.Sort(ok)
		s.Last = ok[len(ok)-1]
		s.P50 = median(ok)
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// askEvery is how often each sandbox asks in a restart storm.
func (r *runCmd) askEvery() time.Duration { return max(r.StormEvery, 100*time.Millisecond) }

// checkStorm refuses a restart storm whose asks are not more frequent than
// the outage: a sandbox that does not ask while the daemon is down would be
// counted when its schedule comes round, not when it is served.
func (r *runCmd) checkStorm() error {
	if r.StormClients == "shared" && r.Storm != "start" {
		return errors.New("--storm-clients shared is for --storm start")
	}
	if r.Storm == "restart" && r.askEvery() >= r.StormDown {
		return fmt.Errorf("--storm-every %s must be shorter than --storm-down %s", r.askEvery(), r.StormDown)
	}
	return nil
}
