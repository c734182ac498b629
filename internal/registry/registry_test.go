package registry

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/cgroup2"
)

// cgroupTree makes a private directory under the cgroup2 root.
func cgroupTree(t *testing.T) (root, base string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	root, err := cgroup2.Root()
	require.NoError(t, err)
	base = filepath.Join(root, fmt.Sprintf("identityd-registry-test-%d-%s", os.Getpid(), t.Name()))
	require.NoError(t, os.Mkdir(base, 0o755))
	t.Cleanup(func() {
		removeTree(base)
	})
	return root, base
}

func removeTree(dir string) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			removeTree(filepath.Join(dir, e.Name()))
		}
	}
	os.Remove(dir)
}

func mkcg(t *testing.T, path string) uint64 {
	t.Helper()
	require.NoError(t, os.MkdirAll(path, 0o755))
	id, err := cgroup2.ID(path)
	require.NoError(t, err)
	return id
}

func TestResolve(t *testing.T) {
	root, base := cgroupTree(t)
	x, err := New(root)
	require.NoError(t, err)
	defer x.Close()

	aPath := filepath.Join(base, "a")
	aID := mkcg(t, aPath)
	childID := mkcg(t, filepath.Join(aPath, "worker", "deep"))
	bPath := filepath.Join(base, "b")
	bID := mkcg(t, bPath)
	strangerID := mkcg(t, filepath.Join(base, "stranger"))

	require.NoError(t, x.Add(Sandbox{ID: "a", App: "web", CgroupPath: aPath, CgroupID: aID}))
	require.NoError(t, x.Add(Sandbox{ID: "b", CgroupPath: bPath, CgroupID: bID, NetnsCookie: 77}))
	require.NoError(t, x.Add(Sandbox{ID: "n", NetnsCookie: 99}))
	assert.Equal(t, 3, x.Len())

	sb, err := x.Resolve(aID, 5)
	require.NoError(t, err)
	assert.Equal(t, "a", sb.ID)
	sb, err = x.Resolve(childID, 5)
	require.NoError(t, err, "a cgroup below a sandbox's belongs to it")
	assert.Equal(t, "a", sb.ID)

	_, err = x.Resolve(bID, 5)
	assert.ErrorIs(t, err, ErrUnknownCaller, "registered with both: the netns must match too")
	sb, err = x.Resolve(bID, 77)
	require.NoError(t, err)
	assert.Equal(t, "b", sb.ID)

	sb, err = x.Resolve(strangerID, 99)
	require.NoError(t, err, "a netns-only sandbox matches on the cookie")
	assert.Equal(t, "n", sb.ID)
	_, err = x.Resolve(strangerID, 5)
	assert.ErrorIs(t, err, ErrUnknownCaller)
	_, err = x.Resolve(0, 5)
	assert.ErrorIs(t, err, ErrUnknownCaller)

	x.Remove("a")
	_, err = x.Resolve(childID, 5)
	assert.ErrorIs(t, err, ErrUnknownCaller, "nothing resolves to a removed sandbox")
	_, err = x.Resolve(aID, 5)
	assert.ErrorIs(t, err, ErrUnknownCaller)
}

func TestRecreatedCgroupIsNotTheSandbox(t *testing.T) {
	root, base := cgroupTree(t)
	x, err := New(root)
	require.NoError(t, err)
	defer x.Close()

	aPath := filepath.Join(base, "a")
	aID := mkcg(t, aPath)
	require.NoError(t, x.Add(Sandbox{ID: "a", CgroupPath: aPath, CgroupID: aID}))

	require.NoError(t, os.Remove(aPath))
	newID := mkcg(t, aPath)
	childID := mkcg(t, filepath.Join(aPath, "child"))
	require.NotEqual(t, aID, newID)

	_, err = x.Resolve(newID, 0)
	assert.ErrorIs(t, err, ErrUnknownCaller)
	_, err = x.Resolve(childID, 0)
	assert.ErrorIs(t, err, ErrUnknownCaller, "a child of the re-created cgroup is not the old sandbox's")
}

func TestAddRefusesDuplicates(t *testing.T) {
	root, base := cgroupTree(t)
	x, err := New(root)
	require.NoError(t, err)
	defer x.Close()
	p := filepath.Join(base, "a")
	id := mkcg(t, p)
	require.NoError(t, x.Add(Sandbox{ID: "a", CgroupPath: p, CgroupID: id}))
	assert.ErrorContains(t, x.Add(Sandbox{ID: "a", NetnsCookie: 3}), "already registered")
	assert.ErrorContains(t, x.Add(Sandbox{ID: "b", CgroupPath: p, CgroupID: id}), "already belongs")
	assert.ErrorContains(t, x.Add(Sandbox{ID: "c"}), "neither a cgroup nor a netns")
	require.NoError(t, x.Add(Sandbox{ID: "n", NetnsCookie: 3}))
	assert.ErrorContains(t, x.Add(Sandbox{ID: "m", NetnsCookie: 3}), "already belongs")
}
