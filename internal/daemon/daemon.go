// Package daemon assembles identityd: the attribution programs, the stores
// the sandbox controller writes and the token server reads, the token
// endpoint, the operator endpoint and the admin socket. Each piece has a
// small constructor; Run builds them in order and runs the servers and
// background loops as one group of tasks, so that any of them failing stops
// the daemon with its error.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/fleet"
	"github.com/identityd/identityd/internal/atomicfile"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/secretstore"
	"github.com/identityd/identityd/tokenserver"
)

// Config is the daemon's configuration; see cmd/identityd for the flags.
type Config struct {
	StateDir        string
	CgroupParent    string
	BPFDir          string
	Listen          string // token endpoint; empty: router address:7123
	Issuer          string // empty: http://<the token endpoint's address>
	SigningAlg      string
	DefaultAudience []string
	OperatorListen  string // empty: none
	AdminSocket     string
	HostNetns       string // netns of the router address and the listener; empty: ours
	NetnsPrefix     string // of the sandboxes' named netns; empty: identityd-
	Bridge          string
	Subnet          netip.Prefix
	RateLimit       float64
	Burst           int
	// Conns bound the token endpoint's connections (Total is lowered to fit
	// the descriptor limit); IdleTimeout closes idle keep-alive ones.
	Conns       tokenserver.ConnLimits
	IdleTimeout time.Duration
	// CheckInterval paces the readiness probe and the check of the
	// attribution programs; DefaultCheckInterval if zero.
	CheckInterval time.Duration
	// Node names this host in the log and, in a fleet, among the nodes;
	// the host name if empty.
	Node string
	// KeyRotationPeriod replaces the signing key when it is this old (0:
	// never on a schedule); KeyPublishDelay is how long a new key is
	// published before it signs (0: at once).
	KeyRotationPeriod time.Duration
	KeyPublishDelay   time.Duration
	// DiscoveryListen, if set, serves OIDC discovery and the JWKS alone on
	// a listener of their own, for a load balancer behind the issuer URL.
	DiscoveryListen string
	// MaxTTL is the longest token lifetime served (longer requests are
	// clamped); tokenserver.MaxTTL if zero. In a fleet it sets how long a
	// dead node's keys stay published.
	MaxTTL time.Duration
	// EtcdEndpoints, if set, make this daemon a node of the fleet whose
	// state is in etcd under EtcdPrefix (fleet.DefaultPrefix if empty),
	// reached with TLS from EtcdCA, EtcdCert and EtcdKey if set. Issuer is
	// required then. Empty: a single host, with no etcd.
	EtcdEndpoints []string
	EtcdPrefix    string
	EtcdCA        string
	EtcdCert      string
	EtcdKey       string
	// CredentialsMount is where each sandbox's credentials directory
	// appears inside it (controllers.DefaultCredentialsMount if empty);
	// SecretRotation and SecretGrace pace its secret's rotation.
	CredentialsMount string
	SecretRotation   time.Duration
	SecretGrace      time.Duration
	// LinkLocalEndpoints are addresses and ports (169.254.169.254:80, say)
	// whose connections from sandboxes the attribution programs send to the
	// token endpoint; InjectLinkLocalURL tells sandboxes the first one's URL
	// instead of the router's. See linklocal.go.
	LinkLocalEndpoints []netip.AddrPort
	InjectLinkLocalURL bool
	// NoTokenCache signs every token request anew instead of reusing a
	// token for a repeated request (tokenserver's cache).
	NoTokenCache bool
	// Pprof serves Go's profiles on the operator endpoint.
	Pprof bool
	// Upgrade, when it fires (SIGHUP), starts this daemon's binary as it is
	// on disk now as its successor, which takes over (handover.go).
	Upgrade <-chan struct{}
	// Version is recorded in the fleet's node record.
	Version string
	Logger  *slog.Logger
}

// shutdownGrace bounds how long in-flight requests may take to finish once
// the daemon is asked to stop.
const shutdownGrace = 10 * time.Second

