package daemon

// Zero-downtime restarts and upgrades. A running daemon waits for a
// successor on a socket next to its admin socket (HandoverSocket). A new
// daemon started with the same configuration finds it there and takes the
// listening sockets over instead of binding them (internal/handover):
//
//  1. the running daemon stops what writes shared state (its admin API and
//     its background loops: resync, rotations, token files, key rotation,
//     the attribution watch), so that the successor rebuilds from a state
//     nobody changes under it, and passes its listening sockets on; it goes
//     on serving tokens, discovery and metrics;
//  2. the successor rebuilds from disk and kernel as at any start (replacing
//     changed programs in place, through their links), proves attribution
//     end to end on a private listener, starts serving on the sockets, and
//     says it is ready;
//  3. the running daemon stops accepting, finishes its in-flight requests
//     (keep-alive connections close after their current one) and exits 0.
//
// Both accept on the same sockets for a moment; there is never a moment in
// which neither does, and connections queued in a socket's backlog stay
// there for whichever accepts next. If the successor fails before it is
// ready (or exits), the running daemon resumes its admin API and loops and
// serves on. SIGHUP makes the daemon start its own binary, as it is on disk
// now, as its successor (Config.Upgrade). Under systemd socket activation
// the daemon uses the sockets systemd passes (LISTEN_FDS, named by
// FileDescriptorName=token, operator, admin, discovery).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	sdactivation "github.com/coreos/go-systemd/v22/activation"
	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"

	"github.com/identityd/identityd/internal/handover"
	"github.com/identityd/identityd/internal/netnsutil"
)

// HandoverSocket is where a daemon whose admin socket is adminSocket waits
// for its successor.
func HandoverSocket(adminSocket string) string { return adminSocket + ".handover" }

// The names of the sockets a daemon hands over (and systemd's
// FileDescriptorName= for each).
const (
	sockToken     = "token"
	sockOperator  = "operator"
	sockAdmin     = "admin"
	sockDiscovery = "discovery"
)

// successorReadyTimeout bounds how long a running daemon waits for a
// successor to become ready before it resumes on its own.
const successorReadyTimeout = 2 * time.Minute

// inherited holds the listening sockets a daemon starts with instead of
// binding them: its predecessor's, or systemd's.
type inherited struct {
	files map[string]*os.File
	pred  *handover.Predecessor // nil unless taking over
	from  string                // "predecessor" or "systemd", for the log
}

// takeOver finds the sockets this daemon starts with: systemd's if it
// passed any, else a running daemon's if one answers at the handover
// socket, else none.
func takeOver(ctx context.Context, cfg Config) (*inherited, error) {
	files, err := systemdSockets()
	if err != nil {
		return nil, err
	}
	if len(files) > 0 {
		return &inherited{files: files, from: "systemd"}, nil
	}
	pred, err := handover.Dial(ctx, HandoverSocket(cfg.AdminSocket), cfg.Version)
	if errors.Is(err, handover.ErrNoPredecessor) {
		return &inherited{}, nil
	}
	if err != nil {
		return nil, err
	}
	cfg.Logger.Info("taking over from the running daemon", "pid", pred.PID, "socket", HandoverSocket(cfg.AdminSocket))
	files, err = pred.Receive()
	if err != nil {
		pred.Close()
		return nil, err
	}
	return &inherited{files: files, pred: pred, from: "predecessor"}, nil
}

// systemdSockets returns the sockets of systemd socket activation, by
// FileDescriptorName; one without a known name is an error.
func systemdSockets() (map[string]*os.File, error) {
	files := sdactivation.Files(true)
	if len(files) == 0 {
		return nil, nil
	}
	out := make(map[string]*os.File, len(files))
	for _, f := range files {
		switch f.Name() {
		case sockToken, sockOperator, sockAdmin, sockDiscovery:
			out[f.Name()] = f
		default:
			return nil, fmt.Errorf("socket activation: socket named %q: name each with FileDescriptorName= token, operator, admin or discovery", f.Name())
		}
	}
	return out, nil
}

// listener returns the inherited socket name as a listener, if there is one
// and it is bound where want says (an address; empty or port 0: anywhere).
// A socket bound elsewhere (the configuration changed) is closed, and the
// caller binds afresh.
func (h *inherited) listener(name, want string) (net.Listener, bool, error) {
	f, ok := h.files[name]
	if !ok {
		return nil, false, nil
	}
	delete(h.files, name)
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, false, fmt.Errorf("inherited %s socket: %w", name, err)
	}
	if !boundAt(ln.Addr(), want) {
		ln.Close()
		return nil, false, nil
	}
	return ln, true, nil
}

