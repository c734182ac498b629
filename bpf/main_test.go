package bpf

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// loaderEnv makes the test binary act as a loader process that installs the
// programs, configures endpoints, and exits, as a daemon that stops would.
const (
	loaderPinDirEnv    = "IDENTITYD_BPF_TEST_LOADER_PINDIR"
	loaderEndpointsEnv = "IDENTITYD_BPF_TEST_LOADER_ENDPOINTS"
)

func TestMain(m *testing.M) {
	sandboxtest.RunChildIfRequested()
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
