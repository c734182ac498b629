package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/fleet"
	"github.com/identityd/identityd/tokenserver"
)

// FleetClockSkew is the clock skew a fleet's key lifetime allows for on top
// of the longest token lifetime: a key stays published this long past the
// exp of the last token it can have signed.
const FleetClockSkew = 5 * time.Second

// errNoFleet answers the fleet's admin routes on a single host.
var errNoFleet = errors.New("no fleet: this daemon runs without --etcd-endpoints")

// checkFleet refuses a fleet configuration that cannot work, before
// anything is installed: a fleet needs the one issuer URL every node
// shares, which cannot be derived from this node's own address.
func checkFleet(cfg Config) error {
	if cfg.MaxTTL != 0 && (cfg.MaxTTL < tokenserver.MinTTL || cfg.MaxTTL > tokenserver.MaxTTL) {
		return fmt.Errorf("max TTL %s: want %s to %s", cfg.MaxTTL, tokenserver.MinTTL, tokenserver.MaxTTL)
	}
	if len(cfg.EtcdEndpoints) == 0 {
		if cfg.EtcdCA != "" || cfg.EtcdCert != "" || cfg.EtcdKey != "" {
			return errors.New("--etcd-ca, --etcd-cert and --etcd-key need --etcd-endpoints")
		}
		return nil
	}
	if cfg.Issuer == "" {
		return errors.New("--issuer is required with --etcd-endpoints: every node of a fleet serves one issuer URL (the load balancer in front of their --discovery-listen), which no node can derive from its own address")
	}
	if err := fleet.ValidName(cfg.Node); err != nil {
		return fmt.Errorf("node name (--node-name) in a fleet: %w", err)
	}
	return nil
}

// endpoints trims the etcd endpoints and drops empty ones: an empty
// IDENTITYD_ETCD_ENDPOINTS means a single host, as no flag does.
func endpoints(list []string) []string {
	var out []string
	for _, e := range list {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// maxTTL is the longest token lifetime served.
func maxTTL(cfg Config) time.Duration {
	if cfg.MaxTTL == 0 {
		return tokenserver.MaxTTL
	}
	return cfg.MaxTTL
}

// keyLifetime is how long a fleet key stays published after its last
// renewal: every token it signed has expired by then.
func keyLifetime(cfg Config) time.Duration {
	return fleet.KeyLifetimeFor(maxTTL(cfg), FleetClockSkew)
}

// openFleet joins the fleet on etcd: nil on a single host. It fails if etcd
// is unreachable or records another issuer than ours (fleet.Open says
// which), so that a misconfigured node never serves.
func openFleet(ctx context.Context, cfg Config, issuer string, reg prometheus.Registerer) (*fleet.Store, error) {
	if len(cfg.EtcdEndpoints) == 0 {
		return nil, nil
	}
	tc, err := fleet.TLSConfig(cfg.EtcdCA, cfg.EtcdCert, cfg.EtcdKey)
	if err != nil {
		return nil, err
	}
	st, err := fleet.Open(ctx, fleet.Options{Endpoints: cfg.EtcdEndpoints, Prefix: cfg.EtcdPrefix, TLS: tc,
		Node: cfg.Node, Issuer: issuer, KeyLifetime: keyLifetime(cfg), Version: cfg.Version,
		Logger: cfg.Logger, Registry: reg})
	if err != nil {
		return nil, fmt.Errorf("join the fleet: %w", err)
	}
	return st, nil
}

// publishLoaded publishes the keys loaded from disk before any of them
// signs or is served: a restarted node's keys (its retired ones too, whose
// tokens may still be valid) must be in the fleet's JWKS again. A retired
// key whose every token has expired by the fleet's key lifetime stays out.
func publishLoaded(ctx context.Context, keys *tokenserver.Keys, st *fleet.Store, lifetime time.Duration) error {
	now := time.Now()
	for _, k := range keys.Published() {
		if k.State == tokenserver.KeyRetired && k.Retired != nil && k.Retired.Add(lifetime).Before(now) {
			continue
		}
		if err := publishKey(ctx, st, k.Public); err != nil {
			return fmt.Errorf("publish signing key %s loaded from disk: %w", k.KeyID, err)
		}
	}
	retireStopped(keys, st)
	return nil
}

// keyVisibleWithin bounds the wait for a key just published to reach this
// node's own JWKS through the watch (normally milliseconds).
const keyVisibleWithin = 10 * time.Second

// publishKey publishes a key and waits until this node's JWKS, which comes
// from the watch, serves it: a token signed with a key this node does not
// serve yet could fail a verifier that fetched this node's JWKS.
func publishKey(ctx context.Context, st *fleet.Store, jwk jose.JSONWebKey) error {
	if err := st.PublishKey(ctx, jwk); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, keyVisibleWithin)
	defer cancel()
	for {
		changed := st.Changed()
		if st.HasKey(jwk.KeyID) {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			// Dropped: it is not renewed for a key that never signs.
			st.RetireKey(jwk.KeyID)
			return fmt.Errorf("key %s published but not seen by this node's watch within %s: %w", jwk.KeyID, keyVisibleWithin, fleet.ErrUnavailable)
		}
	}
}

// retireStopped stops renewing the leases of keys that no longer sign: each
// stays published until its last renewal plus the key lifetime, which
// covers every token it signed.
func retireStopped(keys *tokenserver.Keys, st *fleet.Store) {
	for _, k := range keys.Published() {
		if k.State == tokenserver.KeyRetired {
			st.RetireKey(k.KeyID)
		}
	}
}

// retireLoop retires keys as they stop signing (after a rotation's publish
// delay, or at once for an emergency rotation), until ctx ends. A key is
// renewed for at most one tick after it stopped signing, which only keeps
// it published that much longer.
func retireLoop(ctx context.Context, keys *tokenserver.Keys, st *fleet.Store) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		retireStopped(keys, st)
	}
}

