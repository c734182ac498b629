package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

// ProbeCommand is the hidden subcommand of identityd that runs the probe's
// client side (see ProbeClient).
const ProbeCommand = "__probe"

// probeCgroupName is the probe's cgroup under the sandbox cgroup parent: no
// sandbox id begins with a dot, so it can be no sandbox's.
const probeCgroupName = ".probe"

// ProbeCgroup is where the readiness probe's client runs, below the sandbox
// cgroup parent; tools that list that directory skip it.
func ProbeCgroup(cgroupParent string) string { return filepath.Join(cgroupParent, probeCgroupName) }

// probeTimeout bounds one probe, from starting its client to the token
// server's answer.
const probeTimeout = 5 * time.Second

// prober proves the whole attribution path the way a sandbox uses it: a
// client process the daemon starts in a cgroup of its own connects to the
// token endpoint, and the kernel's record of that connection, as the token
// server reads it from the accepted socket, must name that cgroup and the
// netns it connected from. The token server hands such connections to
// observe instead of serving them.
type prober struct {
	exe         string // this binary, run as the probe's client
	hostNetns   string
	cgroupDir   string
	netnsCookie uint64
	dest        netip.AddrPort
	source      netip.Addr
	log         *slog.Logger
	failures    *prometheus.CounterVec

	mu      sync.Mutex
	waiting map[netip.AddrPort]chan probeResult
}

type probeResult struct {
	rec bpf.Record
	err error
}

func newProber(cfg Config, endpoint netip.AddrPort, reg prometheus.Registerer) (*prober, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("readiness probe: find own binary: %w", err)
	}
	parent := cfg.CgroupParent
	if parent == "" {
		root, err := cgroup2.Root()
		if err != nil {
			return nil, err
		}
		parent = filepath.Join(root, "identityd")
	}
	p := &prober{exe: exe, hostNetns: cfg.HostNetns, cgroupDir: ProbeCgroup(parent), log: cfg.Logger,
		dest: endpoint, source: endpoint.Addr(), waiting: map[netip.AddrPort]chan probeResult{}}
	if p.dest.Addr().IsUnspecified() {
		// Listening everywhere: loopback reaches it, in the same netns.
		p.dest = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), endpoint.Port())
		p.source = p.dest.Addr()
	}
	if err := os.MkdirAll(p.cgroupDir, 0o755); err != nil {
		return nil, fmt.Errorf("readiness probe: create cgroup %s: %w", p.cgroupDir, err)
	}
	if _, err = cgroup2.ID(p.cgroupDir); err != nil {
		return nil, fmt.Errorf("readiness probe: %w", err)
	}
	nsPath := p.hostNetns
	if nsPath == "" {
		nsPath = "/proc/self/ns/net"
	}
	if p.netnsCookie, err = netnsutil.Cookie(nsPath); err != nil {
		return nil, fmt.Errorf("readiness probe: %w", err)
	}
	p.failures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "identityd_readiness_probe_failures_total",
		Help: "Readiness probes whose connection to the token endpoint the kernel did not attribute to the probe's own cgroup and netns, by reason: no_record, unattested, wrong_caller, probe_error.",
	}, []string{"reason"})
	if err := reg.Register(p.failures); err != nil {
		return nil, fmt.Errorf("register metrics: %w", err)
	}
	return p, nil
}

// close removes the probe's cgroup; its clients are gone by then.
func (p *prober) close() {
	if err := os.Remove(p.cgroupDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		p.log.Warn("remove the readiness probe's cgroup", "cgroup", p.cgroupDir, "error", err)
	}
}

// observe is the token server's Probe hook: it claims the connection from
// a probe client that is waiting for its answer.
func (p *prober) observe(remote netip.AddrPort, rec bpf.Record, err error) bool {
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	p.mu.Lock()
	ch, ok := p.waiting[remote]
	delete(p.waiting, remote)
	p.mu.Unlock()
	if ok {
		ch <- probeResult{rec: rec, err: err}
	}
	return ok
}

// probe runs one probe and says what is wrong with the attribution path, if
// anything; failures are counted and logged.
func (p *prober) probe(ctx context.Context) error {
	return p.probeTo(ctx, p.dest)
}

// probeAt is probe to another port of the token endpoint's address: a
// listener a successor serves before it takes the endpoint over.
func (p *prober) probeAt(ctx context.Context, port uint16) error {
	return p.probeTo(ctx, netip.AddrPortFrom(p.dest.Addr(), port))
}

func (p *prober) probeTo(ctx context.Context, dest netip.AddrPort) error {
	reason, err := p.run(ctx, dest)
	if err != nil {
		p.failures.WithLabelValues(reason).Inc()
		p.log.Error("readiness probe failed: the token endpoint would not attribute a sandbox's connection", "reason", reason, "error", err)
	}
	return err
}

