package tokenserver

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/internal/secretstore"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
	os.Exit(m.Run())
}

const port = 7123

var quiet = slog.New(slog.DiscardHandler)

// env is a closed world with the real attribution programs, a registry, a
// secret store, signing keys and a token server listening on the router.
type env struct {
	t       testing.TB
	w       *sandboxtest.World
	in      *bpf.Installation
	reg     *registry.Index
	secrets *secretstore.Store
	state   string
	keys    *Keys
	srv     *Server
	issuer  string
	metrics *prometheus.Registry
	stop    func()
	hs      *http.Server
	log     *slog.Logger
}

type envOptions struct {
	alg      string
	keys     KeySet   // replaces the real keys when set
	attester Attester // replaces the kernel when set
	burst    int
	rate     rate.Limit
	conns    ConnLimits
	node     string
	maxTTL   time.Duration
	now      func() time.Time // the server's clock, time.Now if nil
	noCache  bool             // Config.DisableTokenCache
}

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs, creates namespaces and cgroups")
	}
	if o.alg == "" {
		o.alg = RS256
	}
	e := &env{t: t, w: sandboxtest.New(t), state: filepath.Join(t.TempDir(), "state"), log: quiet}
	pins := bpf.Options{PinDir: filepath.Join(bpf.DefaultBPFFS, fmt.Sprintf("identityd-test-%d-%s", os.Getpid(),
		strings.ReplaceAll(t.Name(), "/", "-"))), Logger: quiet}
	var err error
	e.in, err = bpf.Install(context.Background(), pins)
	require.NoError(t, err)
	t.Cleanup(func() {
		e.in.Close()
		assert.NoError(t, bpf.Uninstall(context.Background(), pins))
	})
	require.NoError(t, e.in.SetEndpoints([]netip.AddrPort{
		netip.AddrPortFrom(e.w.Router4, port), netip.AddrPortFrom(e.w.Router6, port),
	}))
	root, err := cgroup2.Root()
	require.NoError(t, err)
	e.reg, err = registry.New(root)
	require.NoError(t, err)
	t.Cleanup(func() { e.reg.Close() })
	e.secrets, err = secretstore.Open(secretstore.Dir(e.state))
	require.NoError(t, err)
	e.keys, err = OpenKeys(filepath.Join(e.state, "keys"), o.alg, nil)
	require.NoError(t, err)
	e.issuer = fmt.Sprintf("http://%s", netip.AddrPortFrom(e.w.Router4, port))
	e.metrics = prometheus.NewRegistry()
	e.serve(o)
	return e
}

// serve starts a token server on the router; a second call replaces it, as a
// restarted daemon would.
func (e *env) serve(o envOptions) {
	t := e.t
	var keys KeySet = e.keys
	if o.keys != nil {
		keys = o.keys
	}
	var att Attester = e.in
	if o.attester != nil {
		att = o.attester
	}
	metrics, err := NewMetrics(e.metrics, func() float64 { return float64(e.reg.Len()) })
	if err != nil {
		metrics, _ = NewMetrics(nil, nil) // a restarted server in the same test
	}
	e.srv, err = New(Config{
		Issuer: e.issuer, Attester: att, Registry: e.reg, Secrets: e.secrets, Keys: keys,
		Logger: e.log, Metrics: metrics, RateLimit: o.rate, Burst: o.burst, Conns: o.conns, Node: o.node,
		MaxTTL: o.maxTTL, Now: o.now, DisableTokenCache: o.noCache,
	})
	require.NoError(t, err)
	ln, err := e.w.Listen("tcp", fmt.Sprintf(":%d", port))
	require.NoError(t, err)
	hs := e.srv.HTTPServer()
	e.hs = hs
	go hs.Serve(e.srv.Listener(ln))
	// Closing the listener too: Close may run before Serve has taken it.
	e.stop = func() { ln.Close(); hs.Close() }
	t.Cleanup(e.stop)
}

// sandbox makes a sandbox, registers it and stores a fresh secret for it.
func (e *env) sandbox(name, app, org string) (*sandboxtest.Sandbox, *sandboxtest.Client, string) {
	e.t.Helper()
	sb := e.w.AddSandbox(name)
	return sb, e.register(sb, app, org), e.put(name)
}

func (e *env) register(sb *sandboxtest.Sandbox, app, org string) *sandboxtest.Client {
	e.t.Helper()
	require.NoError(e.t, e.reg.Add(registry.Sandbox{
		ID: "sb-" + sb.Name, App: app, Org: org,
		CgroupPath: sb.CgroupDir, CgroupID: sb.CgroupID, NetnsCookie: sb.NetnsCookie,
	}))
	return sb.Start(e.t)
}

