package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// get makes one token request from c with secret, optionally from a given
// source address, and returns status and body.
func get(t *testing.T, c *sandboxtest.Client, env map[string]string, secret, source string) (int, string) {
	t.Helper()
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: env["MIREN_IDENTITY_TOKEN_URL"], Source: source,
		Header: map[string]string{"Authorization": "Bearer " + secret}})
	require.NoError(t, err)
	return resps[0].Status, strings.TrimSpace(resps[0].Body)
}

// lastRefusal waits for the daemon's log line about the latest refusal.
func (ow *world) lastRefusal(t *testing.T, n int) refusal {
	t.Helper()
	var rs []refusal
	require.Eventually(t, func() bool { rs = ow.refusals(); return len(rs) >= n }, 5*time.Second, 10*time.Millisecond)
	return rs[n-1]
}

// TestImpostorsAreRefused plays each impostor against a real daemon and
// checks the refusal and its log line, which names what the kernel attested.
func TestImpostorsAreRefused(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	a := ow.create("e2e-a-"+tag, "billing")
	b := ow.create("e2e-b-"+tag, "search")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	cb := sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath)
	secretA, secretB := a.Env["MIREN_IDENTITY_TOKEN_SECRET"], b.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	refused := 0
	expect := func(t *testing.T, status int, body string, wantStatus int, wantMsg, wantReason string, cgroupID uint64) {
		t.Helper()
		assert.Equal(t, wantStatus, status, body)
		assert.JSONEq(t, fmt.Sprintf(`{"error":%q}`, wantMsg), body)
		refused++
		r := ow.lastRefusal(t, refused)
		assert.Equal(t, wantReason, r.Reason)
		assert.Equal(t, cgroupID, r.Caller.CgroupID, "the log names the attested cgroup")
	}

	status, body := get(t, ca, a.Env, secretA, "")
	require.Equal(t, 200, status, "A itself is served: %s", body)

	t.Run("B with A's stolen secret", func(t *testing.T) {
		status, body := get(t, cb, a.Env, secretA, "")
		expect(t, status, body, 403, "invalid token", "bad_secret", b.Sandbox.CgroupID)
	})
	t.Run("host root process with A's secret", func(t *testing.T) {
		req, _ := http.NewRequest("GET", a.Env["MIREN_IDENTITY_TOKEN_URL"], nil)
		req.Header.Set("Authorization", "Bearer "+secretA)
		client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, n, addr string) (net.Conn, error) {
			var c net.Conn
			err := ow.w.Do(func() (err error) { c, err = net.Dial(n, addr); return err })
			return c, err
		}}}
		resp, err := client.Do(req)
		require.NoError(t, err)
		var sb strings.Builder
		buf := make([]byte, 512)
		n, _ := resp.Body.Read(buf)
		sb.Write(buf[:n])
		resp.Body.Close()
		self, err := os.ReadFile("/proc/self/cgroup")
		require.NoError(t, err)
		root, _ := cgroup2.Root()
		var selfID uint64
		for _, line := range strings.Split(string(self), "\n") {
			if p, ok := strings.CutPrefix(line, "0::"); ok {
				selfID, _ = cgroup2.ID(root + p)
			}
		}
		expect(t, resp.StatusCode, strings.TrimSpace(sb.String()), 403, "unknown source address", "unknown_sandbox", selfID)
	})
	t.Run("B takes A's address", func(t *testing.T) {
		// B, root in its own netns, puts A's address on its eth0 and
		// connects from it. The host's strict reverse-path filter drops
		// what arrives on B's veth from an address routed to A's: no
		// connection, nothing for anyone to answer. A is not disturbed.
		addrA := a.Sandbox.Addresses[0]
		nlAddrA := &netlink.Addr{IPNet: netnsutil.IPNet(addrA)}
		h, err := netnsutil.Handle(b.Sandbox.NetnsPath)
		require.NoError(t, err)
		defer h.Close()
		eth0, err := h.LinkByName("eth0")
		require.NoError(t, err)
		require.NoError(t, h.AddrAdd(eth0, nlAddrA))
		defer h.AddrDel(eth0, nlAddrA)
		source := netip.AddrPortFrom(addrA.Addr(), 0).String()
		for _, secret := range []string{secretA, secretB} {
			_, err := cb.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: a.Env["MIREN_IDENTITY_TOKEN_URL"], Source: source,
				Header: map[string]string{"Authorization": "Bearer " + secret}, Timeout: 2 * time.Second})
			require.Error(t, err, "a connection from A's address through B's veth")
			assert.ErrorContains(t, err, "timeout")
		}
		status, body := get(t, ca, a.Env, secretA, "")
		require.Equal(t, 200, status, body)
		assert.Equal(t, a.Sandbox.ID, claimsOf(t, body)["sandbox_id"])
	})
	t.Run("A's cgroup re-created by someone else", func(t *testing.T) {
		// Adopted, not created: the resync retires it once it sees the
		// new cgroup, and retiring an adopted sandbox leaves its netns and
		// link, so the refusal below is the same whether or not that has
		// happened yet (a created one's netns would go with it).
		other := ow.w.AddSandbox("x")
		var x controllers.Created
		require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "POST", "/v1/sandboxes/adopt",
			controllers.AdoptRequest{ID: "e2e-x-" + tag, App: "victim", CgroupPath: other.CgroupDir}, &x))
		require.NoError(t, os.Remove(other.CgroupDir))
		require.NoError(t, os.Mkdir(other.CgroupDir, 0o755))
		newID, err := cgroup2.ID(other.CgroupDir)
		require.NoError(t, err)
		cx := sandboxtest.StartClient(t, other.CgroupDir, other.Netns)
		status, body := get(t, cx, x.Env, x.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		expect(t, status, body, 403, "unknown source address", "unknown_sandbox", newID)
	})
	t.Run("A deleted, C on A's recycled address replays A's secret", func(t *testing.T) {
		require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "DELETE",
			"/v1/sandboxes/"+a.Sandbox.ID+"?kill=true", nil, nil))
		c := ow.create("e2e-c-"+tag, "newcomer")
		require.Equal(t, a.Sandbox.Addresses, c.Sandbox.Addresses, "the pool hands A's address to C")
		cc := sandboxtest.StartClient(t, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)
		status, body := get(t, cc, c.Env, secretA, "")
		expect(t, status, body, 403, "invalid token", "bad_secret", c.Sandbox.CgroupID)
		status, body = get(t, cc, c.Env, c.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		require.Equal(t, 200, status, body)
		assert.Equal(t, c.Sandbox.ID, claimsOf(t, body)["sandbox_id"])
	})
}