// fleetKeys is the token server's KeySet in a fleet: this node's keys sign,
// the fleet's union (from the watch) is served as the JWKS, and no token
// outlives the guaranteed publication of the key that signs it.
type fleetKeys struct {
	*tokenserver.Keys
	st   *fleet.Store
	skew time.Duration
}

// JWKS is every node's published keys.
func (f *fleetKeys) JWKS() jose.JSONWebKeySet { return f.st.JWKS() }

// JWKSJSON is JWKS encoded, cached by the fleet until its next change.
func (f *fleetKeys) JWKSJSON() ([]byte, error) { return f.st.JWKSJSON() }

// Algorithms are those of the fleet's keys, for discovery.
func (f *fleetKeys) Algorithms() []string {
	var algs []string
	for _, k := range f.st.JWKS().Keys {
		if !slices.Contains(algs, k.Algorithm) {
			algs = append(algs, k.Algorithm)
		}
	}
	return algs
}

// SignableUntil is the earliest guaranteed publication, less the clock
// skew, of the keys that sign now or will next: a rotation between this
// call and the signature cannot pick a key that is guaranteed less long.
// Zero-based (far in the past) once the node is evicted or a key lost its
// publication: nothing is signed then.
func (f *fleetKeys) SignableUntil() time.Time {
	until := f.Keys.SignableUntil()
	for _, k := range f.Keys.Published() {
		if k.State == tokenserver.KeyRetired {
			continue
		}
		if u := f.st.PublishedUntil(k.KeyID).Add(-f.skew); u.Before(until) {
			until = u
		}
	}
	return until
}

// signingKeys is the KeySet the token server uses: the keys alone on a
// single host, the fleet's view of them in a fleet.
func signingKeys(keys *tokenserver.Keys, st *fleet.Store) tokenserver.KeySet {
	if st == nil {
		return keys
	}
	return &fleetKeys{Keys: keys, st: st, skew: FleetClockSkew}
}

