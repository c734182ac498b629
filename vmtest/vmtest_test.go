package vmtest

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// kernels is the kernel matrix, one Debian kernel package per line, with
// the suite to fetch it from when the machine's own apt sources (Debian 12)
// lack it. The host's own kernel is covered by the ordinary go test run.
// IDENTITYD_VMTEST_KERNELS (space-separated "package" or "package@suite")
// replaces it; IDENTITYD_VMTEST_VMLINUZ (plus optional
// IDENTITYD_VMTEST_MODULES, the kernel's lib/modules/<release> directory)
// boots any other kernel. IDENTITYD_VMTEST_PACKAGES (space-separated, e.g.
// "bpf tokenserver") narrows the kernel test packages run in each guest.
var kernels = []DebianKernel{
	{Package: "linux-image-5.10.0-46-cloud-amd64", Suite: "bullseye-security"}, // Debian 11, the oldest kernel supported
	{Package: "linux-image-6.1.0-56-cloud-amd64"},                              // Debian 12
	{Package: "linux-image-6.12.117+deb12-cloud-amd64"},                        // Debian 13's, as Debian 12 ships it
}

// kernelPackages are the packages whose tests exercise the kernel; those
// that have tests run in the guest.
var kernelPackages = []string{"bpf", "tokenserver", "controllers", "internal/cgroup2", "internal/registry", "internal/netnsutil", "internal/daemon"}

// guestModules are loaded in the guest before the tests run (it cannot load
// them on demand). Netfilter's NAT and ctnetlink are for the DNAT tests
// (bpf's TestNATedConnectionIsExplained).
var guestModules = []string{"veth", "bridge", "nf_conntrack_netlink", "iptable_nat", "ip6table_nat", "xt_nat", "xt_tcpudp"}

// guestPrograms are host programs the kernel tests run in the guest too:
// the etcd server of Debian's etcd-server (internal/etcdtest); iptables
// and ip6tables (legacy: see bpf's dnat) and nsenter, which write the DNAT
// tests' rules in their own netns, with the extensions those rules use
// (iptables loads them itself, so ldd does not name them).
var guestPrograms = []string{"/usr/bin/etcd", "/usr/sbin/iptables-legacy", "/usr/sbin/ip6tables-legacy", "/usr/bin/nsenter",
	xtables + "libxt_standard.so", xtables + "libxt_tcp.so", xtables + "libxt_DNAT.so"}

const xtables = "/usr/lib/x86_64-linux-gnu/xtables/"

type harness struct {
	moduleDir string
	work      string
	init      string
	kernels   []Kernel
	accel     string
	err       error
}

var (
	setupOnce sync.Once
	shared    harness
)

// setup builds the guest init once per test process.
func setup(t *testing.T) *harness {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU guests; skipped in -short mode")
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatal("qemu-system-x86_64 not found: install Debian's qemu-system-x86 (make deps does)")
	}
	setupOnce.Do(func() {
		ctx := context.Background()
		shared.moduleDir, shared.err = ModuleDir(ctx)
		if shared.err != nil {
			return
		}
		shared.work, shared.err = os.MkdirTemp("", "identityd-vmtest-")
		if shared.err != nil {
			return
		}
		if shared.init, shared.err = BuildInit(ctx, shared.moduleDir, shared.work); shared.err != nil {
			return
		}
		if shared.kernels, shared.err = matrix(); shared.err != nil {
			return
		}
		var reason string
		shared.accel = os.Getenv("IDENTITYD_VMTEST_ACCEL")
		if shared.accel == "" {
			shared.accel, reason = ChooseAccel(ctx, shared.kernels[0], shared.init, shared.work, 10*time.Second)
			t.Logf("vmtest: using %s: %s", shared.accel, reason)
		}
	})
	require.NoError(t, shared.err)
	return &shared
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.work != "" {
		os.RemoveAll(shared.work)
	}
	os.Exit(code)
}

