package client

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// jwt makes an unsigned token with the claims; the client never verifies.
func jwt(claims map[string]any) string {
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	return enc(map[string]string{"alg": "none"}) + "." + enc(claims) + ".sig"
}

// fakeClock is a settable clock and a sleep that records its waits and
// advances the clock instead of waiting.
type fakeClock struct {
	mu     sync.Mutex
	t      time.Time
	sleeps []time.Duration
}

func (f *fakeClock) now() time.Time { f.mu.Lock(); defer f.mu.Unlock(); return f.t }
func (f *fakeClock) advance(d time.Duration) {
	f.mu.Lock()
	f.t = f.t.Add(d)
	f.mu.Unlock()
}
func (f *fakeClock) sleep(ctx context.Context, d time.Duration) error {
	f.mu.Lock()
	f.sleeps = append(f.sleeps, d)
	f.mu.Unlock()
	f.advance(d)
	return ctx.Err()
}
func (f *fakeClock) waits() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Duration(nil), f.sleeps...)
}

func (f *fakeClock) install(c *Client) *Client { c.now, c.sleep = f.now, f.sleep; return c }

// server is a stand-in token endpoint: it accepts the secrets in ok,
// answers fail's status while fail > 0, and issues tokens valid for the
// requested ttl (default 100 s) on clk's time.
type server struct {
	*httptest.Server
	clk      *fakeClock
	mu       sync.Mutex
	ok       map[string]bool
	fail     int
	requests []*http.Request
	// onRequest runs before the answer, with the presented secret.
	onRequest func(secret string)
}

func newServer(t testing.TB, clk *fakeClock, secrets ...string) *server {
	s := &server{clk: clk, ok: map[string]bool{}}
	for _, x := range secrets {
		s.ok[x] = true
	}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		secret, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if s.onRequest != nil {
			s.onRequest(secret)
		}
		s.mu.Lock()
		s.requests = append(s.requests, r)
		n := len(s.requests)
		fail, ok := s.fail, s.ok[secret]
		if fail > 0 {
			s.fail--
		}
		s.mu.Unlock()
		switch {
		case fail > 0:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `{"error":"overloaded"}`)
		case !ok:
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `{"error":"invalid token"}`)
		default:
			ttl := 100 * time.Second
			if v := r.URL.Query().Get("ttl"); v != "" {
				var n int
				fmt.Sscan(v, &n)
				ttl = time.Duration(n) * time.Second
			}
			json.NewEncoder(w).Encode(map[string]string{"value": jwt(map[string]any{
				"aud": r.URL.Query()["audience"], "exp": clk.now().Add(ttl).Unix(), "n": n,
			})})
		}
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) count() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.requests) }
func (s *server) last() *http.Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[len(s.requests)-1]
}

func newClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func TestCacheUntilHalfLife(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	srv := newServer(t, clk, "s")
	c := clk.install(New(WithURL(srv.URL), WithSecret("s")))

	first, err := c.Token(ctx)
	require.NoError(t, err)
	again, err := c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, first, again)
	assert.Equal(t, 1, srv.count(), "a fresh token comes from the cache")

	clk.advance(49 * time.Second)
	again, _ = c.Token(ctx)
	assert.Equal(t, first, again, "before half of its 100 s lifetime")
	clk.advance(2 * time.Second)
	again, _ = c.Token(ctx)
	assert.NotEqual(t, first, again, "past half of its lifetime")
	assert.Equal(t, 2, srv.count())

	// Another audience set is another cache entry; audiences repeat in order.
	_, err = c.Token(ctx, "b", "a")
	require.NoError(t, err)
	assert.Equal(t, 3, srv.count())
	assert.Equal(t, []string{"b", "a"}, srv.last().URL.Query()["audience"])
	assert.Equal(t, "Bearer s", srv.last().Header.Get("Authorization"))
	_, _ = c.Token(ctx, "b", "a")
	assert.Equal(t, 3, srv.count())
	_, _ = c.Token(ctx, "a", "b")
	assert.Equal(t, 4, srv.count(), "order matters: aud is in request order")

	// Fetch always asks; ttl goes in the query and sets the half-life.
	c2 := clk.install(New(WithURL(srv.URL), WithSecret("s"), WithTTL(10*time.Minute)))
	_, err = c2.Fetch(ctx)
	require.NoError(t, err)
	assert.Equal(t, "600", srv.last().URL.Query().Get("ttl"))
	n := srv.count()
	clk.advance(299 * time.Second)
	_, _ = c2.Token(ctx)
	assert.Equal(t, n, srv.count())
	clk.advance(2 * time.Second)
	_, _ = c2.Token(ctx)
	assert.Equal(t, n+1, srv.count())
}

