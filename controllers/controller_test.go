package controllers

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/registry"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/internal/secretstore"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
	if cfg := os.Getenv(daemonEnv); cfg != "" {
		os.Exit(runDaemon(cfg))
	}
	if os.Getenv(sleeperEnv) != "" {
		time.Sleep(5 * time.Minute) // a task of another runtime
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var quiet = slog.New(slog.DiscardHandler)

// suffix keeps sandbox ids (and so netns names) unique between parallel
// test processes.
func suffix() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// testConfig is a controller configuration inside a world: the bridge lives
// in the world's host netns, sandbox cgroups under the world's cgroup, and
// the sandboxes' named netns have a prefix of this test's own, so that it
// sees neither another test's nor a real identityd's. They are removed when
// the test ends.
func testConfig(t *testing.T, w *sandboxtest.World) Config {
	var r [2]byte
	rand.Read(r[:])
	prefix := testNetnsPrefix(t)
	return Config{
		StateDir:       filepath.Join(t.TempDir(), "state"),
		CgroupParent:   filepath.Join(w.CgroupDir, "sandboxes"),
		HostNetns:      w.HostNetns,
		NetnsPrefix:    prefix,
		Subnet:         netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 200 + r[0]%50, r[1], 0}), 24),
		Issuer:         "https://issuer.test",
		ResyncInterval: 100 * time.Millisecond,
		Logger:         quiet,
	}
}

// testNetnsPrefix is a netns prefix unique to this test; every netns with
// it is removed when the test ends. It has the test worlds' form,
// idt<pid>-..., so that a later test process sweeps what a killed one
// left, and its "c" keeps it apart from the worlds' own names.
func testNetnsPrefix(tb testing.TB) string {
	prefix := fmt.Sprintf("idt%d-c%s-", os.Getpid(), suffix())
	tb.Cleanup(func() { removeNetns(tb, prefix) })
	return prefix
}

// removeNetns deletes every netns an instance with prefix may have made.
func removeNetns(tb testing.TB, prefix string) {
	names, err := ListNetns(prefix)
	if err != nil {
		tb.Errorf("remove the test's netns: %v", err)
	}
	for _, name := range names {
		if err := netnsutil.DeleteNamed(name); err != nil {
			tb.Errorf("remove the test's netns: %v", err)
		}
	}
}

// hasSecret reports whether the state in cfg holds a secret of id.
func hasSecret(t *testing.T, cfg Config, id string) bool {
	t.Helper()
	has, err := secretstore.At(secretstore.Dir(cfg.StateDir)).Has(id)
	require.NoError(t, err)
	return has
}