// registerFleetMetrics adds how long this node can still sign for the
// longest token (what etcd's absence eats into) to the fleet's own metrics.
func registerFleetMetrics(reg prometheus.Registerer, ks tokenserver.KeySet, st *fleet.Store) error {
	if st == nil {
		return nil
	}
	g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "identityd_fleet_signable_seconds",
		Help: "Seconds until which the signing key is guaranteed to stay in the fleet's JWKS (less the clock skew): tokens are issued with an exp no later; under 60 no token is issued.",
	}, func() float64 { return time.Until(ks.SignableUntil()).Seconds() })
	if err := reg.Register(g); err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	return nil
}

// fleetErr is an error of the fleet's store that the controller tells apart
// by its own sentinels, without importing fleet.
type fleetErr struct {
	kind, err error
}

func (e *fleetErr) Error() string        { return e.err.Error() }
func (e *fleetErr) Unwrap() []error      { return []error{e.kind, e.err} }
func (e *fleetErr) Is(target error) bool { return target == e.kind }

// fleetIDs reserves sandbox ids in the fleet for the controller.
type fleetIDs struct{ st *fleet.Store }

func (f fleetIDs) Reserve(ctx context.Context, id string) error {
	return asControllerErr(f.st.Reserve(ctx, id))
}

func (f fleetIDs) Release(ctx context.Context, id string) error {
	return asControllerErr(f.st.Release(ctx, id))
}

func asControllerErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fleet.ErrTaken):
		return &fleetErr{kind: controllers.ErrHeld, err: err}
	case errors.Is(err, fleet.ErrUnavailable), errors.Is(err, fleet.ErrEvicted):
		// An evicted node may not take ids either: for the caller, this
		// node cannot reach the fleet.
		return &fleetErr{kind: controllers.ErrIDsUnavailable, err: err}
	}
	return err
}

// controllerIDs is the controller's id reservation: none on a single host.
func controllerIDs(st *fleet.Store) controllers.IDs {
	if st == nil {
		return nil
	}
	return fleetIDs{st}
}

// firstKeyWaits reports whether no key signs yet because the first one is
// still being published, and when it will sign.
func firstKeyWaits(keys []tokenserver.PublishedKey) (time.Time, bool) {
	var next time.Time
	for _, k := range keys {
		switch k.State {
		case tokenserver.KeySigning:
			return time.Time{}, false
		case tokenserver.KeyNext:
			next = k.SignsFrom
		}
	}
	return next, !next.IsZero()
}

// fleetReadiness is what the fleet adds to /readyz: not ready once the
// signing key's guaranteed publication no longer covers the contract's
// minimum token (evicted, or etcd unreachable for too long); ready, with the
// store's health as a warning, while etcd is unreachable but tokens can
// still be signed within the guarantee.
func fleetReadiness(ks tokenserver.KeySet, st *fleet.Store) (notReady, degraded error) {
	if st == nil {
		return nil, nil
	}
	if p, ok := ks.(interface {
		Published() []tokenserver.PublishedKey
	}); ok {
		if from, waiting := firstKeyWaits(p.Published()); waiting {
			return fmt.Errorf("fleet: the node's first key is published before it signs, until %s (the verifiers' JWKS cache lifetime)", from.Format(time.RFC3339)), nil
		}
	}
	health := st.Healthy()
	if left := time.Until(ks.SignableUntil()); left < tokenserver.MinTTL {
		if health == nil {
			health = errors.New("the signing key is not published")
		}
		return fmt.Errorf("fleet: cannot sign, the signing key's publication is guaranteed for %s only: %w", max(left, 0).Round(time.Second), health), nil
	}
	if health != nil {
		return nil, fmt.Errorf("fleet: %w (issuing goes on within the signing key's guarantee; creates and rotations fail)", health)
	}
	return nil, nil
}