func cacheDir() (string, error) {
	if d := os.Getenv("IDENTITYD_VMTEST_CACHE"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	return filepath.Join(d, "identityd-vmtest"), err
}

func matrix() ([]Kernel, error) {
	if vmlinuz := os.Getenv("IDENTITYD_VMTEST_VMLINUZ"); vmlinuz != "" {
		return []Kernel{{Name: filepath.Base(vmlinuz), Vmlinuz: vmlinuz, Modules: os.Getenv("IDENTITYD_VMTEST_MODULES")}}, nil
	}
	pkgs := kernels
	if env := os.Getenv("IDENTITYD_VMTEST_KERNELS"); env != "" {
		pkgs = nil
		for _, f := range strings.Fields(env) {
			pkgs = append(pkgs, ParseDebianKernel(f))
		}
	}
	cache, err := cacheDir()
	if err != nil {
		return nil, err
	}
	var out []Kernel
	for _, p := range pkgs {
		k, err := FetchDebianKernel(context.Background(), cache, p)
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, nil
}

// console streams guest consoles to stderr when IDENTITYD_VMTEST_CONSOLE is
// set, for watching a slow guest live.
func console() io.Writer {
	if os.Getenv("IDENTITYD_VMTEST_CONSOLE") != "" {
		return os.Stderr
	}
	return nil
}

func timeout(def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv("IDENTITYD_VMTEST_TIMEOUT")); err == nil {
		return d
	}
	return def
}

// TestKernel runs the kernel test packages inside QEMU on every kernel of
// the matrix and reports each guest test as a subtest:
// TestKernel/<kernel>/<package>/<test>.
func TestKernel(t *testing.T) {
	h := setup(t)
	ctx := context.Background()
	want := kernelPackages
	if env := os.Getenv("IDENTITYD_VMTEST_PACKAGES"); env != "" {
		want = strings.Fields(env)
	}
	pkgs := PackagesWithTests(h.moduleDir, want)
	binDir := filepath.Join(h.work, "kernel-tests")
	require.NoError(t, os.MkdirAll(binDir, 0o755))
	start := time.Now()
	tests, err := BuildTestBinaries(ctx, h.moduleDir, binDir, pkgs)
	require.NoError(t, err)
	t.Logf("built %d guest test binaries in %s", len(tests), time.Since(start).Round(time.Millisecond))

	bins := map[string]string{}
	for _, gt := range tests {
		bins[gt.Path] = filepath.Join(binDir, filepath.Base(gt.Path))
	}
	tests, names := withLastTests(tests, pkgs)
	for _, k := range h.kernels {
		t.Run(k.Name, func(t *testing.T) {
			res, err := Run(ctx, Config{
				Kernel:       k,
				Init:         h.init,
				Binaries:     bins,
				Manifest:     Manifest{Tests: tests},
				Modules:      guestModules,
				HostPrograms: guestPrograms,
				Timeout:      timeout(10 * time.Minute),
				Accel:        h.accel,
				WorkDir:      t.TempDir(),
				Console:      console(),
			})
			require.NoError(t, err)
			t.Logf("guest ran for %s under %s", res.Duration.Round(time.Millisecond), res.Accel)
			report(t, res, names)
		})
	}
}

// lastTests run after every package, each as its own guest test, because
// they change the kernel for the rest of its boot.
var lastTests = []struct {
	name, pkg, run, env string
}{
	// Puts a cgroup v1 net_prio hierarchy to use until reboot (bpf.NetPrioEnv).
	{"bpf-netprio", "bpf", "^TestOwnerWithNetPrioActive$", "IDENTITYD_BPF_TEST_NETPRIO=1"},
}

// withLastTests appends lastTests of the packages built to tests, and
// returns the names of all guest tests that must run.
func withLastTests(tests []GuestTest, pkgs []string) ([]GuestTest, []string) {
	names := slices.Clone(pkgs)
	for _, l := range lastTests {
		for _, gt := range tests {
			if gt.Name == l.pkg {
				tests = append(tests, GuestTest{Name: l.name, Path: gt.Path, Args: []string{"-test.run=" + l.run}, Env: []string{l.env}})
				names = append(names, l.name)
				break
			}
		}
	}
	return tests, names
}

// report turns findings into subtests, so that each guest test passes,
// fails or skips under its own name.
func report(t *testing.T, res *Result, want []string) {
	for _, f := range res.Findings(want) {
		if f.Name == "" {
			t.Error(f.Message)
			continue
		}
		t.Run(f.Name, func(t *testing.T) {
			switch f.Outcome {
			case "fail":
				t.Error(f.Message)
			case "skip":
				t.Skip(f.Message)
			}
		})
	}
}

// The harness's tests of itself: guests that fail, hang or panic must fail
// the host side, clearly and in time.

func fixtureRun(t *testing.T, man Manifest, limit time.Duration) *Result {
	t.Helper()
	h := setup(t)
	ctx := context.Background()
	dir := t.TempDir()
	tests, err := BuildTestBinaries(ctx, h.moduleDir, dir, []string{"vmtest/internal/fixture"})
	require.NoError(t, err)
	for i := range man.Tests {
		man.Tests[i].Path = tests[0].Path
	}
	man.Env = append(man.Env, "IDENTITYD_VMTEST_FIXTURE=1")
	res, err := Run(ctx, Config{
		Kernel:   h.kernels[0],
		Init:     h.init,
		Binaries: map[string]string{tests[0].Path: filepath.Join(dir, "fixture.test")},
		Manifest: man,
		Timeout:  limit,
		Accel:    h.accel,
		WorkDir:  dir,
		Console:  console(),
	})
	require.NoError(t, err)
	return res
}

func findingsByName(fs []Finding) map[string]Finding {
	m := map[string]Finding{}
	for _, f := range fs {
		m[f.Name] = f
	}
	return m
}

func TestHarnessReportsGuestFailure(t *testing.T) {
	res := fixtureRun(t, Manifest{Tests: []GuestTest{{
		Name: "fixture",
		Args: []string{"-test.run=^(TestFixturePasses|TestFixtureFails)$"},
	}}}, timeout(5*time.Minute))
	assert.True(t, res.Failed())
	assert.Empty(t, res.Problem, "the guest itself finished normally")
	fs := findingsByName(res.Findings([]string{"fixture"}))
	assert.Equal(t, "pass", fs["fixture/TestFixturePasses"].Outcome)
	assert.Equal(t, "fail", fs["fixture/TestFixtureFails"].Outcome)
	assert.Contains(t, fs["fixture/TestFixtureFails"].Message, "deliberate guest failure")
	assert.Equal(t, "fail", fs["fixture"].Outcome, "the binary's exit code fails it too")
}

func TestHarnessTimesOutHangingGuest(t *testing.T) {
	// Long enough to boot under TCG and start the binary, short enough to
	// keep the suite quick.
	limit := 25 * time.Second
	res := fixtureRun(t, Manifest{Tests: []GuestTest{{
		Name: "fixture",
		Args: []string{"-test.run=^TestFixtureHangs$"},
	}}}, limit)
	assert.True(t, res.Failed())
	assert.Contains(t, res.Problem, "timed out after "+limit.String())
	assert.Contains(t, res.Problem, "inside TestFixtureHangs", "the message names where the guest hung")
	assert.Less(t, res.Duration, limit+15*time.Second, "the guest is killed at the timeout")
	fs := findingsByName(res.Findings([]string{"fixture"}))
	assert.Equal(t, "fail", fs["fixture/TestFixtureHangs"].Outcome)
}

func TestHarnessDetectsKernelPanic(t *testing.T) {
	res := fixtureRun(t, Manifest{Panic: true, Tests: []GuestTest{{Name: "fixture"}}}, timeout(5*time.Minute))
	assert.True(t, res.Failed())
	assert.Contains(t, res.Problem, "guest kernel panicked")
	fs := findingsByName(res.Findings([]string{"fixture"}))
	assert.Equal(t, "fail", fs["fixture"].Outcome, "a binary that never started is a failure")
}