func start(t *testing.T, cfg Config) *Controller {
	t.Helper()
	c, err := New(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

func serveAdmin(t *testing.T, c *Controller) *AdminClient {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "admin", "admin.sock")
	ln, err := ListenAdmin(sock)
	require.NoError(t, err)
	st, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	srv := &http.Server{Handler: AdminHandler(c)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return NewAdminClient(sock)
}

func apiStatus(err error) int {
	var e *APIError
	if errors.As(err, &e) {
		return e.Status
	}
	return 0
}

func TestLifecycleThroughAdminSocket(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	api := serveAdmin(t, c)
	ctx := context.Background()
	id := "web-" + suffix()

	var created Created
	require.NoError(t, api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id, App: "web", Org: "acme"}, &created))
	sb := created.Sandbox
	assert.Equal(t, id, sb.ID)
	assert.Regexp(t, `^[0-9a-f]{64}$`, created.Env["MIREN_IDENTITY_TOKEN_SECRET"])
	assert.Equal(t, fmt.Sprintf("http://%s:7123/v1/token", cfg.Subnet.Addr().Next()), created.Env["MIREN_IDENTITY_TOKEN_URL"])
	assert.Equal(t, "https://issuer.test", created.Env["MIREN_OIDC_ISSUER_URL"])
	cgID, err := cgroup2.ID(sb.CgroupPath)
	require.NoError(t, err)
	assert.Equal(t, cgID, sb.CgroupID)
	cookie, err := netnsutil.Cookie(sb.NetnsPath)
	require.NoError(t, err)
	assert.Equal(t, cookie, sb.NetnsCookie)
	secretFile, err := c.secrets.Path(id)
	require.NoError(t, err)
	for _, f := range []string{filepath.Join(c.records.dir, id+".json"), secretFile} {
		st, err := os.Stat(f)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), st.Mode().Perm(), f)
	}
	resolved, err := c.reg.Resolve(sb.CgroupID, sb.NetnsCookie)
	require.NoError(t, err)
	assert.Equal(t, "web", resolved.App)

	// The sandbox's network reaches the router.
	client := sandboxtest.StartClient(t, sb.CgroupPath, sb.NetnsPath)
	ln, err := w.Listen("tcp", netip.AddrPortFrom(c.Router(), 7999).String())
	require.NoError(t, err)
	defer ln.Close()
	_, err = client.Dial(netip.AddrPortFrom(c.Router(), 7999), 1)
	require.NoError(t, err)
	client.Close()

	var got Record
	require.NoError(t, api.Do(ctx, "GET", "/v1/sandboxes/"+id, nil, &got))
	assert.Equal(t, sb.CgroupID, got.CgroupID)
	var all []Record
	require.NoError(t, api.Do(ctx, "GET", "/v1/sandboxes", nil, &all))
	assert.Len(t, all, 1)

	// Bad input is refused with a clear 4xx.
	for _, tc := range []struct {
		path string
		body any
		want int
		msg  string
	}{
		{"/v1/sandboxes", CreateRequest{ID: id, App: "web"}, 409, "already exists"},
		{"/v1/sandboxes", CreateRequest{App: "we:b"}, 400, "no ':'"},
		{"/v1/sandboxes", CreateRequest{ID: "../x", App: "web"}, 400, "sandbox id"},
		{"/v1/sandboxes", map[string]any{"app": "web", "bogus": 1}, 400, "unknown field"},
		{"/v1/sandboxes/adopt", AdoptRequest{App: "web", CgroupPath: "/etc"}, 400, "not a cgroup"},
		{"/v1/sandboxes/adopt", AdoptRequest{App: "web", NetnsPath: "/etc/hostname"}, 400, "not a network namespace"},
		{"/v1/sandboxes/adopt", AdoptRequest{App: "web"}, 400, "needs a cgroup path"},
	} {
		err := api.Do(ctx, "POST", tc.path, tc.body, nil)
		assert.Equal(t, tc.want, apiStatus(err), "%s %+v: %v", tc.path, tc.body, err)
		assert.ErrorContains(t, err, tc.msg)
	}

	// Adopt a sandbox another runtime made: a world sandbox's cgroup and netns.
	other := w.AddSandbox("other")
	var adopted Created
	require.NoError(t, api.Do(ctx, "POST", "/v1/sandboxes/adopt",
		AdoptRequest{ID: "adopted-" + suffix(), App: "batch", CgroupPath: other.CgroupDir, NetnsPath: other.Netns}, &adopted))
	assert.False(t, adopted.Sandbox.Owned)
	assert.Equal(t, other.NetnsCookie, adopted.Sandbox.NetnsCookie)
	resolved, err = c.reg.Resolve(other.CgroupID, other.NetnsCookie)
	require.NoError(t, err)
	assert.Equal(t, adopted.Sandbox.ID, resolved.ID)

	// A task in the sandbox: delete refuses without kill, kills with it.
	sleeper := startIn(t, sb.CgroupPath)
	err = api.Do(ctx, "DELETE", "/v1/sandboxes/"+id, nil, nil)
	assert.Equal(t, 409, apiStatus(err), "%v", err)
	require.NoError(t, api.Do(ctx, "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil))
	sleeper.Wait()
	assert.NoDirExists(t, sb.CgroupPath)
	assert.NoFileExists(t, sb.NetnsPath)
	assert.False(t, hasSecret(t, cfg, id))
	_, err = c.reg.Resolve(sb.CgroupID, sb.NetnsCookie)
	assert.ErrorIs(t, err, registry.ErrUnknownCaller)
	assert.Equal(t, 404, apiStatus(api.Do(ctx, "GET", "/v1/sandboxes/"+id, nil, nil)))
	assert.Equal(t, 404, apiStatus(api.Do(ctx, "DELETE", "/v1/sandboxes/"+id, nil, nil)))

	// Deleting an adopted sandbox revokes it and leaves its resources alone.
	require.NoError(t, api.Do(ctx, "DELETE", "/v1/sandboxes/"+adopted.Sandbox.ID, nil, nil))
	assert.DirExists(t, other.CgroupDir)
	_, err = c.reg.Resolve(other.CgroupID, other.NetnsCookie)
	assert.ErrorIs(t, err, registry.ErrUnknownCaller)
}

const sleeperEnv = "IDENTITYD_CONTROLLERS_TEST_SLEEPER"

// startIn starts a process in a cgroup, as another runtime would. It is
// this test binary, so that it exists in the QEMU guest too.
func startIn(t *testing.T, cgroupDir string) *exec.Cmd {
	t.Helper()
	cg, err := os.Open(cgroupDir)
	require.NoError(t, err)
	defer cg.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), sleeperEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestRebuildKeepsLiveAndRetiresRecreated(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	ctx := context.Background()
	keep, gone := "keep-"+suffix(), "gone-"+suffix()
	k, err := c.Create(ctx, CreateRequest{ID: keep, App: "web"})
	require.NoError(t, err)
	g, err := c.Create(ctx, CreateRequest{ID: gone, App: "web"})
	require.NoError(t, err)
	require.NoError(t, c.Close())

	// While no controller runs, someone deletes g's cgroup and makes a new
	// one under the same path.
	require.NoError(t, os.Remove(g.Sandbox.CgroupPath))
	require.NoError(t, os.Mkdir(g.Sandbox.CgroupPath, 0o755))

	c2 := start(t, cfg)
	list := c2.List()
	require.Len(t, list, 1)
	assert.Equal(t, keep, list[0].ID)
	ok, err := c2.secrets.Verify(keep, k.Env["MIREN_IDENTITY_TOKEN_SECRET"])
	require.NoError(t, err)
	assert.True(t, ok, "a live sandbox's secret still works after the restart")
	has, err := c2.secrets.Has(gone)
	require.NoError(t, err)
	assert.False(t, has, "the re-created cgroup's old secret is revoked")
	newID, err := cgroup2.ID(g.Sandbox.CgroupPath)
	require.NoError(t, err)
	_, err = c2.reg.Resolve(newID, g.Sandbox.NetnsCookie)
	assert.ErrorIs(t, err, registry.ErrUnknownCaller)
	assert.DirExists(t, g.Sandbox.CgroupPath, "someone else's cgroup is not touched")
}

func TestResyncRetiresSandboxRemovedUnderneath(t *testing.T) {
	w := sandboxtest.New(t)
	c := start(t, testConfig(t, w))
	other := w.AddSandbox("x")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)
	a, err := c.Adopt(ctx, AdoptRequest{ID: "x-" + suffix(), App: "web", CgroupPath: other.CgroupDir})
	require.NoError(t, err)

	require.NoError(t, os.Remove(other.CgroupDir))
	require.Eventually(t, func() bool { return c.Len() == 0 }, 5*time.Second, 20*time.Millisecond,
		"a sandbox whose cgroup vanished is retired within seconds")
	has, err := c.secrets.Has(a.Sandbox.ID)
	require.NoError(t, err)
	assert.False(t, has)
}

