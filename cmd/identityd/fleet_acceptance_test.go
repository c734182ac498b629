package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/etcdtest"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// fleetMaxTTL is the fleet's --max-ttl: the contract's 60 s minimum token
// lifetime, so that every wait on a key's lease is as short as it can be.
const fleetMaxTTL = 60 * time.Second

// fleetPublishDelay is the fleet's --key-publish-delay: long enough for a
// new key to reach every node's JWKS through the watches, short for a test.
const fleetPublishDelay = 3 * time.Second

// issuerProxy stands behind the fleet's issuer URL, as a load balancer
// would: it forwards each request to the nodes' discovery listeners in
// turn, skipping one that does not answer.
type issuerProxy struct {
	URL      string
	backends []string // host:port of the discovery listeners
	next     atomic.Uint64
	hits     []atomic.Int64
	tr       *http.Transport
}

func startIssuerProxy(t *testing.T, backends []string) *issuerProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &issuerProxy{URL: "http://" + ln.Addr().String(), backends: backends,
		hits: make([]atomic.Int64, len(backends)), tr: &http.Transport{DisableKeepAlives: true}}
	rp := &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.Out.URL.Scheme, pr.Out.URL.Host = "http", "backend" },
		Transport: p,
	}
	srv := &http.Server{Handler: rp, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close(); p.tr.CloseIdleConnections() })
	return p
}

// RoundTrip sends req to the next backend that answers. Only GETs of
// discovery and the JWKS come through, so trying another is safe.
func (p *issuerProxy) RoundTrip(req *http.Request) (*http.Response, error) {
	start := p.next.Add(1)
	var errs error
	for i := range p.backends {
		b := int((start + uint64(i)) % uint64(len(p.backends)))
		out := req.Clone(req.Context())
		out.URL.Host = p.backends[b]
		resp, err := p.tr.RoundTrip(out)
		if err == nil {
			p.hits[b].Add(1)
			return resp, nil
		}
		errs = errors.Join(errs, err)
	}
	return nil, errs
}

// fleetNode is one identityd of the fleet, in its own world, with one
// sandbox whose workload fetches tokens.
type fleetNode struct {
	name   string
	ow     *world
	disc   string // its --discovery-listen address
	sb     controllers.Created
	client *sandboxtest.Client
}

// acceptanceFleet is three identityd nodes sharing a 3-member etcd cluster and one
// issuer.
type acceptanceFleet struct {
	etcd   *etcdtest.Cluster
	proxy  *issuerProxy
	issuer string
	prefix string
	nodes  []*fleetNode
}

// fleetMissing names what the binaries lack for the fleet acceptance test,
// or is empty.
func fleetMissing(bin string) string {
	help, _ := exec.Command(filepath.Join(bin, "identityd"), "serve", "--help").CombinedOutput()
	for _, f := range []string{"--etcd-endpoints", "--etcd-prefix", "--max-ttl", "--discovery-listen", "--node-name"} {
		if !strings.Contains(string(help), f) {
			return "identityd serve " + f
		}
	}
	return ""
}

// ctlMissing reports whether identityctl lacks the command.
func ctlMissing(bin, cmd string) bool {
	return exec.Command(filepath.Join(bin, "identityctl"), cmd, "--help").Run() != nil
}

