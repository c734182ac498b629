package bpf

import (
	"errors"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// testNATed4 and testNATed6 are test-only link-local addresses that the
// tests DNAT to the token endpoint, in the world's own host netns.
var (
	testNATed4 = netip.MustParseAddr("169.254.77.79")
	testNATed6 = netip.MustParseAddr("fd00:77::79")
)

// dnat sends sandboxes' connections to an address to addr (in the world's
// host netns, on the way in from the sandboxes) with iptables, as an
// operator would for a metadata address. It skips the test where iptables
// is not installed (the vmtest guests).
func dnat(t *testing.T, w *sandboxtest.World, from netip.AddrPort, to netip.AddrPort) {
	t.Helper()
	cmd, toArg := "iptables", to.String()
	if from.Addr().Is6() {
		cmd = "ip6tables"
	}
	// The legacy (x_tables) flavour where it is installed: Debian 12's
	// iptables-nft cannot append this rule on Linux 5.10 (ENOENT), and
	// the NAT done is the same.
	if _, err := exec.LookPath(cmd + "-legacy"); err == nil {
		cmd += "-legacy"
	} else if _, err := exec.LookPath(cmd); err != nil {
		t.Skipf("%s is not installed", cmd)
	}
	// The address is the world's own first, so that nothing the rule
	// misses leaves the world.
	h, err := netnsutil.Handle(w.HostNetns)
	require.NoError(t, err)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, netnsutil.AddAddr(h, lo, netip.PrefixFrom(from.Addr(), from.Addr().BitLen())))
	out, err := exec.Command("nsenter", "--net="+w.HostNetns, cmd, "-w", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
		"-d", from.Addr().String(), "--dport", strconv.Itoa(int(from.Port())), "-j", "DNAT", "--to-destination", toArg).CombinedOutput()
	if err != nil {
		t.Skipf("%s DNAT in the test's netns: %v: %s", cmd, err, out)
	}
}

// TestNATedConnectionIsExplained: a sandbox's connection that a DNAT rule
// sent to the token endpoint has no record, and Lookup says that NAT is
// the likely cause, naming where the client sent it.
func TestNATedConnectionIsExplained(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	srv := listen(t, w, ":7123")
	token4, token6 := netip.AddrPortFrom(w.Router4, tokenPort), netip.AddrPortFrom(w.Router6, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{token4, token6}))
	client := a.Start(t)

	for _, tc := range []struct {
		name     string
		from, to netip.AddrPort
	}{
		{"ipv4", netip.AddrPortFrom(testNATed4, 80), token4},
		{"ipv6", netip.AddrPortFrom(testNATed6, 80), token6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dnat(t, w, tc.from, tc.to)
			family := 4
			if tc.from.Addr().Is6() {
				family = 6
			}
			fd, err := client.Socket(family)
			require.NoError(t, err)
			local, err := client.Connect(fd, tc.from)
			require.NoError(t, err)

			_, err = in.Lookup(srv.accept())
			require.ErrorIs(t, err, ErrNoRecord)
			var nat *NATError
			require.True(t, errors.As(err, &nat), "not explained: %v", err)
			assert.Equal(t, tc.from, nat.SentTo)
			assert.Equal(t, local, nat.SentFrom)
			assert.Equal(t, tc.to, nat.ArrivedTo)
			assert.Contains(t, err.Error(), "rewritten by NAT")
			assert.Contains(t, err.Error(), "--link-local-endpoint")
			t.Log(err)
		})
	}

	t.Run("not NATed", func(t *testing.T) {
		// A connection without a record that nothing rewrote is not
		// blamed on NAT.
		other := listen(t, w, netip.AddrPortFrom(w.Router4, 8080).String())
		_, err := client.Dial(other.addr(), 1)
		require.NoError(t, err)
		_, err = in.Lookup(other.accept())
		require.ErrorIs(t, err, ErrNoRecord)
		var nat *NATError
		assert.False(t, errors.As(err, &nat), "blamed on NAT: %v", err)
	})
}
