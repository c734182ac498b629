package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// build compiles identityd and identity-bench into one directory, as the
// tool expects to find them.
func build(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the benchmark builds a closed network world and runs identityd")
	}
	dir := t.TempDir()
	out, err := exec.Command("go", "build", "-o", dir+"/",
		"github.com/identityd/identityd/cmd/identityd", "github.com/identityd/identityd/cmd/identity-bench").CombinedOutput()
	require.NoError(t, err, "%s", out)
	return dir
}

// assertNothingLeft checks that the run with pid removed its netns,
// cgroups, pins and mount point directory.
func assertNothingLeft(t *testing.T, pid int) {
	t.Helper()
	prefix := fmt.Sprintf("idt%d-", pid)
	root, err := cgroup2.Root()
	require.NoError(t, err)
	for dir, pre := range map[string]string{
		netnsutil.Dir: prefix, root: prefix, "/run": prefix,
		"/sys/fs/bpf": fmt.Sprintf("identityd-bench-%d-", pid),
	} {
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		for _, e := range entries {
			assert.False(t, strings.HasPrefix(e.Name(), pre), "left behind: %s", filepath.Join(dir, e.Name()))
		}
	}
}

// runBench runs the identity-bench built in dir with args and --json, checks
// that it succeeded and left nothing behind, and returns its result.
func runBench(t *testing.T, dir string, args ...string) result {
	t.Helper()
	cmd := exec.Command(filepath.Join(dir, "identity-bench"), append(args, "--json")...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Run(), "stderr:\n%s", stderr.String())
	assertNothingLeft(t, cmd.Process.Pid)
	var res result
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &res), stdout.String())
	return res
}

// TestSmoke runs the tool for a tiny configuration and checks that it
// completes, reports figures that make sense, and cleans up. It asserts no
// speed: the machine is shared.
func TestSmoke(t *testing.T) {
	res := runBench(t, build(t), "--sandboxes", "2", "--clients", "1", "--duration", "1s",
		"--warmup", "100ms", "--sign-only", "200ms", "--alg", "ES256")
	assert.Equal(t, 2, res.Config.Sandboxes)
	require.Len(t, res.Measurements, 6, "three targets in two modes")
	seen := map[string]bool{}
	for _, m := range res.Measurements {
		name := m.Target + " " + m.Mode
		seen[name] = true
		assert.Positive(t, m.Requests, name)
		assert.Zero(t, m.Failures, "%s: %v", name, m.Errors)
		assert.Positive(t, m.Throughput, name)
		assert.InDelta(t, 1.0, m.Elapsed, 0.9, "%s: the measured window is about --duration", name)
		assert.Positive(t, m.P50, name)
		assert.LessOrEqual(t, m.P50, m.P90, name)
		assert.LessOrEqual(t, m.P90, m.P99, name)
		assert.LessOrEqual(t, m.P99, m.Max, name)
		assert.GreaterOrEqual(t, m.CPU, 0.0, name)
	}
	for _, target := range []string{"identityd", "baseline", "http"} {
		for _, mode := range []string{"keepalive", "newconn"} {
			assert.True(t, seen[target+" "+mode], "%s %s measured", target, mode)
		}
	}
	require.Len(t, res.Ratios, 2)
	for _, r := range res.Ratios {
		assert.Positive(t, r.VsBaseline, r.Mode)
		assert.Positive(t, r.VsHTTP, r.Mode)
		assert.Positive(t, r.VsSign, r.Mode)
		for _, pr := range [][3]float64{r.VsBaselineRounds, r.VsHTTPRounds} {
			assert.Positive(t, pr[0], r.Mode)
			assert.LessOrEqual(t, pr[0], pr[1], r.Mode)
			assert.LessOrEqual(t, pr[1], pr[2], r.Mode)
		}
	}
	require.Len(t, res.SignSummary, 3, "RS256, ES256, EdDSA")
	for _, s := range res.SignSummary {
		assert.Positive(t, s.Rate[1], s.Alg)
		assert.Positive(t, s.PerSignUS, s.Alg)
	}
	assert.Positive(t, res.DaemonPeakRSS)
	assert.Positive(t, res.BaselineTokenB)
}

// TestInterrupted: ^C in the middle of a measurement ends the run soon and
// removes everything, the daemon and the clients included.
func TestInterrupted(t *testing.T) {
	dir := build(t)
	cmd := exec.Command(filepath.Join(dir, "identity-bench"), "--sandboxes", "2", "--clients", "1", "--duration", "60s")
	var stderr sandboxtest.LogBuffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	require.Eventually(t, func() bool { return strings.Contains(stderr.String(), "requests") }, 60*time.Second,
		50*time.Millisecond, "no measurement began:\n%s", &stderr)
	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("still running 30s after SIGINT:\n%s", &stderr)
	}
	assertNothingLeft(t, cmd.Process.Pid)
}