// TestSocketFromBeforeTheProgramsIsAttributed: sockets made in sandbox A
// before identityd ever attached its programs, by a task that then moves into
// sandbox B's cgroup. They still belong to A, whose cgroup the kernel stored
// in each socket at socket(): B's secret over one is refused and logged with
// A's cgroup id; A's secret over the other is served as A. Nothing about such
// a socket is guessed, and start-up order opens no way to pass as B.
func TestSocketFromBeforeTheProgramsIsAttributed(t *testing.T) {
	ow := newWorld(t)
	sbA, sbB := ow.w.AddSandbox("early-a"), ow.w.AddSandbox("early-b")
	client := sbA.Start(t)
	withB, err := client.Socket(4)
	require.NoError(t, err)
	withA, err := client.Socket(4)
	require.NoError(t, err)

	ow.start()
	api := controllers.NewAdminClient(ow.admin)
	tag := suffix()
	var a, b controllers.Created
	require.NoError(t, api.Do(context.Background(), "POST", "/v1/sandboxes/adopt",
		controllers.AdoptRequest{ID: "e2e-early-a-" + tag, App: "web", CgroupPath: sbA.CgroupDir}, &a))
	require.NoError(t, api.Do(context.Background(), "POST", "/v1/sandboxes/adopt",
		controllers.AdoptRequest{ID: "e2e-early-b-" + tag, App: "billing", CgroupPath: sbB.CgroupDir}, &b))
	require.NoError(t, client.MoveTo(sbB.CgroupDir))

	// The world's sandbox reaches the daemon's router through the world's
	// bridge and the host netns's routes.
	request := func(fd int, secret string) sandboxtest.HTTPResponse {
		resps, err := client.HTTP(sandboxtest.HTTPRequest{Method: "GET", FD: fd, URL: a.Env["MIREN_IDENTITY_TOKEN_URL"],
			Header: map[string]string{"Authorization": "Bearer " + secret}})
		require.NoError(t, err)
		return resps[0]
	}
	r := request(withB, b.Env["MIREN_IDENTITY_TOKEN_SECRET"])
	assert.Equal(t, 403, r.Status)
	assert.JSONEq(t, `{"error":"invalid token"}`, r.Body)
	refusal := ow.lastRefusal(t, 1)
	assert.Equal(t, "bad_secret", refusal.Reason)
	assert.Equal(t, sbA.CgroupID, refusal.Caller.CgroupID, "the log names the cgroup the socket was created in")
	assert.Equal(t, sbA.NetnsCookie, refusal.Caller.NetnsCookie)

	r = request(withA, a.Env["MIREN_IDENTITY_TOKEN_SECRET"])
	require.Equal(t, 200, r.Status, r.Body)
	assert.Equal(t, a.Sandbox.ID, claimsOf(t, r.Body)["sandbox_id"])
}