func (e *env) put(name string) string {
	secret := strings.Repeat(fmt.Sprintf("%x", name[0]), 32)[:64]
	require.NoError(e.t, e.secrets.Put("sb-"+name, secret))
	return secret
}

// get asks for a token from inside a sandbox.
func (e *env) get(c *sandboxtest.Client, method, query, auth string) sandboxtest.HTTPResponse {
	e.t.Helper()
	return e.getFrom(c, method, "/v1/token"+query, auth, e.w.Router4)
}

func (e *env) getFrom(c *sandboxtest.Client, method, path, auth string, router netip.Addr) sandboxtest.HTTPResponse {
	e.t.Helper()
	h := map[string]string{}
	if auth != "" {
		h["Authorization"] = auth
	}
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: method, URL: "http://" + netip.AddrPortFrom(router, port).String() + path, Header: h})
	require.NoError(e.t, err)
	return resps[0]
}

// hostClient makes connections from the test process, inside the world's
// host netns: a host process outside every sandbox.
func (e *env) hostClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := e.w.Do(func() (err error) {
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
}

func bearer(s string) string { return "Bearer " + s }

// claims decodes a token's payload without verifying it; verification is
// go-oidc's job in the tests that need it.
func claims(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	require.Len(t, parts, 3)
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(b, &m))
	return m
}

func tokenOf(t *testing.T, r sandboxtest.HTTPResponse) string {
	t.Helper()
	require.Equal(t, http.StatusOK, r.Status, r.Body)
	assert.Equal(t, "application/json", r.Header.Get("Content-Type"))
	var body map[string]string
	require.NoError(t, json.Unmarshal([]byte(r.Body), &body))
	require.Len(t, body, 1, "the success body is exactly {\"value\": ...}")
	return body["value"]
}

func assertError(t *testing.T, r sandboxtest.HTTPResponse, status int, msg string) {
	t.Helper()
	assert.Equal(t, status, r.Status, r.Body)
	assert.Equal(t, "application/json", r.Header.Get("Content-Type"))
	assert.JSONEq(t, fmt.Sprintf(`{"error":%q}`, msg), r.Body)
}

// verifier is an independent OIDC verifier that finds the keys through
// discovery, as relying parties do.
func (e *env) verifier(t *testing.T, audience string) *oidc.IDTokenVerifier {
	t.Helper()
	ctx := oidc.ClientContext(context.Background(), e.hostClient())
	p, err := oidc.NewProvider(ctx, e.issuer)
	require.NoError(t, err)
	return p.Verifier(&oidc.Config{ClientID: audience})
}

func TestContract(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "acme")

	t.Run("success", func(t *testing.T) {
		token := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
		idt, err := e.verifier(t, "miren").Verify(context.Background(), token)
		require.NoError(t, err)
		assert.Equal(t, "org:acme:app:web:sandbox:sb-a", idt.Subject)

		c := claims(t, token)
		assert.Equal(t, e.issuer, c["iss"])
		assert.Equal(t, []any{"miren"}, c["aud"], "aud is an array even with one audience")
		assert.Equal(t, "web", c["app"])
		assert.Equal(t, "sb-a", c["sandbox_id"])
		assert.Equal(t, "acme", c["organization_id"])
		assert.Equal(t, "sandbox", c["identity_type"])
		assert.Equal(t, c["iat"], c["nbf"])
		assert.EqualValues(t, 3600, c["exp"].(float64)-c["iat"].(float64))
		assert.Regexp(t, `^[0-9a-f-]{36}$`, c["jti"])
		assert.Len(t, c, 11, "exactly the contract's claims: %v", c)
	})
	t.Run("405", func(t *testing.T) {
		assertError(t, e.get(a, "POST", "", bearer(secretA)), 405, "only GET is allowed")
	})
	t.Run("401", func(t *testing.T) {
		// "Bearer " alone arrives as "Bearer": HTTP trims trailing spaces.
		for _, auth := range []string{"", "bearer " + secretA, "Basic " + secretA, secretA, "Bearer", "Bearer "} {
			assertError(t, e.get(a, "GET", "", auth), 401, "missing or invalid Authorization header")
		}
	})
	t.Run("403 unknown source address", func(t *testing.T) {
		req, err := http.NewRequest("GET", e.issuer+"/v1/token", nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", bearer(secretA))
		resp, err := e.hostClient().Do(req)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assertError(t, sandboxtest.HTTPResponse{Status: resp.StatusCode, Header: resp.Header, Body: string(body)},
			403, "unknown source address")
	})
	t.Run("403 invalid token", func(t *testing.T) {
		assertError(t, e.get(a, "GET", "", bearer(strings.Repeat("0", 64))), 403, "invalid token")
	})
	t.Run("400", func(t *testing.T) {
		for _, q := range []string{"?ttl=abc", "?ttl=0", "?ttl=-5", "?ttl=1.5", "?ttl=", "?ttl=+60", "?ttl=%2060"} {
			assertError(t, e.get(a, "GET", q, bearer(secretA)), 400, "ttl must be a positive integer (seconds)")
		}
	})
	t.Run("404", func(t *testing.T) {
		for _, p := range []string{"/", "/v1/token/", "/v1/tokens", "/v2/token", "//v1/token", "/metrics"} {
			assertError(t, e.getFrom(a, "GET", p, bearer(secretA), e.w.Router4), 404, "not found")
		}
	})
	t.Run("ipv6", func(t *testing.T) {
		tokenOf(t, e.getFrom(a, "GET", "/v1/token", bearer(secretA), e.w.Router6))
	})
}

