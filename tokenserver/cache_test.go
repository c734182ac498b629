package tokenserver

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/internal/registry"
)

// fixedClock is a settable server clock.
type fixedClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fixedClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fixedClock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// TestTokenCache: through the real server and kernel, a repeated request
// gets the same token while more than half of its lifetime remains, and a
// new one from half-life on; other audience lists and lifetimes get tokens of their
// own; Forget, an emergency key rotation and a secret rotation are seen at
// once; a request whose secret fails never gets the cached token; and
// every token served has its audit line and is counted.
func TestTokenCache(t *testing.T) {
	e := newEnv(t, envOptions{})
	start := time.Now().Truncate(time.Second)
	clk := &fixedClock{t: start}
	buf := e.captureLog(envOptions{now: clk.now, rate: rate.Inf, burst: 1})
	_, a, secretA := e.sandbox("a", "web", "")
	get := func(q, secret string) map[string]any {
		t.Helper()
		return claims(t, tokenOf(t, e.get(a, "GET", q, bearer(secret))))
	}

	first := get("", secretA)
	assert.Equal(t, first["jti"], get("", secretA)["jti"], "a repeated request gets the same token")

	seen := map[any]string{first["jti"]: ""}
	for _, q := range []string{"?audience=x", "?audience=x&audience=y", "?audience=y&audience=x",
		"?audience=x%3Ay", "?audience=1%3Ax", "?ttl=120", "?ttl=600", "?audience=x&ttl=120"} {
		c := get(q, secretA)
		prev, dup := seen[c["jti"]]
		assert.False(t, dup, "%q got the token of %q", q, prev)
		seen[c["jti"]] = q
		assert.Equal(t, c["jti"], get(q, secretA)["jti"], "%q repeated", q)
	}
	assert.Equal(t, get("?ttl=60", secretA)["jti"], get("?ttl=5", secretA)["jti"], "both ask for the minimum lifetime")

	// More than half of the lifetime (3600s) left: reused; half: a new one.
	iat := int64(first["iat"].(float64))
	clk.set(time.Unix(iat+1799, 0))
	assert.Equal(t, first["jti"], get("", secretA)["jti"], "more than half of the lifetime left")
	clk.set(time.Unix(iat+1800, 0))
	second := get("", secretA)
	assert.NotEqual(t, first["jti"], second["jti"], "at half-life")
	assert.EqualValues(t, iat+1800, second["iat"])
	assert.Equal(t, second["jti"], get("", secretA)["jti"])

	// Forget (a deletion or rotation the controller reports).
	e.srv.Forget("sb-a")
	third := get("", secretA)
	assert.NotEqual(t, second["jti"], third["jti"], "Forget drops")

	// The key rotated at once: the next request is signed by the new key.
	kidBefore := kidOf(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))
	require.NoError(t, e.keys.RotateNow(context.Background()))
	rotated := tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	assert.NotEqual(t, kidBefore, kidOf(t, rotated))
	assert.NotEqual(t, third["jti"], claims(t, rotated)["jti"], "a key rotation drops")
	fourth := claims(t, rotated)

	// A wrong secret never gets the cached token.
	assertError(t, e.get(a, "GET", "", bearer(strings.Repeat("0", 64))), http.StatusForbidden, msgInvalidToken)

	// A secret rotation: the new secret gets a token of its own at once,
	// even before the controller's Forget; the old one, in its grace
	// window, its own until Forget; without grace, nothing.
	next := strings.Repeat("9", 64)
	require.NoError(t, e.secrets.Rotate("sb-a", next, time.Hour))
	withNext := get("", next)
	assert.NotEqual(t, fourth["jti"], withNext["jti"], "the new secret's first token is new")
	assert.Equal(t, fourth["jti"], get("", secretA)["jti"], "before Forget, the old secret (in grace) gets its token")
	e.srv.Forget("sb-a")
	assert.NotEqual(t, fourth["jti"], get("", secretA)["jti"], "after Forget, a new one")
	assert.NotEqual(t, withNext["jti"], get("", next)["jti"])
	newest := strings.Repeat("8", 64)
	require.NoError(t, e.secrets.Rotate("sb-a", newest, 0))
	assertError(t, e.get(a, "GET", "", bearer(secretA)), http.StatusForbidden, msgInvalidToken)
	assertError(t, e.get(a, "GET", "", bearer(next)), http.StatusForbidden, msgInvalidToken)

	// Every token served has its audit line; reuses say cached.
	lines := auditLines(t, buf)
	var hits float64
	byJTI := map[string][]auditLine{}
	for _, l := range lines {
		byJTI[l.JTI] = append(byJTI[l.JTI], l)
		if l.Cached {
			hits++
		}
	}
	for jti, ls := range byJTI {
		assert.False(t, ls[0].Cached, "%s: the first line of a token is its signature", jti)
		for _, l := range ls[1:] {
			assert.True(t, l.Cached, "%s: later lines are reuses", jti)
		}
	}
	assert.NotZero(t, hits)
	assert.Equal(t, float64(len(lines)), testutil.ToFloat64(e.srv.cfg.Metrics.issuedByAlg.WithLabelValues(RS256)))
	assert.Equal(t, hits, testutil.ToFloat64(e.srv.cfg.Metrics.cacheHits.WithLabelValues(RS256)))
}