func (p *prober) run(ctx context.Context, dest netip.AddrPort) (string, error) {
	// Pdeathsig fires when the OS thread that forked the client ends, not
	// the process: netnsutil's locked goroutines end their threads, and one
	// of them could be the thread this goroutine forked from. Held locked
	// until the client is waited for, the thread is nobody else's.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	// Made again if missing (a predecessor that handed over removes it
	// when it exits), and its id read each time.
	if err := os.MkdirAll(p.cgroupDir, 0o755); err != nil {
		return "probe_error", fmt.Errorf("create the probe's cgroup: %w", err)
	}
	cgroup, err := os.Open(p.cgroupDir)
	if err != nil {
		return "probe_error", fmt.Errorf("open the probe's cgroup: %w", err)
	}
	defer cgroup.Close()
	cgroupID, err := cgroup2.ID(p.cgroupDir)
	if err != nil {
		return "probe_error", err
	}
	args := []string{ProbeCommand, "--bind", p.source.String(), "--connect", dest.String()}
	if p.hostNetns != "" {
		args = append(args, "--netns", p.hostNetns)
	}
	cmd := exec.CommandContext(ctx, p.exe, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cgroup.Fd()), Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return "probe_error", err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "probe_error", err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return "probe_error", fmt.Errorf("start the probe's client: %w", err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()

	// The client binds first and says where from, so that its connection
	// is known before it can arrive.
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		return "probe_error", fmt.Errorf("probe client: %w (%s)", err, strings.TrimSpace(stderr.String()))
	}
	local, err := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil {
		return "probe_error", fmt.Errorf("probe client said %q: %w", line, err)
	}
	ch := make(chan probeResult, 1)
	p.mu.Lock()
	p.waiting[local] = ch
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.waiting, local)
		p.mu.Unlock()
	}()
	if _, err := io.WriteString(stdin, "connect\n"); err != nil {
		return "probe_error", fmt.Errorf("probe client: %w", err)
	}

	select {
	case <-ctx.Done():
		return "probe_error", fmt.Errorf("no answer from the token endpoint within %s: %w (%s)", probeTimeout, ctx.Err(), strings.TrimSpace(stderr.String()))
	case r := <-ch:
		switch {
		case errors.Is(r.err, bpf.ErrUnattested):
			return "unattested", fmt.Errorf("the probe's connection from %s: %w", local, r.err)
		case r.err != nil:
			return "no_record", fmt.Errorf("the probe's connection from %s: %w", local, r.err)
		case r.rec.CgroupID != cgroupID || r.rec.NetnsCookie != p.netnsCookie:
			return "wrong_caller", fmt.Errorf("the probe's connection from %s was attributed to cgroup %d, netns %d; it came from cgroup %d (%s), netns %d",
				local, r.rec.CgroupID, r.rec.NetnsCookie, cgroupID, p.cgroupDir, p.netnsCookie)
		}
		return "", nil
	}
}

// ProbeClient is the probe's client side, run by the daemon as
// `identityd __probe` in the probe's cgroup: it binds a TCP socket to bind
// (in the netns at netnsPath, if set), prints the local address, connects to
// dest when told on stdin, and holds the connection until stdin closes.
func ProbeClient(netnsPath string, bind netip.Addr, dest netip.AddrPort, stdin io.Reader, stdout io.Writer) error {
	var fd int
	open := func() error {
		family := unix.AF_INET
		if bind.Is6() {
			family = unix.AF_INET6
		}
		var err error
		if fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		return nil
	}
	var err error
	if netnsPath != "" {
		err = netnsutil.Do(netnsPath, open)
	} else {
		err = open()
	}
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), "probe")
	defer f.Close()
	sa := func(ap netip.AddrPort) unix.Sockaddr {
		if ap.Addr().Is4() {
			return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
		}
		return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	}
	if err := unix.Bind(fd, sa(netip.AddrPortFrom(bind, 0))); err != nil {
		return fmt.Errorf("bind %s: %w", bind, err)
	}
	local, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("getsockname: %w", err)
	}
	var port int
	switch a := local.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	fmt.Fprintln(stdout, netip.AddrPortFrom(bind, uint16(port)))
	in := bufio.NewReader(stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return fmt.Errorf("wait to be told to connect: %w", err)
	}
	if err := unix.Connect(fd, sa(dest)); err != nil {
		return fmt.Errorf("connect to %s: %w", dest, err)
	}
	// Held open until the daemon has its answer (the server closes its
	// side at once, which this end need not notice).
	io.Copy(io.Discard, in)
	return nil
}
