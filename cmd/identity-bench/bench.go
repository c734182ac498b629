package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/identityd/identityd/controllers"
)

// measurement is one target, one mode, one round.
type measurement struct {
	Target string `json:"target"`
	Mode   string `json:"mode"`
	Round  int    `json:"round"`
	// Sandboxes is how many existed while it was measured.
	Sandboxes int            `json:"sandboxes"`
	Requests  int            `json:"requests"`
	Failures  int            `json:"failures"`
	Errors    map[string]int `json:"errors,omitempty"`
	Elapsed   float64        `json:"elapsed_s"`
	// Throughput is successful requests per second.
	Throughput float64 `json:"throughput"`
	P50        float64 `json:"p50_ms"`
	P90        float64 `json:"p90_ms"`
	P99        float64 `json:"p99_ms"`
	Max        float64 `json:"max_ms"`
	// CPU is the server process's CPU seconds over the measured window:
	// identityd's for identityd, this process's (which serves the
	// baseline and the bare handler) for the others.
	CPU float64 `json:"cpu_s"`
	// CPUPerRequest is CPU microseconds per successful request.
	CPUPerRequest float64 `json:"cpu_us_per_request"`
}

// summary is a target and mode over all rounds: min, median and max.
type summary struct {
	Target     string     `json:"target"`
	Mode       string     `json:"mode"`
	Sandboxes  int        `json:"sandboxes"`
	Rounds     int        `json:"rounds"`
	Throughput [3]float64 `json:"throughput_min_med_max"`
	P50        float64    `json:"p50_ms_median"`
	P90        float64    `json:"p90_ms_median"`
	P99        [3]float64 `json:"p99_ms_min_med_max"`
	Max        float64    `json:"max_ms_max"`
	CPUPerReq  float64    `json:"cpu_us_per_request_median"`
	Failures   int        `json:"failures"`
}

type ratio struct {
	Mode      string `json:"mode"`
	Sandboxes int    `json:"sandboxes"`
	// Of medians: identityd / baseline, identityd / bare HTTP, identityd /
	// the all-cores sign-only rate of its algorithm.
	VsBaseline float64 `json:"identityd_over_baseline,omitempty"`
	VsHTTP     float64 `json:"identityd_over_http,omitempty"`
	VsSign     float64 `json:"identityd_over_sign,omitempty"`
	// Min, median and max of the same ratios taken round by round: the
	// two targets of a round are measured seconds apart, so what the
	// machine does from one round to the next cancels, where the ratio
	// of medians may pair a fast round of one with a slow one of the
	// other.
	VsBaselineRounds [3]float64 `json:"identityd_over_baseline_per_round,omitzero"`
	VsHTTPRounds     [3]float64 `json:"identityd_over_http_per_round,omitzero"`
}

// growth is a target's throughput with --grow-to sandboxes over that with
// --sandboxes, in one mode.
type growth struct {
	Target string `json:"target"`
	Mode   string `json:"mode"`
	From   int    `json:"from_sandboxes"`
	To     int    `json:"to_sandboxes"`
	// PerRound is min, median and max of the rounds' own ratios: each
	// round measures both sizes, so drift between rounds cancels.
	PerRound [3]float64 `json:"per_round_min_med_max"`
	// OfMedians is the median throughput at To over that at From.
	OfMedians float64 `json:"of_medians"`
}

type machine struct {
	CPUs       int    `json:"cpus"`
	Kernel     string `json:"kernel"`
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}

type config struct {
	Sandboxes int    `json:"sandboxes"`
	Clients   int    `json:"clients_per_sandbox"`
	Active    int    `json:"active_sandboxes,omitempty"`
	GrowTo    int    `json:"grow_to,omitempty"`
	Duration  string `json:"duration"`
	Requests  int    `json:"requests_per_client,omitempty"`
	Alg       string `json:"alg"`
	Audience  string `json:"audience"`
	Rounds    int    `json:"rounds"`
	Identityd string `json:"identityd"`
	// HeldSocket: the token socket was held across the daemon's restarts
	// (--hold-socket), as under systemd socket activation.
	HeldSocket bool `json:"held_socket,omitempty"`
	// StormClients: a start storm's clients were each sandbox's own
	// process ("own") or this process on the sandboxes' sockets ("shared").
	StormClients string `json:"storm_clients,omitempty"`
}

