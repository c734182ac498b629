package fleet

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// DefaultPrefix is the etcd key prefix when Options.Prefix is empty.
const DefaultPrefix = "/identityd/"

const (
	// DefaultOpTimeout bounds every etcd request the Store makes, so a create
	// or a rotation fails fast with a clear error when etcd has no quorum.
	DefaultOpTimeout = 2 * time.Second
	// maxRenewInterval caps the renewal period whatever the key lifetime:
	// renewals are also how the Store notices etcd loss and eviction.
	maxRenewInterval = 2 * time.Second
	// healthyWithin is how many renewal periods may pass without reaching
	// etcd before Healthy reports an error.
	healthyWithin = 3
)

var (
	// ErrUnavailable wraps every failure to reach etcd (or a quorum of it).
	ErrUnavailable = errors.New("etcd unavailable")
	// ErrEvicted is returned once this node has been evicted from the fleet.
	ErrEvicted = errors.New("node evicted from the fleet")
	// ErrTaken is matched (errors.Is) by a *TakenError.
	ErrTaken = errors.New("sandbox id held by another node")
)

// TakenError says which node holds a sandbox id.
type TakenError struct {
	ID, Holder string
}

func (e *TakenError) Error() string {
	return fmt.Sprintf("sandbox id %q is held by node %q", e.ID, e.Holder)
}

// Is makes errors.Is(err, ErrTaken) true.
func (e *TakenError) Is(target error) bool { return target == ErrTaken }

// KeyLifetimeFor is the KeyLifetime that lets a node sign tokens of up to
// maxTokenLifetime while it renews normally: a renewal may be up to one
// renewal period and one request timeout old when a token is signed.
func KeyLifetimeFor(maxTokenLifetime, clockSkew time.Duration) time.Duration {
	return maxTokenLifetime + clockSkew + maxRenewInterval + DefaultOpTimeout
}

// Options configure Open.
type Options struct {
	// Endpoints are etcd client URLs. Required.
	Endpoints []string
	// Prefix is the root of the fleet's keys; DefaultPrefix if empty. A
	// trailing slash is added if missing.
	Prefix string
	// TLS, if set, is used to reach etcd (from --etcd-ca/--etcd-cert/--etcd-key).
	TLS *tls.Config
	// Node is this node's name, unique in the fleet. Required.
	Node string
	// Issuer is the issuer URL every node of the fleet must share. Required.
	Issuer string
	// KeyLifetime is how long a key stays published after its last renewal
	// (see KeyLifetimeFor). At least 2 s (etcd's minimum lease TTL); rounded
	// up to whole seconds.
	KeyLifetime time.Duration
	// RenewInterval is the lease renewal period; default KeyLifetime/4,
	// at most 2 s.
	RenewInterval time.Duration
	// OpTimeout bounds each etcd request; DefaultOpTimeout if zero.
	OpTimeout time.Duration
	// Version is recorded in the node record.
	Version string
	// Logger receives a structured line on every transition; slog.Default if nil.
	Logger *slog.Logger
	// Registry receives the Store's metrics; none are registered if nil.
	Registry prometheus.Registerer
}

// Store is one node's view of, and contribution to, the fleet state. It is
// safe for concurrent use.
type Store struct {
	cli      *clientv3.Client
	log      *slog.Logger
	m        *metrics
	prefix   string
	node     string
	issuer   string
	ttl      int64 // lease TTL in seconds
	interval time.Duration
	opTO     time.Duration
	record   []byte // the node record's value

	cancel context.CancelFunc
	wg     sync.WaitGroup

	publishMu sync.Mutex // serializes PublishKey

	mu        sync.Mutex
	nodeLease lease
	keys      map[string]*pubKey // kid -> key this node renews
	evicted   bool
	up        bool
	lastOK    time.Time // last time a request reached etcd with a quorum
	downSince time.Time
	lastErr   error

	jwks jwksState
}

// lease is a granted lease and the time until which it is guaranteed.
type lease struct {
	id    clientv3.LeaseID
	until time.Time
}

