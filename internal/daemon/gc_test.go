package daemon

import (
	"context"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestGCPercent: a small heap may grow by the headroom, a large one by Go's
// default doubling, and neither bound is crossed.
func TestGCPercent(t *testing.T) {
	// The runtime's goal for a heap of live bytes at GOGC p: live grown by
	// p %, or its minimum heap, 4 MB scaled by p/100.
	goal := func(live uint64) uint64 {
		p := uint64(gcPercent(live))
		return max(live+live*p/100, 4<<20*p/100)
	}
	const mb = 1 << 20
	for _, live := range []uint64{0, 1 << 10, 1 * mb, 3 * mb, 8 * mb, 16 * mb} {
		assert.LessOrEqual(t, goal(live), live+GCHeadroom+mb, "a %d-byte heap grows by the headroom at most", live)
		assert.GreaterOrEqual(t, goal(live), live+GCHeadroom-mb, "a %d-byte heap grows by about the headroom", live)
	}
	assert.Equal(t, 425, gcPercent(1*mb), "1 MB live: the runtime's minimum decides")
	assert.Equal(t, 200, gcPercent(8*mb), "8 MB live: the growth decides")
	assert.Equal(t, 100, gcPercent(GCHeadroom), "from the headroom on, Go's default")
	assert.Equal(t, 100, gcPercent(1<<30))
	assert.Equal(t, uint64(2<<30), goal(1<<30), "a large heap doubles, as by default")
}

// TestTuneGCFollowsCollections: after a collection the target is the one
// gcPercent gives the live heap, and it is set again after each one.
func TestTuneGCFollowsCollections(t *testing.T) {
	t.Setenv("GOGC", "")
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); TuneGC(ctx) }()
	defer func() { cancel(); <-done }()
	for range 3 {
		debug.SetGCPercent(100) // what the tuner must undo
		m := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/gogc:percent"}}
		want := 0
		require.Eventually(t, func() bool {
			runtime.GC() // (the tuner may not have begun at the first)
			metrics.Read(m)
			want = gcPercent(m[0].Value.Uint64())
			return int(m[1].Value.Uint64()) == want
		}, 5*time.Second, 10*time.Millisecond, "GOGC after a collection")
		assert.Greater(t, want, 100, "this test's heap is small")
	}
}
