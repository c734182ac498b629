package controllers

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/credsdir"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// fakeTokens signs real JWTs (EdDSA) with a lifetime of ttl, and counts
// them per sandbox. A unit stand-in for the token server, whose own
// TokenFor is tested in tokenserver and end to end in cmd/identityd.
type fakeTokens struct {
	ttl    time.Duration
	signer jose.Signer

	mu        sync.Mutex
	issued    map[string]int
	fail      bool
	forgotten []string
}

func newFakeTokens(t *testing.T, ttl time.Duration) *fakeTokens {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: key}, nil)
	require.NoError(t, err)
	return &fakeTokens{ttl: ttl, signer: sig, issued: map[string]int{}}
}

func (f *fakeTokens) TokenFor(ctx context.Context, sb registry.Sandbox) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return "", context.DeadlineExceeded
	}
	f.issued[sb.ID]++
	now := time.Now()
	return jwt.Signed(f.signer).Claims(jwt.Claims{Subject: "sandbox:" + sb.ID,
		IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(f.ttl))}).Serialize()
}

func (f *fakeTokens) Forget(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgotten = append(f.forgotten, id)
}

func (f *fakeTokens) count(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.issued[id]
}

func readSecretFile(t *testing.T, cr *Created) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cr.Credentials.Dir, credsdir.SecretFile))
	require.NoError(t, err)
	return strings.TrimSpace(string(b))
}

func TestCredentialsDirectory(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	cfg.CredentialsMount = "/run/identityd-test/creds"
	tokens := newFakeTokens(t, time.Hour)
	cfg.Tokens = tokens
	ctx := context.Background()
	c, err := New(ctx, cfg)
	require.NoError(t, err)
	defer c.Close()

	cr, err := c.Create(ctx, CreateRequest{ID: "cr-" + suffix(), App: "web", Group: 4321})
	require.NoError(t, err)
	require.NotNil(t, cr.Credentials)
	assert.Equal(t, "/run/identityd-test/creds", cr.Credentials.Mount)
	assert.Equal(t, "/run/identityd-test/creds/secret", cr.Env["MIREN_IDENTITY_TOKEN_SECRET_FILE"])
	assert.Equal(t, "/run/identityd-test/creds/token", cr.Env["MIREN_IDENTITY_TOKEN_PATH"])
	assert.Equal(t, cr.Env["MIREN_IDENTITY_TOKEN_SECRET"], readSecretFile(t, cr), "the first secret is the environment's")
	st, err := os.Stat(cr.Credentials.Dir)
	require.NoError(t, err)
	assert.EqualValues(t, 4321, st.Sys().(*syscall.Stat_t).Gid)
	tok, times, err := c.creds.Token(cr.Sandbox.ID)
	require.NoError(t, err, "the token file exists when Create returns")
	assert.NotEmpty(t, tok)
	assert.WithinDuration(t, time.Now().Add(time.Hour), times.Expires, time.Minute)

	// Adopted: the mount the other runtime uses is the one the env names.
	other := w.AddSandbox("adopted")
	ad, err := c.Adopt(ctx, AdoptRequest{ID: "ad-" + suffix(), App: "api", CgroupPath: other.CgroupDir, CredentialsMount: "/var/run/x"})
	require.NoError(t, err)
	assert.Equal(t, "/var/run/x/secret", ad.Env["MIREN_IDENTITY_TOKEN_SECRET_FILE"])
	assert.Equal(t, ad.Env["MIREN_IDENTITY_TOKEN_SECRET"], readSecretFile(t, ad))
	_, err = c.Adopt(ctx, AdoptRequest{ID: "bad-" + suffix(), App: "api", CgroupPath: other.CgroupDir, CredentialsMount: "relative/x"})
	assert.ErrorIs(t, err, ErrInvalid)

	problems, err := Fsck(cfg)
	require.NoError(t, err)
	assert.Empty(t, problems)

	require.NoError(t, c.Delete(ctx, cr.Sandbox.ID, true))
	assert.NoDirExists(t, cr.Credentials.Dir, "a deleted sandbox's credentials go with it")
	tokens.mu.Lock()
	assert.Contains(t, tokens.forgotten, cr.Sandbox.ID, "and the tokens cached for it")
	tokens.mu.Unlock()
	require.NoError(t, c.Delete(ctx, ad.Sandbox.ID, false))
	assert.NoDirExists(t, ad.Credentials.Dir)
}

func TestRotateSecretOnDemand(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	cfg.SecretGrace = time.Hour
	ctx := context.Background()
	c, err := New(ctx, cfg)
	require.NoError(t, err)
	defer c.Close()
	cr, err := c.Create(ctx, CreateRequest{ID: "rot-" + suffix(), App: "web"})
	require.NoError(t, err)
	id, first := cr.Sandbox.ID, cr.Env["MIREN_IDENTITY_TOKEN_SECRET"]

	st, err := c.RotateSecret(ctx, id, false)
	require.NoError(t, err)
	assert.WithinDuration(t, time.Now().Add(time.Hour), st.PreviousUntil, time.Minute)
	second := readSecretFile(t, cr)
	assert.NotEqual(t, first, second)
	for secret, want := range map[string]bool{first: true, second: true} {
		ok, err := c.secrets.Verify(id, secret)
		require.NoError(t, err)
		assert.Equal(t, want, ok)
	}

	st, err = c.RotateSecret(ctx, id, true)
	require.NoError(t, err)
	assert.True(t, st.PreviousUntil.IsZero())
	third := readSecretFile(t, cr)
	for secret, want := range map[string]bool{first: false, second: false, third: true} {
		ok, err := c.secrets.Verify(id, secret)
		require.NoError(t, err)
		assert.Equal(t, want, ok)
	}
	_, err = c.RotateSecret(ctx, "nobody", false)
	assert.ErrorIs(t, err, ErrNotFound)
}

