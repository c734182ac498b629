package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// neighbour is an identityd such as one deployed on the host runs: the
// default netns prefix (identityd-), with a sandbox. TestMain keeps it
// running while the package's tests run, so that every daemon they start,
// every rebuild they watch and every fsck they call happens beside it, and
// checks afterwards that its sandbox is still served. It lives in a world
// of its own (host netns, cgroup, state, pins); only its sandbox's netns
// is in the host's identityd- namespace, under an id that names this test
// process (neighbourID), so that a later run removes it if this one dies.
type neighbour struct {
	bin, tmp, hostNetns, cgroups, pins, admin string
	daemon                                    *exec.Cmd
	stderr                                    *sandboxtest.LogBuffer
	sandbox                                   controllers.Created
}

// neighbourID is the neighbour's sandbox id: idt<pid>-nb-<random>.
var neighbourID = regexp.MustCompile(`^idt([0-9]+)-nb-[0-9a-f]+$`)

func startNeighbour(bin string) (n *neighbour, err error) {
	root, err := cgroup2.Root()
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("idt%d-nb", os.Getpid()) // swept by sandboxtest if this process dies
	n = &neighbour{bin: bin, hostNetns: filepath.Join(netnsutil.Dir, name+"-host"), cgroups: filepath.Join(root, name),
		pins: filepath.Join(bpf.DefaultBPFFS, fmt.Sprintf("identityd-test-%d-neighbour", os.Getpid()))}
	defer func() {
		if err != nil {
			if serr := n.stop(); serr != nil {
				err = errors.Join(err, serr)
			}
			n = nil
		}
	}()
	if n.tmp, err = os.MkdirTemp("", "identityd-neighbour-"); err != nil {
		return n, err
	}
	n.admin = filepath.Join(n.tmp, "run", "admin.sock")
	if err := os.Mkdir(n.cgroups, 0o755); err != nil {
		return n, fmt.Errorf("create cgroup: %w", err)
	}
	if err := netnsutil.NewNamed(filepath.Base(n.hostNetns)); err != nil {
		return n, err
	}
	if err := n.setupHost(); err != nil {
		return n, err
	}
	var r [2]byte
	rand.Read(r[:])
	args := []string{"serve",
		"--state-dir", filepath.Join(n.tmp, "state"), "--cgroup-parent", filepath.Join(n.cgroups, "sandboxes"), "--bpf-dir", n.pins,
		"--admin-socket", n.admin, "--host-netns", n.hostNetns, "--bridge", "idtest0",
		"--subnet", netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 150 + r[0]%50, r[1], 0}), 24).String(),
		"--operator-listen", "", "--log-format", "json", "--signing-alg", "EdDSA"} // no --netns-prefix: the default
	n.daemon = exec.Command(filepath.Join(bin, "identityd"), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "IDENTITYD_") {
			n.daemon.Env = append(n.daemon.Env, kv)
		}
	}
	n.stderr = &sandboxtest.LogBuffer{}
	n.daemon.Stderr = n.stderr
	// Dies with the test process, should a test panic before stop: the
	// forking thread is TestMain's, locked (see runTests), which lives as
	// long as the process.
	n.daemon.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := n.daemon.Start(); err != nil {
		return n, fmt.Errorf("start identityd: %w", err)
	}
	api := controllers.NewAdminClient(n.admin)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for api.Do(ctx, "GET", "/v1/sandboxes", nil, nil) != nil {
		if ctx.Err() != nil {
			return n, fmt.Errorf("identityd did not become ready:\n%s", n.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	id := fmt.Sprintf("idt%d-nb-%s", os.Getpid(), suffix())
	if err := api.Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: id, App: "neighbour"}, &n.sandbox); err != nil {
		return n, fmt.Errorf("create sandbox: %w", err)
	}
	if want := filepath.Join(netnsutil.Dir, controllers.NetnsName(controllers.DefaultNetnsPrefix, id)); n.sandbox.Sandbox.NetnsPath != want {
		return n, fmt.Errorf("sandbox netns is %s, want %s (the default prefix)", n.sandbox.Sandbox.NetnsPath, want)
	}
	return n, n.served()
}

// setupHost brings up lo in the neighbour's host netns and makes its
// reverse-path filter strict, as sandboxtest does for a world.
func (n *neighbour) setupHost() error {
	h, err := netnsutil.Handle(n.hostNetns)
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	return netnsutil.TightenRPFilter(n.hostNetns)
}

