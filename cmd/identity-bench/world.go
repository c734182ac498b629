package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// tb lets sandboxtest, which reports to a testing.TB, build the world of a
// program: cleanups are kept and run by cleanup, and a fatal error ends the
// goroutine that called it, as in a test. The embedded TB is nil: only the
// methods below are called by sandboxtest.
type tb struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	errs     []error
}

func (t *tb) Helper()                   {}
func (t *tb) Name() string              { return "identity-bench" }
func (t *tb) Log(args ...any)           {}
func (t *tb) Logf(string, ...any)       {}
func (t *tb) Errorf(f string, a ...any) { t.fail(fmt.Errorf(f, a...)) }
func (t *tb) Error(args ...any)         { t.fail(errors.New(fmt.Sprint(args...))) }
func (t *tb) Fatalf(f string, a ...any) { t.fail(fmt.Errorf(f, a...)); runtime.Goexit() }
func (t *tb) Fatal(args ...any)         { t.fail(errors.New(fmt.Sprint(args...))); runtime.Goexit() }
func (t *tb) Skip(args ...any)          { t.Fatal(args...) }
func (t *tb) Skipf(f string, a ...any)  { t.Fatalf(f, a...) }
func (t *tb) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

func (t *tb) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.errs = append(t.errs, err)
}

func (t *tb) err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return errors.Join(t.errs...)
}

// do runs f on a goroutine of its own, where Fatalf may end it, and
// returns the errors reported meanwhile.
func (t *tb) do(f func()) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
	return t.err()
}

// cleanup runs the cleanups, last registered first.
func (t *tb) cleanup() error {
	t.mu.Lock()
	fs := t.cleanups
	t.cleanups = nil
	t.errs = nil
	t.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		t.do(fs[i])
	}
	return t.err()
}

// harness is the closed world with one identityd in it.
type harness struct {
	tb    *tb
	world *sandboxtest.World
	bin   string // identityd
	self  string // this binary, for the load clients
	args  []string
	// Names unique to the run, in the form sandboxtest's sweep recognises
	// (idt<pid>-...), so that a killed run's leftovers go with the next.
	dir, state, admin, pins, credsMount, netnsPrefix, cgroups string
	router                                                    netip.Addr
	alg                                                       string

	daemon    *exec.Cmd
	daemonLog *os.File
	exited    chan struct{}
	// held is the token endpoint's listening socket when this process
	// holds it for the daemon (--hold-socket), as systemd would.
	held *os.File
	// pprof is identityd's profile address with --profile.
	pprof string

	// sandboxes in the order of their ids (b00000, ...). Only the main
	// goroutine changes it, under sbMu, which abortOnCancel also takes.
	sandboxes []*benchSandbox
	sbMu      sync.Mutex
	neighMu   sync.Mutex
}

// benchSandbox is one sandbox identityd made, with the load client running
// in it.
type benchSandbox struct {
	created controllers.Created
	addr    netip.Addr
	url     string // identityd's token URL, as the sandbox was told
	secret  string
	client  *loadClient
}

func suffix() string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("%x", b)
}

