package fleet

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Lease renewal results, the values of the result label.
const (
	renewOK     = "ok"     // renewed
	renewFailed = "failed" // etcd unreachable or without quorum
	renewLost   = "lost"   // the lease had expired or was revoked
)

type metrics struct {
	etcdUp        prometheus.Gauge
	keysPublished prometheus.Gauge
	jwksKeys      prometheus.Gauge
	renewals      *prometheus.CounterVec
}

// newMetrics creates the metrics; register registers them.
func newMetrics() *metrics {
	m := &metrics{
		etcdUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "identityd_fleet_etcd_up",
			Help: "1 if the last lease renewal reached etcd (with a quorum), else 0.",
		}),
		keysPublished: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "identityd_fleet_keys_published",
			Help: "Keys this node publishes and keeps renewing (retired keys are not counted).",
		}),
		jwksKeys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "identityd_fleet_jwks_keys",
			Help: "Keys in the fleet's JWKS as this node's watch sees it.",
		}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_fleet_lease_renewals_total",
			Help: "Lease renewals by result: ok, failed (etcd unreachable), lost (lease expired or revoked; re-granted).",
		}, []string{"result"}),
	}
	for _, r := range []string{renewOK, renewFailed, renewLost} {
		m.renewals.WithLabelValues(r)
	}
	return m
}

// register registers the metrics with reg (nothing if reg is nil). Open
// calls it last, so that a failed Open can be retried on the same registry.
func (m *metrics) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{m.etcdUp, m.keysPublished, m.jwksKeys, m.renewals} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register fleet metrics: %w", err)
		}
	}
	return nil
}