// TestFloodDoesNotStarveOthers: B opens connections to the token port as
// fast as it can (bounded) while A keeps fetching; A is never refused and
// nothing is attributed to the wrong sandbox.
func TestFloodDoesNotStarveOthers(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	a := ow.create("e2e-a-"+tag, "billing")
	b := ow.create("e2e-b-"+tag, "search")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	var flooders []*sandboxtest.Client
	for range 2 {
		flooders = append(flooders, sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath))
	}

	var stop atomic.Bool
	var wg sync.WaitGroup
	var flood atomic.Int64
	for _, f := range flooders {
		wg.Go(func() {
			for !stop.Load() {
				// B presents A's secret: every one must be refused as B.
				res, err := f.Load(sandboxtest.HTTPRequest{Method: "GET", URL: b.Env["MIREN_IDENTITY_TOKEN_URL"],
					Header: map[string]string{"Authorization": "Bearer " + a.Env["MIREN_IDENTITY_TOKEN_SECRET"]}}, 200)
				if err != nil {
					t.Error(err)
					return
				}
				flood.Add(int64(len(res.Latencies)))
				if res.Failures != len(res.Latencies) {
					t.Errorf("B got %d tokens with A's secret", len(res.Latencies)-res.Failures)
				}
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	okA := 0
	for time.Now().Before(deadline) {
		status, body := get(t, ca, a.Env, a.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		require.Equal(t, 200, status, "A was refused during B's flood: %s", body)
		require.Equal(t, a.Sandbox.ID, claimsOf(t, body)["sandbox_id"])
		okA++
		time.Sleep(50 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("B flooded %d requests in 5 s; A got %d of %d tokens", flood.Load(), okA, okA)
	for _, r := range ow.refusals() {
		require.Equal(t, b.Sandbox.CgroupID, r.Caller.CgroupID, "a refusal attributed to another cgroup: %+v", r)
	}
}

// claimsOf decodes the claims of the token in a 200 body.
func claimsOf(t *testing.T, body string) map[string]any {
	t.Helper()
	var v struct{ Value string }
	require.NoError(t, json.Unmarshal([]byte(body), &v))
	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(v.Value, ".")[1])
	require.NoError(t, err)
	var claims map[string]any
	require.NoError(t, json.Unmarshal(payload, &claims))
	return claims
}

// TestSlowlorisAndOversizedHeaders: connections that dribble their headers
// are closed by the header timeout, oversized headers are refused, and a
// sandbox asking meanwhile is served.
func TestSlowlorisAndOversizedHeaders(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	a := ow.create("e2e-a-"+suffix(), "billing")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	endpoint := strings.TrimSuffix(strings.TrimPrefix(a.Env["MIREN_IDENTITY_TOKEN_URL"], "http://"), "/v1/token")
	dial := func() net.Conn {
		var c net.Conn
		require.NoError(t, ow.w.Do(func() (err error) { c, err = net.Dial("tcp", endpoint); return err }))
		return c
	}

	// 20 slowloris connections, one header byte a second.
	const slow = 20
	closedAfter := make(chan time.Duration, slow)
	for range slow {
		c := dial()
		defer c.Close()
		go func() {
			start := time.Now()
			c.Write([]byte("GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Slow: "))
			for i := 0; i < 30; i++ {
				if _, err := c.Write([]byte("a")); err != nil {
					break
				}
				c.SetReadDeadline(time.Now().Add(time.Second))
				if _, err := c.Read(make([]byte, 1)); err != nil && !isTimeout(err) {
					break
				}
			}
			closedAfter <- time.Since(start)
		}()
	}

	// Oversized headers: refused, the connection not kept.
	c := dial()
	defer c.Close()
	fmt.Fprintf(c, "GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", strings.Repeat("b", 64<<10))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, _ := c.Read(buf)
	assert.Contains(t, string(buf[:n]), "431", "oversized headers get 431")

	// Meanwhile the sandbox is served, promptly.
	for range 5 {
		start := time.Now()
		status, body := get(t, ca, a.Env, a.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		require.Equal(t, 200, status, body)
		assert.Less(t, time.Since(start), 2*time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	var worst time.Duration
	for range slow {
		d := <-closedAfter
		worst = max(worst, d)
	}
	t.Logf("slowloris connections closed by the server after at most %s", worst.Round(time.Millisecond))
	assert.Less(t, worst, 15*time.Second, "the header timeout closes dribbling connections")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
