package netnsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNamedLifecycle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	name := fmt.Sprintf("idt%d-netnsutil-test", os.Getpid())
	require.NoError(t, NewNamed(name))
	p := filepath.Join(Dir, name)
	assert.True(t, IsNetns(p))
	c, err := Cookie(p)
	require.NoError(t, err)
	assert.NotEqual(t, uint64(1), c, "a new netns is not the initial one")
	require.NoError(t, DeleteNamed(name))
	assert.NoFileExists(t, p)
	require.NoError(t, DeleteNamed(name), "deleting twice is fine")

	// A mount point left by a create that died before its bind mount.
	require.NoError(t, os.WriteFile(p, nil, 0o444))
	assert.False(t, IsNetns(p))
	require.NoError(t, DeleteNamed(name))
	assert.NoFileExists(t, p)
	assert.False(t, IsNetns("/etc/hostname"))
}
