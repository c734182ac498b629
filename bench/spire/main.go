// Command spire-load measures JWT-SVID fetches through a SPIRE agent's
// Workload API, for the comparison in BENCHMARKS.md (run by ../spire.sh).
// K clients, each with a Workload API connection of its own (as each
// identity-bench keep-alive client has its own connection), fetch
// JWT-SVIDs for a bounded time, naming one audience throughout (the
// agent may serve its cached SVID) or a fresh audience per request (a new
// signature by the server). It prints one JSON line: throughput,
// latency percentiles, and the CPU seconds and peak RSS of the agent and
// server processes given by pid.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

type result struct {
	System      string         `json:"system"`
	Mode        string         `json:"mode"`
	Clients     int            `json:"clients"`
	Requests    int            `json:"requests"`
	Failures    int            `json:"failures"`
	Errors      map[string]int `json:"errors,omitempty"`
	Elapsed     float64        `json:"elapsed_s"`
	Throughput  float64        `json:"throughput"`
	P50         float64        `json:"p50_ms"`
	P90         float64        `json:"p90_ms"`
	P99         float64        `json:"p99_ms"`
	Max         float64        `json:"max_ms"`
	AgentCPU    float64        `json:"agent_cpu_s"`
	ServerCPU   float64        `json:"server_cpu_s"`
	CPUPerReq   float64        `json:"cpu_us_per_request"`
	AgentRSSMB  float64        `json:"agent_peak_rss_mb"`
	ServerRSSMB float64        `json:"server_peak_rss_mb"`
}

func main() {
	socket := flag.String("socket", "", "Workload API socket (unix path).")
	clients := flag.Int("clients", 1, "Concurrent clients.")
	duration := flag.Duration("duration", 3*time.Second, "Measured window.")
	warmup := flag.Duration("warmup", 300*time.Millisecond, "Load before the window, not counted.")
	mode := flag.String("mode", "same", "same: one audience repeated; fresh: a new audience per request.")
	agentPid := flag.Int("agent-pid", 0, "spire-agent pid (CPU, RSS).")
	serverPid := flag.Int("server-pid", 0, "spire-server pid (CPU, RSS).")
	flag.Parse()
	if *socket == "" || (*mode != "same" && *mode != "fresh") {
		fmt.Fprintln(os.Stderr, "spire-load: need -socket and -mode same|fresh")
		os.Exit(2)
	}
	r, err := run(*socket, *clients, *warmup, *duration, *mode, *agentPid, *serverPid)
	if err != nil {
		fmt.Fprintf(os.Stderr, "spire-load: %v\n", err)
		os.Exit(1)
	}
	json.NewEncoder(os.Stdout).Encode(r)
}

func run(socket string, k int, warmup, d time.Duration, mode string, agentPid, serverPid int) (result, error) {
	ctx := context.Background()
	r := result{System: "spire", Mode: mode, Clients: k, Errors: map[string]int{}}
	cs := make([]*workloadapi.Client, k)
	for i := range cs {
		c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
		if err != nil {
			return r, fmt.Errorf("workload API client: %w", err)
		}
		defer c.Close()
		// One fetch first: the connection is made, and the entry is known.
		if _, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "bench"}); err != nil {
			return r, fmt.Errorf("first JWT-SVID: %w", err)
		}
		cs[i] = c
	}
	start := time.Now()
	from := start.Add(warmup)
	end := from.Add(d)
	type out struct {
		lat  []int64
		fail int
		errs map[string]int
	}
	outs := make([]out, k)
	var wg sync.WaitGroup
	// CPU over the measured window: read at its start, and once every
	// client is done (at its end, give or take one request).
	var a0, s0 time.Duration
	atStart := make(chan struct{})
	time.AfterFunc(time.Until(from), func() {
		a0, s0 = procCPU(agentPid), procCPU(serverPid)
		close(atStart)
	})
	for g := range k {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := &outs[g]
			o.errs = map[string]int{}
			for i := 0; ; i++ {
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				aud := "bench"
				if mode == "fresh" {
					aud = fmt.Sprintf("bench-%d-%d-%d-%d", start.UnixNano(), os.Getpid(), g, i)
				}
				_, err := cs[g].FetchJWTSVID(ctx, jwtsvid.Params{Audience: aud})
				t1 := time.Now()
				if t0.Before(from) {
					continue
				}
				if err != nil {
					o.fail++
					o.errs[err.Error()]++
					continue
				}
				o.lat = append(o.lat, int64(t1.Sub(t0)))
			}
		}()
	}
	wg.Wait()
	a1, s1 := procCPU(agentPid), procCPU(serverPid)
	elapsed := time.Since(from)
	<-atStart
	var lat []int64
	for _, o := range outs {
		lat = append(lat, o.lat...)
		r.Failures += o.fail
		for e, n := range o.errs {
			r.Errors[e] += n
		}
	}
	r.Requests = len(lat)
	r.Elapsed = elapsed.Seconds()
	r.Throughput = float64(len(lat)) / r.Elapsed
	if len(lat) > 0 {
		slices.Sort(lat)
		r.P50, r.P90, r.P99 = pct(lat, 50), pct(lat, 90), pct(lat, 99)
		r.Max = float64(lat[len(lat)-1]) / 1e6
	}
	r.AgentCPU, r.ServerCPU = (a1 - a0).Seconds(), (s1 - s0).Seconds()
	if r.Requests > 0 {
		r.CPUPerReq = (r.AgentCPU + r.ServerCPU) * 1e6 / float64(r.Requests)
	}
	r.AgentRSSMB, r.ServerRSSMB = peakRSS(agentPid), peakRSS(serverPid)
	return r, nil
}

func pct(sorted []int64, q float64) float64 {
	i := min(max(int(float64(len(sorted))*q/100+0.5)-1, 0), len(sorted)-1)
	return float64(sorted[i]) / 1e6
}

// procCPU is utime+stime of pid (0: none).
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscan(f[11], &ut)
	fmt.Sscan(f[12], &st)
	return time.Duration(ut+st) * (time.Second / 100)
}

// peakRSS is VmHWM of pid in MB.
func peakRSS(pid int) float64 {
	if pid == 0 {
		return 0
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		var kb int64
		if _, err := fmt.Sscanf(line, "VmHWM: %d kB", &kb); err == nil {
			return float64(kb) / 1024
		}
	}
	return 0
}
