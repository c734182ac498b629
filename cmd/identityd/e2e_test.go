package main

import (
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
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
	os.Exit(runTests(m))
}

// runTests runs the package's tests beside an identityd with the default
// netns prefix (see neighbour), and removes what they built.
func runTests(m *testing.M) int {
	defer func() {
		if binDir != "" {
			os.RemoveAll(binDir)
		}
	}()
	if os.Geteuid() != 0 {
		return m.Run()
	}
	// The neighbour's daemon is killed when the thread that started it
	// ends (Pdeathsig): this one, kept until the process exits.
	runtime.LockOSThread()
	sweepNeighbours()
	bin, err := buildBinaries()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	n, err := startNeighbour(bin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "start the neighbour identityd: %v\n", err)
		return 1
	}
	code := m.Run()
	// Whatever the tests did, the neighbour's sandbox is served as before.
	if err := n.check(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: the neighbour identityd (default netns prefix) was disturbed by the tests: %v\n", err)
		code = 1
	}
	if err := n.stop(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: clean up the neighbour identityd: %v\n", err)
		code = 1
	}
	return code
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds identityd and identityctl once per test process, into a
// directory any user can read (the not-root test runs the daemon as nobody).
func binaries(t *testing.T) string {
	t.Helper()
	dir, err := buildBinaries()
	require.NoError(t, err)
	return dir
}

