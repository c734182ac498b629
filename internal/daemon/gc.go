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
// total (BENCHMARKS.md, section 2c). 16 MB is what GOGC=400 gives a small
// heap, which removed most of that; a larger heap (1,000 keep-alive
// connections, a full token cache) gets Go's default doubling instead of
// GOGC=400's quintupling, which took such a daemon to 160 MB.
const GCHeadroom = 16 << 20

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
// or by Go's default 100 % when that is more. The runtime never sets a goal
// below its minimum heap, 4 MB scaled by GOGC/100, so GOGC is also held to
// what puts that minimum at live + GCHeadroom: otherwise a 1 MB heap (or a
// heap not yet measured) would be given a minimum of hundreds of megabytes.
func gcPercent(live uint64) int {
	const defaultPercent, runtimeHeapMinimum = 100, 4 << 20
	p := (live + GCHeadroom) * 100 / runtimeHeapMinimum
	if live > 0 {
		p = min(p, GCHeadroom*100/live)
	}
	return int(max(defaultPercent, p))
}