// Run starts the daemon and serves until ctx ends, then stops accepting,
// finishes in-flight requests and returns nil; or until a server or
// background task fails, and returns why. The BPF programs stay attached:
// sandboxes never lose attribution because the daemon stopped.
func Run(ctx context.Context, cfg Config) error {
	start := time.Now()
	cfg, err := prepare(cfg)
	if err != nil {
		return err
	}
	log := cfg.Logger
	metrics, err := newMetricsRegistry()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	var servers serverSet
	g.Go(func() error { return servers.shutdownWhenDone(gctx, log) })
	var closers closeList
	defer closers.close()
	// A start-up that fails half way stops what already runs.
	fail := func(err error) error {
		cancel()
		g.Wait()
		return err
	}

	// The sockets of a daemon this one takes over from, or of systemd.
	inh, err := takeOver(ctx, cfg)
	if err != nil {
		return fail(err)
	}
	defer inh.closeUnused()
	failHandover := func(err error) error {
		if inh.pred != nil {
			inh.pred.Fail(err)
		}
		return fail(err)
	}
	var socks sockets

	// The operator endpoint comes up first, so /healthz answers and /readyz
	// says "not yet" while sandboxes are rebuilt.
	var ready readiness
	if cfg.OperatorListen != "" {
		ln, err := listenOrInherit(inh, sockOperator, "operator endpoint", cfg.OperatorListen)
		if err != nil {
			return failHandover(err)
		}
		socks.add(sockOperator, ln)
		log.Info("operator endpoint listening", "addr", ln.Addr().String())
		servers.serve(g, "operator", netutil.LimitListener(ln, serviceConns), &http.Server{Handler: operatorHandler(metrics, ready.err, ready.degraded, cfg.Pprof),
			ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second})
	}

	d, err := assemble(ctx, cfg, inh, metrics, &closers)
	if err != nil {
		return failHandover(err)
	}
	if inh.pred != nil {
		// A successor proves attribution before it serves on the
		// predecessor's sockets, on a listener of its own.
		if err := d.proveAttribution(ctx); err != nil {
			return failHandover(fmt.Errorf("readiness probe before taking over: %w", err))
		}
	}
	succ, err := d.start(gctx, g, &servers, inh, &socks)
	if err != nil {
		return failHandover(err)
	}
	succ.stop = cancel
	if inh.pred != nil {
		if err := inh.pred.Ready(ctx); err != nil {
			// It may have died meanwhile: this daemon serves either way.
			log.Warn("the predecessor did not confirm it stopped accepting", "pid", inh.pred.PID, "error", err)
		} else {
			log.Info("took over from the predecessor", "pid", inh.pred.PID)
		}
		inh.pred.Close()
	}
	// Ready means a connection was attributed end to end, once, before the
	// first "ready"; then every check interval.
	d.watch.runProbe(ctx)
	ready.set(d.watch, func() (error, error) { return fleetReadiness(d.keySet, d.fleet) })
	log.Info("identityd ready", "token_endpoint", d.ep.addr.String(), "issuer", d.ep.issuer, "sandboxes", d.stores.reg.Len(),
		"admin_socket", cfg.AdminSocket, "startup", time.Since(start).Round(time.Millisecond), "sockets_from", inh.from)
	notifySystemd("READY=1")
	g.Go(func() error { return succ.run(gctx) })
	g.Go(func() error { upgrades(gctx, cfg, cfg.Upgrade); return nil })
	err = g.Wait()
	if !d.handedOver.Load() {
		// Nobody serves on these paths any more; a successor would.
		for _, p := range []string{cfg.AdminSocket, HandoverSocket(cfg.AdminSocket)} {
			if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
				log.Warn("remove socket", "path", p, "error", rerr)
			}
		}
	}
	if err != nil {
		log.Error("identityd stopped", "error", err)
		return err
	}
	log.Info("identityd stopped; attribution programs stay attached")
	return nil
}

