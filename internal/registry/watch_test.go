package registry

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type recordingWatcher struct {
	added, removed []string
	refuse         error
}

func (w *recordingWatcher) SandboxAdded(s Sandbox) error {
	if w.refuse != nil {
		return w.refuse
	}
	w.added = append(w.added, s.ID)
	return nil
}

func (w *recordingWatcher) SandboxRemoved(s Sandbox) { w.removed = append(w.removed, s.ID) }

// TestWatch: a watcher gets the sandboxes registered when it started, then
// hears of each change; one that refuses an addition refuses the Add.
func TestWatch(t *testing.T) {
	x, err := New(t.TempDir()) // no cgroup is ever resolved here
	require.NoError(t, err)
	defer x.Close()
	require.NoError(t, x.Add(Sandbox{ID: "before", NetnsCookie: 1}))

	w := &recordingWatcher{}
	assert.Error(t, x.Watch(func([]Sandbox) error { return errors.New("no") }, w))
	require.NoError(t, x.Add(Sandbox{ID: "unheard", NetnsCookie: 9}))
	assert.Empty(t, w.added, "a watch whose start failed hears nothing")
	x.Remove("unheard")

	var got []Sandbox
	require.NoError(t, x.Watch(func(now []Sandbox) error { got = now; return nil }, w))
	require.Len(t, got, 1)
	assert.Equal(t, "before", got[0].ID)

	require.NoError(t, x.Add(Sandbox{ID: "after", CgroupID: 7, CgroupPath: "/sys/fs/cgroup/x", NetnsCookie: 2}))
	x.Remove("before")
	x.Remove("nothing")
	assert.Equal(t, []string{"after"}, w.added)
	assert.Equal(t, []string{"before"}, w.removed)

	w.refuse = errors.New("map full")
	err = x.Add(Sandbox{ID: "refused", NetnsCookie: 3})
	assert.ErrorContains(t, err, "map full")
	assert.Equal(t, 1, x.Len(), "a refused sandbox is not registered")

	require.NoError(t, x.Watch(nil, nil))
	w.refuse = nil
	require.NoError(t, x.Add(Sandbox{ID: "unwatched", NetnsCookie: 4}))
	assert.Equal(t, []string{"after"}, w.added)
}
