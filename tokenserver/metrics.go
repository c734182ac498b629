package tokenserver

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the token server's Prometheus metrics. They are registered on
// the operator's registry, never served on the sandbox-facing endpoint.
type Metrics struct {
	requests     *prometheus.CounterVec
	issuedByAlg  *prometheus.CounterVec
	cacheHits    *prometheus.CounterVec
	refusals     *prometheus.CounterVec
	failures     *prometheus.CounterVec
	latency      prometheus.Histogram
	connRefusals *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them with reg (nothing is
// registered if reg is nil). liveSandboxes, if set, backs a gauge of live
// sandboxes.
func NewMetrics(reg prometheus.Registerer, liveSandboxes func() float64) (*Metrics, error) {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_token_requests_total",
			Help: "Token requests by outcome: issued, refused, failed.",
		}, []string{"outcome"}),
		issuedByAlg: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_tokens_issued_total",
			Help: "Tokens issued, signed or reused from the token cache, by the signing algorithm in their header (RS256, ES256, EdDSA).",
		}, []string{"alg"}),
		cacheHits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_token_cache_hits_total",
			Help: "Tokens issued from the token cache (a token signed earlier for the same sandbox, secret, audiences and ttl, reused in the first half of its lifetime), by the signing algorithm in their header.",
		}, []string{"alg"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_token_refusals_total",
			Help: "Refused token requests by reason.",
		}, []string{"reason"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_token_failures_total",
			Help: "Token requests answered 500 by reason: secret_store, sign, key_publication_expiring (the signing key is not guaranteed to stay published for the minimum token lifetime).",
		}, []string{"reason"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "identityd_token_request_duration_seconds",
			Help:    "Time to answer a token request.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		connRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "identityd_token_connections_refused_total",
			Help: "Token endpoint connections closed at accept, by the limit that refused them: total_cap, sandbox_cap, others_cap.",
		}, []string{"reason"}),
	}
	if reg == nil {
		return m, nil
	}
	cs := []prometheus.Collector{m.requests, m.issuedByAlg, m.cacheHits, m.refusals, m.failures, m.latency, m.connRefusals}
	if liveSandboxes != nil {
		cs = append(cs, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "identityd_live_sandboxes",
			Help: "Sandboxes the registry currently knows as live.",
		}, liveSandboxes))
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register token server metrics: %w", err)
		}
	}
	return m, nil
}

func (m *Metrics) observe(outcome string, d time.Duration) {
	m.requests.WithLabelValues(outcome).Inc()
	m.latency.Observe(d.Seconds())
}

func (m *Metrics) issued(alg string, cached bool) {
	m.issuedByAlg.WithLabelValues(alg).Inc()
	if cached {
		m.cacheHits.WithLabelValues(alg).Inc()
	}
}

func (m *Metrics) refused(reason string) { m.refusals.WithLabelValues(reason).Inc() }

func (m *Metrics) failed(reason string) { m.failures.WithLabelValues(reason).Inc() }

func (m *Metrics) connRefused(reason string) { m.connRefusals.WithLabelValues(reason).Inc() }