// TestStorms runs both storms on a few sandboxes, the restart storm with the
// token socket held as socket activation holds it, and checks that every
// sandbox was served by every target and that nothing is left. Times are
// reported, not asserted.
func TestStorms(t *testing.T) {
	dir := build(t)
	run := func(args ...string) stormResult {
		t.Helper()
		res := runBench(t, dir, append([]string{"--sandboxes", "3", "--alg", "ES256"}, args...)...)
		require.NotNil(t, res.Storm, "%+v", res)
		return *res.Storm
	}

	start := run("--storm", "start", "--rounds", "2")
	assert.Equal(t, 3, start.Served, "%v", start.Errors)
	assert.Len(t, start.Rounds, 6, "two rounds of three targets")
	require.Len(t, start.Targets, 3)
	for _, s := range start.Targets {
		assert.Zero(t, s.Failures, s.Target)
		assert.Positive(t, s.Last[1], s.Target)
		assert.LessOrEqual(t, s.Last[0], s.Last[2], s.Target)
	}
	t.Logf("start storm: last %.3fs, floor %.4fs", start.Last, start.Floor)

	// Shared clients ask from identity-bench on sockets each sandbox's
	// process made: identityd serves them only if the kernel attributes
	// each socket to its sandbox, whose secret it carries.
	shared := run("--storm", "start", "--storm-clients", "shared", "--rounds", "1")
	assert.Equal(t, 3, shared.Served, "%v", shared.Errors)
	require.Len(t, shared.Targets, 3)
	for _, s := range shared.Targets {
		assert.Zero(t, s.Failures, s.Target)
	}
	t.Logf("start storm, shared clients: last %.3fs", shared.Last)

	restart := run("--storm", "restart", "--hold-socket", "--storm-every", "500ms", "--storm-down", "1500ms")
	assert.Equal(t, 3, restart.Served, "%v", restart.Errors)
	assert.InDelta(t, 0.5, restart.AskEvery, 0.01)
	assert.GreaterOrEqual(t, restart.Down, 1.5)
	t.Logf("restart storm with the socket held: last %.3fs after readiness", restart.Last)

	// An ask schedule no shorter than the outage is refused: some sandbox
	// would not ask while the daemon is down.
	cmd := exec.Command(filepath.Join(dir, "identity-bench"), "--sandboxes", "1", "--storm", "restart", "--storm-every", "2s", "--storm-down", "2s")
	out, err := cmd.CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "must be shorter than --storm-down")
	assertNothingLeft(t, cmd.Process.Pid)

	cmd = exec.Command(filepath.Join(dir, "identity-bench"), "--sandboxes", "1", "--storm", "restart", "--storm-clients", "shared")
	out, err = cmd.CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "--storm-clients shared is for --storm start")
	assertNothingLeft(t, cmd.Process.Pid)
}

// TestGrowTo: with --grow-to each round measures every target at both
// sizes, the world really growing and shrinking between them (identityd
// holds as many sandboxes as the label says; the same ids are made again
// after their deletion), and the growth ratios come from the same rounds.
func TestGrowTo(t *testing.T) {
	dir := build(t)
	res := runBench(t, dir, "--sandboxes", "2", "--grow-to", "4", "--rounds", "3", "--mode", "keepalive",
		"--duration", "500ms", "--warmup", "100ms", "--sign-only", "0", "--alg", "ES256", "--settle", "100ms")
	assert.Equal(t, 4, res.Config.GrowTo)
	require.Len(t, res.Measurements, 18, "three rounds, two sizes, three targets")
	// One resize per round: 2 then 4, 4 then 2, 2 then 4.
	var sizes []int
	for i, m := range res.Measurements {
		assert.Zero(t, m.Failures, "%+v", m)
		assert.Positive(t, m.Requests, "%+v", m)
		if i%3 == 0 {
			sizes = append(sizes, m.Sandboxes)
		}
	}
	assert.Equal(t, []int{2, 4, 4, 2, 2, 4}, sizes)
	require.Len(t, res.Growth, 3)
	for _, g := range res.Growth {
		assert.Equal(t, 2, g.From, g.Target)
		assert.Equal(t, 4, g.To, g.Target)
		assert.Positive(t, g.PerRound[0], g.Target)
		assert.LessOrEqual(t, g.PerRound[0], g.PerRound[1], g.Target)
		assert.LessOrEqual(t, g.PerRound[1], g.PerRound[2], g.Target)
		assert.Positive(t, g.OfMedians, g.Target)
	}
	require.Len(t, res.Ratios, 2, "identityd/baseline at each size")
	require.Len(t, res.Summaries, 6)
	assert.Equal(t, 2, res.Summaries[0].Sandboxes, "by size")
	assert.Equal(t, 4, res.Summaries[5].Sandboxes)

	cmd := exec.Command(filepath.Join(dir, "identity-bench"), "--sandboxes", "2", "--grow-to", "2")
	out, err := cmd.CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "--grow-to must be more than --sandboxes")
}