func TestBackoff(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	srv := newServer(t, clk, "s")
	srv.fail = 8
	var hooked []time.Duration
	c := clk.install(New(WithURL(srv.URL), WithSecret("s"),
		WithRetryHook(func(err error, wait time.Duration) { hooked = append(hooked, wait) })))
	_, err := c.Token(ctx)
	require.NoError(t, err)
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30, 30}
	for i := range want {
		want[i] *= time.Second
	}
	assert.Equal(t, want, clk.waits(), "1 s doubling to 30 s")
	assert.Equal(t, want, hooked)
	assert.Equal(t, 9, srv.count())

	// Bounded by attempts: the last error says why, with the status.
	clk2 := newClock()
	srv.fail = 5
	c = clk2.install(New(WithURL(srv.URL), WithSecret("s"), WithMaxAttempts(3), WithMaxBackoff(1500*time.Millisecond)))
	_, err = c.Token(ctx)
	require.Error(t, err)
	assert.Equal(t, "token server refused: 503 Service Unavailable: overloaded", err.Error())
	var refused *RefusedError
	require.ErrorAs(t, err, &refused)
	assert.Equal(t, 503, refused.Code)
	assert.Equal(t, []time.Duration{time.Second, 1500 * time.Millisecond}, clk2.waits())

	// Bounded by the context: the wait ends with it.
	srv.fail = 1000
	cctx, cancel := context.WithCancel(ctx)
	clk3 := newClock()
	c = New(WithURL(srv.URL), WithSecret("s"))
	c.now = clk3.now
	c.sleep = func(ctx context.Context, d time.Duration) error {
		cancel()
		return sleepCtx(ctx, d)
	}
	_, err = c.Token(cctx)
	require.Error(t, err)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Contains(t, err.Error(), "overloaded")
}

func TestRefreshFailureKeepsValidToken(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	srv := newServer(t, clk, "s")
	var hooked []time.Duration
	c := clk.install(New(WithURL(srv.URL), WithSecret("s"), WithMaxAttempts(1),
		WithRetryHook(func(err error, wait time.Duration) { hooked = append(hooked, wait) })))
	first, err := c.Token(ctx)
	require.NoError(t, err)
	clk.advance(60 * time.Second)
	srv.fail = 3
	calls := []struct {
		advance  time.Duration
		requests int
	}{
		{0, 2},               // fails: the cached token, next try in 1 s
		{0, 2},               // within the backoff: no request
		{time.Second, 3},     // fails: next in 2 s
		{time.Second, 3},     //
		{time.Second, 4},     // fails: next in 4 s
		{3 * time.Second, 4}, //
	}
	for i, call := range calls {
		clk.advance(call.advance)
		got, err := c.Token(ctx)
		require.NoError(t, err, "call %d: the cached token is still valid", i)
		assert.Equal(t, first, got, "call %d", i)
		assert.Equal(t, call.requests, srv.count(), "call %d", i)
	}
	assert.Empty(t, clk.waits(), "Token never waits while it has a valid token")
	assert.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}, hooked)
	clk.advance(time.Second)
	got, err := c.Token(ctx)
	require.NoError(t, err)
	assert.NotEqual(t, first, got, "refreshed once the server answers")

	// Expired: no token to fall back on, the error is returned.
	clk.advance(101 * time.Second)
	srv.fail = 1
	_, err = c.Token(ctx)
	assert.ErrorContains(t, err, "overloaded")
}

func TestSecretFile(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	dir := t.TempDir()
	file := filepath.Join(dir, "secret")
	require.NoError(t, os.WriteFile(file, []byte("from-file\n"), 0o600))
	srv := newServer(t, clk, "from-file")
	c := clk.install(New(WithURL(srv.URL), WithSecret("from-env"), WithSecretFile(file), WithMaxAttempts(1)))
	_, err := c.Fetch(ctx)
	require.NoError(t, err)
	assert.Equal(t, "Bearer from-file", srv.last().Header.Get("Authorization"), "the file is preferred")

	// Re-read on every fetch.
	require.NoError(t, os.WriteFile(file, []byte("rotated"), 0o600))
	srv.ok["rotated"] = true
	_, err = c.Fetch(ctx)
	require.NoError(t, err)
	assert.Equal(t, "Bearer rotated", srv.last().Header.Get("Authorization"))

	// Unreadable or empty file: the environment's secret.
	srv.ok["from-env"] = true
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	_, err = c.Fetch(ctx)
	require.NoError(t, err)
	assert.Equal(t, "Bearer from-env", srv.last().Header.Get("Authorization"))
	require.NoError(t, os.Remove(file))
	_, err = c.Fetch(ctx)
	require.NoError(t, err)
	assert.Equal(t, "Bearer from-env", srv.last().Header.Get("Authorization"))
	assert.Empty(t, clk.waits())
}

