// Command identity-bench measures identityd under load, side by side with
// its floors. It builds a closed network world (a host netns of its own,
// see ../../shared/docs/test-network-rules.md), starts a real identityd
// process in it, creates sandboxes through the admin API and runs clients
// inside them, then measures, interleaved round by round:
//
//  1. identityd as shipped (kernel-attested callers, secrets checked on disk);
//  2. the same token server with attestation replaced by an in-memory
//     lookup of the caller's source address and the secrets held in memory
//     (what the runtime identityd replaces does), in a process of its own;
//  3. the floors: a bare net/http handler answering a token-sized body on
//     the same kind of listener, and a sign-only loop per algorithm.
//
// It reports throughput, latency percentiles, CPU seconds and peak RSS of
// the server, as a table or as JSON, and the ratios 1/2, 1/3 and 1/sign.
// With --storm it measures a start or restart storm instead.
//
// Everything it makes (netns, cgroups, pins, state) is removed on exit,
// also on ^C; leftovers of a killed run are swept by the next one.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/alecthomas/kong"
)

type cli struct {
	Run     runCmd     `cmd:"" default:"withargs" help:"Run the benchmark (the default command)."`
	Chart   chartCmd   `cmd:"" help:"Draw SVG charts from results already written (--json-out files, bench/spire.sh results.jsonl); needs no root."`
	Client  clientCmd  `cmd:"" name:"__client" hidden:"" help:"The in-sandbox load client; the benchmark runs it."`
	Servers serversCmd `cmd:"" name:"__servers" hidden:"" help:"The baseline and the bare handler, in a process of their own; the benchmark runs it."`
}

type runCmd struct {
	Identityd    string        `help:"identityd binary (default: next to this binary, else on PATH)."`
	DaemonArgs   []string      `name:"identityd-arg" help:"An extra argument for identityd serve (repeatable), e.g. --identityd-arg=--no-token-cache."`
	Sandboxes    int           `default:"1" help:"Sandboxes (each a cgroup, a netns and a veth, made by identityd)."`
	Clients      int           `default:"1" help:"Concurrent clients per sandbox."`
	Active       int           `default:"0" help:"Load from only this many of the sandboxes, spread evenly over them (0: all): the load stays the same while the sandboxes the server knows multiply."`
	GrowTo       int           `placeholder:"M" help:"Measure every round twice: with --sandboxes, and with the world grown to M sandboxes (created and deleted between the two, the order alternating by round), the load from the same sandboxes of the first --sandboxes (--active of them, if given). Reports each target's throughput at M over that at --sandboxes, round by round: how it falls as sandboxes multiply, from rounds minutes apart at most."`
	Settle       time.Duration `default:"5s" help:"With --grow-to, the pause after each resize before measuring: the new client processes, the kernel's new interfaces and the daemon's first look at the new sandboxes are done by then."`
	Duration     time.Duration `default:"5s" help:"Length of each measurement (0: only --requests bounds it)."`
	Requests     int           `default:"0" help:"Requests per client per measurement (0: only --duration bounds it)."`
	Mode         string        `default:"both" enum:"keepalive,newconn,both" help:"keepalive: each client reuses one connection; newconn: a new connection per request; both."`
	Alg          string        `default:"RS256" enum:"RS256,ES256,EdDSA" help:"Signing algorithm of identityd and of the baseline."`
	Targets      []string      `default:"identityd,baseline,http" enum:"identityd,baseline,http" help:"Servers to measure, interleaved."`
	Audience     string        `default:"same" enum:"same,fresh" help:"same: every request names one audience; fresh: a new audience per request."`
	Rounds       int           `default:"1" help:"Repeat the interleaved measurements this many times (figures give min/median/max)."`
	Warmup       time.Duration `default:"300ms" help:"Load before each measurement that is not counted."`
	SignOnly     time.Duration `default:"1s" help:"Length of each sign-only loop per algorithm and round (0: skip)."`
	Storm        string        `enum:",start,restart" default:"" help:"Measure a storm instead: start (every sandbox asks for its first token at once) or restart (SIGKILL the daemon while every sandbox keeps asking, restart it)."`
	StormClients string        `default:"own" enum:"own,shared" help:"Start storm: own: each sandbox's client process asks, as starting workloads would; shared: each sandbox's client process makes the sockets (so the kernel attributes them to its sandbox) and this process connects them and asks, so that the clients cost as little as one process can make them and the storm measures the server."`
	StormDown    time.Duration `default:"2s" help:"Restart storm: how long the daemon stays dead."`
	StormEvery   time.Duration `default:"1s" help:"Restart storm: each sandbox asks for a token this often (spread over the interval), before and after the kill. Shorter than --storm-down, so that every sandbox asks while the daemon is down and the figure is the daemon's, not the schedule's."`
	JSON         bool          `name:"json" help:"Print the results as JSON on stdout (the progress line stays on stderr)."`
	JSONOut      string        `name:"json-out" help:"Also write the results as JSON to this file."`
	Parallelism  int           `default:"16" help:"Sandboxes created (and clients started) at a time."`
	Keep         bool          `help:"Leave the world behind (daemon killed) for inspection."`
	Profile      string        `placeholder:"DIR" help:"Write CPU profiles into DIR: of identityd (served with --pprof on an operator endpoint on loopback) for each of its measurements and for the first 2 s of a start storm, and of this process for each baseline measurement."`
	HoldSocket   bool          `help:"Hold identityd's token endpoint socket and pass it to every identityd started, as systemd socket activation does (deploy/identityd.socket): connections made while the daemon is down wait in the socket's backlog instead of being refused."`

	DynamicNeighbours bool `help:"Leave the veths' neighbour entries to ARP, as identityd sets them up. By default both ends get permanent entries: the kernel's IPv4 neighbour table is shared by all namespaces and overflows at gc_thresh3 (1,024 by default), which about 500 sandboxes reach."`
}

func (r *runCmd) Run(ctx context.Context) error {
	return run(ctx, r)
}

func main() {
	// The load client: re-executed into a sandbox's netns (enterNetns does
	// not return when it is one).
	enterNetnsIfAsked()
	// The daemon is started from this thread with Pdeathsig: keep the
	// thread for the life of the process, so the daemon dies with us and
	// not when some other thread ends.
	runtime.LockOSThread()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var c cli
	k := kong.Parse(&c,
		kong.Name("identity-bench"),
		kong.Description("Load, floors and storms for identityd, in a closed network world of its own (needs root)."),
		kong.BindTo(ctx, (*context.Context)(nil)),
		kong.UsageOnError(),
	)
	if err := k.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "identity-bench: %v\n", err)
		os.Exit(1)
	}
}
