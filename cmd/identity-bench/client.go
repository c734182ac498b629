package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/identityd/identityd/client"
)

// netnsEnv names the netns a re-executed identity-bench joins before it
// execs itself again as the load client.
const netnsEnv = "IDENTITY_BENCH_NETNS"

// enterNetnsIfAsked joins the netns named by netnsEnv on this thread and
// execs the binary again: the new image runs wholly inside the netns, so
// every socket of every goroutine of the client belongs to the sandbox
// (sandboxtest's clients make sockets on one locked thread instead, which
// serializes them; the load client wants K concurrent clients). It returns
// only when not asked.
func enterNetnsIfAsked() {
	path := os.Getenv(netnsEnv)
	if path == "" {
		return
	}
	os.Unsetenv(netnsEnv)
	runtime.LockOSThread()
	ns, err := netns.GetFromPath(path)
	if err == nil {
		err = netns.Set(ns)
	}
	if err == nil {
		err = syscall.Exec("/proc/self/exe", os.Args, os.Environ())
	}
	fmt.Fprintf(os.Stderr, "identity-bench client: enter netns %s: %v\n", path, err)
	os.Exit(2)
}

// job is one command to a load client, a JSON line on its stdin.
type job struct {
	// Kind is "load" (measure), "first" (one token, with the client
	// package's backoff: a start storm), "keep" (a token every Interval
	// with the client package's backoff until "stop": a restart storm),
	// "sockets" (make Sockets unconnected TCP sockets of URL's address
	// family and hold them, for identity-bench to take with pidfd_getfd)
	// or "release" (close the sockets held).
	Kind   string `json:"kind"`
	URL    string `json:"url"`
	Secret string `json:"secret"`
	// Start is when to begin (Unix nanoseconds), the same for every
	// sandbox, so that their loads overlap.
	Start     int64         `json:"start"`
	Warmup    time.Duration `json:"warmup,omitempty"`
	Duration  time.Duration `json:"duration,omitempty"`
	Requests  int           `json:"requests,omitempty"`
	Clients   int           `json:"clients,omitempty"`
	KeepAlive bool          `json:"keepalive,omitempty"`
	// FreshAudience names a new audience in every request.
	FreshAudience bool          `json:"fresh_audience,omitempty"`
	Interval      time.Duration `json:"interval,omitempty"`
	// Audience of a storm's tokens (default: the load's).
	Audience string `json:"audience,omitempty"`
	Sockets  int    `json:"sockets,omitempty"`
}

// report is a load client's answer: progress lines while a job runs, then
// one with Done.
type report struct {
	Progress int64 `json:"progress,omitempty"`
	Done     bool  `json:"done,omitempty"`
	// Latencies of the successful requests, in nanoseconds.
	Latencies []int64        `json:"lat,omitempty"`
	Failures  int            `json:"failures,omitempty"`
	Errors    map[string]int `json:"errors,omitempty"`
	// Elapsed is the measured window.
	Elapsed time.Duration `json:"elapsed,omitempty"`
	// Successes are the Unix nanoseconds of the storms' tokens.
	Successes []int64 `json:"successes,omitempty"`
	// FDs are the descriptors of a "sockets" job's sockets, in this
	// process.
	FDs   []int  `json:"fds,omitempty"`
	Error string `json:"error,omitempty"`
}

// audience is the one every request of a "same audience" load names.
const audience = "bench"

type clientCmd struct{}

// Run serves jobs from stdin until it closes (the benchmark ended or died).
func (clientCmd) Run(ctx context.Context) error {
	lines := make(chan string)
	go func() {
		in := bufio.NewScanner(os.Stdin)
		in.Buffer(make([]byte, 64<<10), 1<<20)
		for in.Scan() {
			lines <- in.Text()
		}
		close(lines)
	}()
	out := &replies{enc: json.NewEncoder(os.Stdout)}
	// held: the last "sockets" job's, until any next job.
	var held []int
	for line := range lines {
		for _, fd := range held {
			syscall.Close(fd)
		}
		held = nil
		var j job
		if err := json.Unmarshal([]byte(line), &j); err != nil {
			out.send(report{Done: true, Error: "bad job: " + err.Error()})
			continue
		}
		var r report
		switch j.Kind {
		case "sockets":
			held, r.Error = makeSockets(j)
			r.FDs = held
		case "release":
		case "load":
			r = runLoad(ctx, j, out)
		case "first":
			r = runFirst(ctx, j)
		case "keep":
			r = runKeep(ctx, j, lines, out)
		default:
			r.Error = fmt.Sprintf("unknown job kind %q", j.Kind)
		}
		r.Done = true
		out.send(r)
	}
	return nil
}

type replies struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (r *replies) send(rep report) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.enc.Encode(rep)
}

func sleepUntil(ctx context.Context, t time.Time) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Until(t)):
		return nil
	}
}

