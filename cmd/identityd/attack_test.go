package main

import (
	"context"
	"encoding/json"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/attacktest"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// The attacks of issue 11 (V1: a neighbour completes A's handshake with raw
// packets and presents A's secret; V2: a neighbour floods A's 4-tuples from
// its own netns) against a real daemon. B is root in its own netns, which
// is more than the attacker needs (CAP_NET_RAW for V1 and the
// transparent flood, CAP_NET_ADMIN for the fake endpoint).

// tokenFileRemote is the remote of the audit line of a token file's token.
const tokenFileRemote = "token-file"

// daemonLine is one JSON log line of the daemon, with the fields these tests
// read.
type daemonLine struct {
	Level   string `json:"level"`
	Msg     string `json:"msg"`
	Sandbox string `json:"sandbox"`
	Status  int    `json:"status"`
	Reason  string `json:"reason"`
	Remote  string `json:"remote"`
	Caller  struct {
		CgroupID uint64 `json:"cgroup_id"`
	} `json:"caller"`
	raw string
}

func (ow *world) logLines() []daemonLine {
	var out []daemonLine
	for _, s := range strings.Split(ow.stderr.String(), "\n") {
		var l daemonLine
		if json.Unmarshal([]byte(s), &l) == nil {
			l.raw = s
			out = append(out, l)
		}
	}
	return out
}

// tokensNaming counts the tokens the daemon issued naming sandbox id to a
// caller (not those of its token file, which no connection asked for), and
// returns the caller cgroups it attributed them to.
func (ow *world) tokensNaming(id string) (n int, callers map[uint64]int) {
	callers = make(map[uint64]int)
	for _, l := range ow.logLines() {
		if l.Msg == "token issued" && l.Sandbox == id && l.Remote != tokenFileRemote {
			n++
			callers[l.Caller.CgroupID]++
		}
	}
	return n, callers
}

// settledTokensNaming is tokensNaming once at least want tokens are
// logged (stderr arrives through a pipe), or after a few seconds.
func (ow *world) settledTokensNaming(id string, want int) (n int, callers map[uint64]int) {
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if n, callers = ow.tokensNaming(id); n >= want || time.Now().After(end) {
			return n, callers
		}
	}
}

// endpointOf is the token endpoint a sandbox's environment names.
func endpointOf(t *testing.T, env map[string]string) netip.AddrPort {
	t.Helper()
	u, err := url.Parse(env["MIREN_IDENTITY_TOKEN_URL"])
	require.NoError(t, err)
	ap, err := netip.ParseAddrPort(u.Host)
	require.NoError(t, err)
	return ap
}

// hwAddr is the hardware address of eth0 in the netns at path.
func hwAddr(t *testing.T, path string) string {
	t.Helper()
	h, err := netnsutil.Handle(path)
	require.NoError(t, err)
	defer h.Close()
	l, err := h.LinkByName("eth0")
	require.NoError(t, err)
	return l.Attrs().HardwareAddr.String()
}

// neighborHW is the hardware address the netns at path has cached for ip,
// or "" when it has none.
func neighborHW(t *testing.T, path string, ip netip.Addr) string {
	t.Helper()
	h, err := netnsutil.Handle(path)
	require.NoError(t, err)
	defer h.Close()
	neighs, err := h.NeighList(0, 0)
	require.NoError(t, err)
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip && n.HardwareAddr != nil {
			return n.HardwareAddr.String()
		}
	}
	return ""
}

// forgetNeighbor drops the netns at path's cache entry for ip.
func forgetNeighbor(t *testing.T, path string, ip netip.Addr) {
	t.Helper()
	h, err := netnsutil.Handle(path)
	require.NoError(t, err)
	defer h.Close()
	netnsutil.ForgetNeighbor(h, ip)
}

// poison starts B's poisoning of each spec and returns a function that
// stops them and reports how long they ran.
func poison(t *testing.T, c *sandboxtest.Client, specs ...attacktest.PoisonSpec) func() []attacktest.PoisonReport {
	t.Helper()
	var ids []int
	for _, s := range specs {
		id, err := c.Poison(s)
		require.NoError(t, err)
		ids = append(ids, id)
	}
	var once sync.Once
	var reports []attacktest.PoisonReport
	stop := func() []attacktest.PoisonReport {
		once.Do(func() {
			for i, id := range ids {
				var r attacktest.PoisonReport
				if err := c.StopAttack(id, &r); err != nil {
					t.Errorf("stop poisoning: %v", err)
				}
				t.Logf("B poisoned %s's entry for %s: %d frames in %s (target answered ARP as %q) %s",
					specs[i].Target, specs[i].Claim, r.Frames, r.Ran.Round(time.Millisecond), r.TargetHW, r.Error)
				reports = append(reports, r)
			}
		})
		return reports
	}
	t.Cleanup(func() { stop() })
	return stop
}

