package credsdir

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func open(t *testing.T) *Dirs {
	t.Helper()
	d, err := Open(filepath.Join(t.TempDir(), "state", dirName))
	require.NoError(t, err)
	return d
}

func secret(t testing.TB) string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func signed(t testing.TB, iat, exp time.Time) string {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: key}, nil)
	require.NoError(t, err)
	tok, err := jwt.Signed(sig).Claims(jwt.Claims{IssuedAt: jwt.NewNumericDate(iat), Expiry: jwt.NewNumericDate(exp), Subject: "s"}).Serialize()
	require.NoError(t, err)
	return tok
}

func TestCreateModesAndGroup(t *testing.T) {
	d := open(t)
	s := secret(t)
	require.NoError(t, d.Create("sb-1", 4242, s))
	st, err := os.Stat(d.Path("sb-1"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), st.Mode().Perm())
	assert.EqualValues(t, 0, st.Sys().(*syscall.Stat_t).Uid)
	assert.EqualValues(t, 4242, st.Sys().(*syscall.Stat_t).Gid)
	fst, err := os.Stat(filepath.Join(d.Path("sb-1"), SecretFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fst.Mode().Perm())
	assert.EqualValues(t, 4242, fst.Sys().(*syscall.Stat_t).Gid)
	got, err := d.Secret("sb-1")
	require.NoError(t, err)
	assert.Equal(t, s, got)
	root, err := os.Stat(d.root)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), root.Mode().Perm(), "the host reaches no sandbox's files but as root")

	assert.Error(t, d.Create("sb-1", 0, s), "an existing directory is not this sandbox's")
	ids, err := d.IDs()
	require.NoError(t, err)
	assert.Equal(t, []string{"sb-1"}, ids)
	require.NoError(t, d.Remove("sb-1"))
	require.NoError(t, d.Remove("sb-1"))
	assert.NoDirExists(t, d.Path("sb-1"))
}

func TestStagePublishDiscard(t *testing.T) {
	d := open(t)
	first, next := secret(t), secret(t)
	require.NoError(t, d.Create("sb", 0, first))
	require.NoError(t, d.Stage("sb", next))
	got, err := d.Secret("sb")
	require.NoError(t, err)
	assert.Equal(t, first, got, "a staged secret is out of the sandbox's sight")
	entries, err := os.ReadDir(d.Path("sb"))
	require.NoError(t, err)
	assert.Len(t, entries, 1)
	staged, ok, err := d.Staged("sb")
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, next, staged)
	ids, err := d.StagedIDs()
	require.NoError(t, err)
	assert.Equal(t, []string{"sb"}, ids)

	require.NoError(t, d.Publish("sb"))
	got, err = d.Secret("sb")
	require.NoError(t, err)
	assert.Equal(t, next, got)
	_, ok, err = d.Staged("sb")
	require.NoError(t, err)
	assert.False(t, ok)

	require.NoError(t, d.Stage("sb", secret(t)))
	require.NoError(t, d.Discard("sb"))
	got, err = d.Secret("sb")
	require.NoError(t, err)
	assert.Equal(t, next, got)
	require.NoError(t, d.Discard("sb"))
}

func TestOpenRemovesInterruptedWrites(t *testing.T) {
	d := open(t)
	require.NoError(t, d.Create("sb", 0, secret(t)))
	leftover := filepath.Join(d.Path("sb"), ".tmp-token-123")
	require.NoError(t, os.WriteFile(leftover, []byte("half"), 0o600))
	_, err := Open(d.root)
	require.NoError(t, err)
	assert.NoFileExists(t, leftover)
}

func TestTokenTimes(t *testing.T) {
	d := open(t)
	require.NoError(t, d.Create("sb", 0, secret(t)))
	iat := time.Unix(1_800_000_000, 0)
	tok := signed(t, iat, iat.Add(time.Hour))
	require.NoError(t, d.WriteToken("sb", tok))
	got, times, err := d.Token("sb")
	require.NoError(t, err)
	assert.Equal(t, tok, got)
	assert.True(t, times.Issued.Equal(iat))
	assert.True(t, times.RefreshAt().Equal(iat.Add(30*time.Minute)))
	_, err = TimesOf("not.a.token")
	assert.Error(t, err)
	_, err = TimesOf(signed(t, iat, time.Time{})[:10])
	assert.Error(t, err)
}

// A write into a directory a delete removed fails; it never brings the
// directory back.
func TestWriteAfterRemove(t *testing.T) {
	d := open(t)
	require.NoError(t, d.Create("sb", 0, secret(t)))
	require.NoError(t, d.Remove("sb"))
	assert.Error(t, d.WriteToken("sb", "x"))
	assert.NoDirExists(t, d.Path("sb"))
}

// Readers hammering both files while they are replaced many times never see
// a torn, empty or missing file.
func TestNoTornReads(t *testing.T) {
	d := open(t)
	require.NoError(t, d.Create("sb", 0, secret(t)))
	now := time.Now()
	tokens := []string{signed(t, now, now.Add(time.Hour)), signed(t, now, now.Add(2*time.Hour))}
	require.NoError(t, d.WriteToken("sb", tokens[0]))
	valid := sync.Map{}
	for _, tok := range tokens {
		valid.Store(tok+"\n", true)
	}
	var stop atomic.Bool
	var reads, bad atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				b, err := os.ReadFile(filepath.Join(d.Path("sb"), TokenFile))
				if err != nil {
					bad.Add(1)
					continue
				}
				if _, ok := valid.Load(string(b)); !ok {
					bad.Add(1)
				}
				s, err := os.ReadFile(filepath.Join(d.Path("sb"), SecretFile))
				if err != nil || len(s) != 65 {
					bad.Add(1)
				}
				reads.Add(2)
			}
		}()
	}
	for i := 0; i < 300; i++ {
		require.NoError(t, d.WriteToken("sb", tokens[i%2]))
		require.NoError(t, d.Stage("sb", secret(t)))
		require.NoError(t, d.Publish("sb"))
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d reads during 300 replacements of each file", reads.Load())
	assert.Zero(t, bad.Load(), "torn, empty or missing reads")
	assert.Positive(t, reads.Load())
}
