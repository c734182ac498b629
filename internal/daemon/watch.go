package daemon

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/identityd/identityd/bpf"
)

// attributionCheckInterval is how often the daemon checks that its programs
// are still attached. Every connection made while they are not is refused,
// so this bounds that outage; each check is a few bpf() calls.
const attributionCheckInterval = 2 * time.Second

// attributionWatch repairs the attribution programs when something detaches
// them or removes their pins while the daemon runs (bpftool, an uninstall
// run by mistake), and says so: a log line, a counter, and /readyz while the
// repair fails. A daemon handing its listener and programs over to a newer
// one must stop its watch first, or it would put its own programs back.
type attributionWatch struct {
	in      *bpf.Installation
	log     *slog.Logger
	repairs *prometheus.CounterVec
	broken  atomic.Pointer[error] // nil while attached as installed
}

func newAttributionWatch(in *bpf.Installation, log *slog.Logger, reg prometheus.Registerer) (*attributionWatch, error) {
	repairs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "identityd_attribution_repairs_total",
		Help: "Times the attribution programs were found detached or unpinned and attached again, by result.",
	}, []string{"result"})
	if err := reg.Register(repairs); err != nil {
		return nil, err
	}
	return &attributionWatch{in: in, log: log, repairs: repairs}, nil
}

// Err is nil while the programs are attached as installed, else why not.
func (w *attributionWatch) Err() error {
	if p := w.broken.Load(); p != nil {
		return *p
	}
	return nil
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