// TestAttackV1HijackOnSharedBridge: adopted sandboxes on another runtime's
// shared bridge, without port isolation. B poisons the host's cache entry
// for A and A's entry for the router, swallows the SYN of a connect() A
// makes, completes the handshake for A's exact 4-tuple with raw packets and
// presents A's secret, with an audience and ttl of its own. The server talks
// to B, but no socket of A's completed that handshake: 403 unknown source
// address, logged with a reason. Once B stops, A is served again, and no
// token naming A went to anyone but A. Adopting onto such a bridge is
// logged as a warning.
func TestAttackV1HijackOnSharedBridge(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	sbA, sbB := ow.w.AddSandbox("v1-a"), ow.w.AddSandbox("v1-b")
	api := controllers.NewAdminClient(ow.admin)
	tag := suffix()
	var a, b controllers.Created
	require.NoError(t, api.Do(context.Background(), "POST", "/v1/sandboxes/adopt",
		controllers.AdoptRequest{ID: "e2e-v1-a-" + tag, App: "billing", CgroupPath: sbA.CgroupDir, NetnsPath: sbA.Netns}, &a))
	require.NoError(t, api.Do(context.Background(), "POST", "/v1/sandboxes/adopt",
		controllers.AdoptRequest{ID: "e2e-v1-b-" + tag, App: "search", CgroupPath: sbB.CgroupDir, NetnsPath: sbB.Netns}, &b))

	// The daemon's stderr arrives through a pipe: wait for the lines.
	assert.Eventually(t, func() bool {
		warned := map[string]bool{}
		for _, l := range ow.logLines() {
			if l.Level == "WARN" && strings.Contains(strings.ToLower(l.raw), "isolat") {
				warned[l.Sandbox] = true
			}
		}
		return warned[a.Sandbox.ID] && warned[b.Sandbox.ID]
	}, 5*time.Second, 20*time.Millisecond, "adopting onto a shared bridge without isolation is a warning naming the sandbox:\n%s", ow.stderr)

	// B drops what it intercepts: no forwarding in its netns.
	require.NoError(t, netnsutil.SetSysctl(sbB.Netns, "net/ipv4/conf/all/forwarding", "0"))
	ca, cb := sbA.Start(t), sbB.Start(t)
	endpoint := endpointOf(t, a.Env)
	secretA := a.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	servedA := 0
	require.Equal(t, a.Sandbox.ID, fetch(t, ca, a.Env)["sandbox_id"])
	servedA++
	require.Equal(t, b.Sandbox.ID, fetch(t, cb, b.Env)["sandbox_id"])

	begin := time.Now()
	stop := poison(t, cb,
		attacktest.PoisonSpec{Claim: sbA.Addr4, Target: ow.w.Router4, Duration: time.Minute},
		attacktest.PoisonSpec{Claim: ow.w.Router4, Target: sbA.Addr4, Duration: time.Minute})
	macB := hwAddr(t, sbB.Netns)
	require.Eventually(t, func() bool {
		return neighborHW(t, ow.w.HostNetns, sbA.Addr4) == macB && neighborHW(t, sbA.Netns, ow.w.Router4) == macB
	}, 10*time.Second, 50*time.Millisecond, "B's poisoning took: the host sends A's packets to B, and A sends the router's to B")

	got := make(chan attacktest.HijackResult, 1)
	go func() {
		r, err := cb.Hijack(attacktest.HijackSpec{Victim: sbA.Addr4, Endpoint: endpoint,
			Target: "/v1/token?audience=attacker&ttl=86400", Header: map[string]string{"Authorization": "Bearer " + secretA},
			Timeout: 15 * time.Second})
		assert.NoError(t, err)
		got <- r
	}()
	fd, err := ca.Socket(4)
	require.NoError(t, err)
	require.NoError(t, ca.ConnectNonblock(fd, endpoint), "A connects; B swallows its SYN")
	r := <-got
	t.Logf("V1 on a shared bridge: B's raw handshake as %s: saw A's SYN %v, established %v, answer %d %s (%s)",
		r.Source, r.SawVictimSYN, r.Established, r.Status, strings.TrimSpace(r.Body), r.Error)
	require.True(t, r.SawVictimSYN && r.Established, "the attack itself works on this network: %+v", r)
	assert.Equal(t, 403, r.Status, "B completed A's handshake and presented A's secret")
	assert.JSONEq(t, `{"error":"unknown source address"}`, strings.TrimSpace(r.Body))
	var logged daemonLine
	if assert.Eventually(t, func() bool {
		for _, l := range ow.logLines() {
			if l.Msg == "token request refused" && l.Remote == r.Source.String() {
				logged = l
				return true
			}
		}
		return false
	}, 5*time.Second, 20*time.Millisecond, "the refusal of %s is logged:\n%s", r.Source, ow.stderr) {
		assert.Equal(t, 403, logged.Status)
		assert.NotEmpty(t, logged.Reason)
		t.Logf("daemon: %s", logged.raw)
	}

	stop()
	attack := time.Since(begin)
	// Caches that B stops refreshing age out by themselves within a minute
	// (REACHABLE, STALE, failed probes); drop them rather than wait.
	forgetNeighbor(t, ow.w.HostNetns, sbA.Addr4)
	forgetNeighbor(t, sbA.Netns, ow.w.Router4)
	served := time.Now()
	require.Eventually(t, func() bool {
		status, body := get(t, ca, a.Env, secretA, "")
		return status == 200 && claimsOf(t, body)["sandbox_id"] == a.Sandbox.ID
	}, 10*time.Second, 100*time.Millisecond, "A is served again once B stops")
	servedA++
	t.Logf("V1 on a shared bridge: attack ran %s; A served again %s after B stopped",
		attack.Round(time.Millisecond), time.Since(served).Round(time.Millisecond))

	n, callers := ow.settledTokensNaming(a.Sandbox.ID, servedA)
	assert.Equal(t, servedA, n, "every token naming A went to A's own requests")
	assert.Equal(t, map[uint64]int{a.Sandbox.CgroupID: n}, callers)
}

