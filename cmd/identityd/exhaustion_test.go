package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestConnectionFloodIsBounded plays issue 11's descriptor exhaustion against
// a real daemon with its default limits: a host process opens thousands of
// connections to the token endpoint and holds them, and sandbox B opens ten
// times its share. The daemon keeps its descriptors and memory bounded,
// sandbox A is served throughout, and the admin socket and /readyz answer.
func TestConnectionFloodIsBounded(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	a := ow.create("flood-a-"+tag, "billing")
	b := ow.create("flood-b-"+tag, "search")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	cb := sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath)
	secretA := a.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	status, body := get(t, ca, a.Env, secretA, "")
	require.Equal(t, http.StatusOK, status, body)
	pid := ow.daemon.Process.Pid
	fdsBefore, rssBefore := openFDs(t, pid), rssKiB(t, pid, "VmRSS")

	endpoint := tokenEndpoint(t, a.Env)
	const hostConns, sandboxConns = 3000, 640
	start := time.Now()
	var flood []net.Conn
	resetAtConnect := 0
	require.NoError(t, netnsutil.Do(ow.w.HostNetns, func() error {
		d := net.Dialer{Timeout: 5 * time.Second}
		for i := range hostConns {
			c, err := d.Dial("tcp", endpoint.String())
			// The daemon may reset a refused connection before connect()
			// has even returned here.
			if errors.Is(err, syscall.ECONNRESET) {
				resetAtConnect++
				continue
			}
			if err != nil {
				return fmt.Errorf("flood connection %d: %w", i, err)
			}
			flood = append(flood, c)
		}
		return nil
	}))
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	_, err := cb.Dial(endpoint, sandboxConns)
	require.NoError(t, err)
	floodTime := time.Since(start)

	// Served during the flood: A, on new connections each time; the admin
	// API; the operator endpoint.
	const requests = 50
	for i := range requests {
		status, body := get(t, ca, a.Env, secretA, "")
		require.Equal(t, http.StatusOK, status, "request %d of A during the flood: %s", i, body)
	}
	require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "GET", "/v1/sandboxes", nil, nil))
	ready := operatorGet(t, ow, "/readyz")
	assert.Contains(t, ready, "ready")

	fdsDuring, rssDuring, hwm := openFDs(t, pid), rssKiB(t, pid, "VmRSS"), rssKiB(t, pid, "VmHWM")
	metrics := operatorGet(t, ow, "/metrics")
	refusedOthers := metricValue(metrics, `identityd_token_connections_refused_total{reason="others_cap"}`)
	refusedSandbox := metricValue(metrics, `identityd_token_connections_refused_total{reason="sandbox_cap"}`)
	t.Logf("flood: %d host (%d reset before connect returned) + %d sandbox connections opened in %s; daemon fds %d -> %d, RSS %d -> %d KiB (peak %d KiB); closed at accept: others_cap %.0f, sandbox_cap %.0f; A served %d/%d",
		hostConns, resetAtConnect, sandboxConns, floodTime.Round(time.Millisecond), fdsBefore, fdsDuring, rssBefore, rssDuring, hwm,
		refusedOthers, refusedSandbox, requests, requests)

	// The daemon holds at most the non-sandbox pool (256), B's share (64),
	// and what it held before, plus a few of A's connections.
	assert.LessOrEqual(t, fdsDuring, fdsBefore+256+64+16, "descriptors held during the flood")
	assert.GreaterOrEqual(t, refusedOthers, float64(hostConns-256-16))
	assert.GreaterOrEqual(t, refusedSandbox, float64(sandboxConns-64))
	// Nothing was retired: both sandboxes are still known.
	var list []controllers.Record
	require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "GET", "/v1/sandboxes", nil, &list))
	assert.Len(t, list, 2)
}

// tokenEndpoint is the address in a sandbox's MIREN_IDENTITY_TOKEN_URL.
func tokenEndpoint(t *testing.T, env map[string]string) netip.AddrPort {
	t.Helper()
	hostPort, _, _ := strings.Cut(strings.TrimPrefix(env["MIREN_IDENTITY_TOKEN_URL"], "http://"), "/")
	ap, err := netip.ParseAddrPort(hostPort)
	require.NoError(t, err)
	return ap
}

func operatorGet(t *testing.T, ow *world, path string) string {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + ow.operator + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b)
}

// metricValue finds one sample in Prometheus text output; 0 if absent.
func metricValue(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

func openFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	require.NoError(t, err)
	return len(entries)
}

// rssKiB reads a Vm* line (VmRSS, VmHWM) of /proc/<pid>/status.
func rssKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}