func buildBinaries() (string, error) {
	buildOnce.Do(func() {
		if binDir, buildErr = os.MkdirTemp("", "identityd-e2e-"); buildErr != nil {
			return
		}
		os.Chmod(binDir, 0o755)
		cmd := exec.Command("go", "build", "-o", binDir+"/", "github.com/identityd/identityd/cmd/...")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	return binDir, buildErr
}

// world is a closed network world with one identityd configuration in it.
type world struct {
	t        *testing.T
	w        *sandboxtest.World
	bin      string
	args     []string
	state    string
	admin    string
	pins     string
	operator string
	// cgroups is the daemon's --cgroup-parent, netnsPrefix its
	// --netns-prefix: unique to the world, so that its daemon, its fsck
	// and its cleanup see nothing of other tests' daemons or of an
	// identityd running on the host.
	cgroups     string
	netnsPrefix string
	// credsMount is the daemon's --credentials-mount: a mount point
	// (made on the host by identityctl run) unique to the world.
	credsMount string
	// made holds the netns of the sandboxes create made, which the
	// cleanup removes even when the prefix is not the world's own.
	made   []string
	daemon *exec.Cmd
	stderr *sandboxtest.LogBuffer
}

func newWorld(t *testing.T) *world {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs identityd")
	}
	w := sandboxtest.New(t)
	var r [2]byte
	rand.Read(r[:])
	tmp := t.TempDir()
	ow := &world{t: t, w: w, bin: binaries(t), state: filepath.Join(tmp, "state"), admin: filepath.Join(tmp, "run", "admin.sock"),
		// One pin directory per world: two daemons sharing one would share
		// their maps and endpoints.
		pins: filepath.Join(bpf.DefaultBPFFS, fmt.Sprintf("identityd-test-%d-%s-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "-"), suffix()))}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ow.operator = ln.Addr().String()
	ln.Close()
	ow.cgroups = filepath.Join(w.CgroupDir, "sandboxes")
	ow.netnsPrefix = testNetnsPrefix()
	// Below /run, not the test's 0700 temporary directory: a confined
	// workload must be able to reach it.
	ow.credsMount = fmt.Sprintf("/run/idt%d-%s/credentials", os.Getpid(), suffix())
	ow.args = []string{"serve",
		"--state-dir", ow.state, "--cgroup-parent", ow.cgroups, "--bpf-dir", ow.pins,
		"--admin-socket", ow.admin, "--host-netns", w.HostNetns, "--netns-prefix", ow.netnsPrefix, "--bridge", "idtest0",
		"--subnet", netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 150 + r[0]%50, r[1], 0}), 24).String(),
		"--operator-listen", ow.operator, "--log-level", "debug", "--log-format", "json",
		"--rate-limit", "1000", "--burst", "1000", "--signing-alg", "EdDSA", "--credentials-mount", ow.credsMount}
	t.Cleanup(ow.cleanup)
	return ow
}

// cleanup stops the daemon and removes its netns and pins.
func (ow *world) cleanup() {
	ow.kill(syscall.SIGKILL)
	for _, p := range ow.made {
		if err := netnsutil.DeleteNamed(filepath.Base(p)); err != nil {
			ow.t.Errorf("remove the world's netns: %v", err)
		}
	}
	if ow.netnsPrefix != controllers.DefaultNetnsPrefix { // the host's, not the world's
		if err := removeNetns(ow.netnsPrefix); err != nil {
			ow.t.Errorf("remove the world's netns: %v", err)
		}
	}
	bpf.Uninstall(context.Background(), bpf.Options{PinDir: ow.pins})
	os.RemoveAll(filepath.Dir(ow.credsMount)) // empty directories: mounts are the workloads' own
}

// testNetnsPrefix is a netns prefix for one daemon of this test process.
// It has the form of the test worlds' names, idt<pid>-..., so that a later
// test process sweeps what a killed one left; the "d" keeps it apart from
// the worlds' own names, which go on with a number.
func testNetnsPrefix() string { return fmt.Sprintf("idt%d-d%s-", os.Getpid(), suffix()) }

// removeNetns deletes every netns a daemon with prefix may have made.
func removeNetns(prefix string) error {
	names, err := controllers.ListNetns(prefix)
	for _, name := range names {
		err = errors.Join(err, netnsutil.DeleteNamed(name))
	}
	return err
}

// fsck runs identityctl fsck on the world's daemon's state, cgroups and
// netns, and returns its output; an error means it found problems.
func (ow *world) fsck() (string, error) {
	out, err := exec.Command(filepath.Join(ow.bin, "identityctl"), "fsck", "--state-dir", ow.state,
		"--cgroup-parent", ow.cgroups, "--netns-prefix", ow.netnsPrefix).CombinedOutput()
	return string(out), err
}

func must[T any](v T, _ error) T { return v }

// start runs identityd and waits until its admin API answers, which it
// does only after the rebuild, with the token endpoint already serving.
func (ow *world) start() time.Duration {
	ow.t.Helper()
	ow.daemon = exec.Command(filepath.Join(ow.bin, "identityd"), ow.args...)
	ow.stderr = &sandboxtest.LogBuffer{}
	ow.daemon.Stdout, ow.daemon.Stderr = io.Discard, ow.stderr
	begin := time.Now()
	require.NoError(ow.t, ow.daemon.Start())
	api := controllers.NewAdminClient(ow.admin)
	require.Eventually(ow.t, func() bool {
		return api.Do(context.Background(), "GET", "/v1/sandboxes", nil, nil) == nil
	}, 30*time.Second, 10*time.Millisecond, "identityd did not become ready")
	return time.Since(begin)
}

// kill stops the daemon with sig and returns its exit code.
func (ow *world) kill(sig syscall.Signal) int {
	if ow.daemon == nil || ow.daemon.Process == nil {
		return -1
	}
	ow.daemon.Process.Signal(sig)
	ow.daemon.Wait()
	code := ow.daemon.ProcessState.ExitCode()
	ow.daemon = nil
	return code
}

func (ow *world) create(id, app string) controllers.Created {
	ow.t.Helper()
	var c controllers.Created
	require.NoError(ow.t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "POST", "/v1/sandboxes",
		controllers.CreateRequest{ID: id, App: app}, &c))
	ow.made = append(ow.made, c.Sandbox.NetnsPath)
	return c
}

// fetch asks for a token from inside the sandbox, as its workload would,
// and returns the claims.
func fetch(t *testing.T, c *sandboxtest.Client, env map[string]string) map[string]any {
	t.Helper()
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: env["MIREN_IDENTITY_TOKEN_URL"],
		Header: map[string]string{"Authorization": "Bearer " + env["MIREN_IDENTITY_TOKEN_SECRET"]}})
	require.NoError(t, err)
	require.Equal(t, 200, resps[0].Status, resps[0].Body)
	return claimsOf(t, resps[0].Body)
}

func suffix() string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("%x", b)
}