// TestAttackV1OnDaemonNetwork: sandboxes the daemon made. B poisons ARP as
// on a shared bridge, waits for A's SYNs, and sends SYNs with A's source
// address; none of it reaches A's traffic. A keeps fetching throughout
// with no failure, B never sees A's SYN nor a SYN-ACK to A's address, and
// no token naming A goes to anyone else.
func TestAttackV1OnDaemonNetwork(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	// e2e- ids: newWorld's cleanup removes the netns of such sandboxes.
	a := ow.create("e2e-v1n-a-"+tag, "billing")
	b := ow.create("e2e-v1n-b-"+tag, "search")
	require.NoError(t, netnsutil.SetSysctl(b.Sandbox.NetnsPath, "net/ipv4/conf/all/forwarding", "0"))
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	cb := sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath)
	endpoint := endpointOf(t, a.Env)
	addrA := a.Sandbox.Addresses[0].Addr()
	secretA := a.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	require.Equal(t, a.Sandbox.ID, fetch(t, ca, a.Env)["sandbox_id"])
	require.Equal(t, b.Sandbox.ID, fetch(t, cb, b.Env)["sandbox_id"])

	const duration = 8 * time.Second
	begin := time.Now()
	stop := poison(t, cb,
		attacktest.PoisonSpec{Claim: addrA, Target: endpoint.Addr(), Duration: duration + 30*time.Second},
		attacktest.PoisonSpec{Claim: endpoint.Addr(), Target: addrA, Duration: duration + 30*time.Second})

	// A fetches every 100 ms, each time on a new connection, for duration.
	var okA, failedA int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for end := time.Now().Add(duration); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
			resps, err := ca.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: a.Env["MIREN_IDENTITY_TOKEN_URL"], Timeout: 2 * time.Second,
				Header: map[string]string{"Authorization": "Bearer " + secretA}})
			if err == nil && resps[0].Status == 200 {
				okA++
			} else {
				failedA++
			}
		}
	}()
	hijack := func(port uint16, timeout time.Duration) attacktest.HijackResult {
		r, err := cb.Hijack(attacktest.HijackSpec{Victim: addrA, Port: port, Endpoint: endpoint,
			Target: "/v1/token?audience=attacker", Header: map[string]string{"Authorization": "Bearer " + secretA}, Timeout: timeout})
		require.NoError(t, err)
		return r
	}
	var results []attacktest.HijackResult
	// B waits for a SYN of A's to take over, again and again while A polls.
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
			results = append(results, hijack(0, time.Second))
		}
	}
	// And B spoofs A's address outright on ports of its choosing.
	for _, port := range []uint16{40000, 50001, 60999} {
		results = append(results, hijack(port, 2*time.Second))
	}
	stop()
	attack := time.Since(begin)

	sawSYN, established, answered := 0, 0, 0
	for _, r := range results {
		if r.SawVictimSYN {
			sawSYN++
		}
		if r.Established {
			established++
		}
		if r.Status != 0 {
			answered++
		}
		assert.NotEqual(t, 200, r.Status, "B got a token with A's secret: %+v", r)
	}
	t.Logf("V1 on the daemon's network: attack ran %s; A: %d of %d requests served, %d failed; B: %d hijack attempts, saw A's SYN %d times, %d handshakes completed, %d answers",
		attack.Round(time.Millisecond), okA, okA+failedA, failedA, len(results), sawSYN, established, answered)
	assert.NotZero(t, okA)
	assert.Zero(t, failedA, "A failed during B's attack")
	assert.Zero(t, sawSYN, "B saw A's SYN")
	assert.Zero(t, established, "a SYN with A's source address from B was answered")

	n, callers := ow.settledTokensNaming(a.Sandbox.ID, okA+1)
	assert.Equal(t, okA+1, n, "A's own requests, and no more")
	assert.Equal(t, map[uint64]int{a.Sandbox.CgroupID: n}, callers, "tokens naming A went to A only")
}

