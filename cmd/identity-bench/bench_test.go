package main

import (
	"bytes"
	"encoding/json"
	"fmt"
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

// TestSmoke runs the tool for a tiny configuration and checks that it
// completes, reports figures that make sense, and cleans up. It asserts no
// speed: the machine is shared.
func TestSmoke(t *testing.T) {
	dir := build(t)
	cmd := exec.Command(filepath.Join(dir, "identity-bench"), "--sandboxes", "2", "--clients", "1", "--duration", "1s",
		"--warmup", "100ms", "--sign-only", "200ms", "--alg", "ES256", "--json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Run(), "stderr:\n%s", stderr.String())
	assertNothingLeft(t, cmd.Process.Pid)

	var res result
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &res), stdout.String())
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
