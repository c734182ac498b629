package tokenserver

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/registry"
)

// clock is a settable time for the pure logic of key timing; the keys it
// drives are real files.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Now().UTC()} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// kidOf reads the kid from a compact JWS's header.
func kidOf(t *testing.T, token string) string {
	t.Helper()
	_, kid := signedBy(token)
	require.NotEmpty(t, kid)
	return kid
}

func sign(t *testing.T, k *Keys) string {
	t.Helper()
	tok, err := k.Sign(Claims{Subject: "s"})
	require.NoError(t, err)
	return tok
}

func kids(set jose.JSONWebKeySet) []string {
	var out []string
	for _, k := range set.Keys {
		out = append(out, k.KeyID)
	}
	return out
}

// TestRotatePublishesBeforeSigning: a rotated-in key is in the JWKS at once
// and signs only once the publish delay has passed; a restart during the
// delay keeps the schedule (it is on disk). RotateNow signs at once.
func TestRotatePublishesBeforeSigning(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	clk := newClock()
	cfg := KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: time.Minute, Now: clk.now}
	k, err := LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	old := kidOf(t, sign(t, k))
	require.Equal(t, []string{old}, kids(k.JWKS()), "a first key signs at once")

	require.NoError(t, k.Rotate(context.Background()))
	published := kids(k.JWKS())
	require.Len(t, published, 2)
	next := published[1]
	assert.Equal(t, old, kidOf(t, sign(t, k)), "the old key signs while the new one is being published")
	assert.Equal(t, []string{KeySigning, KeyNext}, states(k.Status()))

	// A restart half way through the delay keeps it.
	clk.advance(30 * time.Second)
	k, err = LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	assert.Equal(t, []string{old, next}, kids(k.JWKS()))
	assert.Equal(t, old, kidOf(t, sign(t, k)))
	clk.advance(29 * time.Second)
	assert.Equal(t, old, kidOf(t, sign(t, k)))
	clk.advance(time.Second)
	assert.Equal(t, next, kidOf(t, sign(t, k)), "the new key signs once published for the delay")
	assert.Equal(t, []string{KeyRetired, KeySigning}, states(k.Status()))

	// The retired key stays published until every token it signed expired.
	clk.advance(MaxTTL + clockSkew)
	assert.Equal(t, []string{old, next}, kids(k.JWKS()))
	clk.advance(time.Second)
	assert.Equal(t, []string{next}, kids(k.JWKS()))

	require.NoError(t, k.RotateNow(context.Background()))
	now := kids(k.JWKS())
	require.Len(t, now, 2)
	assert.Equal(t, now[1], kidOf(t, sign(t, k)), "an emergency rotation signs at once")
}

func states(st []KeyStatus) []string {
	var out []string
	for _, s := range st {
		out = append(out, s.State)
	}
	return out
}

// TestRotationDuringPublication: a second rotation while a key is still
// being published supersedes it; the key that signs keeps signing until the
// newest one's delay has passed, and an emergency rotation retires both.
func TestRotationDuringPublication(t *testing.T) {
	clk := newClock()
	k, err := LoadKeys(context.Background(), KeysConfig{Dir: filepath.Join(t.TempDir(), "keys"), Alg: ES256, PublishDelay: time.Minute, Now: clk.now})
	require.NoError(t, err)
	first := kidOf(t, sign(t, k))
	require.NoError(t, k.Rotate(context.Background()))
	clk.advance(10 * time.Second)
	require.NoError(t, k.Rotate(context.Background()))
	ks := kids(k.JWKS())
	require.Len(t, ks, 3)
	clk.advance(55 * time.Second)
	assert.Equal(t, ks[1], kidOf(t, sign(t, k)), "the first new key signs once published for the delay")
	clk.advance(5 * time.Second)
	assert.Equal(t, ks[2], kidOf(t, sign(t, k)))
	assert.Equal(t, []string{KeyRetired, KeyRetired, KeySigning}, states(k.Status()))
	assert.NotEqual(t, first, ks[2])

	require.NoError(t, k.Rotate(context.Background()))
	require.NoError(t, k.RotateNow(context.Background()))
	ks = kids(k.JWKS())
	require.Len(t, ks, 5)
	assert.Equal(t, ks[4], kidOf(t, sign(t, k)))
	clk.advance(time.Hour)
	assert.Equal(t, ks[4], kidOf(t, sign(t, k)), "the superseded key never signs")
}