// TestSecretFileRotatedDuringRequest: the secret rotates between the read
// and the server's check; the 403 makes the client read the file again and
// retry at once, without a backoff wait.
func TestSecretFileRotatedDuringRequest(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	file := filepath.Join(t.TempDir(), "secret")
	require.NoError(t, os.WriteFile(file, []byte("old"), 0o600))
	srv := newServer(t, clk, "new")
	srv.onRequest = func(secret string) {
		if secret == "old" {
			os.WriteFile(file, []byte("new"), 0o600)
		}
	}
	c := clk.install(New(WithURL(srv.URL), WithSecretFile(file)))
	_, err := c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, 2, srv.count())
	assert.Equal(t, "Bearer new", srv.last().Header.Get("Authorization"))
	assert.Empty(t, clk.waits(), "no backoff before the re-read")

	// An unchanged secret after a 403 is not re-sent at once: back off.
	srv.onRequest = nil
	c = clk.install(New(WithURL(srv.URL), WithSecret("wrong"), WithSecretFile(filepath.Join(t.TempDir(), "none")), WithMaxAttempts(2)))
	n := srv.count()
	_, err = c.Fetch(ctx)
	assert.EqualError(t, err, "token server refused: 403 Forbidden: invalid token")
	assert.Equal(t, n+2, srv.count())
	assert.Equal(t, []time.Duration{time.Second}, clk.waits())
}

// writeToken replaces path atomically, as identityd does.
func writeToken(t *testing.T, path, tok string) {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(tok), 0o600); err != nil {
		t.Error(err)
		return
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Error(err)
	}
}

func TestTokenFileReplacedByRename(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "token")
	exp := time.Now().Add(time.Hour).Unix()
	writeToken(t, path, jwt(map[string]any{"exp": exp, "n": 0}))
	c := FromFile(path)
	// A read that needed a second look (torn, empty) would wait first.
	var retries atomic.Int32
	c.sleep = func(ctx context.Context, d time.Duration) error { retries.Add(1); return nil }

	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; !stop.Load(); i++ {
			// Tokens of varying length, so a torn read would not parse.
			writeToken(t, path, jwt(map[string]any{"exp": exp, "n": i, "pad": strings.Repeat("x", i%4096)}))
		}
	}()
	seen := map[string]bool{}
	for i := 0; i < 5000; i++ {
		tok, err := c.Token(ctx)
		if !assert.NoError(t, err) {
			break
		}
		claims, err := Claims(tok)
		require.NoError(t, err)
		require.Equal(t, float64(exp), claims["exp"])
		seen[tok] = true
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d distinct tokens read", len(seen))
	assert.Greater(t, len(seen), 1, "the writer ran during the reads")
	assert.Zero(t, retries.Load(), "every read parsed at the first try")
}