// runLoad runs j.Clients clients, each with a connection of its own
// (keep-alive) or a new connection per request, from j.Start: a warm-up,
// then the measured window, bounded by j.Duration and j.Requests.
func runLoad(ctx context.Context, j job, out *replies) report {
	start := time.Unix(0, j.Start)
	measureFrom := start.Add(j.Warmup)
	var end time.Time
	if j.Duration > 0 {
		end = measureFrom.Add(j.Duration)
	}
	if err := sleepUntil(ctx, start); err != nil {
		return report{Error: err.Error()}
	}
	var done atomic.Int64
	stopProgress := make(chan struct{})
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopProgress:
				return
			case <-t.C:
				if n := done.Load(); n > 0 {
					out.send(report{Progress: n})
				}
			}
		}
	}()
	type result struct {
		lat      []int64
		failures int
		errs     map[string]int
		last     time.Time
	}
	results := make([]result, max(j.Clients, 1))
	var wg sync.WaitGroup
	for g := range results {
		wg.Go(func() {
			res := &results[g]
			res.errs = map[string]int{}
			tr := &http.Transport{DisableKeepAlives: !j.KeepAlive, MaxIdleConnsPerHost: 1, DisableCompression: true}
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			for i := 0; ; i++ {
				now := time.Now()
				measuring := !now.Before(measureFrom)
				if (!end.IsZero() && !now.Before(end)) || (j.Requests > 0 && measuring && len(res.lat)+res.failures >= j.Requests) || ctx.Err() != nil {
					return
				}
				aud := audience
				if j.FreshAudience {
					// Unique across jobs too: a token cache keeps earlier
					// rounds' tokens.
					aud = fmt.Sprintf("bench-%d-%d-%d-%d", j.Start, os.Getpid(), g, i)
				}
				t0 := time.Now()
				err := fetch(ctx, hc, j.URL+"?audience="+url.QueryEscape(aud), j.Secret)
				t1 := time.Now()
				if t0.Before(measureFrom) {
					continue // warm-up
				}
				res.last = t1
				if err != nil {
					res.failures++
					if len(res.errs) < 20 {
						res.errs[err.Error()]++
					}
					continue
				}
				res.lat = append(res.lat, int64(t1.Sub(t0)))
				done.Add(1)
			}
		})
	}
	wg.Wait()
	close(stopProgress)
	r := report{Errors: map[string]int{}}
	var last time.Time
	for _, res := range results {
		r.Latencies = append(r.Latencies, res.lat...)
		r.Failures += res.failures
		for k, v := range res.errs {
			r.Errors[k] += v
		}
		if res.last.After(last) {
			last = res.last
		}
	}
	// With a duration, the window is the duration: a request that ran
	// over it (a stall) does not stretch it.
	switch {
	case j.Duration > 0:
		r.Elapsed = j.Duration
	case last.After(measureFrom):
		r.Elapsed = last.Sub(measureFrom)
	}
	return r
}

// fetch makes one token request and reads the answer to its end.
func fetch(ctx context.Context, hc *http.Client, u, secret string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %d: %.80s", resp.StatusCode, body)
	}
	if len(body) < 20 {
		return fmt.Errorf("short body %q", body)
	}
	return nil
}

// makeSockets makes j.Sockets TCP sockets of j.URL's address family, in
// this process's cgroup and netns, which the kernel stamps on each socket
// for good: whoever connects them later connects as this sandbox.
func makeSockets(j job) ([]int, string) {
	u, err := url.Parse(j.URL)
	if err != nil {
		return nil, err.Error()
	}
	ap, err := netip.ParseAddrPort(u.Host)
	if err != nil {
		return nil, fmt.Sprintf("target %q is not an address and port: %v", u.Host, err)
	}
	family := syscall.AF_INET
	if ap.Addr().Is6() {
		family = syscall.AF_INET6
	}
	var fds []int
	for range j.Sockets {
		fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			for _, fd := range fds {
				syscall.Close(fd)
			}
			return nil, fmt.Sprintf("make socket: %v", err)
		}
		fds = append(fds, fd)
	}
	return fds, ""
}

func stormClient(j job) *client.Client {
	return client.New(client.WithURL(j.URL), client.WithSecret(j.Secret))
}

// runFirst fetches one token from j.Start on, as a starting workload does
// (with the client package's backoff), within j.Duration.
func runFirst(ctx context.Context, j job) report {
	if err := sleepUntil(ctx, time.Unix(0, j.Start)); err != nil {
		return report{Error: err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, j.Duration)
	defer cancel()
	if _, err := stormClient(j).Fetch(ctx, cmp.Or(j.Audience, audience)); err != nil {
		return report{Failures: 1, Error: err.Error()}
	}
	return report{Successes: []int64{time.Now().UnixNano()}}
}

// runKeep fetches a token every j.Interval, each fetch retrying with the
// client package's backoff (1 s doubling to 30 s), until "stop" arrives on
// lines, and reports when each fetch succeeded, each at once too.
func runKeep(ctx context.Context, j job, lines <-chan string, out *replies) report {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		for line := range lines {
			if line == "stop" {
				break
			}
		}
		cancel()
	}()
	if err := sleepUntil(ctx, time.Unix(0, j.Start)); err != nil {
		return report{Error: err.Error()}
	}
	c := stormClient(j)
	var r report
	for ctx.Err() == nil {
		t0 := time.Now()
		if _, err := c.Fetch(ctx, audience); err == nil {
			now := time.Now().UnixNano()
			r.Successes = append(r.Successes, now)
			out.send(report{Progress: int64(len(r.Successes)), Successes: []int64{now}})
		} else if !errors.Is(ctx.Err(), context.Canceled) {
			r.Failures++
		}
		sleepUntil(ctx, t0.Add(j.Interval))
	}
	slices.Sort(r.Successes)
	return r
}
