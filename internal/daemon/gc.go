package daemon

import (
	"os"
	"runtime/debug"
	"strconv"
)

// GCPercent is identityd's garbage-collection target when the environment
// sets none (GOGC). Its live heap is one to a few megabytes and a token
// request allocates about 2 KB, so under load Go's default of 100 collects
// some 25 times a second, and each collection scans the daemon's goroutine
// stacks and globals whatever the heap: measured at 10,000 requests a
// second, that was 10 to 15 µs of CPU per request, a sixth of the total
// (BENCHMARKS.md). At 400 the heap may grow to five times what is live, 16
// MB at least, in exchange for a fifth of the collections.
const GCPercent = 400

// TuneGC sets the garbage collector's target to GCPercent unless GOGC is
// set in the environment (which the runtime has applied already), and
// returns the target in force. GOMEMLIMIT still bounds the heap as usual.
func TuneGC() string {
	if v := os.Getenv("GOGC"); v != "" {
		return v
	}
	debug.SetGCPercent(GCPercent)
	return strconv.Itoa(GCPercent)
}