// newHarness builds the world. Its removal is registered before anything
// is made, so h.close removes whatever exists.
func newHarness(r *runCmd) (*harness, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root: creates network namespaces and cgroups, and runs identityd")
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	bin := r.Identityd
	if bin == "" {
		bin = filepath.Join(filepath.Dir(self), "identityd")
		if _, err := os.Stat(bin); err != nil {
			if bin, err = exec.LookPath("identityd"); err != nil {
				return nil, errors.New("identityd not found next to identity-bench or on PATH (give --identityd)")
			}
		}
	}
	sweepDeadRuns(bin)
	h := &harness{tb: &tb{}, bin: bin, self: self, alg: r.Alg}
	if err := h.tb.do(func() { h.world = sandboxtest.New(h.tb) }); err != nil {
		h.close()
		return nil, fmt.Errorf("build the closed world: %w", err)
	}
	sfx := suffix()
	if h.dir, err = os.MkdirTemp("", "identity-bench-"); err != nil {
		h.close()
		return nil, err
	}
	h.state = filepath.Join(h.dir, "state")
	h.admin = filepath.Join(h.dir, "run", "admin.sock")
	h.pins = filepath.Join("/sys/fs/bpf", fmt.Sprintf("identityd-bench-%d-%s", os.Getpid(), sfx))
	h.credsMount = fmt.Sprintf("/run/idt%d-b%s/credentials", os.Getpid(), sfx)
	h.netnsPrefix = fmt.Sprintf("idt%d-b%s-", os.Getpid(), sfx)
	h.cgroups = filepath.Join(h.world.CgroupDir, "sandboxes")
	// A /20 of 10.200.0.0/13: apart from sandboxtest's and the daemon
	// tests' ranges, room for 4,000 sandboxes.
	var b [2]byte
	rand.Read(b[:])
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 200 + b[0]%8, b[1] & 0xf0, 0}), 20)
	h.router = subnet.Addr().Next()
	conns := max(4096, r.Sandboxes*r.Clients*2+256)
	h.args = []string{"serve",
		"--state-dir", h.state, "--cgroup-parent", h.cgroups, "--bpf-dir", h.pins,
		"--admin-socket", h.admin, "--host-netns", h.world.HostNetns, "--netns-prefix", h.netnsPrefix,
		"--bridge", "idbench0", "--subnet", subnet.String(), "--operator-listen", "",
		"--log-format", "json", "--signing-alg", r.Alg, "--credentials-mount", h.credsMount,
		// The benchmark measures the server, not the per-sandbox limits.
		"--rate-limit", "1000000", "--burst", "1000000",
		"--max-conns", fmt.Sprint(conns), "--max-conns-per-sandbox", fmt.Sprint(r.Clients*2 + 16),
		"--max-other-conns", "256",
	}
	if r.Profile != "" {
		if err := os.MkdirAll(r.Profile, 0o755); err != nil {
			h.close()
			return nil, fmt.Errorf("profile directory: %w", err)
		}
		port, err := freeLoopbackPort()
		if err != nil {
			h.close()
			return nil, err
		}
		h.pprof = fmt.Sprintf("127.0.0.1:%d", port)
		h.args = append(h.args, "--operator-listen", h.pprof, "--pprof")
	}
	h.args = append(h.args, r.DaemonArgs...)
	if r.HoldSocket {
		if h.held, err = h.holdTokenSocket(); err != nil {
			h.close()
			return nil, err
		}
	}
	return h, nil
}

// freeLoopbackPort is a port nothing listens on now, on 127.0.0.1.
func freeLoopbackPort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// profile writes a CPU profile of identityd over the next d (whole
// seconds, at least one) to file, in the background; wait returns when it
// is written.
func (h *harness) profile(ctx context.Context, d time.Duration, file string) (wait func() error) {
	done := make(chan error, 1)
	go func() {
		secs := max(int((d+time.Second-1)/time.Second), 1)
		done <- func() error {
			req, err := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", h.pprof, secs), nil)
			if err != nil {
				return err
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("profile identityd: %w", err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("profile identityd: %s", resp.Status)
			}
			f, err := os.Create(file)
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, resp.Body); err != nil {
				f.Close()
				return fmt.Errorf("write profile %s: %w", file, err)
			}
			return f.Close()
		}()
	}()
	return func() error { return <-done }
}