// blockingKeys holds every Sign until release is closed.
type blockingKeys struct {
	KeySet
	entered chan struct{}
	release chan struct{}
}

func (k blockingKeys) Sign(c any) (string, error) {
	k.entered <- struct{}{}
	<-k.release
	return k.KeySet.Sign(c)
}

func TestGracefulShutdownFinishesInFlight(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.stop()
	keys := blockingKeys{KeySet: e.keys, entered: make(chan struct{}, 1), release: make(chan struct{})}
	e.serve(envOptions{keys: keys})
	_, a, secretA := e.sandbox("a", "web", "")

	got := make(chan sandboxtest.HTTPResponse, 1)
	go func() { got <- e.get(a, "GET", "", bearer(secretA)) }()
	<-keys.entered // the request is inside the handler

	done := make(chan error, 1)
	go func() { done <- e.hs.Shutdown(context.Background()) }()
	select {
	case <-done:
		t.Fatal("Shutdown returned while a request was in flight")
	case <-time.After(200 * time.Millisecond):
	}
	close(keys.release)
	tokenOf(t, <-got)
	require.NoError(t, <-done)
}

// TestRefusalsAreLoggedWithTheKernelsView checks the operator's side of a
// refusal: one structured line naming what the kernel attested, and never
// the secret.
func TestRefusalsAreLoggedWithTheKernelsView(t *testing.T) {
	e := newEnv(t, envOptions{})
	var buf sandboxtest.LogBuffer
	e.stop()
	e.log = slog.New(slog.NewJSONHandler(&buf, nil))
	e.serve(envOptions{})
	sbA, a, secretA := e.sandbox("a", "web", "")
	_, b, _ := e.sandbox("b", "web", "")
	assertError(t, e.get(b, "GET", "", bearer(secretA)), 403, "invalid token")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))

	lines := logLines(t, &buf, "token request refused")
	require.Len(t, lines, 1, "one line per refusal: %s", buf.String())
	assert.NotContains(t, buf.String(), secretA)
	var entry struct {
		Msg    string `json:"msg"`
		Status int    `json:"status"`
		Reason string `json:"reason"`
		Caller struct {
			CgroupID    uint64 `json:"cgroup_id"`
			NetnsCookie uint64 `json:"netns_cookie"`
			PID         uint64 `json:"pid"`
		} `json:"caller"`
		Sandbox string `json:"sandbox"`
	}
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &entry))
	assert.Len(t, logLines(t, &buf, "token issued"), 1, "and one for the token")
	assert.Equal(t, 403, entry.Status)
	assert.Equal(t, reasonBadSecret, entry.Reason)
	assert.Equal(t, "sb-b", entry.Sandbox)
	assert.NotEqual(t, sbA.CgroupID, entry.Caller.CgroupID)
	assert.NotZero(t, entry.Caller.CgroupID)
	assert.NotZero(t, entry.Caller.NetnsCookie)
	assert.Equal(t, uint64(b.Pid), entry.Caller.PID)
}

type failingKeys struct{ KeySet }

func (failingKeys) Sign(any) (string, error) { return "", fmt.Errorf("the HSM is on fire") }