// TestTokenCacheDeletedSandbox: a deleted sandbox (secret revoked,
// unregistered, Forget) is refused and leaves nothing cached.
func TestTokenCacheDeletedSandbox(t *testing.T) {
	e := newEnv(t, envOptions{})
	_, a, secretA := e.sandbox("a", "web", "")
	_, b, secretB := e.sandbox("b", "web", "")
	tokenOf(t, e.get(a, "GET", "", bearer(secretA)))
	tokenOf(t, e.get(b, "GET", "", bearer(secretB)))
	require.Equal(t, 2, e.srv.cache.len())

	require.NoError(t, e.secrets.Delete("sb-a"))
	e.reg.Remove("sb-a")
	e.srv.Forget("sb-a")
	assert.Equal(t, 1, e.srv.cache.len(), "b's token stays")
	assertError(t, e.get(a, "GET", "", bearer(secretA)), http.StatusForbidden, msgUnknownSource)
}

// TestTokenCacheOff: with the cache off every request is signed anew.
func TestTokenCacheOff(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.stop()
	e.serve(envOptions{noCache: true})
	_, a, secretA := e.sandbox("a", "web", "")
	jtis := map[any]bool{}
	for range 3 {
		jtis[claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))["jti"]] = true
	}
	assert.Len(t, jtis, 3)
	assert.Nil(t, e.srv.cache)

	_, err := New(Config{Issuer: e.issuer, Attester: e.in, Registry: e.reg, Secrets: e.secrets, Keys: e.keys, TokenCacheBytes: -1})
	assert.ErrorContains(t, err, "token cache size")
}

// movableKeys are real keys whose guaranteed publication can shrink, as a
// fleet node's does while the shared store is away.
type movableKeys struct {
	*Keys
	until atomic.Int64
}

func (k *movableKeys) SignableUntil() time.Time { return time.Unix(k.until.Load(), 0) }

// TestTokenCacheNeverOutlivesPublication: a cached token whose exp is past
// what the keys now guarantee is not reused; the next one is clamped, and
// reused while it fits. Once the publication no longer covers the minimum
// lifetime, nothing is reused either: the request fails as a signature
// would.
func TestTokenCacheNeverOutlivesPublication(t *testing.T) {
	e := newEnv(t, envOptions{})
	keys := &movableKeys{Keys: e.keys}
	keys.until.Store(farFuture.Unix())
	clk := &fixedClock{t: time.Now().Truncate(time.Second)}
	e.stop()
	e.serve(envOptions{keys: keys, now: clk.now, rate: rate.Inf, burst: 1})
	_, a, secretA := e.sandbox("a", "web", "")
	first := claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))
	assert.Equal(t, first["jti"], claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))["jti"])

	until := clk.now().Add(10 * time.Minute).Unix()
	keys.until.Store(until)
	second := claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))
	assert.NotEqual(t, first["jti"], second["jti"], "first's exp is past the publication")
	assert.EqualValues(t, until, second["exp"])
	assert.Equal(t, second["jti"], claims(t, tokenOf(t, e.get(a, "GET", "", bearer(secretA))))["jti"])

	// A 60s token, published exactly as long: reused while the
	// publication covers MinTTL, refused after, like a signature.
	short := claims(t, tokenOf(t, e.get(a, "GET", "?ttl=60", bearer(secretA))))
	keys.until.Store(int64(short["exp"].(float64)))
	assert.Equal(t, short["jti"], claims(t, tokenOf(t, e.get(a, "GET", "?ttl=60", bearer(secretA))))["jti"])
	clk.set(clk.now().Add(2 * time.Second))
	assertError(t, e.get(a, "GET", "?ttl=60", bearer(secretA)), http.StatusInternalServerError, msgIssueFailed)
	assert.Equal(t, 1.0, testutil.ToFloat64(e.srv.cfg.Metrics.failures.WithLabelValues(failKeyPublication)))
}