// nodeRecord is the value of nodes/<node>.
type nodeRecord struct {
	Node    string    `json:"node"`
	Started time.Time `json:"started"`
	Version string    `json:"version,omitempty"`
}

// evictionRecord is the value of evicted/<node>.
type evictionRecord struct {
	At time.Time `json:"at"`
	By string    `json:"by"`
}

// Open connects to etcd, checks or records the fleet's issuer, refuses a
// node that was evicted, registers the node, loads the fleet's JWKS and
// starts the lease renewals and the JWKS watch. It fails if etcd is
// unreachable. Close releases it; nothing is revoked then, so the node's keys
// stay published until every token they signed has expired.
func Open(ctx context.Context, o Options) (*Store, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("open fleet store: no etcd endpoints")
	}
	if err := ValidName(o.Node); err != nil {
		return nil, fmt.Errorf("open fleet store: node name: %w", err)
	}
	if o.Issuer == "" {
		return nil, errors.New("open fleet store: an issuer is required with etcd")
	}
	if o.KeyLifetime < 2*time.Second {
		return nil, fmt.Errorf("open fleet store: key lifetime %s is under etcd's 2s minimum lease", o.KeyLifetime)
	}
	s := &Store{
		log:    o.Logger,
		prefix: o.Prefix,
		node:   o.Node,
		issuer: o.Issuer,
		ttl:    int64((o.KeyLifetime + time.Second - 1) / time.Second),
		opTO:   o.OpTimeout,
		keys:   map[string]*pubKey{},
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	s.log = s.log.With("component", "fleet", "node", o.Node)
	if s.prefix == "" {
		s.prefix = DefaultPrefix
	}
	if !strings.HasSuffix(s.prefix, "/") {
		s.prefix += "/"
	}
	if s.opTO <= 0 {
		s.opTO = DefaultOpTimeout
	}
	s.interval = o.RenewInterval
	if s.interval <= 0 {
		s.interval = min(o.KeyLifetime/4, maxRenewInterval)
	}
	if s.interval > o.KeyLifetime/2 {
		return nil, fmt.Errorf("open fleet store: renew interval %s is over half the key lifetime %s", s.interval, o.KeyLifetime)
	}
	s.m = newMetrics()
	var err error
	s.record, err = json.Marshal(nodeRecord{Node: o.Node, Started: time.Now().UTC(), Version: o.Version})
	if err != nil {
		return nil, fmt.Errorf("encode node record: %w", err)
	}
	s.cli, err = clientv3.New(clientv3.Config{
		Endpoints:            o.Endpoints,
		TLS:                  o.TLS,
		DialTimeout:          s.opTO,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: s.opTO,
		// The client's own zap logs are noise next to the Store's transitions.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("open fleet store: etcd client for %v: %w", o.Endpoints, err)
	}
	if err := s.join(ctx); err != nil {
		s.cli.Close()
		return nil, fmt.Errorf("open fleet store: %w", err)
	}
	if err := s.loadJWKS(ctx); err != nil {
		s.cli.Close()
		return nil, err
	}
	if err := s.m.register(o.Registry); err != nil {
		s.cli.Close()
		return nil, err
	}
	s.setUp(true, nil)
	loopCtx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.wg.Add(3)
	go func() { defer s.wg.Done(); s.renewLoop(loopCtx) }()
	go func() { defer s.wg.Done(); s.watchLoop(loopCtx) }()
	go func() { defer s.wg.Done(); s.evictionWatch(loopCtx) }()
	s.log.Info("joined the fleet", "issuer", s.issuer, "prefix", s.prefix, "key_lifetime", time.Duration(s.ttl)*time.Second, "renew_interval", s.interval)
	return s, nil
}

// join records or checks the issuer, refuses an evicted node and registers
// the node under a new lease.
func (s *Store) join(ctx context.Context) error {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(octx).
		If(clientv3.Compare(clientv3.CreateRevision(s.issuerKey()), "=", 0)).
		Then(clientv3.OpPut(s.issuerKey(), s.issuer)).
		Else(clientv3.OpGet(s.issuerKey())).
		Commit()
	if err != nil {
		return s.unavailable("record the fleet's issuer", err)
	}
	if !resp.Succeeded {
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 1 && string(kvs[0].Value) != s.issuer {
			return fmt.Errorf("etcd (%s) records issuer %q for this fleet; this node was started with issuer %q", s.issuerKey(), kvs[0].Value, s.issuer)
		}
	} else {
		s.log.Info("recorded the fleet's issuer", "issuer", s.issuer, "key", s.issuerKey())
	}
	if ev, err := s.evictionOf(ctx, s.node); err != nil {
		return err
	} else if ev != nil {
		return fmt.Errorf("node %q: %w at %s by %q (readmit it first)", s.node, ErrEvicted, ev.At.Format(time.RFC3339), ev.By)
	}
	s.warnIfNameInUse(ctx)
	l, err := s.grantAndPut(ctx, s.nodeKey(s.node), s.record)
	if err != nil {
		return fmt.Errorf("register node %q: %w", s.node, err)
	}
	s.mu.Lock()
	s.nodeLease = l
	s.mu.Unlock()
	return nil
}

// warnIfNameInUse warns when this node's record was renewed within the last
// two renewal periods: another live process may be using the same node name
// (or this node restarted at once after dying; the two look alike, so this
// only warns).
func (s *Store) warnIfNameInUse(ctx context.Context) {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(octx, s.nodeKey(s.node))
	if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
		return
	}
	ttl, err := s.cli.TimeToLive(octx, clientv3.LeaseID(resp.Kvs[0].Lease))
	if err != nil || ttl.TTL <= 0 {
		return
	}
	if ago := time.Duration(ttl.GrantedTTL-ttl.TTL) * time.Second; ago <= 2*s.interval {
		s.log.Warn("node name may be in use by another live process: its record was renewed moments ago; every node needs its own --node-name", "renewed_ago", ago)
	}
}