// result is everything a run reports (--json prints it).
type result struct {
	Config         config        `json:"config"`
	Machine        machine       `json:"machine"`
	CreateSeconds  float64       `json:"sandbox_creation_s"`
	DaemonReady    float64       `json:"daemon_ready_s"`
	Measurements   []measurement `json:"measurements,omitempty"`
	Summaries      []summary     `json:"summaries,omitempty"`
	Ratios         []ratio       `json:"ratios,omitempty"`
	Growth         []growth      `json:"growth,omitempty"`
	Sign           []signFloor   `json:"sign_only,omitempty"`
	SignSummary    []signSummary `json:"sign_only_summary,omitempty"`
	DaemonPeakRSS  float64       `json:"identityd_peak_rss_mb"`
	BenchPeakRSS   float64       `json:"bench_process_peak_rss_mb"`
	ServersPeakRSS float64       `json:"servers_process_peak_rss_mb,omitempty"`
	Storm          *stormResult  `json:"storm,omitempty"`
	BaselineTokenB int           `json:"token_bytes"`
}

type signSummary struct {
	Alg       string     `json:"alg"`
	Rate      [3]float64 `json:"rate_min_med_max"`
	PerSignUS float64    `json:"per_sign_us_median"`
}

// progressLine keeps one status line on stderr.
type progressLine struct {
	mu   sync.Mutex
	last time.Time
}

func (p *progressLine) show(force bool, format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !force && time.Since(p.last) < 200*time.Millisecond {
		return
	}
	p.last = time.Now()
	fmt.Fprintf(os.Stderr, "\r\033[K%s", fmt.Sprintf(format, args...))
}

func (p *progressLine) done() { fmt.Fprint(os.Stderr, "\r\033[K") }

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

func run(ctx context.Context, r *runCmd) (err error) {
	if r.Sandboxes < 1 || r.Clients < 1 || r.Rounds < 1 {
		return errors.New("--sandboxes, --clients and --rounds must be at least 1")
	}
	if r.Storm == "" && r.Duration <= 0 && r.Requests <= 0 {
		return errors.New("give --duration or --requests")
	}
	if r.GrowTo != 0 && (r.GrowTo <= r.Sandboxes || r.Storm != "") {
		return errors.New("--grow-to must be more than --sandboxes, and is not for storms")
	}
	var uname syscall.Utsname
	syscall.Uname(&uname)
	res := &result{
		Config: config{Sandboxes: r.Sandboxes, Clients: r.Clients, Duration: r.Duration.String(), Requests: r.Requests,
			Alg: r.Alg, Audience: r.Audience, Rounds: r.Rounds, HeldSocket: r.HoldSocket, Active: r.Active, GrowTo: r.GrowTo},
		Machine: machine{CPUs: runtime.NumCPU(), Kernel: charsToString(uname.Release[:]), LoadBefore: loadavg()},
	}
	if err := r.checkStorm(); err != nil {
		return err
	}
	if r.Storm == "start" {
		res.Config.StormClients = r.StormClients
	}
	h, err := newHarness(r)
	if err != nil {
		return err
	}
	res.Config.Identityd = h.bin
	defer func() {
		if r.Keep {
			h.killDaemon(syscall.SIGKILL)
			fmt.Fprintf(os.Stderr, "kept: %s, host netns %s\n", h.dir, h.world.HostNetns)
			return
		}
		if cerr := h.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	p := &progressLine{}
	defer p.done()
	p.show(true, "starting identityd")
	ready, err := h.startDaemon(ctx)
	if err != nil {
		return err
	}
	res.DaemonReady = ready.Seconds()
	begin := time.Now()
	if _, err := h.createSandboxes(ctx, r.Sandboxes, r.Parallelism, !r.DynamicNeighbours, func(s string) { p.show(false, "%s", s) }); err != nil {
		return err
	}
	res.CreateSeconds = time.Since(begin).Seconds()

	defer h.abortOnCancel(ctx)()
	switch r.Storm {
	case "start":
		res.Storm, err = startStorm(ctx, h, r, p)
	case "restart":
		res.Storm, err = restartStorm(ctx, h, r, p)
	default:
		err = measureAll(ctx, h, r, res, p)
	}
	if err != nil {
		return err
	}
	if h.daemon != nil {
		if rss, err := peakRSS(h.daemon.Process.Pid); err == nil {
			res.DaemonPeakRSS = float64(rss) / (1 << 20)
		}
	}
	if rss, err := peakRSS(os.Getpid()); err == nil {
		res.BenchPeakRSS = float64(rss) / (1 << 20)
	}
	res.Machine.LoadAfter = loadavg()
	p.done()
	if r.JSONOut != "" {
		b, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(r.JSONOut, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("write results: %w", err)
		}
	}
	if r.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printResult(res)
	return nil
}

func charsToString(b []int8) string {
	var s strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		s.WriteByte(byte(c))
	}
	return s.String()
}