// prepare checks cfg and the host before anything is made, and fills in
// the defaults that depend on the host.
func prepare(cfg Config) (Config, error) {
	// First, before the start opens a descriptor: under a limit too low
	// for the daemon the refusal then says what to raise, not which open
	// happened to fail first.
	conns, err := connLimits(cfg.Conns, cfg.Logger)
	if err != nil {
		return cfg, err
	}
	cfg.Conns = conns
	if err := checkHost(cfg); err != nil {
		return cfg, err
	}
	if err := checkKeyTiming(cfg); err != nil {
		return cfg, err
	}
	if cfg.Node == "" {
		host, err := os.Hostname()
		if err != nil {
			return cfg, fmt.Errorf("node name: %w", err)
		}
		cfg.Node = host
	}
	if cfg.CheckInterval <= 0 {
		cfg.CheckInterval = DefaultCheckInterval
	}
	cfg.EtcdEndpoints = endpoints(cfg.EtcdEndpoints)
	return cfg, checkFleet(cfg)
}

// closeList closes what the daemon opened, last opened first.
type closeList []func()

func (c *closeList) add(f func()) { *c = append(*c, f) }

func (c *closeList) close() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

// parts are the daemon's pieces, built by assemble and run by start.
type parts struct {
	cfg    Config
	ep     tokenEndpoint
	fleet  *fleet.Store // nil on a single host
	in     *bpf.Installation
	stores *stores
	ctrl   *controllers.Controller
	keys   *tokenserver.Keys
	keySet tokenserver.KeySet
	probe  *prober
	token  *tokenserver.Server
	// handedOver is set once a successor took over: what this daemon
	// leaves on its way out is the successor's.
	handedOver atomic.Bool
	watch      *attributionWatch
}

// assemble builds the daemon's pieces in order, each from its own
// constructor: what sandboxes are told comes from the token listener
// actually opened; a fleet whose etcd is unreachable, or that records
// another issuer, stops the start before anything is installed.
func assemble(ctx context.Context, cfg Config, inh *inherited, metrics *prometheus.Registry, closers *closeList) (*parts, error) {
	log := cfg.Logger
	d := &parts{cfg: cfg}
	var err error
	if d.ep, err = openTokenEndpoint(cfg, inh); err != nil {
		return nil, err
	}
	closers.add(func() { d.ep.ln.Close() })
	log.Info("token endpoint", "addr", d.ep.addr.String(), "url", d.ep.tokenURL, "issuer", d.ep.issuer)

	if d.fleet, err = openFleet(ctx, cfg, d.ep.issuer, metrics); err != nil {
		return nil, err
	}
	if d.fleet != nil {
		closers.add(func() { d.fleet.Close() })
	}
	if d.in, err = bpf.Install(ctx, bpf.Options{PinDir: cfg.BPFDir, Logger: log}); err != nil {
		return nil, err
	}
	closers.add(func() { d.in.Close() })
	if err := d.in.SetEndpoints([]netip.AddrPort{d.ep.addr}); err != nil {
		return nil, err
	}
	if d.ep, err = redirectLinkLocal(d.ep, d.in, cfg.LinkLocalEndpoints, cfg.InjectLinkLocalURL, log); err != nil {
		return nil, err
	}
	if d.stores, err = openStores(cfg); err != nil {
		return nil, err
	}
	closers.add(d.stores.close)
	if d.keys, err = openKeys(ctx, cfg, d.fleet); err != nil {
		return nil, err
	}
	d.keySet = signingKeys(d.keys, d.fleet)
	if err := registerFleetMetrics(metrics, d.keySet, d.fleet); err != nil {
		return nil, err
	}
	if d.probe, err = newProber(cfg, d.ep.addr, metrics); err != nil {
		return nil, err
	}
	closers.add(func() {
		if !d.handedOver.Load() { // the successor probes from it now
			d.probe.close()
		}
	})
	if d.token, err = newTokenServer(cfg, d.ep, d.in, d.stores, d.keySet, metrics, d.probe.observe); err != nil {
		return nil, err
	}
	// The controller comes last: it signs the sandboxes' token files with
	// the token server.
	if d.ctrl, err = controllers.New(ctx, controllerConfig(cfg, d.ep, d.stores, d.fleet, d.token)); err != nil {
		return nil, err
	}
	closers.add(func() { d.ctrl.Close() })
	if err := watchLinkLocalSandboxes(d.in, d.stores.reg, len(cfg.LinkLocalEndpoints) > 0, log); err != nil {
		return nil, err
	}
	if err := registerControllerMetrics(metrics, d.ctrl); err != nil {
		return nil, err
	}
	if d.watch, err = newAttributionWatch(d.in, d.probe.probe, log, metrics); err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	return d, nil
}