func TestTokenFileChecks(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	path := filepath.Join(t.TempDir(), "token")

	// Expired.
	writeToken(t, path, jwt(map[string]any{"exp": clk.now().Add(-time.Second).Unix()}))
	c := clk.install(FromFile(path))
	_, err := c.Token(ctx)
	assert.ErrorContains(t, err, "expired")
	_, err = c.Token(ctx, "other")
	assert.ErrorContains(t, err, "only a token file")

	// The endpoint's JSON form is accepted too.
	valid := jwt(map[string]any{"exp": clk.now().Add(time.Hour).Unix()})
	writeToken(t, path, `{"value":"`+valid+`"}`)
	got, err := c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, valid, got)

	// Garbage is read again shortly: here it is fixed during the first wait.
	writeToken(t, path, "not a token")
	c.sleep = func(ctx context.Context, d time.Duration) error {
		writeToken(t, path, valid+"\n")
		return nil
	}
	got, err = c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, valid, got)
	// Garbage that stays: the error says why.
	writeToken(t, path, "not a token")
	c.sleep = clk.sleep
	_, err = c.Token(ctx)
	assert.ErrorContains(t, err, "malformed token")
	assert.Len(t, clk.waits(), fileAttempts-1)

	// A missing file is not waited for.
	c = clk.install(FromFile(filepath.Join(t.TempDir(), "none")))
	n := len(clk.waits())
	_, err = c.Token(ctx)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.Len(t, clk.waits(), n)

	// With a server too, an expired file falls back to it; audiences always go to it.
	writeToken(t, path, jwt(map[string]any{"exp": clk.now().Add(-time.Second).Unix()}))
	srv := newServer(t, clk, "s")
	c = clk.install(New(WithURL(srv.URL), WithSecret("s"), WithTokenFile(path)))
	_, err = c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, 1, srv.count())
	writeToken(t, path, valid)
	got, err = c.Token(ctx)
	require.NoError(t, err)
	assert.Equal(t, valid, got)
	_, err = c.Token(ctx, "a")
	require.NoError(t, err)
	assert.Equal(t, 2, srv.count())

	// Both failing: the error names both.
	writeToken(t, path, jwt(map[string]any{"exp": clk.now().Add(-time.Second).Unix()}))
	c = clk.install(New(WithURL(srv.URL), WithSecret("wrong"), WithTokenFile(path), WithMaxAttempts(1)))
	_, err = c.Token(ctx)
	assert.ErrorContains(t, err, "invalid token")
	assert.ErrorContains(t, err, "expired")
}

func TestFromEnv(t *testing.T) {
	for _, k := range []string{EnvTokenURL, EnvSecret, EnvSecretFile, EnvTokenPath} {
		t.Setenv(k, "")
	}
	_, err := FromEnv()
	assert.ErrorContains(t, err, "must be set")
	t.Setenv(EnvTokenURL, "http://127.0.0.1:1/v1/token")
	_, err = FromEnv()
	assert.Error(t, err, "a URL without a secret")
	t.Setenv(EnvSecretFile, "/nonexistent")
	c, err := FromEnv(WithMaxAttempts(1))
	require.NoError(t, err)
	_, err = c.Token(context.Background())
	assert.ErrorContains(t, err, "no secret")
	t.Setenv(EnvSecret, "s")
	c, err = FromEnv(WithMaxAttempts(1))
	require.NoError(t, err)
	_, err = c.Token(context.Background())
	assert.ErrorContains(t, err, "token server unreachable")
	assert.False(t, errors.As(err, new(*RefusedError)))
}

func BenchmarkTokenCached(b *testing.B) {
	srv := newServer(b, newClock(), "s")
	c := New(WithURL(srv.URL), WithSecret("s"))
	c.now = srv.clk.now
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.Token(ctx, "a"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkFetch(b *testing.B) {
	srv := newServer(b, newClock(), "s")
	c := New(WithURL(srv.URL), WithSecret("s"))
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.Fetch(ctx, "a"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkTokenFile(b *testing.B) {
	path := filepath.Join(b.TempDir(), "token")
	if err := os.WriteFile(path, []byte(jwt(map[string]any{"exp": time.Now().Add(time.Hour).Unix()})), 0o600); err != nil {
		b.Fatal(err)
	}
	c := FromFile(path)
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.Token(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// TestNoRedirect: a redirect is a refusal; the secret goes nowhere else.
func TestNoRedirect(t *testing.T) {
	var leaked atomic.Bool
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		leaked.Store(r.Header.Get("Authorization") != "")
	}))
	defer elsewhere.Close()
	redirector := httptest.NewServer(http.RedirectHandler(elsewhere.URL, http.StatusFound))
	defer redirector.Close()
	_, err := New(WithURL(redirector.URL), WithSecret("s"), WithMaxAttempts(1)).Token(context.Background())
	var refused *RefusedError
	require.ErrorAs(t, err, &refused)
	assert.Equal(t, http.StatusFound, refused.Code)
	assert.False(t, leaked.Load())
}

func TestConcurrentCallers(t *testing.T) {
	clk := newClock()
	srv := newServer(t, clk, "s")
	c := New(WithURL(srv.URL), WithSecret("s"))
	c.now = clk.now
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 20; j++ {
				if _, err := c.Token(context.Background(), fmt.Sprint(j%3)); err != nil {
					t.Error(err)
					return
				}
				clk.advance(time.Second)
			}
		}()
	}
	wg.Wait()
}
