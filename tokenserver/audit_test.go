package tokenserver

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// logLines returns the lines of buf whose msg is msg; every line must be
// JSON.
func logLines(t *testing.T, buf *sandboxtest.LogBuffer, msg string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var entry struct {
			Msg string `json:"msg"`
		}
		require.NoError(t, json.Unmarshal([]byte(line), &entry), "not a JSON line: %q", line)
		if entry.Msg == msg {
			out = append(out, line)
		}
	}
	return out
}

// auditLine is the "token issued" line as an operator's tools read it.
type auditLine struct {
	Level   string   `json:"level"`
	Node    string   `json:"node"`
	Sandbox string   `json:"sandbox"`
	JTI     string   `json:"jti"`
	Sub     string   `json:"sub"`
	Aud     []string `json:"aud"`
	IAT     int64    `json:"iat"`
	Exp     int64    `json:"exp"`
	Alg     string   `json:"alg"`
	Kid     string   `json:"kid"`
	Cached  bool     `json:"cached"`
	Remote  string   `json:"remote"`
	Caller  struct {
		CgroupID     uint64 `json:"cgroup_id"`
		NetnsCookie  uint64 `json:"netns_cookie"`
		PID          uint64 `json:"pid"`
		TID          uint64 `json:"tid"`
		SocketCookie uint64 `json:"socket_cookie"`
	} `json:"caller"`
}

func auditLines(t *testing.T, buf *sandboxtest.LogBuffer) []auditLine {
	t.Helper()
	var out []auditLine
	for _, line := range logLines(t, buf, "token issued") {
		var a auditLine
		require.NoError(t, json.Unmarshal([]byte(line), &a))
		out = append(out, a)
	}
	return out
}

// captureLog makes the server log every level, as JSON, into the returned
// buffer: whatever the secret or the token could leak into, debug lines
// included, is captured.
func (e *env) captureLog(o envOptions) *sandboxtest.LogBuffer {
	buf := &sandboxtest.LogBuffer{}
	e.stop()
	e.log = slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.serve(o)
	return buf
}

// TestIssuanceIsAudited: every token is one info line whose claims are the
// token's and whose evidence is what the kernel saw of the process that
// asked, on a named host; neither the secret nor the token is ever logged,
// for a token or for a refusal.
func TestIssuanceIsAudited(t *testing.T) {
	e := newEnv(t, envOptions{})
	buf := e.captureLog(envOptions{})
	sbA, a, secretA := e.sandbox("a", "web", "acme")
	_, b, _ := e.sandbox("b", "db", "")

	// Two tokens on one keep-alive connection: one line each, same socket;
	// the second is the first, reused from the cache.
	resps, err := a.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: e.issuer + "/v1/token?audience=rp1&audience=rp2&ttl=120",
		Repeat: 2, Header: map[string]string{"Authorization": bearer(secretA)}})
	require.NoError(t, err)
	require.Len(t, resps, 2)
	tokens := []string{tokenOf(t, resps[0]), tokenOf(t, resps[1])}

	// Refusals that carry a secret: a wrong one, another sandbox's, a
	// malformed header, and the right one with a bad parameter.
	wrong := strings.Repeat("7e", 32)
	assertError(t, e.get(a, "GET", "", bearer(wrong)), 403, msgInvalidToken)
	assertError(t, e.get(b, "GET", "", bearer(secretA)), 403, msgInvalidToken)
	assertError(t, e.get(a, "GET", "", "Basic "+secretA), 401, msgAuthorization)
	assertError(t, e.get(a, "GET", "?ttl=abc", bearer(secretA)), 400, msgBadTTL)

	host, err := os.Hostname()
	require.NoError(t, err)
	lines := auditLines(t, buf)
	require.Len(t, lines, 2, "one line per token:\n%s", buf)
	for i, l := range lines {
		c := claims(t, tokens[i])
		assert.Equal(t, "INFO", l.Level)
		assert.Equal(t, c["jti"], l.JTI, "the jti in the token")
		assert.Equal(t, c["sub"], l.Sub)
		assert.Equal(t, "org:acme:app:web:sandbox:sb-a", l.Sub)
		assert.Equal(t, []string{"rp1", "rp2"}, l.Aud)
		assert.Equal(t, []any{"rp1", "rp2"}, c["aud"])
		assert.EqualValues(t, c["exp"], l.Exp, "exp in unix seconds, as in the token")
		assert.EqualValues(t, c["iat"], l.IAT)
		assert.Equal(t, "sb-a", l.Sandbox)
		assert.Equal(t, host, l.Node, "the host name by default")

		var header struct{ Alg, Kid string }
		hb, err := base64.RawURLEncoding.DecodeString(strings.Split(tokens[i], ".")[0])
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(hb, &header))
		assert.Equal(t, RS256, l.Alg)
		assert.Equal(t, header.Alg, l.Alg)
		assert.Equal(t, header.Kid, l.Kid)
		assert.Equal(t, e.keys.JWKS().Keys[0].KeyID, l.Kid)

		// The kernel's evidence: the sandbox's cgroup and netns, the
		// client's process, its socket and address.
		assert.Equal(t, sbA.CgroupID, l.Caller.CgroupID)
		assert.Equal(t, sbA.NetnsCookie, l.Caller.NetnsCookie)
		assert.Equal(t, uint64(a.Pid), l.Caller.PID)
		assert.NotZero(t, l.Caller.TID)
		assert.NotZero(t, l.Caller.SocketCookie)
		remote, err := netip.ParseAddrPort(l.Remote)
		require.NoError(t, err)
		assert.Equal(t, sbA.Addr4, remote.Addr())
	}
	assert.Equal(t, lines[0].JTI, lines[1].JTI, "the second request is served from the cache")
	assert.False(t, lines[0].Cached)
	assert.True(t, lines[1].Cached)
	assert.Equal(t, lines[0].Caller.SocketCookie, lines[1].Caller.SocketCookie, "one connection")
	assert.Equal(t, lines[0].Remote, lines[1].Remote)

	refusals := logLines(t, buf, "token request refused")
	require.Len(t, refusals, 4, "%s", buf)
	for _, r := range refusals {
		var n struct{ Node string }
		require.NoError(t, json.Unmarshal([]byte(r), &n))
		assert.Equal(t, host, n.Node, "refusals name the host too: %s", r)
	}

	out := buf.String()
	for name, s := range map[string]string{"the secret": secretA, "the wrong secret": wrong} {
		assert.NotContains(t, out, s, "%s is logged", name)
	}
	for i, token := range tokens {
		assert.NotContains(t, out, token, "token %d is logged", i)
		parts := strings.Split(token, ".")
		assert.NotContains(t, out, parts[1], "token %d's payload is logged", i)
		assert.NotContains(t, out, parts[2], "token %d's signature is logged", i)
	}

	assert.Equal(t, 2.0, testutil.ToFloat64(e.srv.cfg.Metrics.issuedByAlg.WithLabelValues(RS256)))
	assert.Equal(t, 1.0, testutil.ToFloat64(e.srv.cfg.Metrics.cacheHits.WithLabelValues(RS256)))
}