func TestSigningFailureIs500(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.stop()
	e.serve(envOptions{keys: failingKeys{e.keys}})
	_, a, secretA := e.sandbox("a", "web", "")
	assertError(t, e.get(a, "GET", "", bearer(secretA)), 500, "failed to issue token")
}

func TestAudienceAndTTL(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")

	c := claims(t, tokenOf(t, e.get(a, "GET", "?audience=first&audience=second&audience=third", bearer(secretA))))
	assert.Equal(t, []any{"first", "second", "third"}, c["aud"], "audiences in request order")
	assert.Equal(t, "app:web:sandbox:sb-a", c["sub"], "no org: part without an org")
	assert.NotContains(t, c, "organization_id")

	for q, want := range map[string]float64{"": 3600, "?ttl=5": 60, "?ttl=120": 120, "?ttl=86400": 86400,
		"?ttl=999999": 86400, "?ttl=99999999999999999999999": 86400, "?ttl=0060": 60} {
		c := claims(t, tokenOf(t, e.get(a, "GET", q, bearer(secretA))))
		assert.Equal(t, want, c["exp"].(float64)-c["iat"].(float64), "ttl for %q", q)
	}
	for _, q := range []string{"?audience=", "?audience=a&audience=", "?audience=&ttl=120"} {
		assertError(t, e.get(a, "GET", q, bearer(secretA)), 400, "audience must not be empty")
	}

	// A smaller MaxTTL clamps requests, and the default, to it.
	e.stop()
	e.serve(envOptions{maxTTL: 600 * time.Second})
	for q, want := range map[string]float64{"": 600, "?ttl=5": 60, "?ttl=120": 120, "?ttl=601": 600, "?ttl=86400": 600} {
		c := claims(t, tokenOf(t, e.get(a, "GET", q, bearer(secretA))))
		assert.Equal(t, want, c["exp"].(float64)-c["iat"].(float64), "ttl for %q with MaxTTL 600s", q)
	}
	for _, bad := range []time.Duration{30 * time.Second, MaxTTL + time.Second} {
		_, err := New(Config{Issuer: e.issuer, Attester: e.in, Registry: e.reg, Secrets: e.secrets, Keys: e.keys, MaxTTL: bad})
		assert.ErrorContains(t, err, "max TTL", "MaxTTL %s", bad)
	}
}

// TestConnectionsCappedPerSandbox: a sandbox holding more connections than
// its share gets the rest reset at accept, while another sandbox is served;
// once it lets go, it is served again.
func TestConnectionsCappedPerSandbox(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.stop()
	e.serve(envOptions{conns: ConnLimits{PerSandbox: 3}})
	sbA, a, secretA := e.sandbox("a", "web", "")
	_, b, secretB := e.sandbox("b", "web", "")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	// That request's connection counts until the server has seen it close.
	require.Eventually(t, func() bool {
		e.srv.conns.mu.Lock()
		defer e.srv.conns.mu.Unlock()
		return e.srv.conns.total == 0
	}, 10*time.Second, 10*time.Millisecond)

	for range 10 {
		// The server may reset a refused connection before connect()
		// has returned in the sandbox.
		if _, err := a.Dial(netip.AddrPortFrom(e.w.Router4, port), 1); err != nil {
			require.ErrorContains(t, err, "connection reset by peer")
		}
	}
	refused := e.srv.cfg.Metrics.connRefusals.WithLabelValues(connSandboxCap)
	require.Eventually(t, func() bool { return testutil.ToFloat64(refused) == 7 }, 10*time.Second, 10*time.Millisecond,
		"three of a's ten connections are kept")
	tokenOf(t, e.get(b, "GET", "", bearer(secretB)))

	a.Close()
	a2 := sbA.Start(t)
	require.Eventually(t, func() bool { return e.get(a2, "GET", "", bearer(secretA)).Status == 200 }, 10*time.Second, 20*time.Millisecond,
		"a is served again once its connections are closed")
}

func TestKernelDecidesWhoIsCalling(t *testing.T) {
	e := newEnv(t, envOptions{})
	sbA, a, secretA := e.sandbox("a", "web", "")
	_, b, secretB := e.sandbox("b", "db", "")

	assertError(t, e.get(b, "GET", "", bearer(secretA)), 403, "invalid token")
	c := claims(t, tokenOf(t, e.get(b, "GET", "", bearer(secretB))))
	assert.Equal(t, "sb-b", c["sandbox_id"])

	// A process in a cgroup below A's is A.
	require.NoError(t, a.MoveTo(sbA.ChildCgroup("worker")))
	c = claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))
	assert.Equal(t, "sb-a", c["sandbox_id"])

	// Keep-alive requests reuse the attestation made at accept.
	resps, err := a.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: e.issuer + "/v1/token", Repeat: 3,
		Header: map[string]string{"Authorization": bearer(secretA)}})
	require.NoError(t, err)
	require.Len(t, resps, 3)
	for _, r := range resps {
		assert.Equal(t, "sb-a", claims(t, tokenOf(t, r))["sandbox_id"])
	}
}