// TestTokenCacheNeedsCurrentKey: keys that cannot say which key signs get
// no cache, rather than one that could outlive a rotation.
func TestTokenCacheNeedsCurrentKey(t *testing.T) {
	k, err := OpenKeys(filepath.Join(t.TempDir(), "k"), EdDSA, nil)
	require.NoError(t, err)
	s, err := New(Config{Issuer: "http://x", Attester: fakeAttester{}, Registry: fakeRegistry{}, Secrets: fakeSecrets{},
		Keys: shortKeys{KeySet: k, until: farFuture}, Logger: quiet, Node: "n"})
	require.NoError(t, err)
	assert.Nil(t, s.cache)
	s, err = New(Config{Issuer: "http://x", Attester: fakeAttester{}, Registry: fakeRegistry{}, Secrets: fakeSecrets{},
		Keys: k, Logger: quiet, Node: "n"})
	require.NoError(t, err)
	assert.NotNil(t, s.cache)
}

// cachedFor makes a cache entry for the pure-logic tests.
func cachedFor(sb registry.Sandbox, aud []string, kid string, iat, exp int64, body int) *cachedToken {
	return &cachedToken{key: newCacheKey(sb, "secret", aud, time.Hour), token: strings.Repeat("t", body), kid: kid,
		claims: Claims{IssuedAt: iat, Expiry: exp}}
}

func TestTokenCacheKeys(t *testing.T) {
	sb := registry.Sandbox{ID: "sb", App: "web", CgroupID: 1, NetnsCookie: 2}
	keys := map[cacheKey]string{}
	add := func(name string, k cacheKey) {
		prev, dup := keys[k]
		assert.False(t, dup, "%s has the key of %s", name, prev)
		keys[k] = name
	}
	add("base", newCacheKey(sb, "s", []string{"a", "b"}, time.Hour))
	add("joined audience", newCacheKey(sb, "s", []string{"ab"}, time.Hour))
	add("audience with separator", newCacheKey(sb, "s", []string{"1:a1:b"}, time.Hour))
	add("reversed", newCacheKey(sb, "s", []string{"b", "a"}, time.Hour))
	add("ttl", newCacheKey(sb, "s", []string{"a", "b"}, time.Minute))
	add("secret", newCacheKey(sb, "t", []string{"a", "b"}, time.Hour))
	recreated := sb
	recreated.CgroupID = 3
	add("recreated under the same id", newCacheKey(recreated, "s", []string{"a", "b"}, time.Hour))
	moved := sb
	moved.App = "db"
	add("other app", newCacheKey(moved, "s", []string{"a", "b"}, time.Hour))
	assert.Equal(t, newCacheKey(sb, "s", []string{"a", "b"}, time.Hour), newCacheKey(sb, "s", []string{"a", "b"}, time.Hour))
}