// holdTokenSocket binds the token endpoint's address in the world's host
// netns the way deploy/identityd.socket does (FreeBind: the router address
// appears when identityd first starts).
func (h *harness) holdTokenSocket() (*os.File, error) {
	var f *os.File
	err := h.world.Do(func() error {
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_IP, unix.IP_FREEBIND, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
		ln, err := lc.Listen(context.Background(), "tcp4", netip.AddrPortFrom(h.router, controllers.DefaultTokenPort).String())
		if err != nil {
			return err
		}
		defer ln.Close()
		f, err = ln.(*net.TCPListener).File()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("hold the token endpoint socket: %w", err)
	}
	return f, nil
}

// sweepDeadRuns removes the pins and credentials mount points of earlier
// runs that were killed before their cleanup (their netns and cgroups carry
// the dead pid too, and sandboxtest.New sweeps those).
func sweepDeadRuns(bin string) {
	dead := func(name, prefix string) bool {
		rest, ok := strings.CutPrefix(name, prefix)
		if !ok {
			return false
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		return err == nil && pid != os.Getpid() && syscall.Kill(pid, 0) == syscall.ESRCH
	}
	if entries, err := os.ReadDir("/sys/fs/bpf"); err == nil {
		for _, e := range entries {
			if dead(e.Name(), "identityd-bench-") {
				exec.Command(bin, "uninstall", "--bpf-dir", filepath.Join("/sys/fs/bpf", e.Name())).Run()
			}
		}
	}
	if entries, err := os.ReadDir("/run"); err == nil {
		for _, e := range entries {
			// idt<pid>-b<suffix>: a bench run's (tests' are idt<pid>-<hex>).
			// Only empty directories: never descend into a mount.
			if rest, _, ok := strings.Cut(e.Name(), "-b"); ok && dead(rest+"-", "idt") {
				os.Remove(filepath.Join("/run", e.Name(), "credentials"))
				os.Remove(filepath.Join("/run", e.Name()))
			}
		}
	}
}

// startDaemon runs identityd and waits until its admin API answers (after
// its rebuild, with the token endpoint serving). It is called from the
// main goroutine, whose thread lives as long as the process (Pdeathsig).
func (h *harness) startDaemon(ctx context.Context) (time.Duration, error) {
	if err := os.MkdirAll(h.dir, 0o700); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(filepath.Join(h.dir, "daemon.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	h.daemonLog = logf
	h.daemon = exec.Command(h.bin, h.args...)
	if h.held != nil {
		// As systemd starts a socket-activated service: LISTEN_PID is the
		// daemon's own pid, which only a shell exec'ing it knows.
		h.daemon = exec.Command("sh", append([]string{"-c", `export LISTEN_PID=$$; exec "$0" "$@"`, h.bin}, h.args...)...)
		h.daemon.Env = append(os.Environ(), "LISTEN_FDS=1", "LISTEN_FDNAMES=token")
		h.daemon.ExtraFiles = []*os.File{h.held}
	}
	h.daemon.Stdout, h.daemon.Stderr = logf, logf
	h.daemon.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	begin := time.Now()
	if err := h.daemon.Start(); err != nil {
		return 0, fmt.Errorf("start identityd: %w", err)
	}
	exited := make(chan struct{})
	h.exited = exited
	go func(cmd *exec.Cmd) { cmd.Wait(); close(exited) }(h.daemon)
	api := controllers.NewAdminClient(h.admin)
	for {
		if err := api.Do(ctx, "GET", "/v1/sandboxes", nil, nil); err == nil {
			return time.Since(begin), nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-exited:
			return 0, fmt.Errorf("identityd exited during start:\n%s", h.logTail())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Since(begin) > 60*time.Second {
			return 0, fmt.Errorf("identityd not ready within 60s:\n%s", h.logTail())
		}
	}
}

// killDaemon stops identityd with sig and waits for it.
func (h *harness) killDaemon(sig syscall.Signal) {
	if h.daemon == nil || h.daemon.Process == nil {
		return
	}
	h.daemon.Process.Signal(sig)
	<-h.exited
	h.daemon = nil
	if h.daemonLog != nil {
		h.daemonLog.Close()
		h.daemonLog = nil
	}
}

func (h *harness) logTail() string {
	b, _ := os.ReadFile(filepath.Join(h.dir, "daemon.log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-15):], "\n")
}

// createSandboxes makes sandboxes through the admin API until there are n,
// parallel requests at a time, and starts a load client in each. It
// returns those it made.
func (h *harness) createSandboxes(ctx context.Context, n, parallel int, pinNeighbours bool, progress func(string)) ([]*benchSandbox, error) {
	api := controllers.NewAdminClient(h.admin)
	from := len(h.sandboxes)
	out := make([]*benchSandbox, max(n-from, 0))
	var made atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(parallel, 1))
	for i := range out {
		g.Go(func() error {
			var c controllers.Created
			id := fmt.Sprintf("b%05d", from+i)
			if err := api.Do(gctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: id, App: "bench", Org: "bench"}, &c); err != nil {
				return fmt.Errorf("create sandbox %s: %w", id, err)
			}
			sb := &benchSandbox{created: c, url: c.Env["MIREN_IDENTITY_TOKEN_URL"], secret: c.Env["MIREN_IDENTITY_TOKEN_SECRET"]}
			if len(c.Sandbox.Addresses) == 0 || sb.url == "" || sb.secret == "" {
				return fmt.Errorf("sandbox %s: no address, token URL or secret in %+v", id, c)
			}
			for _, p := range c.Sandbox.Addresses {
				if p.Addr().Is4() {
					sb.addr = p.Addr()
				}
			}
			if pinNeighbours {
				if err := h.pinNeighbours(sb); err != nil {
					return fmt.Errorf("sandbox %s: %w", id, err)
				}
			}
			lc, err := startLoadClient(h.self, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)
			if err != nil {
				return fmt.Errorf("sandbox %s: %w", id, err)
			}
			sb.client = lc
			out[i] = sb
			progress(fmt.Sprintf("sandboxes: %d/%d created, clients started", made.Add(1), len(out)))
			return nil
		})
	}
	err := g.Wait()
	h.sbMu.Lock()
	defer h.sbMu.Unlock()
	// With err set the run ends: what was made is kept for the cleanup.
	var fresh []*benchSandbox
	for _, sb := range out {
		if sb != nil {
			h.sandboxes = append(h.sandboxes, sb)
			fresh = append(fresh, sb)
		}
	}
	return fresh, err
}

// deleteSandboxes stops the load clients of the sandboxes past the first n
// and deletes those sandboxes through the admin API, parallel requests at a
// time. It returns those it deleted.
func (h *harness) deleteSandboxes(ctx context.Context, n, parallel int, progress func(string)) ([]*benchSandbox, error) {
	if n >= len(h.sandboxes) {
		return nil, nil
	}
	api := controllers.NewAdminClient(h.admin)
	gone := slices.Clone(h.sandboxes[n:])
	var done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(parallel, 1))
	for _, sb := range gone {
		g.Go(func() error {
			sb.client.close()
			if err := api.Do(gctx, "DELETE", "/v1/sandboxes/"+sb.created.Sandbox.ID, nil, nil); err != nil {
				return fmt.Errorf("delete sandbox %s: %w", sb.created.Sandbox.ID, err)
			}
			progress(fmt.Sprintf("sandboxes: %d/%d deleted", done.Add(1), len(gone)))
			return nil
		})
	}
	err := g.Wait()
	if err != nil {
		// Some may be left: the cleanup removes whatever has the run's
		// prefix.
		return nil, err
	}
	h.sbMu.Lock()
	h.sandboxes = h.sandboxes[:n]
	h.sbMu.Unlock()
	return gone, nil
}

// pinNeighbours gives both ends of the sandbox's veth a permanent
// neighbour entry for the other. The kernel's IPv4 neighbour table is one
// for all network namespaces, and at gc_thresh3 (1,024 by default) it
// overflows: with a thousand sandboxes, two dynamic entries each, new
// connections fail ("no route to host") or stall, here and in every other
// namespace of the machine. Permanent entries are not counted against it.
func (h *harness) pinNeighbours(sb *benchSandbox) error {
	h.neighMu.Lock()
	defer h.neighMu.Unlock()
	host, err := netnsutil.Handle(h.world.HostNetns)
	if err != nil {
		return err
	}
	defer host.Close()
	inner, err := netnsutil.Handle(sb.created.Sandbox.NetnsPath)
	if err != nil {
		return err
	}
	defer inner.Close()
	veth, err := host.LinkByName(sb.created.Sandbox.Veth)
	if err != nil {
		return fmt.Errorf("host veth %s: %w", sb.created.Sandbox.Veth, err)
	}
	eth0, err := inner.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("sandbox eth0: %w", err)
	}
	if err := host.NeighSet(&netlink.Neigh{LinkIndex: veth.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: sb.addr.AsSlice(), HardwareAddr: eth0.Attrs().HardwareAddr}); err != nil {
		return fmt.Errorf("pin neighbour %s on %s: %w", sb.addr, sb.created.Sandbox.Veth, err)
	}
	if err := inner.NeighSet(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: h.router.AsSlice(), HardwareAddr: veth.Attrs().HardwareAddr}); err != nil {
		return fmt.Errorf("pin neighbour %s in the sandbox: %w", h.router, err)
	}
	return nil
}

// close removes everything: clients, daemon, sandboxes' netns, pins,
// credentials mount point, state, and the world (cgroups and host netns).
func (h *harness) close() error {
	var errs []error
	for _, sb := range h.sandboxes {
		sb.client.close()
	}
	h.killDaemon(syscall.SIGKILL)
	if h.held != nil {
		h.held.Close()
	}
	if h.netnsPrefix != "" {
		names, err := controllers.ListNetns(h.netnsPrefix)
		errs = append(errs, err)
		for _, name := range names {
			errs = append(errs, netnsutil.DeleteNamed(name))
		}
	}
	if h.pins != "" {
		if out, err := exec.Command(h.bin, "uninstall", "--bpf-dir", h.pins).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("identityd uninstall: %v: %s", err, out))
		}
	}
	if h.credsMount != "" {
		os.RemoveAll(filepath.Dir(h.credsMount)) // empty directories: nothing mounts there
	}
	if h.dir != "" {
		errs = append(errs, os.RemoveAll(h.dir))
	}
	errs = append(errs, h.tb.cleanup())
	return errors.Join(errs...)
}

