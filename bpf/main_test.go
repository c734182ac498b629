package bpf

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// loaderEnv makes the test binary act as a loader process that installs the
// programs, configures endpoints, and exits, as a daemon that stops would.
const (
	loaderPinDirEnv    = "IDENTITYD_BPF_TEST_LOADER_PINDIR"
	loaderEndpointsEnv = "IDENTITYD_BPF_TEST_LOADER_ENDPOINTS"
	// loaderMemlockEnv, set to a number of bytes, makes the loader start
	// with RLIMIT_MEMLOCK at that limit and without CAP_SYS_RESOURCE, so
	// that it cannot raise it.
	loaderMemlockEnv = "IDENTITYD_BPF_TEST_LOADER_MEMLOCK"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
	if limit := os.Getenv(loaderMemlockEnv); limit != "" {
		if err := execWithMemlock(limit); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if dir := os.Getenv(loaderPinDirEnv); dir != "" {
		if err := runLoader(dir, os.Getenv(loaderEndpointsEnv)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func runLoader(dir, endpoints string) error {
	in, err := Install(context.Background(), Options{PinDir: dir})
	if err != nil {
		return err
	}
	defer in.Close()
	var eps []netip.AddrPort
	for _, s := range strings.Fields(endpoints) {
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return err
		}
		eps = append(eps, ap)
	}
	return in.SetEndpoints(eps)
}

// execWithMemlock runs this binary again with RLIMIT_MEMLOCK at limit and
// CAP_SYS_RESOURCE out of the bounding set: root's capabilities are worked
// out afresh at exec, so every thread of the new image lacks it.
func execWithMemlock(limit string) error {
	n, err := strconv.ParseUint(limit, 10, 64)
	if err != nil {
		return err
	}
	runtime.LockOSThread()
	if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &unix.Rlimit{Cur: n, Max: n}); err != nil {
		return fmt.Errorf("lower RLIMIT_MEMLOCK: %w", err)
	}
	if err := unix.Prctl(unix.PR_CAPBSET_DROP, unix.CAP_SYS_RESOURCE, 0, 0, 0); err != nil {
		return fmt.Errorf("drop CAP_SYS_RESOURCE: %w", err)
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, loaderMemlockEnv+"=") {
			env = append(env, kv)
		}
	}
	return syscall.Exec("/proc/self/exe", os.Args, env)
}
