package main

import (
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestReadinessProvesAttribution: /readyz is "ready" only while a
// connection the daemon makes to its own token endpoint, from a cgroup of
// its own, is attributed to that cgroup and netns by the kernel. Detaching
// the sockops program underneath the running daemon turns it 503, with the
// reason, a metric and a log line, until the repair brings the program back
// and a probe passes again. Meanwhile a sandbox fetching tokens as fast as
// it can is never refused outside the detached window: the probe never
// takes a sandbox's connection or record.
func TestReadinessProvesAttribution(t *testing.T) {
	ow := newWorld(t)
	ow.args = append(ow.args, "--check-interval", "300ms")
	ow.start()
	require.Eventually(t, func() bool { return strings.Contains(operatorGet(t, ow, "/readyz"), `"ready"`) },
		10*time.Second, 20*time.Millisecond, "ready once the probe passed")

	a := ow.create("e2e-ready-"+suffix(), "web")
	client := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	secret := a.Env["MIREN_IDENTITY_TOKEN_SECRET"]

	// Many probes while the sandbox asks: every answer is a token naming it.
	var served, limited, refused atomic.Int64
	var load sync.WaitGroup
	stop := make(chan struct{})
	load.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			status, body := get(t, client, a.Env, secret, "")
			switch {
			case status == http.StatusOK && claimsOf(t, body)["sandbox_id"] == a.Sandbox.ID:
				served.Add(1)
			case status == http.StatusTooManyRequests: // the world's 1000/s budget
				limited.Add(1)
			default:
				refused.Add(1)
			}
		}
	})
	time.Sleep(2 * time.Second)
	close(stop)
	load.Wait()
	probeFailures := metricSum(operatorGet(t, ow, "/metrics"), "identityd_readiness_probe_failures_total")
	t.Logf("while probes ran every 300 ms for 2 s: %d tokens for the sandbox, %d over its rate limit, %d refused otherwise",
		served.Load(), limited.Load(), refused.Load())
	assert.Zero(t, refused.Load(), "the probe took none of the sandbox's connections")
	assert.NotZero(t, served.Load())
	assert.Zero(t, probeFailures)

	// Detach sockops through its pinned link, as bpftool would.
	l, err := link.LoadPinnedLink(filepath.Join(ow.pins, "links", "record_connect"), nil)
	require.NoError(t, err)
	require.NoError(t, l.Detach())
	l.Close()
	var reason string
	require.Eventually(t, func() bool {
		reason = operatorGet(t, ow, "/readyz")
		return strings.Contains(reason, "not ready")
	}, 10*time.Second, 5*time.Millisecond, "/readyz turns 503 once a probe's connection goes unattributed")
	t.Logf("/readyz while detached: %s", strings.TrimSpace(reason))
	assert.Contains(t, reason, "attribution")
	require.Eventually(t, func() bool { return strings.Contains(operatorGet(t, ow, "/readyz"), `"ready"`) },
		10*time.Second, 20*time.Millisecond, "ready again after the repair")
	metrics := operatorGet(t, ow, "/metrics")
	assert.GreaterOrEqual(t, metricValue(metrics, `identityd_readiness_probe_failures_total{reason="no_record"}`), 1.0)
	assert.Contains(t, ow.stderr.String(), "readiness probe failed")
	status, body := get(t, client, a.Env, secret, "")
	require.Equal(t, http.StatusOK, status, body)
}

// metricSum adds up every series of a metric in Prometheus text output.
func metricSum(text, name string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, name); ok && (strings.HasPrefix(rest, "{") || strings.HasPrefix(rest, " ")) {
			fields := strings.Fields(rest)
			if v, err := strconv.ParseFloat(fields[len(fields)-1], 64); err == nil {
				sum += v
			}
		}
	}
	return sum
}