// loadClient is a client process running in a sandbox's cgroup and netns.
type loadClient struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
	once  sync.Once
}

func startLoadClient(self, cgroupDir, netnsPath string) (*loadClient, error) {
	cg, err := os.Open(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer cg.Close()
	// In the sandbox's cgroup from its first instruction (CLONE_INTO_CGROUP).
	cmd, stdin, out, err := startInNetns(self, "__client", netnsPath, &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}, "GOMAXPROCS=2")
	if err != nil {
		return nil, fmt.Errorf("start load client: %w", err)
	}
	return &loadClient{cmd: cmd, stdin: stdin, out: out}, nil
}

// startInNetns starts this binary's hidden command in the netns at
// netnsPath (enterNetnsIfAsked re-executes it there), talking over its
// stdin and stdout; its stdin closing tells it to end.
func startInNetns(self, command, netnsPath string, attr *syscall.SysProcAttr, env ...string) (*exec.Cmd, io.WriteCloser, *bufio.Reader, error) {
	cmd := exec.Command(self, command)
	cmd.Env = append(append(os.Environ(), netnsEnv+"="+netnsPath), env...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = attr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, err
	}
	// The default buffer: a report's line may be longer (every latency of
	// a measurement), and ReadBytes collects it whole; a megabyte each,
	// as before, cost identity-bench 1 GB for 1,000 idle clients, and
	// --grow-to makes them anew every other round.
	return cmd, stdin, bufio.NewReader(stdout), nil
}