// TestTokenCacheBounded: the cache holds at most its size in bytes,
// dropping the least recently used first; an entry too large for it is not
// kept.
func TestTokenCacheBounded(t *testing.T) {
	const body = 1000
	c := newTokenCache(15 * body)
	c.get(cacheKey{}, "k", 0, 0) // the current kid
	for i := range 1000 {
		c.put(cachedFor(registry.Sandbox{ID: fmt.Sprint("sb-", i)}, []string{"a"}, "k", 0, 3600, body), 0)
		require.LessOrEqual(t, c.bytes, c.maxBytes)
	}
	assert.LessOrEqual(t, c.len(), 15)
	assert.Greater(t, c.len(), 5)
	assert.Len(t, c.byKey, c.len())
	n := 0
	for _, m := range c.bySandbox {
		n += len(m)
	}
	assert.Equal(t, c.len(), n)

	small := newTokenCache(DefaultTokenCacheBytes)
	small.get(cacheKey{}, "k", 0, 0)
	small.put(cachedFor(registry.Sandbox{ID: "big"}, []string{strings.Repeat("a", maxCachedTokenBytes)}, "k", 0, 3600, 10), 0)
	assert.Zero(t, small.len(), "an entry over maxCachedTokenBytes is signed every time")

	// LRU order: of 0..10 in a cache of 3, 7 used again after 8 was
	// put outlives 8.
	c = newTokenCache(3 * (body + 300))
	c.get(cacheKey{}, "k", 0, 0)
	var ks []cacheKey
	for i := range 11 {
		tk := cachedFor(registry.Sandbox{ID: fmt.Sprint("s", i)}, nil, "k", 0, 3600, body)
		ks = append(ks, tk.key)
		c.put(tk, 0)
		if i == 8 {
			_, ok := c.get(ks[7], "k", 1, 1<<40)
			require.True(t, ok)
		}
	}
	_, ok := c.get(ks[7], "k", 1, 1<<40)
	assert.True(t, ok)
	_, ok = c.get(ks[8], "k", 1, 1<<40)
	assert.False(t, ok)
}

// TestTokenCacheRules is the reuse rule alone: the first half of the
// lifetime (half-life itself excluded), not before iat, not past the publication, the same key, and
// not kept when a Forget came between the check and the signature.
func TestTokenCacheRules(t *testing.T) {
	sb := registry.Sandbox{ID: "sb"}
	for _, tc := range []struct {
		name       string
		kid        string
		now, until int64
		want       bool
	}{
		{"fresh", "k", 1000, 1 << 40, true},
		{"just over half left", "k", 1000 + 1799, 1 << 40, true},
		{"half left", "k", 1000 + 1800, 1 << 40, false},
		{"less than half", "k", 1000 + 1801, 1 << 40, false},
		{"before iat", "k", 999, 1 << 40, false},
		{"exp past the publication", "k", 1000, 1000 + 3599, false},
		{"exp at the publication", "k", 1000, 1000 + 3600, true},
		{"another key signs", "k2", 1000, 1 << 40, false},
	} {
		c := newTokenCache(DefaultTokenCacheBytes)
		c.get(cacheKey{}, "k", 0, 0)
		tk := cachedFor(sb, []string{"a"}, "k", 1000, 1000+3600, 10)
		c.put(tk, c.generation())
		_, ok := c.get(tk.key, tc.kid, tc.now, tc.until)
		assert.Equal(t, tc.want, ok, tc.name)
		if !ok {
			assert.Zero(t, c.len(), "%s: dropped", tc.name)
		}
	}

	c := newTokenCache(DefaultTokenCacheBytes)
	c.get(cacheKey{}, "k", 0, 0)
	gen := c.generation()
	c.forget("other")
	tk := cachedFor(sb, []string{"a"}, "k", 1000, 1000+3600, 10)
	c.put(tk, gen)
	assert.Zero(t, c.len(), "signed across a Forget: not kept")
	c.put(cachedFor(sb, []string{"a"}, "old-key", 1000, 1000+3600, 10), c.generation())
	assert.Zero(t, c.len(), "signed by a key that no longer signs: not kept")
}

// TestTokenCacheConcurrent: readers, writers, Forget and key changes at
// once (run with -race); the cache's indexes stay consistent.
func TestTokenCacheConcurrent(t *testing.T) {
	c := newTokenCache(50 * 1500)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				sb := registry.Sandbox{ID: fmt.Sprint("sb-", (g*7+i)%40)}
				kid := "k1"
				if i > 1500 {
					kid = "k2"
				}
				tk := cachedFor(sb, []string{fmt.Sprint(i % 3)}, kid, 0, 3600, 1000)
				gen := c.generation()
				if _, ok := c.get(tk.key, kid, 1, 1<<40); !ok {
					c.put(tk, gen)
				}
				if i%97 == 0 {
					c.forget(sb.ID)
				}
			}
		})
	}
	wg.Wait()
	assert.LessOrEqual(t, c.bytes, c.maxBytes)
	assert.Len(t, c.byKey, c.len())
	n, bytes := 0, 0
	for _, m := range c.bySandbox {
		n += len(m)
	}
	for e := c.lru.Front(); e != nil; e = e.Next() {
		bytes += e.Value.(*cachedToken).size
	}
	assert.Equal(t, c.len(), n)
	assert.Equal(t, c.bytes, bytes)
}