// TestUninstallCommand: after the daemon stops, `identityd uninstall`
// detaches the programs and removes every pin; running it again is a no-op.
func TestUninstallCommand(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	require.Equal(t, 0, ow.kill(syscall.SIGTERM))
	require.DirExists(t, filepath.Join(ow.pins, "links"))
	type attached struct {
		attach ebpf.AttachType
		prog   ebpf.ProgramID
	}
	var progs []attached
	for _, e := range must(os.ReadDir(filepath.Join(ow.pins, "links"))) {
		l, err := link.LoadPinnedLink(filepath.Join(ow.pins, "links", e.Name()), nil)
		require.NoError(t, err)
		info, err := l.Info()
		l.Close()
		require.NoError(t, err)
		progs = append(progs, attached{ebpf.AttachType(info.Cgroup().AttachType), info.Program})
	}
	require.Len(t, progs, 5, "connect4, connect6, sockops, getpeername4, getpeername6")
	root, err := cgroup2.Root()
	require.NoError(t, err)
	isAttached := func(a attached) bool {
		cg, err := os.Open(root)
		require.NoError(t, err)
		defer cg.Close()
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: a.attach})
		require.NoError(t, err)
		for _, p := range res.Programs {
			if p.ID == a.prog {
				return true
			}
		}
		return false
	}
	for _, a := range progs {
		require.True(t, isAttached(a), "attached while the daemon is stopped: %v", a)
	}

	for range 2 {
		out, err := exec.Command(filepath.Join(ow.bin, "identityd"), "uninstall", "--bpf-dir", ow.pins).CombinedOutput()
		require.NoError(t, err, "%s", out)
		assert.NoDirExists(t, ow.pins)
		for _, a := range progs {
			assert.False(t, isAttached(a), "still attached after uninstall: %v", a)
		}
	}
}

// TestRepairsProgramsRemovedWhileRunning: `identityd uninstall` run while the
// daemon serves detaches the programs and removes the pins; the daemon
// notices within its check interval, attaches the programs again with the
// same maps, and the sandbox is served again, as itself.
func TestRepairsProgramsRemovedWhileRunning(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	require.Equal(t, sb.Sandbox.ID, fetch(t, client, sb.Env)["sandbox_id"])

	out, err := exec.Command(filepath.Join(ow.bin, "identityd"), "uninstall", "--bpf-dir", ow.pins).CombinedOutput()
	require.NoError(t, err, "%s", out)
	removed := time.Now()
	require.Eventually(t, func() bool {
		status, body := get(t, client, sb.Env, sb.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		return status == 200 && claimsOf(t, body)["sandbox_id"] == sb.Sandbox.ID
	}, 15*time.Second, 100*time.Millisecond, "not served again:\n%s", ow.stderr)
	t.Logf("served again %s after the uninstall", time.Since(removed).Round(time.Millisecond))
	assert.Contains(t, ow.stderr.String(), "attribution programs attached again")
	assert.DirExists(t, filepath.Join(ow.pins, "links"))

	resp, err := http.Get("http://" + ow.operator + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(body), `identityd_attribution_repairs_total{result="ok"} 1`)
	// Ready again once a probe after the repair passed (the next round).
	assert.Eventually(t, func() bool {
		resp, err := http.Get("http://" + ow.operator + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}, 10*time.Second, 50*time.Millisecond)
}

// TestOriginalBugRepro: a sandbox that uses workload identity keeps getting
// tokens, as the same sandbox, across ten restarts of real identityd
// processes, alternately stopped with SIGTERM and killed with SIGKILL, and
// a sandbox started while the daemon was down works once it is back.
func TestOriginalBugRepro(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	first := fetch(t, client, sb.Env)
	assert.Equal(t, sb.Sandbox.ID, first["sandbox_id"])

	for i := range 10 {
		sig := []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL}[i%2]
		code := ow.kill(sig)
		if sig == syscall.SIGTERM {
			assert.Equal(t, 0, code, "SIGTERM is a clean exit:\n%s", ow.stderr)
			assert.DirExists(t, filepath.Join(ow.pins, "links"), "the programs stay pinned and attached")
		}
		took := ow.start()
		got := fetch(t, client, sb.Env)
		assert.Equal(t, first["sub"], got["sub"], "restart %d (%s)", i+1, sig)
		t.Logf("restart %d after %s: ready in %s, token for %s", i+1, sig, took.Round(time.Millisecond), got["sandbox_id"])
	}

	// A sandbox created earlier, whose workload starts while no daemon runs.
	late := ow.create("e2e-late-"+suffix(), "batch")
	ow.kill(syscall.SIGKILL)
	lateClient := sandboxtest.StartClient(t, late.Sandbox.CgroupPath, late.Sandbox.NetnsPath)
	ow.start()
	assert.Equal(t, late.Sandbox.ID, fetch(t, lateClient, late.Env)["sandbox_id"])
	assert.Equal(t, first["sub"], fetch(t, client, sb.Env)["sub"])

	// Key rotation through identityctl: the new key signs, the old one
	// stays published.
	out, err := exec.Command(filepath.Join(ow.bin, "identityctl"), "--admin-socket", ow.admin, "rotate-key").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, 3, strings.Count(string(out), "\n"), "two keys published:\n%s", out)

	// The operator endpoint reports readiness and metrics.
	// Ready once the first probe has passed, which may be just after the
	// admin API first answers.
	var ready []byte
	assert.Eventually(t, func() bool {
		resp, err := http.Get("http://" + ow.operator + "/readyz")
		if err != nil {
			return false
		}
		ready, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode == 200
	}, 10*time.Second, 20*time.Millisecond, "ready: %s", ready)
	resp, err := http.Get("http://" + ow.operator + "/metrics")
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(body), "identityd_live_sandboxes 2")
}