// TestCrashDuringRotationLeavesASigner: a new key written without its
// predecessor being told when to stop (a crash in between) is put in order
// at load: the old key signs until the new one's time, then retires.
func TestCrashDuringRotationLeavesASigner(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	clk := newClock()
	cfg := KeysConfig{Dir: dir, Alg: RS256, PublishDelay: time.Minute, Now: clk.now}
	k, err := LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	old := kidOf(t, sign(t, k))
	require.NoError(t, k.Rotate(context.Background()))
	next := kids(k.JWKS())[1]

	// Undo the old key's retirement on disk, as if the daemon died first.
	p := filepath.Join(dir, old+keyFileExt)
	var sk map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(must(os.ReadFile(p)), &sk))
	require.Contains(t, sk, "retired")
	delete(sk, "retired")
	require.NoError(t, os.WriteFile(p, must(json.Marshal(sk)), 0o600))

	k, err = LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	assert.Equal(t, old, kidOf(t, sign(t, k)))
	clk.advance(time.Minute)
	assert.Equal(t, next, kidOf(t, sign(t, k)))
	st := k.Status()
	require.NotNil(t, st[0].Retired)
	assert.Equal(t, st[1].SignsFrom, *st[0].Retired, "the old key retires when the new one starts")
}

// TestKeysWithoutSignsFromLoad: key files written before keys were
// published ahead of use (no signs_from) sign from their creation.
func TestKeysWithoutSignsFromLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	k, err := OpenKeys(dir, EdDSA, nil)
	require.NoError(t, err)
	kid := kidOf(t, sign(t, k))
	p := filepath.Join(dir, kid+keyFileExt)
	var sk map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(must(os.ReadFile(p)), &sk))
	delete(sk, "signs_from")
	require.NoError(t, os.WriteFile(p, must(json.Marshal(sk)), 0o600))
	k, err = LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: time.Minute})
	require.NoError(t, err)
	assert.Equal(t, kid, kidOf(t, sign(t, k)))
}

// TestAlgorithmChangeIsPublishedFirst: a restart with another algorithm
// publishes a key with it, which signs after the delay.
func TestAlgorithmChangeIsPublishedFirst(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	clk := newClock()
	_, err := LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: RS256, PublishDelay: time.Minute, Now: clk.now})
	require.NoError(t, err)
	k, err := LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: ES256, PublishDelay: time.Minute, Now: clk.now})
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{RS256, ES256}, k.Algorithms())
	assert.Equal(t, RS256, alg(sign(t, k)))
	clk.advance(time.Minute)
	assert.Equal(t, ES256, alg(sign(t, k)))
	// A third start with ES256 does not rotate again.
	k, err = LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: ES256, PublishDelay: time.Minute, Now: clk.now})
	require.NoError(t, err)
	assert.Len(t, k.JWKS().Keys, 2)
}

func alg(token string) string { a, _ := signedBy(token); return a }

// TestRotationDueCountsFromTheKeyOnDisk: the rotation time is the newest
// key's creation plus the period, whatever the restarts; a daemon stopped
// past it rotates as soon as it runs again.
func TestRotationDueCountsFromTheKeyOnDisk(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	clk := newClock()
	cfg := KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: time.Minute, Now: clk.now}
	k, err := LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	created := clk.now()
	const period = 30 * 24 * time.Hour
	assert.Equal(t, created.Add(period), k.NextRotation(period))

	clk.advance(period - time.Hour)
	k, err = LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	assert.Equal(t, created.Add(period), k.NextRotation(period), "a restart does not reset the period")

	// Down past the due time: the rotation happens at start.
	clk.advance(2 * time.Hour)
	k, err = LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { k.RotateEvery(ctx, period, quiet); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	require.Eventually(t, func() bool { return len(k.JWKS().Keys) == 2 }, 10*time.Second, 10*time.Millisecond)
	assert.Equal(t, clk.now().Add(period), k.NextRotation(period))
	assert.Equal(t, []string{KeySigning, KeyNext}, states(k.Status()))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 2, "the new key is on disk")
}

