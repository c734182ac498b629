package daemon

import (
	"context"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// GCHeadroom is the least the heap may grow past what is live before the
// garbage collector runs, unless the environment sets GOGC. identityd's
// live heap is one to a few megabytes, and a token request allocates about
// 2 KB; with Go's default (collect when the heap has doubled, 4 MB at
// least) it collected some 25 times a second at 10,000 requests a second,
// and each collection scans every goroutine's stack and the globals
// whatever the heap holds: 10 to 15 µs of CPU per request, a sixth of the
// total (BENCHMARKS.md, section 2c). A larger heap (1,000 keep-alive
// connections, a full token cache) gets Go's default doubling, so memory
// grows by the headroom at most, never by a multiple of the heap.
const GCHeadroom = 32 << 20

// gcTuneEvery is how often the target follows the live heap.
const gcTuneEvery = time.Second

// TuneGC keeps the collector's target (GOGC) at max(100, GCHeadroom over
// the live heap) until ctx ends, checking every second; it does nothing if
// GOGC is set in the environment. GOMEMLIMIT still bounds the heap.
func TuneGC(ctx context.Context) {
	if os.Getenv("GOGC") != "" {
		return
	}
	live := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	t := time.NewTicker(gcTuneEvery)
	defer t.Stop()
	for {
		metrics.Read(live)
		debug.SetGCPercent(gcPercent(live[0].Value.Uint64()))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// gcPercent is the GOGC that lets a heap of live bytes grow by GCHeadroom,
// or by Go's default 100 % when that is more.
func gcPercent(live uint64) int {
	const minPercent, maxPercent = 100, 10000
	if live == 0 {
		return maxPercent
	}
	return int(max(minPercent, min(maxPercent, GCHeadroom*100/live)))
}