func startAcceptanceFleet(t *testing.T) *acceptanceFleet {
	t.Helper()
	f := &acceptanceFleet{etcd: etcdtest.Start(t, 3), prefix: "/identityd-test-" + suffix() + "/"}
	var discs []string
	for range 3 {
		discs = append(discs, freeLoopbackAside(t))
	}
	f.proxy = startIssuerProxy(t, discs)
	f.issuer = f.proxy.URL
	for i := range 3 {
		n := &fleetNode{name: fmt.Sprintf("node%d", i+1), ow: newWorld(t), disc: discs[i]}
		n.ow.args = append(n.ow.args, "--discovery-listen", n.disc, "--issuer", f.issuer, "--node-name", n.name,
			"--etcd-endpoints", strings.Join(f.etcd.Endpoints(), ","), "--etcd-prefix", f.prefix,
			"--max-ttl", fleetMaxTTL.String(), "--key-publish-delay", fleetPublishDelay.String())
		t.Cleanup(func() {
			if t.Failed() && n.ow.stderr != nil {
				lines := strings.Split(strings.TrimSpace(n.ow.stderr.String()), "\n")
				t.Logf("%s's log, last lines:\n%s", n.name, strings.Join(lines[max(0, len(lines)-25):], "\n"))
			}
		})
		took := n.ow.start()
		n.ow.waitReady() // the first key is published for the delay before it signs
		t.Logf("%s ready in %s", n.name, took.Round(time.Millisecond))
		n.sb = n.ow.create("fleet-"+n.name+"-"+suffix(), "web")
		require.Equal(t, f.issuer, n.sb.Env["MIREN_OIDC_ISSUER_URL"])
		n.client = sandboxtest.StartClient(t, n.sb.Sandbox.CgroupPath, n.sb.Sandbox.NetnsPath)
		f.nodes = append(f.nodes, n)
	}
	return f
}

// token fetches a token from inside the node's sandbox: the raw JWT on 200,
// else the status and body.
func (n *fleetNode) token(t *testing.T) (status int, token, body string) {
	t.Helper()
	resps, err := n.client.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: n.sb.Env["MIREN_IDENTITY_TOKEN_URL"],
		Header: map[string]string{"Authorization": "Bearer " + n.sb.Env["MIREN_IDENTITY_TOKEN_SECRET"]}})
	require.NoError(t, err)
	if resps[0].Status != http.StatusOK {
		return resps[0].Status, "", resps[0].Body
	}
	return http.StatusOK, claimsOfToken(t, resps[0].Body), resps[0].Body
}

// mustToken is token when it must succeed; it returns the JWT, its kid and
// its claims.
func (n *fleetNode) mustToken(t *testing.T) (string, string, map[string]any) {
	t.Helper()
	status, tok, body := n.token(t)
	require.Equal(t, http.StatusOK, status, "token from %s: %s", n.name, body)
	_, kid := header(t, tok)
	return tok, kid, claimsOf(t, body)
}

// create asks the node's admin API for a sandbox, within 30 s; it does not
// fail the test.
func (n *fleetNode) create(ctx context.Context, id string) (controllers.Created, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var c controllers.Created
	err := controllers.NewAdminClient(n.ow.admin).Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: id, App: "web"}, &c)
	if err == nil {
		n.ow.made = append(n.ow.made, c.Sandbox.NetnsPath)
	}
	return c, err
}

func (n *fleetNode) remove(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return controllers.NewAdminClient(n.ow.admin).Do(ctx, "DELETE", "/v1/sandboxes/"+id, nil, nil)
}

// ctl runs identityctl against the node's admin socket.
func (n *fleetNode) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(n.ow.bin, "identityctl"),
		append([]string{"--admin-socket", n.ow.admin}, args...)...).CombinedOutput()
	return string(out), err
}

// fleetNodeInfo is a line of `identityctl nodes -o json`.
type fleetNodeInfo struct {
	Node     string    `json:"node"`
	Kids     []string  `json:"kids"`
	LastSeen time.Time `json:"last_seen"`
	Evicted  bool      `json:"evicted"`
}

// listNodes runs `identityctl nodes -o json` on the node.
func (n *fleetNode) listNodes(t *testing.T) map[string]fleetNodeInfo {
	t.Helper()
	out, err := n.ctl("nodes", "-o", "json")
	require.NoError(t, err, "%s", out)
	var list []fleetNodeInfo
	require.NoError(t, json.Unmarshal([]byte(out), &list), "%s", out)
	m := map[string]fleetNodeInfo{}
	for _, i := range list {
		m[i.Node] = i
	}
	return m
}