// TestRotateEveryWithAShortPeriod runs the periodic rotation on the real
// clock: keys are replaced every period, each published for the delay
// before it signs, and every replaced key stays published and on disk.
func TestRotateEveryWithAShortPeriod(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	const period, delay = 400 * time.Millisecond, 100 * time.Millisecond
	k, err := LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: delay})
	require.NoError(t, err)
	first := kidOf(t, sign(t, k))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { k.RotateEvery(ctx, period, quiet); close(done) }()
	require.Eventually(t, func() bool { return len(k.JWKS().Keys) >= 4 }, 30*time.Second, 20*time.Millisecond)
	cancel()
	<-done

	ks := kids(k.JWKS())
	assert.Equal(t, first, ks[0], "replaced keys stay published")
	for _, st := range k.Status()[1:] {
		assert.Equal(t, delay, st.SignsFrom.Sub(st.Created).Round(time.Millisecond), "every new key is published for the delay first")
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, len(ks))
	for _, e := range entries {
		info, err := e.Info()
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), info.Mode().Perm())
	}
	// Reloaded, the same keys.
	k2, err := LoadKeys(context.Background(), KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: delay})
	require.NoError(t, err)
	assert.Equal(t, ks, kids(k2.JWKS()))
}

// offsetClock runs real keys on a clock ahead of the real one by a settable
// offset, so that a test need not sleep through the publish delay.
type offsetClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *offsetClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *offsetClock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// TestVerifierWithCachedJWKSFindsTheNewKey: through the real server, after a
// rotation tokens carry the old kid until the publish delay has passed. A
// go-oidc verifier whose JWKS cache was filled before the rotation verifies
// the first token of the new key (it refetches on the unknown kid and
// finds it), and so does a verifier that will never refetch but whose copy
// was taken during the delay: publication came first.
func TestVerifierWithCachedJWKSFindsTheNewKey(t *testing.T) {
	e := newEnv(t, envOptions{alg: ES256})
	clk := &offsetClock{}
	var err error
	e.keys, err = LoadKeys(context.Background(), KeysConfig{Dir: filepath.Join(e.state, "keys"), Alg: ES256, PublishDelay: DefaultPublishDelay, Now: clk.now})
	require.NoError(t, err)
	e.stop()
	e.serve(envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")
	ctx := context.Background()

	cached := e.verifier(t, "miren")
	before := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	_, err = cached.Verify(ctx, before)
	require.NoError(t, err, "fills the verifier's JWKS cache")
	oldKid := kidOf(t, before)

	require.NoError(t, e.keys.Rotate(ctx))
	during := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	assert.Equal(t, oldKid, kidOf(t, during), "the old key signs during the publish delay")
	frozen := e.fetchJWKS(t)
	require.Len(t, frozen.Keys, 2, "the new key is published at once")

	clk.advance(DefaultPublishDelay)
	after := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	newKid := kidOf(t, after)
	require.NotEqual(t, oldKid, newKid)
	assert.Equal(t, frozen.Keys[1].KeyID, newKid)
	_, err = cached.Verify(ctx, after)
	require.NoError(t, err, "the verifier that cached the old JWKS finds the new key")
	_, err = cached.Verify(ctx, before)
	require.NoError(t, err, "the old key stays published")

	static := oidc.NewVerifier(e.issuer, &oidc.StaticKeySet{PublicKeys: publicKeys(frozen)},
		&oidc.Config{ClientID: "miren", SupportedSigningAlgs: []string{ES256}})
	_, err = static.Verify(ctx, after)
	require.NoError(t, err, "a JWKS copy taken during the delay already verifies the new key's tokens")
}

func (e *env) fetchJWKS(t *testing.T) jose.JSONWebKeySet {
	t.Helper()
	resp, err := e.hostClient().Get(e.issuer + "/.well-known/jwks.json")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "max-age=60", resp.Header.Get("Cache-Control"))
	var set jose.JSONWebKeySet
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&set))
	return set
}

func publicKeys(set jose.JSONWebKeySet) []crypto.PublicKey {
	var out []crypto.PublicKey
	for _, k := range set.Keys {
		out = append(out, k.Key)
	}
	return out
}

// shortKeys is a KeySet whose signing key is guaranteed published only
// until a set time, as a fleet node's key may be while the shared store is
// unreachable.
type shortKeys struct {
	KeySet
	until time.Time
}

func (k shortKeys) SignableUntil() time.Time { return k.until }

