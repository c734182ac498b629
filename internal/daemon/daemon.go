// Package daemon assembles identityd: the attribution programs, the sandbox
// controller, the token endpoint, the operator endpoint and the admin
// socket, started in that order and stopped gracefully.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/net/netutil"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/atomicfile"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/tokenserver"
)

// Config is the daemon's configuration; see cmd/identityd for the flags.
type Config struct {
	StateDir        string
	CgroupParent    string
	BPFDir          string
	Listen          string // token endpoint; empty: router address:7123
	Issuer          string // empty: http://<listen address>
	SigningAlg      string
	DefaultAudience []string
	OperatorListen  string // empty: none
	AdminSocket     string
	HostNetns       string // netns of the bridge and the listener; empty: ours
	NetnsPrefix     string // of the sandboxes' named netns; empty: identityd-
	Bridge          string
	Subnet          netip.Prefix
	RateLimit       float64
	Burst           int
	// Conns bound the token endpoint's connections (Total is lowered to fit
	// the descriptor limit); IdleTimeout closes idle keep-alive ones.
	Conns       tokenserver.ConnLimits
	IdleTimeout time.Duration
	Logger      *slog.Logger
}

// Run starts the daemon and serves until ctx ends, then stops accepting,
// finishes in-flight requests and returns nil. The BPF programs stay
// attached: sandboxes never lose attribution because the daemon stopped.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if os.Geteuid() != 0 {
		return fmt.Errorf("identityd must run as root (running as uid %d)", os.Geteuid())
	}
	if _, err := cgroup2.Root(); err != nil {
		return err
	}
	if err := atomicfile.MkdirPrivate(cfg.StateDir); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	// Refused here, before anything is installed or rebuilt, rather than
	// when the admin socket is opened at the end.
	if err := atomicfile.MkdirPrivate(filepath.Dir(cfg.AdminSocket)); err != nil {
		return fmt.Errorf("admin socket directory: %w", err)
	}
	var ready atomic.Bool
	var watch atomic.Pointer[attributionWatch]
	readyErr := func() error {
		if !ready.Load() {
			return errors.New("starting: rebuilding sandboxes")
		}
		if err := watch.Load().Err(); err != nil {
			return fmt.Errorf("attribution programs detached: %w", err)
		}
		return nil
	}

	reg := prometheus.NewRegistry()
	for _, c := range []prometheus.Collector{collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	var servers []*http.Server
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	serve := func(name string, ln net.Listener, s *http.Server) {
		servers = append(servers, s)
		go func() {
			if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("server stopped", "server", name, "error", err)
			}
		}()
	}

	// The operator endpoint comes up first, so /healthz answers and /readyz
	// says "not yet" while sandboxes are rebuilt.
	if cfg.OperatorListen != "" {
		ln, err := net.Listen("tcp", cfg.OperatorListen)
		if err != nil {
			return fmt.Errorf("operator endpoint: %w", err)
		}
		// Any host user can connect here: past the cap, new connections
		// wait in the kernel's backlog, holding none of our descriptors.
		ln = netutil.LimitListener(ln, serviceConns)
		log.Info("operator endpoint listening", "addr", ln.Addr().String())
		serve("operator", ln, &http.Server{Handler: tokenserver.OperatorHandler(reg, readyErr), ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second})
	}

	start := time.Now()
	in, err := bpf.Install(ctx, bpf.Options{PinDir: cfg.BPFDir, Logger: log})
	if err != nil {
		return err
	}
	defer in.Close()

	ctrl, err := controllers.New(ctx, controllers.Config{
		StateDir: cfg.StateDir, CgroupParent: cfg.CgroupParent, HostNetns: cfg.HostNetns, NetnsPrefix: cfg.NetnsPrefix,
		Bridge: cfg.Bridge, Subnet: cfg.Subnet, Issuer: cfg.Issuer, Logger: log,
	})
	if err != nil {
		return err
	}
	defer ctrl.Close()

	listen := cfg.Listen
	if listen == "" {
		listen = netip.AddrPortFrom(ctrl.Router(), 7123).String()
	}
	var tokenLn net.Listener
	listenIn := func() (err error) {
		tokenLn, err = net.Listen("tcp", listen)
		return err
	}
	if cfg.HostNetns != "" {
		err = netnsutil.Do(cfg.HostNetns, listenIn)
	} else {
		err = listenIn()
	}
	if err != nil {
		return fmt.Errorf("token endpoint: %w", err)
	}
	ep := tokenLn.Addr().(*net.TCPAddr).AddrPort()
	if err := in.SetEndpoints([]netip.AddrPort{ep}); err != nil {
		tokenLn.Close()
		return err
	}
	issuer := cfg.Issuer
	if issuer == "" {
		issuer = "http://" + ep.String()
	}

	keys, err := tokenserver.OpenKeys(filepath.Join(cfg.StateDir, "keys"), cfg.SigningAlg, nil)
	if err != nil {
		tokenLn.Close()
		return err
	}
	inconclusive := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "identityd_sandbox_checks_inconclusive_total",
		Help: "Checks of a sandbox's cgroup or netns, at start and by the resync, that could not be made (the sandbox was kept).",
	}, func() float64 { return float64(ctrl.InconclusiveChecks()) })
	if err := reg.Register(inconclusive); err != nil {
		tokenLn.Close()
		return fmt.Errorf("register metrics: %w", err)
	}
	metrics, err := tokenserver.NewMetrics(reg, func() float64 { return float64(ctrl.Len()) })
	if err != nil {
		tokenLn.Close()
		return err
	}
	conns, err := connLimits(cfg.Conns, log)
	if err != nil {
		tokenLn.Close()
		return err
	}
	srv, err := tokenserver.New(tokenserver.Config{
		Issuer: issuer, DefaultAudience: cfg.DefaultAudience, Attester: in, Registry: ctrl,
		Secrets: ctrl.Secrets(), Keys: keys, Logger: log, Metrics: metrics,
		RateLimit: rate.Limit(cfg.RateLimit), Burst: cfg.Burst, Conns: conns, IdleTimeout: cfg.IdleTimeout,
	})
	if err != nil {
		tokenLn.Close()
		return err
	}
	tokenSrv := srv.HTTPServer()
	serve("token", srv.Listener(tokenLn), tokenSrv)

	adminLn, err := controllers.ListenAdmin(cfg.AdminSocket)
	if err != nil {
		return err
	}
	adminLn = netutil.LimitListener(adminLn, serviceConns)
	admin := http.NewServeMux()
	admin.Handle("/", controllers.AdminHandler(ctrl))
	admin.HandleFunc("POST /v1/keys/rotate", func(w http.ResponseWriter, r *http.Request) {
		if err := keys.Rotate(); err != nil {
			log.Error("rotate signing key", "error", err)
			http.Error(w, `{"error":"rotate signing key failed"}`, http.StatusInternalServerError)
			return
		}
		log.Info("signing key rotated; the previous key stays published until its tokens expire")
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(keys.JWKS())
	})
	adminSrv := &http.Server{Handler: admin, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	serve("admin", adminLn, adminSrv)

	w, err := newAttributionWatch(in, log, reg)
	if err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	watch.Store(w)
	// Cancelled, then waited for, before the installation and the
	// controller they use are closed.
	var background sync.WaitGroup
	defer background.Wait()
	runCtx, stopBackground := context.WithCancel(ctx)
	defer stopBackground()
	background.Go(func() { ctrl.Run(runCtx) })
	background.Go(func() { w.Run(runCtx, attributionCheckInterval) })

	ready.Store(true)
	log.Info("identityd ready", "token_endpoint", ep.String(), "issuer", issuer, "sandboxes", ctrl.Len(),
		"admin_socket", cfg.AdminSocket, "startup", time.Since(start).Round(time.Millisecond))

	<-ctx.Done()
	log.Info("identityd stopping: finishing in-flight requests")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	for _, s := range servers {
		if err := s.Shutdown(shutdownCtx); err != nil {
			errs = append(errs, err)
		}
	}
	servers = nil
	log.Info("identityd stopped; attribution programs stay attached")
	return errors.Join(errs...)
}

// LogLevel parses a --log-level value.
func LogLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(strings.ToUpper(s)))
	return l, err
}