// refusals returns the daemon's "token request refused" log lines.
func (ow *world) refusals() []refusal {
	var out []refusal
	for _, line := range strings.Split(ow.stderr.String(), "\n") {
		var r refusal
		if json.Unmarshal([]byte(line), &r) == nil && r.Msg == "token request refused" {
			out = append(out, r)
		}
	}
	return out
}

type refusal struct {
	Msg     string `json:"msg"`
	Status  int    `json:"status"`
	Reason  string `json:"reason"`
	Sandbox string `json:"sandbox"`
	Caller  struct {
		CgroupID    uint64 `json:"cgroup_id"`
		NetnsCookie uint64 `json:"netns_cookie"`
		PID         uint32 `json:"pid"`
		Flags       string `json:"flags"`
	} `json:"caller"`
}

// TestRefusesToStart: each broken precondition stops the daemon at once
// with one line naming the cause.
func TestRefusesToStart(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	ow.kill(syscall.SIGTERM)

	run := func(t *testing.T, cred *syscall.Credential, args ...string) (int, string) {
		t.Helper()
		cmd := exec.Command(filepath.Join(ow.bin, "identityd"), args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		done := make(chan struct{})
		go func() { cmd.Run(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatal("identityd did not refuse; it started")
		}
		return cmd.ProcessState.ExitCode(), strings.TrimSpace(stderr.String())
	}
	with := func(flag, value string) []string {
		out := append([]string(nil), ow.args...)
		for i := range out {
			if out[i] == flag {
				out[i+1] = value
			}
		}
		return out
	}
	lastLine := func(s string) string {
		lines := strings.Split(s, "\n")
		return lines[len(lines)-1]
	}

	t.Run("not root", func(t *testing.T) {
		code, out := run(t, &syscall.Credential{Uid: 65534, Gid: 65534}, ow.args...)
		assert.Equal(t, 1, code)
		assert.Contains(t, lastLine(out), "identityd: identityd must run as root")
	})
	t.Run("state dir open to others", func(t *testing.T) {
		require.NoError(t, os.Chmod(ow.state, 0o777))
		defer os.Chmod(ow.state, 0o700)
		code, out := run(t, nil, ow.args...)
		assert.Equal(t, 1, code)
		assert.Contains(t, lastLine(out), "group or others can reach it")
	})
	t.Run("key file readable by others", func(t *testing.T) {
		keys, _ := filepath.Glob(filepath.Join(ow.state, "keys", "*.jwk.json"))
		require.NotEmpty(t, keys)
		require.NoError(t, os.Chmod(keys[0], 0o644))
		defer os.Chmod(keys[0], 0o600)
		code, out := run(t, nil, ow.args...)
		assert.Equal(t, 1, code)
		assert.Contains(t, lastLine(out), "group or others can read it (want 0600)")
	})
	t.Run("no bpffs", func(t *testing.T) {
		code, out := run(t, nil, with("--bpf-dir", filepath.Join(t.TempDir(), "pins"))...)
		assert.Equal(t, 1, code)
		assert.Contains(t, lastLine(out), "is not on a bpffs")
	})
	t.Run("listen address in use", func(t *testing.T) {
		// Something else holds the router's port 7123.
		var ln net.Listener
		ow.start() // makes sure the bridge and router address exist
		ow.kill(syscall.SIGTERM)
		var router string
		for i, a := range ow.args {
			if a == "--subnet" {
				router = netip.MustParsePrefix(ow.args[i+1]).Addr().Next().String()
			}
		}
		require.NoError(t, ow.w.Do(func() (err error) {
			ln, err = net.Listen("tcp", router+":7123")
			return err
		}))
		defer ln.Close()
		code, out := run(t, nil, ow.args...)
		assert.Equal(t, 1, code)
		assert.Contains(t, lastLine(out), "address already in use")
	})
}

// TestIdentityctlRun: run creates a sandbox, runs the command inside it
// with the identity environment, passes the exit code and signals through,
// and deletes the sandbox afterwards unless told to keep it.
func TestIdentityctlRun(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	ctl := filepath.Join(ow.bin, "identityctl")
	run := func(args ...string) (*exec.Cmd, *strings.Builder) {
		cmd := exec.Command(ctl, append([]string{"--admin-socket", ow.admin, "run"}, args...)...)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd, &out
	}
	list := func() []controllers.Record {
		var recs []controllers.Record
		require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "GET", "/v1/sandboxes", nil, &recs))
		return recs
	}

	// The sandboxed command fetches its own token.
	id := "e2e-run-" + suffix()
	cmd, out := run("--app", "web", "--id", id, "--", ctl, "token", "--decode", "--max-attempts", "3")
	require.NoError(t, cmd.Run(), out.String())
	assert.Contains(t, out.String(), `"sandbox_id": "`+id+`"`)
	assert.Empty(t, list(), "the sandbox is deleted when the command exits")

	cmd, out = run("--app", "web", "--", "sh", "-c", "exit 3")
	err := cmd.Run()
	require.Error(t, err)
	assert.Equal(t, 3, cmd.ProcessState.ExitCode(), out.String())

	cmd, out = run("--app", "web", "--keep", "--id", "e2e-keep-"+suffix(), "--", "true")
	require.NoError(t, cmd.Run(), out.String())
	assert.Len(t, list(), 1, "--keep keeps the sandbox")

	cmd, out = run("--app", "web", "--", "sleep", "30")
	require.NoError(t, cmd.Start())
	require.Eventually(t, func() bool { return len(list()) == 2 }, 10*time.Second, 20*time.Millisecond)
	time.Sleep(100 * time.Millisecond) // let sleep start inside the sandbox
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
	assert.Equal(t, 128+int(syscall.SIGTERM), cmd.ProcessState.ExitCode(), "the signal reached the command: %s", out.String())
	assert.Len(t, list(), 1)

	lsOut, err := exec.Command(ctl, "--admin-socket", ow.admin, "ls").CombinedOutput()
	require.NoError(t, err)
	assert.Contains(t, string(lsOut), "e2e-keep-")
}

// TestDemo runs the README's first command's program and checks that it
// shows what it promises: tokens, tokens again after a SIGKILL and restart,
// and both impostors refused.
func TestDemo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	out, err := exec.Command(filepath.Join(binaries(t), "identityd"), "demo").CombinedOutput()
	require.NoError(t, err, "%s", out)
	s := string(out)
	for _, want := range []string{
		"demo-a got a token",
		"demo-b got a token",
		"identityd killed",
		"demo-a (never restarted) got a token",
		"demo-b (never restarted) got a token",
		"sandbox demo-b presenting demo-a's secret: refused, token server refused: 403 Forbidden: invalid token",
		"a host process (in no sandbox) presenting demo-a's secret: refused, token server refused: 403 Forbidden: unknown source address",
	} {
		assert.Contains(t, s, want)
	}
	assert.NoFileExists(t, filepath.Join(netnsutil.Dir, demoHostNetns), "the demo cleans up")
	names, err := controllers.ListNetns(demoNetnsPrefix)
	require.NoError(t, err)
	assert.Empty(t, names, "the demo cleans up")
}
