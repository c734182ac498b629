package daemon

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
)

// GCHeadroom is how far a small heap may grow past what is live before the
// garbage collector runs, unless the environment sets GOGC. identityd's
// live heap is one to a few megabytes, and a cached token answer allocates
// a few KB; with Go's default (collect when the heap has doubled, 4 MB at
// least) it collected 23 times a second at 10,000 requests a second, and
// each collection scans every goroutine's stack and the globals whatever
// the heap holds: about 7 µs of CPU per request of some 60 (BENCHMARKS.md,
// section 2c). 16 MB is what GOGC=400 gives a small heap; a larger heap
// (1,000 keep-alive connections, a full token cache) gets Go's default
// doubling instead of GOGC=400's quintupling, which took such a daemon to
// 160 MB.
const GCHeadroom = 16 << 20

// TuneGC keeps the collector's target (GOGC) at gcPercent of the live heap
// after every collection until ctx ends, so that a heap that grows fast
// (1,000 clients connecting at once) is not collected for a while by a
// target set for a small one; it does nothing if GOGC is set in the
// environment. GOMEMLIMIT still bounds the heap.
func TuneGC(ctx context.Context) {
	if os.Getenv("GOGC") != "" {
		return
	}
	t := &gcTuner{live: []metrics.Sample{{Name: "/gc/heap/live:bytes"}}}
	t.after()
	<-ctx.Done()
	t.stopped.Store(true)
}

// gcTuner sets the target after each collection: a sentinel made after
// one collection is unreachable at the next, and its cleanup, run after
// that collection, sets the target and makes the next sentinel. There is
// one sentinel at a time, so the calls of after never overlap.
type gcTuner struct {
	live    []metrics.Sample
	stopped atomic.Bool
}

// gcSentinel holds a pointer so that it is never a tiny allocation, whose
// cleanups may not run.
type gcSentinel struct{ _ *gcTuner }

func (t *gcTuner) after() {
	if t.stopped.Load() {
		return
	}
	metrics.Read(t.live)
	debug.SetGCPercent(gcPercent(t.live[0].Value.Uint64()))
	runtime.AddCleanup(&gcSentinel{}, func(t *gcTuner) { t.after() }, t)
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