// TestPerRound pairs each round's identityd with the same round's other
// target, whatever order the rounds were measured in, and leaves out
// rounds that lack either.
func TestPerRound(t *testing.T) {
	ms := []measurement{
		{Target: "baseline", Mode: "keepalive", Round: 1, Sandboxes: 10, Throughput: 100},
		{Target: "identityd", Mode: "keepalive", Round: 1, Sandboxes: 10, Throughput: 90},
		{Target: "identityd", Mode: "keepalive", Round: 2, Sandboxes: 10, Throughput: 50},
		{Target: "baseline", Mode: "keepalive", Round: 2, Sandboxes: 10, Throughput: 40},
		{Target: "identityd", Mode: "keepalive", Round: 3, Sandboxes: 10, Throughput: 70},
		{Target: "baseline", Mode: "newconn", Round: 3, Sandboxes: 10, Throughput: 70},
		{Target: "baseline", Mode: "keepalive", Round: 1, Sandboxes: 1000, Throughput: 1},
	}
	assert.ElementsMatch(t, []float64{0.9, 1.25}, perRound(ms, "keepalive", 10, "baseline"))
	assert.Empty(t, perRound(ms, "keepalive", 10, "http"))
	assert.Equal(t, [3]float64{0.9, 1.075, 1.25}, minMedMax(perRound(ms, "keepalive", 10, "baseline")))
}

// TestGrowthOf pairs each round's two sizes per target and mode; a round
// that measured one size only is left out of the per-round ratios.
func TestGrowthOf(t *testing.T) {
	m := func(round, n int, tput float64) measurement {
		return measurement{Target: "identityd", Mode: "keepalive", Round: round, Sandboxes: n, Throughput: tput}
	}
	g := growthOf([]measurement{m(1, 10, 100), m(1, 1000, 90), m(2, 1000, 60), m(2, 10, 50), m(3, 10, 80)}, 10, 1000)
	require.Len(t, g, 1)
	assert.Equal(t, [3]float64{0.9, 1.05, 1.2}, g[0].PerRound)
	assert.InDelta(t, 75.0/80, g[0].OfMedians, 1e-9, "medians over all rounds of each size")
	assert.Equal(t, 10, g[0].From)
	assert.Equal(t, 1000, g[0].To)
}

// TestBaselineAddDrop: the baseline learns sandboxes made after it started
// and forgets deleted ones, as identityd's registry does.
func TestBaselineAddDrop(t *testing.T) {
	b := newBySource()
	sb := func(i int) serverSandbox {
		return serverSandbox{Addr: netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), ID: fmt.Sprintf("b%05d", i), App: "a", Org: "o", Secret: fmt.Sprint("s", i)}
	}
	b.add([]serverSandbox{sb(1), sb(2)})
	b.add([]serverSandbox{sb(3)})
	n := b.index[sb(3).Addr]
	got, err := b.Resolve(n, n)
	require.NoError(t, err)
	assert.Equal(t, "b00003", got.ID)
	ok, err := b.Verify("b00003", "s3")
	require.NoError(t, err)
	assert.True(t, ok)

	b.drop([]string{"b00002", "b00003"})
	_, err = b.Resolve(n, n)
	assert.Error(t, err)
	ok, _ = b.Verify("b00003", "s3")
	assert.False(t, ok)
	assert.Len(t, b.index, 1)
	ok, _ = b.Verify("b00001", "s1")
	assert.True(t, ok, "the others stay")

	// A deleted sandbox made again is known under a new number.
	b.add([]serverSandbox{sb(3)})
	assert.NotEqual(t, n, b.index[sb(3).Addr])
}

// TestRotatedTargets: each round begins with the next target, and every
// target is measured once per round.
func TestRotatedTargets(t *testing.T) {
	ts := []string{"identityd", "baseline", "http"}
	assert.Equal(t, ts, rotated(ts, 0))
	assert.Equal(t, []string{"baseline", "http", "identityd"}, rotated(ts, 1))
	assert.Equal(t, []string{"http", "identityd", "baseline"}, rotated(ts, 2))
	assert.Equal(t, ts, rotated(ts, 3))
	assert.Equal(t, []string{"identityd", "baseline", "http"}, ts, "the flag's own slice is left as it was")
	assert.Nil(t, rotated(nil, 1))
}
