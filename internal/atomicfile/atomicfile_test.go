package atomicfile

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWriteFileReplacesWithPermissions(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "secret")
	require.NoError(t, WriteFile(p, []byte("one"), 0o600))
	require.NoError(t, WriteFile(p, []byte("two"), 0o600))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "two", string(b))
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "no temporary file is left")
}

func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, TempPrefix+"x-123"), nil, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "keep"), nil, 0o600))
	temps, err := Temps(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(dir, TempPrefix+"x-123")}, temps)
	assert.True(t, IsTemp(TempPrefix+"x-123"))
	assert.False(t, IsTemp("keep"))
	require.NoError(t, RemoveTemps(dir))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1)
	assert.Equal(t, "keep", entries[0].Name())
}

func TestMkdirPrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	require.NoError(t, MkdirPrivate(dir))
	st, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	require.NoError(t, MkdirPrivate(dir), "an existing private directory is accepted")
	require.NoError(t, os.Chmod(dir, 0o755))
	assert.ErrorContains(t, MkdirPrivate(dir), "want 0700")
	require.NoError(t, os.Chmod(dir, 0o730))
	assert.ErrorContains(t, MkdirPrivate(dir), "has mode 730: group or others can reach it")
}

// TestMkdirPrivateRefusesOtherOwners: a directory another user owns, or one
// another user could swap for their own, is refused with the path and the
// owner named.
func TestMkdirPrivateRefusesOtherOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chowns to another user")
	}
	const nobody = 65534
	base := t.TempDir()

	theirs := filepath.Join(base, "theirs")
	require.NoError(t, os.Mkdir(theirs, 0o700))
	require.NoError(t, os.Chown(theirs, nobody, nobody))
	err := MkdirPrivate(theirs)
	assert.ErrorContains(t, err, theirs+" is owned by uid 65534; it must be owned by uid 0")

	// Our directory inside theirs: they could rename it and put their own
	// in its place.
	inside := filepath.Join(theirs, "state")
	err = MkdirPrivate(inside)
	assert.ErrorContains(t, err, theirs+", above "+inside+", is owned by uid 65534")

	// The same through a symbolic link.
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(inside, link))
	assert.ErrorContains(t, MkdirPrivate(link), "is owned by uid 65534")

	// Below a directory anyone may write to: refused unless sticky.
	open := filepath.Join(base, "open")
	require.NoError(t, os.Mkdir(open, 0o777))
	require.NoError(t, os.Chmod(open, 0o777))
	assert.ErrorContains(t, MkdirPrivate(filepath.Join(open, "state")), "has mode 777: group or others can write to it")
	require.NoError(t, os.Chmod(open, 0o777|os.ModeSticky))
	assert.NoError(t, MkdirPrivate(filepath.Join(open, "state")), "like /tmp: others cannot rename what they do not own")
}