// boundAt says whether a listener's address is the one configured.
func boundAt(a net.Addr, want string) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return want == "" || a.Name == want
	case *net.TCPAddr:
		if want == "" {
			return true
		}
		w, err := netip.ParseAddrPort(want)
		if err != nil {
			host, port, serr := net.SplitHostPort(want)
			return serr == nil && (host == "" || host == a.IP.String()) && (port == "0" || port == fmt.Sprint(a.Port))
		}
		got := a.AddrPort()
		return w.Addr().Unmap() == got.Addr().Unmap() && (w.Port() == 0 || w.Port() == got.Port())
	}
	return false
}

// closeUnused closes inherited sockets nothing took.
func (h *inherited) closeUnused() {
	for _, f := range h.files {
		f.Close()
	}
	h.files = nil
}

// sockets are the daemon's listening sockets, by name, as bound or
// inherited: what it hands over.
type sockets struct {
	mu  sync.Mutex
	lns map[string]net.Listener
}

func (s *sockets) add(name string, ln net.Listener) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lns == nil {
		s.lns = map[string]net.Listener{}
	}
	s.lns[name] = ln
}

// files returns a duplicate of every socket; the caller closes them.
func (s *sockets) files() (map[string]*os.File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]*os.File, len(s.lns))
	for name, ln := range s.lns {
		fl, ok := ln.(interface{ File() (*os.File, error) })
		if !ok {
			closeFiles(out)
			return nil, fmt.Errorf("hand over the %s socket: a %T cannot be passed on", name, ln)
		}
		f, err := fl.File()
		if err != nil {
			closeFiles(out)
			return nil, fmt.Errorf("hand over the %s socket: %w", name, err)
		}
		out[name] = f
	}
	return out, nil
}

func closeFiles(files map[string]*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// background are the daemon's loops that write shared state; a handover
// stops them while the successor rebuilds, and restarts them if it fails.
type background struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (d *parts) startBackground(ctx context.Context) *background {
	cfg, log := d.cfg, d.cfg.Logger
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { d.ctrl.Run(ctx) })
	wg.Go(func() { d.keys.RotateEvery(ctx, cfg.KeyRotationPeriod, log) })
	if d.fleet != nil {
		wg.Go(func() { retireLoop(ctx, d.keys, d.fleet) })
	}
	wg.Go(func() { d.watch.Run(ctx, cfg.CheckInterval) })
	b := &background{cancel: cancel, done: make(chan struct{})}
	go func() { wg.Wait(); close(b.done) }()
	return b
}

func (b *background) stop() {
	b.cancel()
	<-b.done
}

// proveAttribution runs a successor's first readiness probe before it
// serves on the sockets it took over: on a private listener of its own,
// next to the token endpoint, so that its predecessor, which accepts on the
// shared socket meanwhile, never sees the probe's connection.
func (d *parts) proveAttribution(ctx context.Context) error {
	var ln net.Listener
	bind := func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(d.ep.addr.Addr(), 0).String())
		return err
	}
	var err error
	if d.cfg.HostNetns != "" {
		err = netnsutil.Do(d.cfg.HostNetns, bind)
	} else {
		err = bind()
	}
	if err != nil {
		return fmt.Errorf("readiness probe listener: %w", err)
	}
	private := ln.Addr().(*net.TCPAddr).AddrPort()
	if err := d.in.SetEndpoints([]netip.AddrPort{d.ep.addr, private}); err != nil {
		ln.Close()
		return err
	}
	defer func() {
		if err := d.in.SetEndpoints([]netip.AddrPort{d.ep.addr}); err != nil {
			d.cfg.Logger.Warn("remove the readiness probe's private endpoint", "error", err)
		}
	}()
	srv := d.token.HTTPServer()
	go srv.Serve(d.token.Listener(ln))
	defer srv.Close()
	return d.probe.probeAt(ctx, private.Port())
}

// successors waits for daemons that want to take over and hands over to
// the first that becomes ready; then it ends the daemon (stop). A handover
// that fails leaves this daemon serving as before.
type successors struct {
	d       *parts
	socks   *sockets
	servers *serverSet
	bg      *background
	bgCtx   context.Context
	stop    context.CancelFunc // ends Run, which then drains and returns nil
	g       *errgroup.Group
	// admin is the admin API's server; a handover drains it and a failed
	// one starts another on the same socket.
	admin *served
}