func TestRecycledAddressGetsNoOldIdentity(t *testing.T) {
	e := newEnv(t, envOptions{})
	sbA, a, secretA := e.sandbox("a", "web", "")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))

	// A is deleted: revoked first, then torn down.
	require.NoError(t, e.secrets.Delete("sb-a"))
	e.reg.Remove("sb-a")
	sbA.Delete()

	sbC := e.w.AddSandboxAt("c", sbA.Addr4, sbA.Addr6)
	c := e.register(sbC, "other", "")
	secretC := e.put("c")

	assertError(t, e.get(c, "GET", "", bearer(secretA)), 403, "invalid token")
	claimsC := claims(t, tokenOf(t, e.get(c, "GET", "", bearer(secretC))))
	assert.Equal(t, "sb-c", claimsC["sandbox_id"])
	assert.Equal(t, "app:other:sandbox:sb-c", claimsC["sub"])
}

func TestKeysSurviveRestartAndRotation(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")
	before := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))

	// A restarted server loads the same key from disk.
	e.stop()
	keys, err := OpenKeys(filepath.Join(e.state, "keys"), RS256, nil)
	require.NoError(t, err)
	e.keys = keys
	e.serve(envOptions{})
	ctx := context.Background()
	_, err = e.verifier(t, "miren").Verify(ctx, before)
	require.NoError(t, err, "a token issued before the restart still verifies")

	require.NoError(t, e.keys.Rotate(ctx))
	after := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	v := e.verifier(t, "miren")
	_, err = v.Verify(ctx, before)
	require.NoError(t, err, "the rotated-out key stays published for its unexpired tokens")
	_, err = v.Verify(ctx, after)
	require.NoError(t, err)
	assert.Len(t, e.keys.JWKS().Keys, 2)
}

func TestAlgorithms(t *testing.T) {
	for _, alg := range []string{ES256, EdDSA} {
		t.Run(alg, func(t *testing.T) {
			e := newEnv(t, envOptions{alg: alg})
			_, a, secretA := e.sandbox("a", "web", "")
			token := tokenOf(t, e.get(a, "GET", "?audience=relying-party", bearer(secretA)))
			_, err := e.verifier(t, "relying-party").Verify(context.Background(), token)
			require.NoError(t, err)
		})
	}
}

func TestRateLimitPerSandbox(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.stop()
	e.serve(envOptions{rate: rate.Every(time.Hour), burst: 2})
	_, a, secretA := e.sandbox("a", "web", "")
	_, b, secretB := e.sandbox("b", "web", "")

	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	r := e.get(a, "GET", "", bearer(secretA))
	assertError(t, r, 429, "rate limit exceeded")
	assert.NotEmpty(t, r.Header.Get("Retry-After"))
	tokenOf(t, e.get(b, "GET", "", bearer(secretB)))

	assert.Equal(t, 1.0, testutil.ToFloat64(e.srv.cfg.Metrics.refusals.WithLabelValues(reasonRateLimited)))
}

func TestMetricsCountOutcomes(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	e.get(a, "GET", "", bearer("wrong"))
	e.get(a, "GET", "", "")

	count := func(name string, labels ...string) float64 {
		mfs, err := e.metrics.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				ok := true
				for i := 0; i < len(labels); i += 2 {
					found := false
					for _, lp := range m.GetLabel() {
						if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
							found = true
						}
					}
					ok = ok && found
				}
				if ok {
					if m.Counter != nil {
						return m.Counter.GetValue()
					}
					return m.Gauge.GetValue()
				}
			}
		}
		return 0
	}
	assert.Equal(t, 1.0, count("identityd_token_requests_total", "outcome", "issued"))
	assert.Equal(t, 2.0, count("identityd_token_requests_total", "outcome", "refused"))
	assert.Equal(t, 1.0, count("identityd_token_refusals_total", "reason", reasonBadSecret))
	assert.Equal(t, 1.0, count("identityd_token_refusals_total", "reason", reasonAuthorization))
	assert.Equal(t, 1.0, count("identityd_live_sandboxes"))
}