// start runs the servers as tasks of g and the background loops, and
// returns what hands them over to a successor.
func (d *parts) start(gctx context.Context, g *errgroup.Group, servers *serverSet, inh *inherited, socks *sockets) (*successors, error) {
	cfg, log := d.cfg, d.cfg.Logger
	socks.add(sockToken, d.ep.ln)
	servers.serve(g, "token", d.token.Listener(d.ep.ln), d.token.HTTPServer())
	if cfg.DiscoveryListen != "" {
		ln, err := listenOrInherit(inh, sockDiscovery, "discovery endpoint", cfg.DiscoveryListen)
		if err != nil {
			return nil, err
		}
		socks.add(sockDiscovery, ln)
		log.Info("discovery endpoint listening", "addr", ln.Addr().String())
		servers.serve(g, "discovery", netutil.LimitListener(ln, serviceConns), discoveryServer(d.token))
	}
	adminLn, ok, err := inh.listener(sockAdmin, cfg.AdminSocket)
	if err == nil && !ok {
		adminLn, err = controllers.ListenAdmin(cfg.AdminSocket)
	}
	if err != nil {
		return nil, err
	}
	// The socket's file must outlive this listener when a successor takes
	// it over.
	adminLn.(*net.UnixListener).SetUnlinkOnClose(false)
	socks.add(sockAdmin, adminLn)
	admin := servers.serve(g, "admin", netutil.LimitListener(adminLn, serviceConns), d.adminServer())
	return &successors{d: d, socks: socks, servers: servers, g: g, admin: admin,
		bg: d.startBackground(gctx), bgCtx: gctx}, nil
}

// adminServer serves the admin API.
func (d *parts) adminServer() *http.Server {
	return &http.Server{Handler: adminHandler(d.ctrl, d.keys, d.fleet, d.cfg.Logger), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
}

// checkHost refuses to start where the daemon cannot keep its promises,
// before anything is installed or rebuilt.
func checkHost(cfg Config) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("identityd must run as root (running as uid %d)", os.Geteuid())
	}
	if _, err := cgroup2.Root(); err != nil {
		return err
	}
	if err := atomicfile.MkdirPrivate(cfg.StateDir); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := atomicfile.MkdirPrivate(filepath.Dir(cfg.AdminSocket)); err != nil {
		return fmt.Errorf("admin socket directory: %w", err)
	}
	if cfg.NetnsPrefix != "" {
		if err := controllers.CheckNetnsPrefix(cfg.NetnsPrefix); err != nil {
			return err
		}
	}
	return nil
}