// TestExpiryClampedToKeyPublication: exp never outlives the signing key's
// guaranteed publication; when that leaves less than the minimum lifetime
// the request fails with 500, and the log and the metrics say why.
func TestExpiryClampedToKeyPublication(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")

	until := time.Now().Add(10 * time.Minute)
	buf := e.captureLog(envOptions{keys: shortKeys{KeySet: e.keys, until: until}})
	c := claims(t, tokenOf(t, e.get(a, "GET", "?ttl=3600", bearer(secretA))))
	assert.Equal(t, float64(until.Unix()), c["exp"], "exp clamped to the key's publication")
	c = claims(t, tokenOf(t, e.get(a, "GET", "?ttl=120", bearer(secretA))))
	assert.Equal(t, 120.0, c["exp"].(float64)-c["iat"].(float64), "a shorter ttl is untouched")

	buf = e.captureLog(envOptions{keys: shortKeys{KeySet: e.keys, until: time.Now().Add(MinTTL - 2*time.Second)}})
	assertError(t, e.get(a, "GET", "?ttl=60", bearer(secretA)), 500, "failed to issue token")
	assert.Equal(t, 1.0, testutil.ToFloat64(e.srv.cfg.Metrics.failures.WithLabelValues(failKeyPublication)))
	lines := logLines(t, buf, "issue token")
	require.Len(t, lines, 1)
	assert.Contains(t, lines[0], `"reason":"key_publication_expiring"`)
	assert.Contains(t, lines[0], "not guaranteed to stay published")
	assert.Empty(t, auditLines(t, buf), "no token issued")
}

// TestIssueClamp is the clamp's arithmetic alone.
func TestIssueClamp(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct {
		ttl, left time.Duration
		exp       int64 // 0: refused
	}{
		{time.Hour, 24 * time.Hour, now.Unix() + 3600},
		{time.Hour, 30 * time.Minute, now.Unix() + 1800},
		{time.Hour, MinTTL, now.Unix() + 60},
		{time.Hour, MinTTL - time.Second, 0},
		{MinTTL, MinTTL - time.Second, 0},
		{time.Hour, -time.Hour, 0},
	} {
		s, err := New(Config{Issuer: "http://x", Attester: fakeAttester{}, Registry: fakeRegistry{}, Secrets: fakeSecrets{},
			Keys: shortKeys{KeySet: must2(OpenKeys(filepath.Join(t.TempDir(), "k"), EdDSA, nil)), until: now.Add(tc.left)},
			Now:  func() time.Time { return now }, Logger: quiet, Node: "n"})
		require.NoError(t, err)
		_, c, err := s.issue(registry.Sandbox{ID: "x"}, []string{"a"}, tc.ttl)
		if tc.exp == 0 {
			require.ErrorIs(t, err, errKeyPublicationExpiring, "ttl %s, %s left", tc.ttl, tc.left)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, tc.exp, c.Expiry, "ttl %s, %s left", tc.ttl, tc.left)
	}
}

func must2[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestDiscoveryHandlerServesOnlyDiscovery: the discovery listener's
// handler serves discovery and the JWKS, and a JSON 404 for the token
// endpoint and anything else.
func TestDiscoveryHandlerServesOnlyDiscovery(t *testing.T) {
	k, err := OpenKeys(filepath.Join(t.TempDir(), "keys"), EdDSA, nil)
	require.NoError(t, err)
	s, err := New(Config{Issuer: "https://issuer.example/", Attester: fakeAttester{}, Registry: fakeRegistry{},
		Secrets: fakeSecrets{}, Keys: k, Logger: quiet, Node: "n"})
	require.NoError(t, err)
	h := s.DiscoveryHandler()
	get := func(path string) (int, http.Header, string) {
		w := httptest.NewRecorder()
		r := httptest.NewRequest("GET", "http://x"+path, nil)
		r.Header.Set("Authorization", "Bearer "+strings.Repeat("a", 64))
		h.ServeHTTP(w, r)
		return w.Code, w.Header(), w.Body.String()
	}
	status, _, body := get("/.well-known/openid-configuration")
	require.Equal(t, 200, status)
	var doc map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &doc))
	assert.Equal(t, "https://issuer.example", doc["issuer"])
	assert.Equal(t, "https://issuer.example/.well-known/jwks.json", doc["jwks_uri"])
	for _, p := range []string{"/.well-known/jwks.json", "/.well-known/miren/jwks"} {
		status, hdr, body := get(p)
		require.Equal(t, 200, status)
		assert.Equal(t, "max-age=60", hdr.Get("Cache-Control"))
		var set jose.JSONWebKeySet
		require.NoError(t, json.Unmarshal([]byte(body), &set))
		assert.Equal(t, kids(k.JWKS()), kids(set))
	}
	for _, p := range []string{"/v1/token", "/v1/token?ttl=60", "/", "/metrics", "/.well-known/"} {
		status, hdr, body := get(p)
		assert.Equal(t, 404, status, p)
		assert.Equal(t, "application/json", hdr.Get("Content-Type"))
		assert.JSONEq(t, `{"error":"not found"}`, body)
	}
}