// served fetches a token from inside the neighbour's sandbox, as its
// workload would, and checks that it names the sandbox.
func (n *neighbour) served() error {
	sb := n.sandbox.Sandbox
	cg, err := os.Open(sb.CgroupPath)
	if err != nil {
		return err
	}
	defer cg.Close()
	ctl := filepath.Join(n.bin, "identityctl")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, ctl, "__exec", "--netns", sb.NetnsPath, "--",
		ctl, "token", "--decode", "--max-attempts", "3", "--max-backoff", "500ms")
	cmd.Env = os.Environ()
	for k, v := range n.sandbox.Env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("fetch a token in sandbox %s: %v\n%s\ndaemon log:\n%s", sb.ID, err, out, n.stderr)
	}
	if !strings.Contains(string(out), `"sandbox_id": "`+sb.ID+`"`) {
		return fmt.Errorf("the token fetched in sandbox %s is not its own:\n%s", sb.ID, out)
	}
	return nil
}

// check tells whether the neighbour is as it was: its daemon running, its
// sandbox listed, served, and its netns and veth still the ones it made.
func (n *neighbour) check() error {
	if err := n.daemon.Process.Signal(syscall.Signal(0)); err != nil {
		return fmt.Errorf("the daemon is gone (%v):\n%s", err, n.stderr)
	}
	var got controllers.Record
	if err := controllers.NewAdminClient(n.admin).Do(context.Background(), "GET", "/v1/sandboxes/"+n.sandbox.Sandbox.ID, nil, &got); err != nil {
		return fmt.Errorf("its sandbox: %w", err)
	}
	cookie, err := netnsutil.Cookie(got.NetnsPath)
	if err != nil {
		return err
	}
	if cookie != n.sandbox.Sandbox.NetnsCookie {
		return fmt.Errorf("netns %s was re-created", got.NetnsPath)
	}
	return n.served()
}

// stop deletes the sandbox through the daemon, stops it, and removes the
// rest of the world, leaving nothing behind.
func (n *neighbour) stop() error {
	var errs []error
	if n.daemon != nil && n.daemon.Process != nil {
		if id := n.sandbox.Sandbox.ID; id != "" {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if err := controllers.NewAdminClient(n.admin).Do(ctx, "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil); err != nil {
				errs = append(errs, fmt.Errorf("delete sandbox %s: %w", id, err))
			}
			cancel()
		}
		n.daemon.Process.Signal(syscall.SIGTERM)
		n.daemon.Wait()
	}
	if p := n.sandbox.Sandbox.NetnsPath; p != "" { // gone unless the delete failed
		errs = append(errs, netnsutil.DeleteNamed(filepath.Base(p)))
	}
	bpf.Uninstall(context.Background(), bpf.Options{PinDir: n.pins})
	errs = append(errs, cgroup2.Kill(n.cgroups), cgroup2.Remove(n.cgroups), netnsutil.DeleteNamed(filepath.Base(n.hostNetns)))
	if n.tmp != "" {
		errs = append(errs, os.RemoveAll(n.tmp))
	}
	return errors.Join(errs...)
}

// sweepNeighbours removes the sandbox netns and the pins of neighbours
// whose test process died before it could stop them: their names hold the
// process's pid. (Their host netns and cgroups have the worlds' form,
// which sandboxtest sweeps.)
func sweepNeighbours() {
	dead := func(pid string) bool {
		n, err := strconv.Atoi(pid)
		return err == nil && n != os.Getpid() && unix.Kill(n, 0) == unix.ESRCH
	}
	names, _ := controllers.ListNetns(controllers.DefaultNetnsPrefix)
	for _, name := range names {
		if m := neighbourID.FindStringSubmatch(strings.TrimPrefix(name, controllers.DefaultNetnsPrefix)); m != nil && dead(m[1]) {
			netnsutil.DeleteNamed(name)
		}
	}
	pins, _ := filepath.Glob(filepath.Join(bpf.DefaultBPFFS, "identityd-test-*-neighbour"))
	for _, p := range pins {
		pid := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(p), "identityd-test-"), "-neighbour")
		if dead(pid) {
			bpf.Uninstall(context.Background(), bpf.Options{PinDir: p})
		}
	}
}
