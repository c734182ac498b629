package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/identityd/identityd/bpf"
)

// DefaultCheckInterval is how often the daemon probes the attribution path
// and checks that its programs are still attached. Every connection made
// while they are not is refused, so this bounds that outage; each round is a
// few bpf() calls and one short-lived probe process.
const DefaultCheckInterval = 2 * time.Second

// attributionWatch repairs the attribution programs when something detaches
// them or removes their pins while the daemon runs (bpftool, an uninstall
// run by mistake), and says so: a log line, a counter, and /readyz while the
// repair fails. A daemon handing its listener and programs over to a newer
// one must stop its watch first, or it would put its own programs back.
//
// Each round first runs the readiness probe (probe: a real connection to
// the token endpoint, attributed or not), whose failure keeps /readyz at 503
// until a later round's probe passes, then checks the programs and repairs
// them.
type attributionWatch struct {
	in       *bpf.Installation
	log      *slog.Logger
	repairs  *prometheus.CounterVec
	broken   atomic.Pointer[error] // nil while attached as installed
	probe    func(context.Context) error
	probeErr atomic.Pointer[error] // nil while the last probe passed
}

func newAttributionWatch(in *bpf.Installation, probe func(context.Context) error, log *slog.Logger, reg prometheus.Registerer) (*attributionWatch, error) {
	repairs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "identityd_attribution_repairs_total",
		Help: "Times the attribution programs were found detached or unpinned and attached again, by result.",
	}, []string{"result"})
	if err := reg.Register(repairs); err != nil {
		return nil, err
	}
	return &attributionWatch{in: in, probe: probe, log: log, repairs: repairs}, nil
}

// Err is nil while the programs are attached as installed and the last
// probe passed, else why not.
func (w *attributionWatch) Err() error {
	if p := w.broken.Load(); p != nil {
		return fmt.Errorf("attribution programs detached: %w", *p)
	}
	if p := w.probeErr.Load(); p != nil {
		return fmt.Errorf("attribution probe failed: %w", *p)
	}
	return nil
}

// runProbe runs the readiness probe once and keeps its verdict.
func (w *attributionWatch) runProbe(ctx context.Context) {
	if w.probe == nil {
		return
	}
	if err := w.probe(ctx); err != nil && ctx.Err() == nil {
		w.probeErr.Store(&err)
		return
	}
	if w.probeErr.Swap(nil) != nil {
		w.log.Info("readiness probe passes again")
	}
}

// Run checks every interval until ctx ends.
func (w *attributionWatch) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.runProbe(ctx)
			w.check(ctx)
		}
	}
}

func (w *attributionWatch) check(ctx context.Context) {
	problem := w.in.Check()
	if problem == nil {
		w.broken.Store(nil)
		return
	}
	w.log.Error("attribution programs are not attached as installed; attaching them again", "problem", problem)
	if err := w.in.Repair(ctx); err != nil {
		w.repairs.WithLabelValues("failed").Inc()
		w.log.Error("attaching the attribution programs again failed; token requests are refused until it succeeds", "error", err)
		w.broken.Store(&err)
		return
	}
	w.repairs.WithLabelValues("ok").Inc()
	w.broken.Store(nil)
	w.log.Info("attribution programs attached again")
}
