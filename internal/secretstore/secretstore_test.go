package secretstore

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/atomicfile"
)

const secretA = "3f1c0d7a9b2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"

func TestPutVerifyDelete(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	require.NoError(t, s.Put("sb-1", secretA))

	ok, err := s.Verify("sb-1", secretA)
	require.NoError(t, err)
	assert.True(t, ok)
	ok, err = s.Verify("sb-1", strings.Repeat("0", 64))
	require.NoError(t, err)
	assert.False(t, ok)

	b, err := os.ReadFile(filepath.Join(dir, "sb-1.json"))
	require.NoError(t, err)
	assert.NotContains(t, string(b), secretA, "only a hash is stored")
	st, err := os.Stat(filepath.Join(dir, "sb-1.json"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	// A new Store over the same directory (a restarted daemon) agrees.
	s2, err := Open(dir)
	require.NoError(t, err)
	ok, err = s2.Verify("sb-1", secretA)
	require.NoError(t, err)
	assert.True(t, ok)

	require.NoError(t, s.Delete("sb-1"))
	_, err = s.Verify("sb-1", secretA)
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = At(dir).Verify("sb-1", secretA)
	assert.ErrorIs(t, err, ErrNotFound, "deleted on disk too")
	require.NoError(t, s.Delete("sb-1"))
}

func TestExpiredHashIsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	past := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	rec := `{"version":1,"hashes":[{"sha256":"` + hashOf("old") + `","not_after":"` + past + `"},` +
		`{"sha256":"` + hashOf("grace") + `","not_after":"` + future + `"},{"sha256":"` + hashOf("new") + `"}]}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "x.json"), []byte(rec), 0o600))
	for secret, want := range map[string]bool{"old": false, "grace": true, "new": true} {
		ok, err := s.Verify("x", secret)
		require.NoError(t, err)
		assert.Equal(t, want, ok, secret)
	}
}

func TestCorruptRecordNeverMatches(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	for _, body := range []string{"", "{", `{"version":2,"hashes":[]}`, `{"version":1,"hashes":[]}`,
		`{"version":1,"hashes":[{"sha256":"zz"}]}`, `{"version":1,"hashes":[{"sha256":"` + hashOf("s") + `"}],"extra":1}`} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "c.json"), []byte(body), 0o600))
		ok, err := s.Verify("c", "s")
		assert.Error(t, err, body)
		assert.False(t, ok, body)
	}
}

func TestInvalidIDs(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	for _, id := range []string{"", "../x", "a/b", ".hidden", strings.Repeat("a", 129)} {
		assert.Error(t, s.Put(id, "x"), id)
		_, err := s.Verify(id, "x")
		assert.Error(t, err, id)
	}
}

func FuzzRecord(f *testing.F) {
	f.Add([]byte(`{"version":1,"hashes":[{"sha256":"` + hashOf("s") + `"}]}`))
	f.Add([]byte(`{"version":1,"hashes":[{"sha256":"00","not_after":"2020-01-01T00:00:00Z"}]}`))
	dir := filepath.Join(f.TempDir(), "secrets")
	require.NoError(f, os.MkdirAll(dir, 0o700))
	// At reads the file at every check: each input is parsed.
	s := At(dir)
	f.Fuzz(func(t *testing.T, body []byte) {
		p := filepath.Join(dir, "f.json")
		require.NoError(t, os.WriteFile(p, body, 0o600))
		ok, err := s.Verify("f", "s")
		if err != nil && ok {
			t.Fatal("an error must never come with a match")
		}
	})
}

// TestLayout: the store of a state directory is its secrets directory, one
// file per sandbox; IDs lists them and nothing else; At only reads.
func TestLayout(t *testing.T) {
	state := t.TempDir()
	assert.Equal(t, filepath.Join(state, "secrets"), Dir(state))

	ro := At(Dir(state))
	_, err := ro.IDs()
	assert.ErrorIs(t, err, os.ErrNotExist, "At creates nothing")
	assert.NoDirExists(t, Dir(state))

	s, err := Open(Dir(state))
	require.NoError(t, err)
	require.NoError(t, s.Put("b", secretA))
	require.NoError(t, s.Put("a", secretA))
	p, err := s.Path("a")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(state, "secrets", "a.json"), p)
	assert.FileExists(t, p)
	_, err = s.Path("../a")
	assert.Error(t, err)
	// A write in flight and files that are no sandbox's are not listed.
	require.NoError(t, os.WriteFile(filepath.Join(Dir(state), atomicfile.TempPrefix+"c.json-1"), nil, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(Dir(state), "notes.txt"), nil, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(Dir(state), "-x.json"), nil, 0o600))

	ids, err := ro.IDs()
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "b"}, ids)
	has, err := ro.Has("a")
	require.NoError(t, err)
	assert.True(t, has)
	assert.True(t, ValidID(strings.Repeat("a", MaxIDLen)))
	assert.False(t, ValidID(strings.Repeat("a", MaxIDLen+1)))
}