// TestPublishHookComesFirst: a new key's public half goes to the Publish
// hook before the key is served or signs here; a key whose publication
// fails is dropped, and the rotation (or the start) fails with why.
func TestPublishHookComesFirst(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	ctx := context.Background()
	var k *Keys
	var published []string
	var fail error
	cfg := KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: time.Minute, Publish: func(_ context.Context, key jose.JSONWebKey) error {
		require.True(t, key.IsPublic(), "only the public half is published")
		if k != nil {
			assert.NotContains(t, kids(k.JWKS()), key.KeyID, "published elsewhere before here")
		}
		if fail != nil {
			return fail
		}
		published = append(published, key.KeyID)
		return nil
	}}
	fail = errors.New("etcd: no leader")
	_, err := LoadKeys(ctx, cfg)
	require.ErrorContains(t, err, "etcd: no leader", "no first key without its publication")
	fail = nil
	k, err = LoadKeys(ctx, cfg)
	require.NoError(t, err)
	require.Equal(t, kids(k.JWKS()), published)

	require.NoError(t, k.Rotate(ctx))
	require.Equal(t, kids(k.JWKS()), published)
	p := k.Published()
	require.Len(t, p, 2)
	assert.Equal(t, KeyNext, p[1].State)
	assert.True(t, p[1].Public.IsPublic())
	assert.Equal(t, p[1].KeyID, p[1].Public.KeyID)

	fail = errors.New("etcd: no leader")
	require.ErrorContains(t, k.Rotate(ctx), "etcd: no leader")
	require.ErrorContains(t, k.RotateNow(ctx), "etcd: no leader")
	assert.Equal(t, kids(k.JWKS()), published, "an unpublished key is not used")
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 2, "nor kept")
}

// BenchmarkKeysSign signs with the key chosen at the time of signing, while
// a replaced key and a key being published are also held.
func BenchmarkKeysSign(b *testing.B) {
	for _, alg := range []string{EdDSA, ES256, RS256} {
		b.Run(alg, func(b *testing.B) {
			ctx := context.Background()
			k, err := LoadKeys(ctx, KeysConfig{Dir: filepath.Join(b.TempDir(), "keys"), Alg: alg, PublishDelay: time.Hour})
			require.NoError(b, err)
			require.NoError(b, k.RotateNow(ctx))
			require.NoError(b, k.Rotate(ctx))
			c := Claims{Subject: "org:o:app:a:sandbox:s", Audience: []string{"miren"}, ID: "x"}
			for b.Loop() {
				if _, err := k.Sign(c); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestFirstKeyWaitsInAFleet: with FirstKeyWaits (a fleet node), the first
// key is published for the delay before it signs, like every later one; a
// restart in the meantime keeps that key and its schedule.
func TestFirstKeyWaitsInAFleet(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	clk := newClock()
	cfg := KeysConfig{Dir: dir, Alg: EdDSA, PublishDelay: time.Minute, Now: clk.now, FirstKeyWaits: true}
	k, err := LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	first := kids(k.JWKS())
	require.Len(t, first, 1, "published at once")
	assert.Equal(t, []string{KeyNext}, states(k.Status()))
	_, err = k.Sign(Claims{Subject: "x"})
	assert.ErrorContains(t, err, "no signing key signs now")

	clk.advance(30 * time.Second)
	k, err = LoadKeys(context.Background(), cfg)
	require.NoError(t, err)
	assert.Equal(t, first, kids(k.JWKS()), "a restart during the delay makes no second key")
	_, err = k.Sign(Claims{Subject: "x"})
	assert.Error(t, err)
	clk.advance(30 * time.Second)
	assert.Equal(t, first[0], kidOf(t, sign(t, k)), "signs once published for the delay")
}