// measureAll runs every target and mode once per round, interleaved, and
// the sign-only loops.
func measureAll(ctx context.Context, h *harness, r *runCmd, res *result, p *progressLine) error {
	srv, err := startServerProcess(h, r.Alg)
	if err != nil {
		return err
	}
	defer func() {
		if rss, err := peakRSS(srv.pid()); err == nil {
			res.ServersPeakRSS = float64(rss) / (1 << 20)
		}
		srv.close()
	}()
	res.BaselineTokenB = srv.tokenLen
	modes := []string{"keepalive", "newconn"}
	if r.Mode != "both" {
		modes = []string{r.Mode}
	}
	sizes := []int{r.Sandboxes}
	if r.GrowTo > 0 {
		sizes = append(sizes, r.GrowTo)
	}
	for round := 1; round <= r.Rounds; round++ {
		// Every other round the other size first: one resize per round,
		// and neither size always measured after the other.
		if round > 1 {
			slices.Reverse(sizes)
		}
		for _, n := range sizes {
			if err := resize(ctx, h, srv, r, n, p); err != nil {
				return fmt.Errorf("round %d: %w", round, err)
			}
			for _, mode := range modes {
				for _, target := range rotated(r.Targets, round-1) {
					m, err := measure(ctx, h, srv, r, target, mode, round, p)
					if err != nil {
						return fmt.Errorf("round %d, %s %s, %d sandboxes: %w", round, target, mode, n, err)
					}
					res.Measurements = append(res.Measurements, m)
				}
			}
		}
		if r.SignOnly > 0 {
			for _, alg := range signAlgs {
				p.show(true, "[round %d/%d] sign-only %s", round, r.Rounds, alg)
				f, err := measureSign(h.dir, alg, r.SignOnly)
				if err != nil {
					return err
				}
				f.Round = round
				res.Sign = append(res.Sign, f)
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	summarize(res, r)
	return nil
}

// resize grows or shrinks the world to n sandboxes, and tells the
// baseline. Sandboxes are made and deleted at the end of the list, so the
// loaded ones, among the first --sandboxes, stay.
func resize(ctx context.Context, h *harness, srv *serverProc, r *runCmd, n int, p *progressLine) error {
	progress := func(s string) { p.show(false, "%s", s) }
	switch {
	case n > len(h.sandboxes):
		made, err := h.createSandboxes(ctx, n, r.Parallelism, !r.DynamicNeighbours, progress)
		if err != nil {
			return fmt.Errorf("grow to %d sandboxes: %w", n, err)
		}
		if err := srv.add(made); err != nil {
			return err
		}
	case n < len(h.sandboxes):
		gone, err := h.deleteSandboxes(ctx, n, r.Parallelism, progress)
		if err != nil {
			return fmt.Errorf("shrink to %d sandboxes: %w", n, err)
		}
		if err := srv.drop(gone); err != nil {
			return err
		}
	default:
		return nil
	}
	// The figure is only worth its label if identityd holds what was
	// asked for.
	var live []controllers.Record
	if err := controllers.NewAdminClient(h.admin).Do(ctx, "GET", "/v1/sandboxes", nil, &live); err != nil {
		return fmt.Errorf("list identityd's sandboxes: %w", err)
	}
	if len(live) != n {
		return fmt.Errorf("identityd holds %d sandboxes after resizing to %d", len(live), n)
	}
	p.show(true, "%d sandboxes; settling for %s", n, r.Settle)
	select {
	case <-time.After(r.Settle):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// rotated is targets starting at the k-th (modulo their number): each round
// starts with another target, so that none is always the one measured
// right after the sign-only loops or the other mode's connections.
func rotated(targets []string, k int) []string {
	if len(targets) == 0 {
		return nil
	}
	k %= len(targets)
	return append(slices.Clone(targets[k:]), targets[:k]...)
}

// activeSandboxes are the m sandboxes (all, if m is 0 or more than there
// are) that load the server, spread evenly over all of them.
func activeSandboxes(all []*benchSandbox, m int) []*benchSandbox {
	if m <= 0 || m >= len(all) {
		return all
	}
	out := make([]*benchSandbox, 0, m)
	for i := range m {
		out = append(out, all[i*len(all)/m])
	}
	return out
}

// measure runs one target in one mode from every active sandbox at once.
func measure(ctx context.Context, h *harness, srv *serverProc, r *runCmd, target, mode string, round int, p *progressLine) (measurement, error) {
	m := measurement{Target: target, Mode: mode, Round: round, Sandboxes: len(h.sandboxes), Errors: map[string]int{}}
	pid := srv.pid()
	if target == "identityd" {
		pid = h.daemon.Process.Pid
	}
	// Every client starts at the same moment, once all have their job.
	loaded := activeSandboxes(h.sandboxes[:min(r.Sandboxes, len(h.sandboxes))], r.Active)
	start := time.Now().Add(100*time.Millisecond + time.Duration(len(loaded))*50*time.Microsecond)
	measureFrom := start.Add(r.Warmup)
	for _, sb := range loaded {
		j := job{Kind: "load", URL: targetURL(target, h.router, sb), Secret: sb.secret, Start: start.UnixNano(),
			Warmup: r.Warmup, Duration: r.Duration, Requests: r.Requests, Clients: r.Clients,
			KeepAlive: mode == "keepalive", FreshAudience: r.Audience == "fresh"}
		if err := sb.client.send(j); err != nil {
			return m, fmt.Errorf("send job: %w", err)
		}
	}
	// The server's CPU over the measured window: from its start to its
	// end (with --duration) or until every client is done.
	var cpu0, cpu1 time.Duration
	var cpuMu sync.Mutex
	t0 := time.AfterFunc(time.Until(measureFrom), func() {
		c, _ := procCPU(pid)
		cpuMu.Lock()
		cpu0 = c
		cpuMu.Unlock()
	})
	defer t0.Stop()
	var t1 *time.Timer
	if r.Duration > 0 {
		t1 = time.AfterFunc(time.Until(measureFrom.Add(r.Duration)), func() {
			c, _ := procCPU(pid)
			cpuMu.Lock()
			cpu1 = c
			cpuMu.Unlock()
		})
		defer t1.Stop()
	}
	if target == "identityd" && h.pprof != "" && r.Duration > 0 {
		// From the measured window's start, as long as it lasts.
		file := filepath.Join(r.Profile, fmt.Sprintf("identityd-%s-%s-n%d-k%d-%s-%s-r%d.pprof", r.Alg, r.Audience, len(h.sandboxes), r.Clients, mode, "cpu", round))
		started := make(chan func() error, 1)
		tp := time.AfterFunc(time.Until(measureFrom), func() { started <- h.profile(ctx, r.Duration, file) })
		defer func() {
			if tp.Stop() {
				return // never began
			}
			if err := (<-started)(); err != nil {
				fmt.Fprintf(os.Stderr, "identity-bench: %v\n", err)
			}
		}()
	}
	if target == "baseline" && r.Profile != "" && r.Duration > 0 {
		file := filepath.Join(r.Profile, fmt.Sprintf("baseline-%s-%s-n%d-k%d-%s-cpu-r%d.pprof", r.Alg, r.Audience, len(h.sandboxes), r.Clients, mode, round))
		done := make(chan struct{})
		go func() {
			defer close(done)
			time.Sleep(time.Until(measureFrom))
			if err := srv.profile(r.Duration, file); err != nil {
				fmt.Fprintf(os.Stderr, "identity-bench: %v\n", err)
			}
		}()
		defer func() { <-done }()
	}
	counts := make([]atomic.Int64, len(loaded))
	var total atomic.Int64
	reports := make([]report, len(loaded))
	errs := make([]error, len(loaded))
	var wg sync.WaitGroup
	label := fmt.Sprintf("[round %d/%d] %-9s %-9s", round, r.Rounds, target, mode)
	if r.GrowTo > 0 {
		label += fmt.Sprintf(" N=%-5d", len(h.sandboxes))
	}
	for i, sb := range loaded {
		wg.Go(func() {
			reports[i], errs[i] = sb.client.wait(func(rep report) {
				total.Add(rep.Progress - counts[i].Swap(rep.Progress))
				el := time.Since(measureFrom).Seconds()
				if el > 0 {
					p.show(false, "%s %8d requests  %8.0f/s  %5.1fs", label, total.Load(), float64(total.Load())/el, el)
				}
			})
		})
	}
	wg.Wait()
	cpuMu.Lock()
	if r.Duration <= 0 || cpu1 == 0 {
		cpu1, _ = procCPU(pid)
	}
	m.CPU = (cpu1 - cpu0).Seconds()
	cpuMu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return m, err
	}
	var lat []int64
	for _, rep := range reports {
		lat = append(lat, rep.Latencies...)
		m.Failures += rep.Failures
		for k, v := range rep.Errors {
			if len(m.Errors) < 10 {
				m.Errors[k] += v
			}
		}
		m.Elapsed = max(m.Elapsed, rep.Elapsed.Seconds())
	}
	m.Requests = len(lat)
	if m.Elapsed > 0 {
		m.Throughput = float64(m.Requests) / m.Elapsed
	}
	if m.Requests > 0 {
		slices.Sort(lat)
		m.P50, m.P90, m.P99 = pct(lat, 50), pct(lat, 90), pct(lat, 99)
		m.Max = float64(lat[len(lat)-1]) / 1e6
		m.CPUPerRequest = m.CPU * 1e6 / float64(m.Requests)
	}
	p.show(true, "%s %8d requests  %8.0f/s  p99 %.2fms", label, m.Requests, m.Throughput, m.P99)
	return m, ctx.Err()
}

// pct is the q-th percentile of sorted latencies, in milliseconds.
func pct(sorted []int64, q float64) float64 {
	i := int(float64(len(sorted))*q/100+0.5) - 1
	i = min(max(i, 0), len(sorted)-1)
	return float64(sorted[i]) / 1e6
}

func minMedMax(v []float64) [3]float64 {
	if len(v) == 0 {
		return [3]float64{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return [3]float64{s[0], median(s), s[len(s)-1]}
}

func median(sorted []float64) float64 {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

func med(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return median(s)
}

func summarize(res *result, r *runCmd) {
	type key struct {
		target, mode string
		sandboxes    int
	}
	var order []key
	groups := map[key][]measurement{}
	for _, m := range res.Measurements {
		k := key{m.Target, m.Mode, m.Sandboxes}
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], m)
	}
	// By size, then as measured: the tables read down the sizes.
	slices.SortStableFunc(order, func(a, b key) int { return cmp.Compare(a.sandboxes, b.sandboxes) })
	tput := map[key]float64{}
	for _, k := range order {
		ms := groups[k]
		var t, p50, p90, p99, cpu []float64
		s := summary{Target: k.target, Mode: k.mode, Sandboxes: k.sandboxes, Rounds: len(ms)}
		for _, m := range ms {
			t = append(t, m.Throughput)
			p50, p90, p99, cpu = append(p50, m.P50), append(p90, m.P90), append(p99, m.P99), append(cpu, m.CPUPerRequest)
			s.Max = max(s.Max, m.Max)
			s.Failures += m.Failures
		}
		s.Throughput, s.P99 = minMedMax(t), minMedMax(p99)
		s.P50, s.P90, s.CPUPerReq = med(p50), med(p90), med(cpu)
		res.Summaries = append(res.Summaries, s)
		tput[k] = s.Throughput[1]
	}
	signRate := map[string]float64{}
	for _, alg := range signAlgs {
		var rates, per []float64
		for _, f := range res.Sign {
			if f.Alg == alg {
				rates, per = append(rates, f.Rate), append(per, f.PerSignUS)
			}
		}
		if len(rates) > 0 {
			res.SignSummary = append(res.SignSummary, signSummary{Alg: alg, Rate: minMedMax(rates), PerSignUS: med(per)})
			signRate[alg] = med(rates)
		}
	}
	sizes := []int{r.Sandboxes}
	if r.GrowTo > 0 {
		sizes = append(sizes, r.GrowTo)
	}
	for _, n := range sizes {
		for _, mode := range []string{"keepalive", "newconn"} {
			id, ok := tput[key{"identityd", mode, n}]
			if !ok {
				continue
			}
			rt := ratio{Mode: mode, Sandboxes: n}
			if b := tput[key{"baseline", mode, n}]; b > 0 {
				rt.VsBaseline = id / b
				rt.VsBaselineRounds = minMedMax(perRound(res.Measurements, mode, n, "baseline"))
			}
			if b := tput[key{"http", mode, n}]; b > 0 {
				rt.VsHTTP = id / b
				rt.VsHTTPRounds = minMedMax(perRound(res.Measurements, mode, n, "http"))
			}
			if s := signRate[r.Alg]; s > 0 {
				rt.VsSign = id / s
			}
			res.Ratios = append(res.Ratios, rt)
		}
	}
	if r.GrowTo > 0 {
		res.Growth = growthOf(res.Measurements, r.Sandboxes, r.GrowTo)
	}
}

// perRound is identityd's throughput over other's in each round that
// measured both, in mode with n sandboxes.
func perRound(ms []measurement, mode string, n int, other string) []float64 {
	of := func(target string) map[int]float64 {
		return byRound(ms, func(m measurement) bool { return m.Target == target && m.Mode == mode && m.Sandboxes == n })
	}
	return roundRatios(of("identityd"), of(other))
}

// growthOf is each target's throughput with to sandboxes over that with
// from, per mode, from measurements that hold both.
func growthOf(ms []measurement, from, to int) []growth {
	type key struct{ target, mode string }
	var order []key
	seen := map[key]bool{}
	for _, m := range ms {
		if k := (key{m.Target, m.Mode}); !seen[k] {
			seen[k] = true
			order = append(order, k)
		}
	}
	var out []growth
	for _, k := range order {
		at := func(n int) map[int]float64 {
			return byRound(ms, func(m measurement) bool { return m.Target == k.target && m.Mode == k.mode && m.Sandboxes == n })
		}
		small, large := at(from), at(to)
		per := roundRatios(large, small)
		if len(per) == 0 {
			continue
		}
		out = append(out, growth{Target: k.target, Mode: k.mode, From: from, To: to,
			PerRound: minMedMax(per), OfMedians: med(slices.Collect(maps.Values(large))) / med(slices.Collect(maps.Values(small)))})
	}
	return out
}

// byRound is the throughput of the measurements keep picks, by round.
func byRound(ms []measurement, keep func(measurement) bool) map[int]float64 {
	out := map[int]float64{}
	for _, m := range ms {
		if keep(m) {
			out[m.Round] = m.Throughput
		}
	}
	return out
}

// roundRatios is num over den in each round that has both.
func roundRatios(num, den map[int]float64) []float64 {
	var out []float64
	for round, v := range num {
		if d := den[round]; d > 0 {
			out = append(out, v/d)
		}
	}
	return out
}

func printResult(res *result) {
	c := res.Config
	if res.Storm != nil {
		fmt.Printf("identity-bench: %s storm, %d sandboxes, %s", res.Storm.Kind, c.Sandboxes, c.Alg)
		if c.StormClients != "" {
			fmt.Printf(", clients: %s", c.StormClients)
		}
		fmt.Println()
	} else {
		fmt.Printf("identity-bench: %d sandboxes x %d clients, %s per measurement, %d round(s), %s, audience %s\n",
			c.Sandboxes, c.Clients, c.Duration, c.Rounds, c.Alg, c.Audience)
	}
	fmt.Printf("machine: %d CPUs, kernel %s, load average %s before, %s after\n",
		res.Machine.CPUs, res.Machine.Kernel, res.Machine.LoadBefore, res.Machine.LoadAfter)
	fmt.Printf("identityd ready in %.2fs; %d sandboxes created (and clients started) in %.2fs\n\n",
		res.DaemonReady, c.Sandboxes, res.CreateSeconds)
	if len(res.Summaries) > 0 {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "sandboxes\ttarget\tmode\trounds\treq/s min\tmedian\tmax\tp50 ms\tp90 ms\tp99 ms\tmax ms\tCPU us/req\tfailures\t")
		for _, s := range res.Summaries {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%.0f\t%.0f\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%.0f\t%d\t\n", s.Sandboxes, s.Target, s.Mode, s.Rounds,
				s.Throughput[0], s.Throughput[1], s.Throughput[2], s.P50, s.P90, s.P99[1], s.Max, s.CPUPerReq, s.Failures)
		}
		tw.Flush()
		fmt.Println()
	}
	if len(res.SignSummary) > 0 {
		tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "sign-only\tus/sign (1 core)\tsigns/s all cores min\tmedian\tmax\t")
		for _, s := range res.SignSummary {
			fmt.Fprintf(tw, "%s\t%.1f\t%.0f\t%.0f\t%.0f\t\n", s.Alg, s.PerSignUS, s.Rate[0], s.Rate[1], s.Rate[2])
		}
		tw.Flush()
		fmt.Println()
	}
	ratioText := func(v float64) string {
		if v == 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.2f", v)
	}
	perRoundText := func(v [3]float64) string {
		if v[1] == 0 {
			return ""
		}
		return fmt.Sprintf(" (per round %.2f [%.2f-%.2f])", v[1], v[0], v[2])
	}
	for _, rt := range res.Ratios {
		fmt.Printf("ratios (%d sandboxes, %s, medians): identityd/baseline %s%s  identityd/http %s%s  identityd/sign-only(%s, all cores) %s\n",
			rt.Sandboxes, rt.Mode, ratioText(rt.VsBaseline), perRoundText(rt.VsBaselineRounds),
			ratioText(rt.VsHTTP), perRoundText(rt.VsHTTPRounds), c.Alg, ratioText(rt.VsSign))
	}
	for _, g := range res.Growth {
		fmt.Printf("throughput at %d over %d sandboxes (%s %s): per round %.2f [%.2f-%.2f], of medians %.2f\n",
			g.To, g.From, g.Target, g.Mode, g.PerRound[1], g.PerRound[0], g.PerRound[2], g.OfMedians)
	}
	if res.Storm != nil {
		res.Storm.print()
	}
	fmt.Printf("peak RSS: identityd %.1f MB, baseline and bare servers %.1f MB, identity-bench %.1f MB\n", res.DaemonPeakRSS, res.ServersPeakRSS, res.BenchPeakRSS)
	for _, m := range res.Measurements {
		for e, n := range m.Errors {
			fmt.Printf("errors: round %d %s %s: %dx %s\n", m.Round, m.Target, m.Mode, n, e)
		}
	}
}