// send hands the client a job.
func (c *loadClient) send(j job) error {
	b, err := json.Marshal(j)
	if err != nil {
		return err
	}
	_, err = c.stdin.Write(append(b, '\n'))
	return err
}

// stop ends a "keep" job.
func (c *loadClient) stop() error {
	_, err := io.WriteString(c.stdin, "stop\n")
	return err
}

// wait reads the client's reports until the final one, passing progress
// counts to progress.
func (c *loadClient) wait(progress func(report)) (report, error) {
	for {
		line, err := c.out.ReadBytes('\n')
		if err != nil {
			return report{}, fmt.Errorf("read load client report: %w", err)
		}
		var r report
		if err := json.Unmarshal(line, &r); err != nil {
			return report{}, fmt.Errorf("decode load client report: %w", err)
		}
		if !r.Done {
			progress(r)
			continue
		}
		if r.Error != "" && r.Failures == 0 {
			return r, errors.New(r.Error)
		}
		return r, nil
	}
}

func (c *loadClient) close() {
	if c == nil {
		return
	}
	c.once.Do(func() {
		c.stdin.Close()
		c.cmd.Process.Kill()
		c.cmd.Wait()
	})
}

// abortOnCancel kills every load client when ctx ends (^C), so that
// nothing waits for their jobs to run out; the cleanup follows.
func (h *harness) abortOnCancel(ctx context.Context) (stop func() bool) {
	return context.AfterFunc(ctx, func() {
		h.sbMu.Lock()
		defer h.sbMu.Unlock()
		for _, sb := range h.sandboxes {
			sb.client.close()
		}
	})
}