// Crash tests: a daemon process (this test binary) runs the controller and
// the admin API and kills itself with SIGKILL at one fault point.

const daemonEnv = "IDENTITYD_CONTROLLERS_TEST_DAEMON"

type daemonConfig struct {
	Config Config `json:"config"`
	Socket string `json:"socket"`
	Fault  string `json:"fault"`
}

func runDaemon(raw string) int {
	var dc daemonConfig
	if err := json.Unmarshal([]byte(raw), &dc); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	dc.Config.Logger = quiet
	c, err := New(context.Background(), dc.Config)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	c.fault = func(point string) {
		if point == dc.Fault {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
	ln, err := ListenAdmin(dc.Socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	http.Serve(ln, AdminHandler(c))
	return 0
}

// daemon starts a daemon process and waits until its admin socket answers.
func daemon(t *testing.T, cfg Config, sock, fault string) *exec.Cmd {
	t.Helper()
	b, err := json.Marshal(daemonConfig{Config: cfg, Socket: sock, Fault: fault})
	require.NoError(t, err)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), daemonEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	buf := make([]byte, 6)
	_, err = out.Read(buf)
	require.NoError(t, err, "daemon did not start")
	require.Equal(t, "ready\n", string(buf))
	return cmd
}

// assertConsistent checks the invariants after a restart: every record and
// secret parses, every live sandbox has its cgroup, netns and secret, and
// nothing is left of sandboxes that are not live.
func assertConsistent(t *testing.T, c *Controller, cfg Config) {
	t.Helper()
	recs, errs := list(c.records.dir)
	assert.Empty(t, errs, "no record is torn")
	pending, _ := list(c.records.pending)
	assert.Empty(t, pending, "no pending marker survives a start")
	live := map[string]bool{}
	for _, r := range c.List() {
		live[r.ID] = true
		assert.DirExists(t, r.CgroupPath)
		assert.True(t, netnsutil.IsNetns(r.NetnsPath), r.NetnsPath)
		has, err := c.secrets.Has(r.ID)
		require.NoError(t, err)
		assert.True(t, has, r.ID)
	}
	assert.Len(t, recs, len(live))
	secrets, err := c.secrets.IDs()
	require.NoError(t, err)
	for _, id := range secrets {
		assert.True(t, live[id], "secret of %s has no live sandbox", id)
	}
	cgroups, _ := os.ReadDir(cfg.CgroupParent)
	for _, e := range cgroups {
		if e.IsDir() {
			assert.True(t, live[e.Name()], "cgroup %s has no live sandbox", e.Name())
		}
	}
	names, err := ListNetns(cfg.NetnsPrefix)
	require.NoError(t, err)
	for _, name := range names {
		id := strings.TrimPrefix(name, cfg.NetnsPrefix)
		assert.True(t, live[id], "netns %s has no live sandbox", name)
	}
	problems, err := Fsck(cfg)
	require.NoError(t, err)
	assert.Empty(t, problems, "fsck finds nothing")
}

func TestCrashSafety(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	sock := filepath.Join(t.TempDir(), "run", "admin.sock")
	ctx := context.Background()
	tag := suffix()
	id := func(name string) string { return name + "-" + tag }

	// A sandbox made before any crash must survive all of them.
	d := daemon(t, cfg, sock, "")
	api := NewAdminClient(sock)
	var survivor Created
	require.NoError(t, api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id("survivor"), App: "web"}, &survivor))
	d.Process.Kill()
	d.Wait()

	restart := func(t *testing.T) {
		t.Helper()
		c, err := New(ctx, cfg)
		require.NoError(t, err)
		defer c.Close()
		assertConsistent(t, c, cfg)
		ok, err := c.secrets.Verify(survivor.Sandbox.ID, survivor.Env["MIREN_IDENTITY_TOKEN_SECRET"])
		require.NoError(t, err)
		assert.True(t, ok, "a sandbox whose Create returned still authenticates")
		_, err = c.reg.Resolve(survivor.Sandbox.CgroupID, survivor.Sandbox.NetnsCookie)
		assert.NoError(t, err)
	}

	for _, point := range []string{"create:pending", "create:cgroup", "create:network", "create:secret", "create:record"} {
		t.Run(point, func(t *testing.T) {
			d := daemon(t, cfg, sock, point)
			err := NewAdminClient(sock).Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id(strings.ReplaceAll(point, ":", "-")), App: "web"}, nil)
			require.Error(t, err, "the daemon dies inside Create")
			d.Wait()
			restart(t)
		})
	}
	for _, point := range []string{"delete:revoked", "delete:teardown"} {
		t.Run(point, func(t *testing.T) {
			d := daemon(t, cfg, sock, point)
			api := NewAdminClient(sock)
			victim := id(strings.ReplaceAll(point, ":", "-"))
			var cr Created
			require.NoError(t, api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: victim, App: "web"}, &cr))
			require.Error(t, api.Do(ctx, "DELETE", "/v1/sandboxes/"+victim+"?kill=true", nil, nil))
			d.Wait()
			restart(t)
			c, err := New(ctx, cfg)
			require.NoError(t, err)
			defer c.Close()
			_, err = c.Get(victim)
			assert.ErrorIs(t, err, ErrNotFound, "a delete the daemon started is finished at restart")
			ok, _ := c.secrets.Verify(victim, cr.Env["MIREN_IDENTITY_TOKEN_SECRET"])
			assert.False(t, ok)
		})
	}
}