// kidsAt reads the kids of the JWKS at url, without failing the test.
func kidsAt(url string) ([]string, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var set jwks
	if err := json.NewDecoder(resp.Body).Decode(&set); err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	return set.kids(), nil
}

func (n *fleetNode) jwksURL() string { return "http://" + n.disc + "/.well-known/jwks.json" }

// verifier is a relying party that knows only the issuer URL: discovery
// and the JWKS through the proxy. It caches the JWKS and refetches it on
// an unknown kid (go-oidc's RemoteKeySet).
func (f *acceptanceFleet) verifier(t *testing.T, skipExpiry bool) *oidc.IDTokenVerifier {
	t.Helper()
	ctx := oidc.ClientContext(context.Background(), &http.Client{Timeout: 10 * time.Second})
	p, err := oidc.NewProvider(ctx, f.issuer)
	require.NoError(t, err, "discovery from the fleet's issuer")
	return p.Verifier(&oidc.Config{ClientID: "miren", SupportedSigningAlgs: []string{"EdDSA"}, SkipExpiryCheck: skipExpiry})
}

// keyLifetime is how long the node's key leases last, from its log's
// "published key" line (published_until minus the line's time).
func (n *fleetNode) keyLifetime() time.Duration {
	for _, s := range strings.Split(n.ow.stderr.String(), "\n") {
		var l struct {
			Msg   string    `json:"msg"`
			Time  time.Time `json:"time"`
			Until time.Time `json:"published_until"`
		}
		if json.Unmarshal([]byte(s), &l) == nil && l.Msg == "published key" && !l.Until.IsZero() {
			return l.Until.Sub(l.Time)
		}
	}
	return 0
}

// signable is how long the node can still sign for, from its
// identityd_fleet_signable_seconds metric.
func (n *fleetNode) signable() (time.Duration, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + n.ow.operator + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "identityd_fleet_signable_seconds "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return time.Duration(f * float64(time.Second)), err
		}
	}
	return 0, errors.New("no identityd_fleet_signable_seconds metric")
}

// etcdLeader is the index, among members, of the one that leads the
// cluster, as the members themselves report it.
func etcdLeader(cli *clientv3.Client, c *etcdtest.Cluster, members []int) (int, error) {
	ids := map[uint64]int{}
	var leader uint64
	for _, i := range members {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := cli.Status(ctx, c.Endpoint(i))
		cancel()
		if err != nil {
			continue
		}
		ids[st.Header.MemberId] = i
		if st.Leader != 0 {
			leader = st.Leader
		}
	}
	if i, ok := ids[leader]; ok {
		return i, nil
	}
	return 0, fmt.Errorf("no leader among etcd members %v", members)
}

// kidSampler records, every 100 ms, whether kid is in a node's JWKS.
type kidSampler struct {
	mu          sync.Mutex
	lastPresent time.Time
	firstAbsent time.Time
	samples     int
	cancel      context.CancelFunc
	done        chan struct{}
}