// TestAttackV2FloodOfAsTuples: B holds a socket bound to A's address on
// every port of A's ephemeral range, connecting to the token endpoint:
// (transparent) with IP_TRANSPARENT, out through the real path; (fake
// endpoint) with A's address and the router's on a veth pair inside B's own
// netns and B's listener on the router's address, so that every one of B's
// sockets completes its handshake under A's 4-tuple. Meanwhile A makes 200
// requests, each on a new connection: every one is served, as A.
func TestAttackV2FloodOfAsTuples(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	a := ow.create("e2e-v2-a-"+tag, "billing")
	b := ow.create("e2e-v2-b-"+tag, "search")
	const first, last, requests = 40000, 40999, 200
	require.NoError(t, netnsutil.SetSysctl(a.Sandbox.NetnsPath, "net/ipv4/ip_local_port_range", "40000 40999"))
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	endpoint := endpointOf(t, a.Env)
	addrA := a.Sandbox.Addresses[0].Addr()
	req := sandboxtest.HTTPRequest{Method: "GET", URL: a.Env["MIREN_IDENTITY_TOKEN_URL"], Timeout: 5 * time.Second,
		Header: map[string]string{"Authorization": "Bearer " + a.Env["MIREN_IDENTITY_TOKEN_SECRET"]}}
	fd, err := ca.Socket(4)
	require.NoError(t, err)
	local, err := ca.Connect(fd, endpoint)
	require.NoError(t, err)
	require.True(t, local.Port() >= first && local.Port() <= last, "A's connections come from %d-%d: %s", first, last, local)
	require.Equal(t, a.Sandbox.ID, fetch(t, ca, a.Env)["sandbox_id"])
	servedA := 1

	for _, variant := range []struct {
		name        string
		fake        bool
		transparent bool
	}{{"transparent", false, true}, {"fake endpoint", true, false}} {
		t.Run(variant.name, func(t *testing.T) {
			cb := sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath)
			defer cb.Close()
			if variant.fake {
				id, err := cb.FakeEndpoint(attacktest.FakeEndpointSpec{Victim: addrA, Endpoint: endpoint, Duration: 2 * time.Minute})
				require.NoError(t, err)
				defer func() {
					var r attacktest.FakeEndpointReport
					require.NoError(t, cb.StopAttack(id, &r))
					t.Logf("B's fake endpoint accepted %d connections in %s", r.Accepted, r.Held.Round(time.Millisecond))
				}()
			}
			id, flood, err := cb.Flood(attacktest.FloodSpec{Source: addrA, FirstPort: first, LastPort: last, Endpoint: endpoint,
				Transparent: variant.transparent, Duration: 2 * time.Minute})
			require.NoError(t, err)
			require.Equal(t, last-first+1, flood.Sockets, "B holds a socket on every port of A's range: %+v", flood)
			if variant.fake {
				require.Equal(t, flood.Sockets, flood.Connected, "each of B's sockets completed a handshake under A's 4-tuple")
			}

			start := time.Now()
			res, err := ca.Load(req, requests)
			require.NoError(t, err)
			took := time.Since(start)
			require.NoError(t, cb.StopAttack(id, &flood))
			servedA += requests - res.Failures
			t.Logf("V2 %s: B held %d sockets on %s ports %d-%d (%d completed handshakes) for %s; A: %d of %d served (%.1f%%) in %s",
				variant.name, flood.Sockets, addrA, first, last, flood.Connected, flood.Held.Round(time.Millisecond),
				requests-res.Failures, requests, 100*float64(requests-res.Failures)/requests, took.Round(time.Millisecond))
			assert.Zero(t, res.Failures, "A was refused while B flooded its 4-tuples")
		})
	}

	refused := 0
	for _, l := range ow.logLines() {
		if l.Msg == "token request refused" {
			if refused++; refused <= 3 {
				t.Logf("refused: %s", l.raw)
			}
		}
	}
	assert.Zero(t, refused, "no request was refused")
	n, callers := ow.settledTokensNaming(a.Sandbox.ID, servedA)
	assert.Equal(t, servedA, n)
	assert.Equal(t, map[uint64]int{a.Sandbox.CgroupID: n}, callers, "tokens naming A went to A only")
}