// run accepts successors until ctx ends or one takes over.
func (s *successors) run(ctx context.Context) error {
	log := s.d.cfg.Logger
	l, err := handover.Listen(HandoverSocket(s.d.cfg.AdminSocket))
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer l.Close()
	for {
		succ, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("handover: %w", err)
		}
		if s.handOver(ctx, succ) {
			log.Info("handed over; finishing in-flight requests, then exiting", "successor", succ.PID, "successor_version", succ.Version)
			// Under systemd the successor is the service's main process
			// from now on.
			notifySystemd(fmt.Sprintf("MAINPID=%d", succ.PID))
			s.d.handedOver.Store(true)
			s.stop()
			succ.Released()
			return nil
		}
	}
}

// handOver runs one handover and reports whether the successor took over.
func (s *successors) handOver(ctx context.Context, succ *handover.Successor) bool {
	log := s.d.cfg.Logger.With("successor", succ.PID, "successor_version", succ.Version)
	log.Info("a successor asks to take over: stopping the admin API and background loops, handing over the sockets")
	// Copies first: they keep every socket open (the admin socket
	// included, whose listener the shutdown closes) for the successor, or
	// for this daemon again.
	files, err := s.socks.files()
	if err != nil {
		succ.Refuse(err.Error())
		log.Error("handover refused; serving on", "error", err)
		return false
	}
	s.bg.stop()
	drainCtx, cancel := context.WithTimeout(ctx, shutdownGrace)
	s.admin.drain(drainCtx)
	cancel()
	err = succ.Send(files)
	if err == nil {
		readyCtx, cancel := context.WithTimeout(ctx, successorReadyTimeout)
		err = succ.WaitReady(readyCtx)
		cancel()
	}
	if err == nil {
		closeFiles(files)
		return true
	}
	succ.Close()
	log.Error("handover failed; serving on", "error", err)
	// The admin socket stays open through the copy kept here: connections
	// made meanwhile wait in its backlog for the admin API's return.
	resumeErr := s.resumeAdmin(files[sockAdmin])
	closeFiles(files)
	// The successor's start may have written the state directory (a
	// finished rotation, a sandbox retired): secrets are read from disk
	// again, and the resync catches up with the rest.
	s.d.stores.secrets.Reload()
	s.bg = s.d.startBackground(s.bgCtx)
	if resumeErr != nil {
		log.Error("handover failed and the admin API cannot be served again; stopping", "error", resumeErr)
		s.stop()
	}
	return false
}

// resumeAdmin serves the admin API again on the admin socket, from the
// copy f made for the handover.
func (s *successors) resumeAdmin(f *os.File) error {
	if f == nil {
		return errors.New("no copy of the admin socket")
	}
	ln, err := net.FileListener(f)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	s.socks.add(sockAdmin, ln)
	s.admin = s.servers.serve(s.g, "admin", netutil.LimitListener(ln, serviceConns), s.d.adminServer())
	return nil
}

// upgrades starts this daemon's binary, as it is on disk now, as its own
// successor each time up fires (SIGHUP), and reports a successor that exits
// before it took over.
func upgrades(ctx context.Context, cfg Config, up <-chan struct{}) {
	if up == nil {
		return
	}
	exe, err := os.Executable()
	if err != nil {
		cfg.Logger.Error("upgrade on SIGHUP unavailable: cannot find own binary", "error", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-up:
		}
		cmd := exec.Command(exe, os.Args[1:]...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		for _, kv := range os.Environ() {
			// The successor takes its sockets from this daemon, not
			// from systemd.
			if !strings.HasPrefix(kv, "LISTEN_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		// Its own process group: a signal to this daemon's group (a
		// terminal's ^C) is not the successor's.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			cfg.Logger.Error("upgrade: start the successor", "binary", exe, "error", err)
			continue
		}
		cfg.Logger.Info("upgrade: successor started", "binary", exe, "pid", cmd.Process.Pid)
		go func() {
			err := cmd.Wait()
			if ctx.Err() == nil {
				// This daemon still runs: the successor did not take over.
				cfg.Logger.Error("upgrade: the successor exited before taking over; serving on", "pid", cmd.Process.Pid, "error", err)
			}
		}()
	}
}

// notifySystemd tells systemd (if it started the daemon with
// NOTIFY_SOCKET) a state change; without it this is a no-op.
func notifySystemd(state string) {
	sddaemon.SdNotify(false, state)
}