func sampleKid(url, kid string) *kidSampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &kidSampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for ctx.Err() == nil {
			at := time.Now()
			kids, err := kidsAt(url)
			if err == nil {
				s.mu.Lock()
				s.samples++
				if slices.Contains(kids, kid) {
					s.lastPresent = at
				} else if s.firstAbsent.IsZero() {
					s.firstAbsent = at
				}
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return s
}

func (s *kidSampler) stop() (lastPresent, firstAbsent time.Time, samples int) {
	s.cancel()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastPresent, s.firstAbsent, s.samples
}

func expOf(c map[string]any) time.Time {
	v, _ := c["exp"].(float64)
	return time.Unix(int64(v), 0)
}

// TestFleetAcceptance is issue 13's acceptance test with real processes:
// a 3-member etcd cluster, three identityd daemons each in its own network
// world, all behind one issuer URL (a reverse proxy on loopback to their
// discovery listeners), sandboxes on every node. The steps run in order on
// the one fleet.
func TestFleetAcceptance(t *testing.T) {
	if missing := fleetMissing(binaries(t)); missing != "" {
		t.Skip("waiting for: " + missing)
	}
	begin := time.Now()
	// fig logs a figure and keeps it for the summary at the end, which
	// the lead copies into RELIABILITY.md. The subtests run one at a time.
	var figures []string
	fig := func(t *testing.T, format string, args ...any) {
		t.Helper()
		s := fmt.Sprintf(format, args...)
		t.Log(s)
		figures = append(figures, s)
	}
	f := startAcceptanceFleet(t)
	n1, n2, n3 := f.nodes[0], f.nodes[1], f.nodes[2]
	fig(t, "fleet of 3 up in %s: issuer %s, etcd prefix %s", time.Since(begin).Round(time.Millisecond), f.issuer, f.prefix)
	top := t
	haveNodes := !ctlMissing(n1.ow.bin, "nodes")
	haveEvict := !ctlMissing(n1.ow.bin, "evict-node")

	ok := t.Run("1 every node's tokens verify under the one issuer", func(t *testing.T) {
		v := f.verifier(t, false)
		ctx := context.Background()
		kidOf := map[string]string{}
		for _, n := range f.nodes {
			for range 3 {
				tok, kid, claims := n.mustToken(t)
				assert.Equal(t, f.issuer, claims["iss"])
				_, err := v.Verify(ctx, tok)
				require.NoError(t, err, "token from %s", n.name)
				if prev, seen := kidOf[n.name]; seen {
					assert.Equal(t, prev, kid, "%s signs with one key", n.name)
				}
				kidOf[n.name] = kid
				assert.InDelta(t, fleetMaxTTL.Seconds(), expOf(claims).Sub(time.Unix(int64(claims["iat"].(float64)), 0)).Seconds(), 0,
					"the default lifetime is clamped to --max-ttl")
			}
		}
		assert.Len(t, slices.Compact(slices.Sorted(maps.Values(kidOf))), 3, "distinct kids per node: %v", kidOf)
		for i, n := range f.nodes {
			t.Logf("%s signs with kid %s; the proxy sent %d requests to it", n.name, kidOf[n.name], f.proxy.hits[i].Load())
		}
		if !haveNodes {
			t.Skip("waiting for: identityctl nodes -o json (kid → node)")
		}
		for _, asker := range f.nodes {
			list := asker.listNodes(t)
			for _, n := range f.nodes {
				require.Contains(t, list, n.name, "identityctl nodes on %s", asker.name)
				assert.Contains(t, list[n.name].Kids, kidOf[n.name], "identityctl nodes on %s maps the kid to %s", asker.name, n.name)
				assert.False(t, list[n.name].LastSeen.IsZero(), "%s last seen", n.name)
			}
		}
		fig(t, "key lease lifetime (from the log): %s", n1.keyLifetime())
	})
	if !ok {
		return
	}

	t.Run("2 etcd members lost and back", func(t *testing.T) {
		ctx := context.Background()
		v := f.verifier(t, false)
		// The leader goes first: the harder loss, an election follows.
		cli := f.etcd.Client(t)
		first, err := etcdLeader(cli, f.etcd, []int{0, 1, 2})
		require.NoError(t, err)
		second := (first + 1) % 3
		// Whatever fails below, the later steps get their quorum back.
		defer func() {
			for _, i := range []int{first, second} {
				if !f.etcd.Running(i) {
					f.etcd.Restart(i)
				}
			}
		}()
		f.etcd.Kill(first)
		killed := time.Now()
		var leader int
		require.Eventually(t, func() bool {
			leader, err = etcdLeader(cli, f.etcd, []int{second, (first + 2) % 3})
			return err == nil
		}, 20*time.Second, 50*time.Millisecond, "a new etcd leader: %v", err)
		fig(t, "etcd leader (member %d) killed; member %d leads %s later", first, leader, time.Since(killed).Round(time.Millisecond))
		for _, n := range f.nodes {
			tok, _, _ := n.mustToken(t)
			_, err := v.Verify(ctx, tok)
			require.NoError(t, err)
		}
		start := time.Now()
		out, err := n1.ctl("rotate-key")
		require.NoError(t, err, "rotation with one etcd member down: %s", out)
		fig(t, "one member down: rotate-key on node1 took %s", time.Since(start).Round(time.Millisecond))
		for _, n := range f.nodes {
			start := time.Now()
			_, err := n.create(ctx, "fleet-one-down-"+n.name+"-"+suffix())
			require.NoError(t, err, "create on %s with one etcd member down", n.name)
			fig(t, "one member down: create on %s took %s", n.name, time.Since(start).Round(time.Millisecond))
		}

		// A renewal in flight to the killed member failed: wait until every
		// node has renewed since, so that each starts the quorum loss with
		// a guarantee at most one renewal period old.
		for _, n := range f.nodes {
			require.Eventually(t, func() bool {
				left, err := n.signable()
				return err == nil && left > fleetMaxTTL+2*time.Second
			}, 15*time.Second, 50*time.Millisecond, "%s renews its key's lease with one member down", n.name)
		}

		f.etcd.Kill(second)
		lost := time.Now()
		t.Logf("etcd member %d killed too: no quorum", second)
		for _, n := range f.nodes {
			tok, _, claims := n.mustToken(t)
			_, err := v.Verify(ctx, tok)
			require.NoError(t, err, "a token issued without quorum verifies")
			fig(t, "no quorum: %s issued a token %s after the loss, lifetime %s", n.name,
				time.Since(lost).Round(time.Millisecond), expOf(claims).Sub(time.Unix(int64(claims["iat"].(float64)), 0)))
		}
		// Issuing goes on while the key's publication covers the minimum
		// lifetime, then stops with a 500 that the log explains.
		var stopped time.Duration
		var lastStatus int
		var lastBody string
		bound := 10 * time.Minute
		if lt := n1.keyLifetime(); lt > 0 {
			bound = lt - fleetMaxTTL + 10*time.Second
		}
		for time.Since(lost) < bound {
			status, _, body := n1.token(t)
			if status != http.StatusOK {
				stopped, lastStatus, lastBody = time.Since(lost), status, body
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		require.NotZero(t, stopped, "node1 kept issuing for %s without quorum", bound)
		assert.Equal(t, http.StatusInternalServerError, lastStatus, lastBody)
		assert.Eventually(t, func() bool { return strings.Contains(n1.ow.stderr.String(), "not guaranteed to stay published") },
			5*time.Second, 20*time.Millisecond, "node1's log says why it refused")
		fig(t, "no quorum: node1 issued for %s after the loss, then %d %s", stopped.Round(100*time.Millisecond), lastStatus, strings.TrimSpace(lastBody))

		start = time.Now()
		_, err = n2.create(ctx, "fleet-no-quorum-"+suffix())
		took := time.Since(start)
		var apiErr *controllers.APIError
		require.ErrorAs(t, err, &apiErr, "create without quorum fails")
		assert.Equal(t, http.StatusServiceUnavailable, apiErr.Status)
		assert.Contains(t, apiErr.Message, "etcd unavailable")
		fig(t, "no quorum: create on node2 refused in %s: %s", took.Round(time.Millisecond), apiErr)
		start = time.Now()
		out, err = n3.ctl("rotate-key")
		took = time.Since(start)
		require.Error(t, err, "rotation without quorum fails: %s", out)
		assert.Contains(t, out, "etcd unavailable")
		fig(t, "no quorum: rotate-key on node3 refused in %s: %s", took.Round(time.Millisecond), strings.TrimSpace(out))

		down := time.Since(lost)
		f.etcd.Restart(first)
		f.etcd.Restart(second)
		back := time.Now()
		fig(t, "etcd members %d and %d restarted after %s without quorum (restart took %s)", first, second, down.Round(time.Millisecond), back.Sub(lost.Add(down)).Round(time.Millisecond))
		for _, n := range f.nodes {
			var tok string
			require.Eventually(t, func() bool {
				var status int
				status, tok, _ = n.token(t)
				return status == http.StatusOK
			}, 30*time.Second, 100*time.Millisecond, "%s issues again", n.name)
			_, err := v.Verify(ctx, tok)
			require.NoError(t, err)
			fig(t, "quorum back: %s issues again %s after the restart", n.name, time.Since(back).Round(time.Millisecond))
		}
		for _, n := range f.nodes {
			var err error
			require.Eventually(t, func() bool {
				_, err = n.create(ctx, "fleet-back-"+n.name+"-"+suffix())
				return err == nil
			}, 30*time.Second, 200*time.Millisecond, "%s creates again: %v", n.name, err)
		}
		fig(t, "quorum back: every node creates again %s after the restart", time.Since(back).Round(time.Millisecond))
		out, err = n3.ctl("rotate-key")
		require.NoError(t, err, "rotation with quorum back: %s", out)
		// The keys outlived the quorum loss in the fleet's JWKS, not only
		// in v's cache: a verifier that starts now verifies every node.
		fresh := f.verifier(t, false)
		for _, n := range f.nodes {
			tok, kid, _ := n.mustToken(t)
			_, err := fresh.Verify(ctx, tok)
			require.NoError(t, err, "a fresh verifier verifies %s's token after the quorum loss", n.name)
			for _, m := range f.nodes {
				kids, err := kidsAt(m.jwksURL())
				require.NoError(t, err)
				assert.Contains(t, kids, kid, "%s's signing key in %s's JWKS after the quorum loss", n.name, m.name)
			}
		}
	})

	var old2 string
	var old2Exp, old2Switched time.Time
	var old2Sampler *kidSampler
	t.Run("3 rotate node2's key", func(t *testing.T) {
		ctx := context.Background()
		cached := f.verifier(t, false)
		tok, kid, claims := n2.mustToken(t)
		_, err := cached.Verify(ctx, tok)
		require.NoError(t, err, "fills the verifier's JWKS cache")
		old2, old2Exp = kid, expOf(claims)
		old2Sampler = sampleKid(n1.jwksURL(), old2)
		top.Cleanup(func() { old2Sampler.stop() })

		rotated := time.Now()
		out, err := n2.ctl("rotate-key")
		require.NoError(t, err, "%s", out)
		var first string
		var firstKid string
		require.Eventually(t, func() bool {
			tok, kid, claims := n2.mustToken(t)
			if kid == old2 {
				old2Exp = expOf(claims)
				return false
			}
			first, firstKid = tok, kid
			return true
		}, fleetPublishDelay+30*time.Second, 50*time.Millisecond, "node2 signs with its new key")
		switched := time.Since(rotated)
		old2Switched = time.Now()
		_, err = cached.Verify(ctx, first)
		require.NoError(t, err, "a verifier that cached the JWKS before the rotation verifies the new key's first token")
		_, err = f.verifier(t, false).Verify(ctx, first)
		require.NoError(t, err, "a fresh verifier verifies the new key's first token")
		fig(t, "node2 rotated %s -> %s; the new key signed %s after rotate-key (publish delay %s)", old2, firstKid, switched.Round(time.Millisecond), fleetPublishDelay)
		for _, n := range f.nodes {
			kids, err := kidsAt(n.jwksURL())
			require.NoError(t, err)
			assert.Contains(t, kids, old2, "the old kid stays in %s's JWKS", n.name)
			assert.Contains(t, kids, firstKid, "the new kid is in %s's JWKS", n.name)
		}
	})

	t.Run("4 node3 killed: its keys leave after the longest token lifetime", func(t *testing.T) {
		var kids []string
		if haveNodes {
			kids = n1.listNodes(t)[n3.name].Kids
		}
		tok, kid, claims := n3.mustToken(t)
		if !slices.Contains(kids, kid) {
			kids = append(kids, kid)
		}
		lastExp := expOf(claims)
		lifetime := n3.keyLifetime()
		require.NotZero(t, lifetime, "no \"published key\" line with published_until in node3's log")
		n3.ow.kill(syscall.SIGKILL)
		killed := time.Now()
		fig(t, "node3 SIGKILLed with kids %v; its last token expires %s after; key lease lifetime %s", kids, lastExp.Sub(killed).Round(time.Millisecond), lifetime)

		hasAny := func(url string) (bool, error) {
			have, err := kidsAt(url)
			if err != nil {
				return false, err
			}
			for _, k := range kids {
				if slices.Contains(have, k) {
					return true, nil
				}
			}
			return false, nil
		}
		var gone time.Time
		for time.Since(killed) < lifetime+15*time.Second {
			present, err := hasAny(n2.jwksURL())
			if err == nil && !present {
				gone = time.Now()
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		require.False(t, gone.IsZero(), "node3's keys still published %s after its SIGKILL", time.Since(killed))
		assert.False(t, gone.Before(lastExp), "node3's keys left %s before its last token expired", lastExp.Sub(gone))
		fig(t, "node3's keys left node2's JWKS %s after the SIGKILL, %s after its last token expired",
			gone.Sub(killed).Round(100*time.Millisecond), gone.Sub(lastExp).Round(100*time.Millisecond))
		require.Eventually(t, func() bool {
			present, err := hasAny(n1.jwksURL())
			return err == nil && !present
		}, 5*time.Second, 50*time.Millisecond, "node3's keys leave node1's JWKS too")
		for range 3 { // every backend of the proxy
			present, err := hasAny(f.issuer + "/.well-known/jwks.json")
			require.NoError(t, err)
			assert.False(t, present, "node3's keys gone from the issuer's JWKS")
		}
		_, err := f.verifier(t, true).Verify(context.Background(), tok)
		require.Error(t, err, "a fresh verifier rejects node3's token (expiry not checked: the key is what is missing)")
		t.Logf("fresh verifier on node3's token: %v", err)
	})

	if old2Sampler != nil {
		t.Run("3 (cont.) node2's old kid stayed until its tokens expired", func(t *testing.T) {
			lastPresent, firstAbsent, samples := old2Sampler.stop()
			if old2Switched.IsZero() {
				t.Skip("step 3 failed before node2's new key signed")
			}
			require.NotZero(t, samples)
			// The retired key's lease runs out one key lifetime after its
			// last renewal, a second or so after it stopped signing.
			deadline := old2Switched.Add(n2.keyLifetime() + 10*time.Second)
			for firstAbsent.IsZero() && time.Now().Before(deadline) {
				at := time.Now()
				if kids, err := kidsAt(n1.jwksURL()); err == nil {
					if slices.Contains(kids, old2) {
						lastPresent = at
					} else {
						firstAbsent = at
					}
				}
				time.Sleep(100 * time.Millisecond)
			}
			t.Logf("node2's old kid %s: its last token expires %s; last seen in node1's JWKS %s; first absent %s",
				old2, old2Exp.UTC().Format(time.RFC3339), lastPresent.UTC().Format(time.RFC3339Nano), firstAbsent.UTC().Format(time.RFC3339Nano))
			require.False(t, firstAbsent.IsZero(), "node2's old kid still published %s after it stopped signing", time.Since(old2Switched))
			assert.False(t, firstAbsent.Before(old2Exp), "node2's old kid left %s before its last token expired", old2Exp.Sub(firstAbsent))
			fig(t, "node2's old kid left the JWKS %s after it stopped signing, %s after its last token expired",
				firstAbsent.Sub(old2Switched).Round(100*time.Millisecond), firstAbsent.Sub(old2Exp).Round(100*time.Millisecond))
		})
	}

	t.Run("5 the same sandbox id created on two nodes at once", func(t *testing.T) {
		ctx := context.Background()
		wins := map[string]int{}
		for round := range 5 {
			id := fmt.Sprintf("fleet-dup-%d-%s", round, suffix())
			var wg sync.WaitGroup
			errs := make([]error, 2)
			for i, n := range []*fleetNode{n1, n2} {
				wg.Go(func() { _, errs[i] = n.create(ctx, id) })
			}
			wg.Wait()
			winner, loser := -1, -1
			for i, err := range errs {
				if err == nil {
					winner = i
				} else {
					loser = i
				}
			}
			require.True(t, winner >= 0 && loser >= 0, "exactly one create of %s succeeds: %v", id, errs)
			nodes := []*fleetNode{n1, n2}
			var apiErr *controllers.APIError
			require.ErrorAs(t, errs[loser], &apiErr)
			assert.Equal(t, http.StatusConflict, apiErr.Status, "%s", apiErr)
			assert.Contains(t, apiErr.Message, `"`+nodes[winner].name+`"`, "the refusal names the holder")
			wins[nodes[winner].name]++
			if round == 0 {
				t.Logf("loser's answer: %s", apiErr)
				// A delete releases the id: the other node may take it.
				require.NoError(t, nodes[winner].remove(ctx, id))
				_, err := nodes[loser].create(ctx, id)
				require.NoError(t, err, "the id is free once its holder deleted the sandbox")
			}
		}
		fig(t, "5 concurrent double creates: wins %v", wins)
	})

	t.Run("6 identityctl evict-node removes a node's keys at once", func(t *testing.T) {
		if !haveEvict || !haveNodes {
			t.Skip("waiting for: identityctl evict-node and identityctl nodes")
		}
		tok, kid, _ := n1.mustToken(t)
		kids := n2.listNodes(t)[n1.name].Kids
		require.Contains(t, kids, kid)
		start := time.Now()
		out, err := n2.ctl("evict-node", n1.name)
		took := time.Since(start)
		require.NoError(t, err, "%s", out)
		returned := time.Now()
		fig(t, "evict-node node1 (from node2) took %s: %s", took.Round(time.Millisecond), strings.TrimSpace(out))
		for _, n := range []*fleetNode{n2, n1} {
			require.Eventually(t, func() bool {
				have, err := kidsAt(n.jwksURL())
				if err != nil {
					return false
				}
				for _, k := range kids {
					if slices.Contains(have, k) {
						return false
					}
				}
				return true
			}, 2*time.Second, 10*time.Millisecond, "node1's kids %v gone from %s's JWKS", kids, n.name)
			fig(t, "node1's kids gone from %s's JWKS %s after evict-node returned", n.name, time.Since(returned).Round(time.Millisecond))
		}
		_, err = f.verifier(t, false).Verify(context.Background(), tok)
		require.Error(t, err, "a fresh verifier rejects the evicted node's token")
		require.Eventually(t, func() bool {
			status, _, _ := n1.token(t)
			return status == http.StatusInternalServerError
		}, 5*time.Second, 50*time.Millisecond, "the evicted node signs no more")
		list := n2.listNodes(t)
		assert.True(t, list[n1.name].Evicted, "identityctl nodes shows node1 evicted: %+v", list[n1.name])
		assert.Empty(t, list[n1.name].Kids)
		_, _, _ = n2.mustToken(t)
	})
	fig(t, "fleet acceptance test ran %s", time.Since(begin).Round(time.Second))
	t.Logf("figures:\n  %s", strings.Join(figures, "\n  "))
}