// TestAuditNodeIsConfigurable: Config.Node names the host in the lines of
// tokens and refusals alike.
func TestAuditNodeIsConfigurable(t *testing.T) {
	e := newEnv(t, envOptions{})
	buf := e.captureLog(envOptions{node: "rack4-host7"})
	_, a, secretA := e.sandbox("a", "web", "")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	assertError(t, e.get(a, "GET", "", bearer("nope")), 403, msgInvalidToken)

	lines := auditLines(t, buf)
	require.Len(t, lines, 1)
	assert.Equal(t, "rack4-host7", lines[0].Node)
	refusals := logLines(t, buf, "token request refused")
	require.Len(t, refusals, 1)
	assert.Contains(t, refusals[0], `"node":"rack4-host7"`)
}

func TestSignedBy(t *testing.T) {
	for token, want := range map[string][2]string{
		"":                                   {"unknown", ""},
		"not base64!.x.y":                    {"unknown", ""},
		b64(`{"kid":"k1"}`) + ".p.s":         {"unknown", "k1"},
		b64(`{"alg":"ES256"}`) + ".p.s":      {"ES256", ""},
		b64(`{"alg":"EdDSA","kid":"k2"}`):    {"EdDSA", "k2"},
		b64(`[1,2]`) + ".p.s":                {"unknown", ""},
		b64(`{"alg":"RS256","kid":7}`) + ".": {"unknown", ""},
	} {
		alg, kid := signedBy(token)
		assert.Equal(t, want, [2]string{alg, kid}, "%q", token)
	}
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// BenchmarkAuditLine is what the audit trail adds to an issuance: reading
// the token's header, counting it and one JSON line.
func BenchmarkAuditLine(b *testing.B) {
	keys, err := OpenKeys(filepath.Join(b.TempDir(), "keys"), EdDSA, nil)
	require.NoError(b, err)
	srv, err := New(Config{Issuer: "http://10.0.0.1:7123", Attester: fakeAttester{}, Registry: fakeRegistry{},
		Secrets: fakeSecrets{}, Keys: keys, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))})
	require.NoError(b, err)
	c := Claims{Subject: "app:web:sandbox:sb-a", Audience: []string{"miren"}, IssuedAt: 1, Expiry: 3601,
		ID: "b3ce8fb4-2004-4a64-a9d0-5f68693e4b28", SandboxID: "sb-a"}
	token, err := keys.Sign(c)
	require.NoError(b, err)
	rec := bpf.Record{CgroupID: 1771718, NetnsCookie: 3147, PID: 21768, TGID: 21768, SocketCookie: 516825}
	b.ReportAllocs()
	for b.Loop() {
		alg, kid := signedBy(token)
		srv.audit(b.Context(), "10.136.167.2:52218", "sb-a", issued{token: token, claims: c, alg: alg, kid: kid}, rec)
	}
}

// TestTokenForTokenFile: a token for a sandbox's token file has the
// default audience and lifetime (clamped by MaxTTL), names the sandbox,
// and is audited like any other, as asked by "token-file".
func TestTokenForTokenFile(t *testing.T) {
	e := newEnv(t, envOptions{})
	buf := e.captureLog(envOptions{maxTTL: 600 * time.Second})
	sb := registry.Sandbox{ID: "sb-file", App: "web", Org: "acme"}
	tok, err := e.srv.TokenFor(context.Background(), sb)
	require.NoError(t, err)
	c := claims(t, tok)
	assert.Equal(t, []any{"miren"}, c["aud"])
	assert.Equal(t, "org:acme:app:web:sandbox:sb-file", c["sub"])
	assert.Equal(t, 600.0, c["exp"].(float64)-c["iat"].(float64), "the default lifetime, clamped by MaxTTL")
	lines := auditLines(t, buf)
	require.Len(t, lines, 1)
	assert.Equal(t, "token-file", lines[0].Remote)
	assert.Equal(t, c["jti"], lines[0].JTI)
	assert.Zero(t, lines[0].Caller.CgroupID, "no connection asked for it")

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = e.srv.TokenFor(ctx, sb)
	assert.ErrorIs(t, err, context.Canceled)
	_, err = e.srv.TokenFor(context.Background(), registry.Sandbox{ID: "x", App: "a:b"})
	assert.Error(t, err, "a sub that cannot be built is not signed")
}