// evictionOf reads a node's eviction record; nil if it is not evicted.
func (s *Store) evictionOf(ctx context.Context, node string) (*evictionRecord, error) {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(octx, s.evictedKey(node))
	if err != nil {
		return nil, s.unavailable("read eviction of node "+node, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	var ev evictionRecord
	if err := json.Unmarshal(resp.Kvs[0].Value, &ev); err != nil {
		ev = evictionRecord{By: "(unreadable record)"}
	}
	return &ev, nil
}

// grantAndPut grants a lease of the key lifetime and puts key=value under it
// unless this node has been evicted. The returned lease's guarantee runs from
// the moment the grant was sent.
func (s *Store) grantAndPut(ctx context.Context, key string, value []byte) (lease, error) {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	sent := time.Now()
	g, err := s.cli.Grant(octx, s.ttl)
	if err != nil {
		return lease{}, s.unavailable("grant lease", err)
	}
	resp, err := s.cli.Txn(octx).
		If(clientv3.Compare(clientv3.CreateRevision(s.evictedKey(s.node)), "=", 0)).
		Then(clientv3.OpPut(key, string(value), clientv3.WithLease(g.ID))).
		Commit()
	if err == nil && !resp.Succeeded {
		err = ErrEvicted
	}
	if err != nil {
		// Whether or not the put landed, the lease must not outlive this
		// failure: revoking it removes the key if it did.
		rctx, rcancel := s.opCtx(context.Background())
		_, _ = s.cli.Revoke(rctx, g.ID)
		rcancel()
		if errors.Is(err, ErrEvicted) {
			s.markEvicted()
			return lease{}, fmt.Errorf("put %s: %w", key, ErrEvicted)
		}
		return lease{}, s.unavailable("put "+key, err)
	}
	return lease{id: g.ID, until: sent.Add(time.Duration(g.TTL) * time.Second)}, nil
}

// opCtx bounds one etcd request, and makes a member without a leader refuse
// it at once instead of holding it until the timeout.
func (s *Store) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.opTO)
}

