package daemon

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestGCPercent: a small heap may grow by the headroom, a large one by Go's
// default doubling, and neither bound is crossed.
func TestGCPercent(t *testing.T) {
	assert.Equal(t, 3200, gcPercent(1<<20), "1 MB live: 32 MB of headroom")
	assert.Equal(t, 400, gcPercent(8<<20))
	assert.Equal(t, 100, gcPercent(GCHeadroom), "from the headroom on, Go's default")
	assert.Equal(t, 100, gcPercent(1<<30))
	assert.Equal(t, 10000, gcPercent(1<<10), "a tiny heap is capped")
	assert.Equal(t, 10000, gcPercent(0))
}