// The schedule rotates on its own, and the first (environment) secret
// works until the first rotation's grace window ends, then never again.
func TestScheduledRotation(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	cfg.SecretRotation, cfg.SecretGrace = 2*time.Second, 2*time.Second
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := New(ctx, cfg)
	require.NoError(t, err)
	defer c.Close()
	go c.Run(ctx)
	cr, err := c.Create(ctx, CreateRequest{ID: "sched-" + suffix(), App: "web"})
	require.NoError(t, err)
	id, first := cr.Sandbox.ID, cr.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	require.Eventually(t, func() bool { return readSecretFile(t, cr) != first }, 10*time.Second, 50*time.Millisecond,
		"the secret is rotated on schedule")
	ok, err := c.secrets.Verify(id, first)
	require.NoError(t, err)
	assert.True(t, ok, "within the grace window")
	require.Eventually(t, func() bool {
		ok, err := c.secrets.Verify(id, first)
		return err == nil && !ok
	}, 10*time.Second, 50*time.Millisecond, "after the first rotation's grace window, the environment secret is refused")
	ok, err = c.secrets.Verify(id, readSecretFile(t, cr))
	require.NoError(t, err)
	assert.True(t, ok, "the file's secret is always accepted")
}

// A token file is replaced at half its lifetime, and after a restart at
// once if the daemon was down past that.
func TestTokenFileRefresh(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	tokens := newFakeTokens(t, 4*time.Second)
	cfg.Tokens = tokens
	ctx, cancel := context.WithCancel(context.Background())
	c, err := New(ctx, cfg)
	require.NoError(t, err)
	runDone := make(chan struct{})
	go func() { defer close(runDone); c.Run(ctx) }()
	cr, err := c.Create(ctx, CreateRequest{ID: "tok-" + suffix(), App: "web"})
	require.NoError(t, err)
	id := cr.Sandbox.ID
	first, _, err := c.creds.Token(id)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		tok, _, err := c.creds.Token(id)
		return err == nil && tok != first
	}, 8*time.Second, 50*time.Millisecond, "replaced at half its lifetime")

	// Down for longer than half a lifetime: the next start replaces it at
	// once.
	cancel()
	<-runDone
	c.Close()
	before, times, err := c.creds.Token(id)
	require.NoError(t, err)
	time.Sleep(time.Until(times.RefreshAt()) + 100*time.Millisecond)
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	c2, err := New(ctx2, cfg)
	require.NoError(t, err)
	defer c2.Close()
	start := time.Now()
	go c2.Run(ctx2)
	require.Eventually(t, func() bool {
		tok, _, err := c2.creds.Token(id)
		return err == nil && tok != before
	}, 5*time.Second, 20*time.Millisecond)
	t.Logf("token file replaced %v after the restart's Run began", time.Since(start).Round(time.Millisecond))

	// A signer that fails is retried with backoff, never dropped.
	tokens.mu.Lock()
	tokens.fail = true
	tokens.mu.Unlock()
	n := tokens.count(id)
	time.Sleep(3 * time.Second)
	tokens.mu.Lock()
	tokens.fail = false
	tokens.mu.Unlock()
	require.Eventually(t, func() bool { return tokens.count(id) > n }, 40*time.Second, 50*time.Millisecond)
}

// A daemon killed at each point of a rotation comes back with a
// consistent current/previous pair and a secret file holding one of them:
// the old secret current if the store had not committed the new one, the
// new one published if it had.
func TestRotationCrashSafety(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	cfg.SecretGrace = time.Hour
	sock := filepath.Join(t.TempDir(), "run", "admin.sock")
	ctx := context.Background()
	d := daemon(t, cfg, sock, "")
	var cr Created
	require.NoError(t, NewAdminClient(sock).Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: "crash-" + suffix(), App: "web"}, &cr))
	d.Process.Kill()
	d.Wait()
	id := cr.Sandbox.ID
	accepted := []string{cr.Env["MIREN_IDENTITY_TOKEN_SECRET"]}

	for _, point := range []string{"rotate:staged", "rotate:committed", "rotate:published"} {
		t.Run(point, func(t *testing.T) {
			before := readSecretFile(t, &cr)
			d := daemon(t, cfg, sock, point)
			err := NewAdminClient(sock).Do(ctx, "POST", "/v1/sandboxes/"+id+"/rotate", nil, nil)
			require.Error(t, err, "the daemon dies inside the rotation")
			d.Wait()

			c, err := New(ctx, cfg)
			require.NoError(t, err)
			defer c.Close()
			assertConsistent(t, c, cfg)
			file := readSecretFile(t, &cr)
			cur, err := c.secrets.IsCurrent(id, file)
			require.NoError(t, err)
			assert.True(t, cur, "the file holds the current secret")
			if point == "rotate:staged" {
				assert.Equal(t, before, file, "an uncommitted rotation is abandoned")
			} else {
				assert.NotEqual(t, before, file, "a committed rotation is published")
				ok, err := c.secrets.Verify(id, before)
				require.NoError(t, err)
				assert.True(t, ok, "the previous secret is accepted for the grace window")
			}
			staged, err := c.creds.StagedIDs()
			require.NoError(t, err)
			assert.Empty(t, staged)
			accepted = append(accepted, file)
		})
	}
	t.Logf("secrets in turn: %d", len(accepted))
}