// unavailable wraps an etcd failure as ErrUnavailable, saying what was being done.
func (s *Store) unavailable(doing string, err error) error {
	return fmt.Errorf("%s: %w (endpoints %v): %w", doing, ErrUnavailable, s.cli.Endpoints(), err)
}

// markEvicted records, once, that this node was evicted, and says so loudly.
func (s *Store) markEvicted() {
	s.mu.Lock()
	was := s.evicted
	s.evicted = true
	n := len(s.keys)
	s.mu.Unlock()
	s.m.keysPublished.Set(0)
	if !was {
		s.log.Error("this node was evicted from the fleet: its keys are no longer published and it must not sign; restart it after `readmit` if that was a mistake", "keys", n)
	}
}

// setUp records whether the last renewal reached etcd, logging transitions.
func (s *Store) setUp(up bool, err error) {
	now := time.Now()
	s.mu.Lock()
	was := s.up
	s.up = up
	if up {
		s.lastOK, s.lastErr = now, nil
	} else {
		s.lastErr = err
		if was {
			s.downSince = now
		}
	}
	down := s.downSince
	s.mu.Unlock()
	if up {
		s.m.etcdUp.Set(1)
	} else {
		s.m.etcdUp.Set(0)
	}
	switch {
	case was && !up:
		s.log.Warn("etcd unreachable: keys stay published until their leases run out; creates and rotations fail", "err", err)
	case !was && up && !down.IsZero():
		s.log.Info("etcd reachable again", "down_for", now.Sub(down).Round(time.Millisecond))
	}
}

// Healthy returns nil if etcd was reached (with a quorum) within the last few
// renewal periods and the node is not evicted. It is for health reports and
// metrics, not for gating tokens: signing is bounded by PublishedUntil, which
// stays valid for a while without etcd.
func (s *Store) Healthy() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.evicted {
		return fmt.Errorf("node %q: %w", s.node, ErrEvicted)
	}
	if since := time.Since(s.lastOK); since > healthyWithin*s.interval+s.opTO {
		return fmt.Errorf("%w: last reached %s ago: %v", ErrUnavailable, since.Round(time.Millisecond), s.lastErr)
	}
	return nil
}

// Node is this node's name.
func (s *Store) Node() string { return s.node }

// Close stops the renewals and the watch and closes the etcd connection. It
// revokes nothing: the node's keys stay published until their leases run out.
func (s *Store) Close() error {
	s.cancel()
	s.wg.Wait()
	return s.cli.Close()
}

// ValidName checks a node name or sandbox id used as one etcd key segment:
// 1 to 253 of [A-Za-z0-9._-], not "." or "..".
func ValidName(name string) error {
	if name == "" || len(name) > 253 || name == "." || name == ".." {
		return fmt.Errorf("invalid name %q: 1 to 253 of [A-Za-z0-9._-], not . or ..", name)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("invalid name %q: character %q (allowed: [A-Za-z0-9._-])", name, r)
		}
	}
	return nil
}

// The fleet's key layout; see the package documentation.
func (s *Store) issuerKey() string              { return s.prefix + "issuer" }
func (s *Store) nodesPrefix() string            { return s.prefix + "nodes/" }
func (s *Store) nodeKey(node string) string     { return s.nodesPrefix() + node }
func (s *Store) keysPrefix() string             { return s.prefix + "keys/" }
func (s *Store) nodeKeysPrefix(n string) string { return s.keysPrefix() + n + "/" }
func (s *Store) keyKey(node, kid string) string { return s.nodeKeysPrefix(node) + kid }
func (s *Store) evictedPrefix() string          { return s.prefix + "evicted/" }
func (s *Store) evictedKey(node string) string  { return s.evictedPrefix() + node }
func (s *Store) sandboxKey(id string) string    { return s.prefix + "sandboxes/" + id }