func newMetricsRegistry() (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	for _, c := range []prometheus.Collector{collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	return reg, nil
}

// listenOrInherit opens the operator or the discovery endpoint, or takes
// the inherited socket of that name if it is bound there. Serve it through
// netutil.LimitListener: anyone who can reach it can connect there, and
// past the cap new connections wait in the kernel's backlog, holding none
// of the daemon's descriptors.
func listenOrInherit(inh *inherited, name, what, addr string) (net.Listener, error) {
	ln, ok, err := inh.listener(name, addr)
	if err != nil || ok {
		return ln, err
	}
	if ln, err = net.Listen("tcp", addr); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return ln, nil
}

// discoveryServer serves discovery and the JWKS only: nothing there is
// secret or attributed, so it needs timeouts but no connection accounting.
func discoveryServer(srv *tokenserver.Server) *http.Server {
	return &http.Server{Handler: srv.DiscoveryHandler(), ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second, IdleTimeout: 30 * time.Second,
		MaxHeaderBytes: 8 << 10}
}

// checkKeyTiming refuses a rotation period no longer than the publish
// delay, which would replace every key before it ever signed.
func checkKeyTiming(cfg Config) error {
	if cfg.KeyPublishDelay < 0 {
		return fmt.Errorf("key publish delay %s: want 0 or more", cfg.KeyPublishDelay)
	}
	if cfg.KeyRotationPeriod < 0 || cfg.KeyRotationPeriod > 0 && cfg.KeyRotationPeriod <= cfg.KeyPublishDelay {
		return fmt.Errorf("key rotation period %s: want 0 (off) or longer than the key publish delay (%s)",
			cfg.KeyRotationPeriod, cfg.KeyPublishDelay)
	}
	// At most two secrets are accepted: a grace window longer than the
	// period would be cut short by the next rotation.
	if cfg.SecretGrace < 0 || cfg.SecretRotation < 0 || cfg.SecretRotation > 0 && cfg.SecretGrace >= cfg.SecretRotation {
		return fmt.Errorf("secret grace %s and rotation period %s: want both 0 or more, and the grace shorter than the period (or the period 0, off)",
			cfg.SecretGrace, cfg.SecretRotation)
	}
	return nil
}

// openKeys loads the signing keys. In a fleet, every key is published to
// etcd before it is served or signs: new ones through the Publish hook,
// those loaded from disk here.
func openKeys(ctx context.Context, cfg Config, fl *fleet.Store) (*tokenserver.Keys, error) {
	kc := tokenserver.KeysConfig{Dir: filepath.Join(cfg.StateDir, "keys"), Alg: cfg.SigningAlg, PublishDelay: cfg.KeyPublishDelay}
	if fl != nil {
		kc.Publish = func(ctx context.Context, jwk jose.JSONWebKey) error { return publishKey(ctx, fl, jwk) }
		// Other nodes' verifiers may hold a JWKS from before this node
		// existed: its first key, too, is published before it signs.
		kc.FirstKeyWaits = true
	}
	keys, err := tokenserver.LoadKeys(ctx, kc)
	if err != nil {
		return nil, err
	}
	if fl != nil {
		if err := publishLoaded(ctx, keys, fl, keyLifetime(cfg)); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

// tokenEndpoint is the token listener and what sandboxes are told about it.
type tokenEndpoint struct {
	ln       net.Listener
	addr     netip.AddrPort // as bound
	tokenURL string         // MIREN_IDENTITY_TOKEN_URL
	issuer   string         // MIREN_OIDC_ISSUER_URL, the tokens' iss
}

// openTokenEndpoint prepares the router address in the host netns, binds the
// token endpoint there (or to --listen), and derives the URL and the issuer
// from the address actually bound.
func openTokenEndpoint(cfg Config, inh *inherited) (tokenEndpoint, error) {
	router, err := controllers.PrepareHost(controllers.Config{HostNetns: cfg.HostNetns, Bridge: cfg.Bridge, Subnet: cfg.Subnet, Logger: cfg.Logger})
	if err != nil {
		return tokenEndpoint{}, err
	}
	listen := cfg.Listen
	if listen == "" {
		listen = netip.AddrPortFrom(router, controllers.DefaultTokenPort).String()
	}
	ln, ok, err := inh.listener(sockToken, listen)
	bind := func() (err error) {
		ln, err = net.Listen("tcp", listen)
		return err
	}
	switch {
	case err != nil || ok:
	case cfg.HostNetns != "":
		err = netnsutil.Do(cfg.HostNetns, bind)
	default:
		err = bind()
	}
	if err != nil {
		return tokenEndpoint{}, fmt.Errorf("token endpoint: %w", err)
	}
	ep := tokenEndpoint{ln: ln, addr: ln.Addr().(*net.TCPAddr).AddrPort()}
	host := ep.addr
	if host.Addr().IsUnspecified() {
		// Listening everywhere: sandboxes reach it on the router address.
		host = netip.AddrPortFrom(router, host.Port())
	}
	ep.tokenURL = "http://" + host.String() + "/v1/token"
	ep.issuer = strings.TrimRight(cfg.Issuer, "/")
	if ep.issuer == "" {
		ep.issuer = "http://" + host.String()
	}
	return ep, nil
}

// stores are what the controller writes and the token server reads.
type stores struct {
	reg     *registry.Index
	secrets *secretstore.Store
}

func openStores(cfg Config) (*stores, error) {
	root, err := cgroup2.Root()
	if err != nil {
		return nil, err
	}
	reg, err := registry.New(root)
	if err != nil {
		return nil, err
	}
	secrets, err := secretstore.Open(secretstore.Dir(cfg.StateDir))
	if err != nil {
		reg.Close()
		return nil, err
	}
	return &stores{reg: reg, secrets: secrets}, nil
}

func (s *stores) close() { s.reg.Close() }

func controllerConfig(cfg Config, ep tokenEndpoint, st *stores, fl *fleet.Store, tokens controllers.TokenIssuer) controllers.Config {
	return controllers.Config{
		StateDir: cfg.StateDir, CgroupParent: cfg.CgroupParent, HostNetns: cfg.HostNetns, NetnsPrefix: cfg.NetnsPrefix,
		Bridge: cfg.Bridge, Subnet: cfg.Subnet, TokenURL: ep.tokenURL, Issuer: ep.issuer,
		Registry: st.reg, Secrets: st.secrets, IDs: controllerIDs(fl), Logger: cfg.Logger,
		CredentialsMount: cfg.CredentialsMount, SecretRotation: cfg.SecretRotation, SecretGrace: cfg.SecretGrace, Tokens: tokens,
	}
}

func registerControllerMetrics(reg prometheus.Registerer, ctrl *controllers.Controller) error {
	inconclusive := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "identityd_sandbox_checks_inconclusive_total",
		Help: "Checks of a sandbox's cgroup or netns, at start and by the resync, that could not be made (the sandbox was kept).",
	}, func() float64 { return float64(ctrl.InconclusiveChecks()) })
	rotations := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "identityd_secret_rotations_total",
		Help: "Sandbox secrets rotated, on schedule or on demand.",
	}, func() float64 { return float64(ctrl.SecretRotations()) })
	tokenFiles := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "identityd_token_file_failures_total",
		Help: "Sandbox token files that could not be renewed when due (each is retried with backoff, 1s doubling to 30s).",
	}, func() float64 { return float64(ctrl.TokenFileFailures()) })
	for _, c := range []prometheus.Collector{inconclusive, rotations, tokenFiles} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}

