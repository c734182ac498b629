package cgroup2

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestRootFrom(t *testing.T) {
	hybrid := `tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
`
	root, err := rootFrom(strings.NewReader(hybrid))
	require.NoError(t, err)
	assert.Equal(t, "/sys/fs/cgroup/unified", root)

	root, err = rootFrom(strings.NewReader("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"))
	require.NoError(t, err)
	assert.Equal(t, "/sys/fs/cgroup", root)

	root, err = rootFrom(strings.NewReader(`none /mnt/my\040cgroups cgroup2 rw 0 0` + "\n"))
	require.NoError(t, err)
	assert.Equal(t, "/mnt/my cgroups", root)

	_, err = rootFrom(strings.NewReader("proc /proc proc rw 0 0\n"))
	assert.ErrorIs(t, err, ErrNoCgroup2)
}

func TestWithin(t *testing.T) {
	assert.True(t, Within("/sys/fs/cgroup", "/sys/fs/cgroup"))
	assert.True(t, Within("/sys/fs/cgroup", "/sys/fs/cgroup/a/b"))
	assert.False(t, Within("/sys/fs/cgroup", "/sys/fs/cgroupx"))
	assert.False(t, Within("/sys/fs/cgroup", "/sys/fs/cgroup/../etc"))
	assert.False(t, Within("/sys/fs/cgroup", "/etc"))
}

// TestIDIsInode checks the live hierarchy: the id of a fresh cgroup is the
// inode of its directory, and a cgroup re-created under the same path gets a
// new id.
func TestIDIsInode(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	root, err := Root()
	require.NoError(t, err)
	ok, err := IsCgroup2(root)
	require.NoError(t, err)
	require.True(t, ok, "%s is not a cgroup2 mount", root)

	dir := filepath.Join(root, fmt.Sprintf("identityd-cgroup2-test-%d", os.Getpid()))
	require.NoError(t, os.Mkdir(dir, 0o755))
	first, err := ID(dir)
	require.NoError(t, err)

	var st unix.Stat_t
	require.NoError(t, unix.Stat(dir, &st))
	assert.Equal(t, st.Ino, first)

	require.NoError(t, os.Remove(dir))
	require.NoError(t, os.Mkdir(dir, 0o755))
	t.Cleanup(func() { os.Remove(dir) })
	second, err := ID(dir)
	require.NoError(t, err)
	assert.NotEqual(t, first, second, "a re-created cgroup must get a new id")
}