func newTokenServer(cfg Config, ep tokenEndpoint, in *bpf.Installation, st *stores, keys tokenserver.KeySet,
	reg prometheus.Registerer, probe func(netip.AddrPort, bpf.Record, error) bool) (*tokenserver.Server, error) {
	metrics, err := tokenserver.NewMetrics(reg, func() float64 { return float64(st.reg.Len()) })
	if err != nil {
		return nil, err
	}
	return tokenserver.New(tokenserver.Config{
		Issuer: ep.issuer, DefaultAudience: cfg.DefaultAudience, Attester: in, Registry: st.reg,
		Secrets: st.secrets, Keys: keys, Logger: cfg.Logger, Metrics: metrics,
		RateLimit: rate.Limit(cfg.RateLimit), Burst: cfg.Burst, Conns: cfg.Conns, IdleTimeout: cfg.IdleTimeout,
		Probe: probe, Node: cfg.Node, MaxTTL: cfg.MaxTTL, DisableTokenCache: cfg.NoTokenCache,
	})
}

// readiness is what /readyz reports: not ready until the daemon serves,
// then whatever the attribution watch and, in a fleet, the signing key's
// guaranteed publication say.
type readiness struct {
	watch atomic.Pointer[attributionWatch]
	fleet atomic.Pointer[func() (notReady, degraded error)]
}

func (r *readiness) set(w *attributionWatch, fleet func() (error, error)) {
	r.fleet.Store(&fleet)
	r.watch.Store(w)
}

func (r *readiness) err() error {
	w := r.watch.Load()
	if w == nil {
		return errors.New("starting: rebuilding sandboxes")
	}
	if err := w.Err(); err != nil {
		return err
	}
	notReady, _ := (*r.fleet.Load())()
	return notReady
}

// degraded is what a ready daemon warns of (etcd unreachable while the
// signing key's guarantee still covers issuing); nil if nothing.
func (r *readiness) degraded() error {
	f := r.fleet.Load()
	if f == nil {
		return nil
	}
	_, degraded := (*f)()
	return degraded
}

// LogLevel parses a --log-level value.
func LogLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(strings.ToUpper(s)))
	return l, err
}
