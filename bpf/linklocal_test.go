package bpf

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// Test-only link-local addresses, never a real metadata address. Each world
// gives them to its own host netns first, so that a connection the programs
// did not redirect reaches a listener of the test's, never the machine's.
var (
	testLinkLocal4  = netip.MustParseAddr("169.254.77.77")
	testLinkLocal6  = netip.MustParseAddr("fd00:77::77")
	testLinkLocal6b = netip.MustParseAddr("fd00:77::78") // sent to the IPv4 endpoint
)

const linkLocalPort = 80

// linkLocalWorld is a world whose host netns holds the test's link-local
// addresses, a token listener, and stand-ins for the service really at the
// link-local addresses (on the link-local port and one more).
type linkLocalWorld struct {
	w      *sandboxtest.World
	in     *Installation
	opts   Options
	token  *server
	real   *server // the link-local addresses' own service, port linkLocalPort
	other  *server // the same addresses, linkLocalPort+1
	rules  []Redirect
	token4 netip.AddrPort
}

func newLinkLocalWorld(t *testing.T) *linkLocalWorld {
	t.Helper()
	in, opts := install(t)
	w := sandboxtest.New(t)
	h, err := netnsutil.Handle(w.HostNetns)
	require.NoError(t, err)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	for _, a := range []netip.Addr{testLinkLocal4, testLinkLocal6, testLinkLocal6b} {
		require.NoError(t, netnsutil.AddAddr(h, lo, netip.PrefixFrom(a, a.BitLen())))
	}
	lw := &linkLocalWorld{
		w: w, in: in, opts: opts,
		token:  listen(t, w, fmt.Sprintf(":%d", tokenPort)),
		real:   listen(t, w, fmt.Sprintf(":%d", linkLocalPort)),
		other:  listen(t, w, fmt.Sprintf(":%d", linkLocalPort+1)),
		token4: netip.AddrPortFrom(w.Router4, tokenPort),
	}
	token6 := netip.AddrPortFrom(w.Router6, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{lw.token4, token6}))
	lw.rules = []Redirect{
		{From: netip.AddrPortFrom(testLinkLocal4, linkLocalPort), To: lw.token4},
		{From: netip.AddrPortFrom(testLinkLocal6, linkLocalPort), To: token6},
		{From: netip.AddrPortFrom(testLinkLocal6b, linkLocalPort), To: lw.token4},
	}
	require.NoError(t, in.SetLinkLocal(lw.rules))
	return lw
}

func TestLinkLocalRedirectsSandbox(t *testing.T) {
	lw := newLinkLocalWorld(t)
	a := lw.w.AddSandbox("a")
	require.NoError(t, lw.in.AddSandbox(SandboxKey{CgroupID: a.CgroupID, NetnsCookie: a.NetnsCookie}))
	client := a.Start(t)

	for _, tc := range []struct {
		name   string
		family int
		dest   netip.Addr
	}{
		{"ipv4", 4, testLinkLocal4},
		{"ipv6", 6, testLinkLocal6},
		{"ipv4-mapped", 6, netip.AddrFrom16(testLinkLocal4.As16())},
		{"ipv6 to the ipv4 endpoint", 6, testLinkLocal6b},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dest := netip.AddrPortFrom(tc.dest, linkLocalPort)
			fd, err := client.Socket(tc.family)
			require.NoError(t, err)
			local, err := client.Connect(fd, dest)
			require.NoError(t, err)

			conn := lw.token.accept()
			assert.Equal(t, local.Addr().Unmap(), peer(conn).Addr().Unmap(), "the token endpoint accepted the sandbox's connection")
			rec, err := lw.in.Lookup(conn)
			require.NoError(t, err, "a redirected connection carries its record")
			assert.Equal(t, a.CgroupID, rec.CgroupID)
			assert.Equal(t, a.NetnsCookie, rec.NetnsCookie)
			assert.Equal(t, uint32(client.Pid), rec.TGID, "the connect program noted the caller after redirecting")

			got, err := client.Peer(fd)
			require.NoError(t, err)
			assert.Equal(t, dest, got, "getpeername reports the address the caller connected to")
			assertNoRecords(t, lw.in)
		})
	}
}

// TestLinkLocalLeavesOthersAlone: only sandboxes' connections to a
// configured link-local address and port are redirected; everything else
// reaches the service really there.
func TestLinkLocalLeavesOthersAlone(t *testing.T) {
	lw := newLinkLocalWorld(t)
	a, b := lw.w.AddSandbox("a"), lw.w.AddSandbox("b")
	require.NoError(t, lw.in.AddSandbox(SandboxKey{CgroupID: a.CgroupID, NetnsCookie: a.NetnsCookie}))
	ca, cb := a.Start(t), b.Start(t)
	dest4 := netip.AddrPortFrom(testLinkLocal4, linkLocalPort)

	reachesReal := func(t *testing.T, c *sandboxtest.Client, dest netip.AddrPort, srv *server) {
		t.Helper()
		fd, err := c.Socket(4)
		require.NoError(t, err)
		_, err = c.Connect(fd, dest)
		require.NoError(t, err)
		_, err = lw.in.Lookup(srv.accept())
		assert.ErrorIs(t, err, ErrNoRecord)
		got, err := c.Peer(fd)
		require.NoError(t, err)
		assert.Equal(t, dest, got)
	}
	t.Run("unregistered sandbox", func(t *testing.T) { reachesReal(t, cb, dest4, lw.real) })
	t.Run("registered sandbox, another port", func(t *testing.T) {
		reachesReal(t, ca, netip.AddrPortFrom(testLinkLocal4, linkLocalPort+1), lw.other)
	})
	t.Run("registered cgroup, another netns", func(t *testing.T) {
		// A task of a's cgroup in b's netns is not a's by the registry's
		// rule (a is registered with its netns).
		reachesReal(t, sandboxtest.StartClient(t, a.CgroupDir, b.Netns), dest4, lw.real)
	})
	t.Run("host process", func(t *testing.T) {
		var peerAddr netip.AddrPort
		require.NoError(t, lw.w.Do(func() error {
			c, err := net.Dial("tcp4", dest4.String())
			if err != nil {
				return err
			}
			defer c.Close()
			peerAddr = c.RemoteAddr().(*net.TCPAddr).AddrPort()
			return nil
		}))
		assert.Equal(t, dest4, peerAddr)
		_, err := lw.in.Lookup(lw.real.accept())
		assert.ErrorIs(t, err, ErrNoRecord)
	})
	t.Run("removed sandbox", func(t *testing.T) {
		require.NoError(t, lw.in.RemoveSandbox(SandboxKey{CgroupID: a.CgroupID, NetnsCookie: a.NetnsCookie}))
		reachesReal(t, ca, dest4, lw.real)
	})
	t.Run("no rules", func(t *testing.T) {
		require.NoError(t, lw.in.AddSandbox(SandboxKey{CgroupID: a.CgroupID, NetnsCookie: a.NetnsCookie}))
		require.NoError(t, lw.in.SetLinkLocal(nil))
		reachesReal(t, ca, dest4, lw.real)
	})
}

// TestLinkLocalSandboxMembership: a child cgroup of a registered sandbox is
// the sandbox's; a sandbox registered by netns alone owns every socket of
// its netns, the test's own included.
func TestLinkLocalSandboxMembership(t *testing.T) {
	lw := newLinkLocalWorld(t)
	a, b := lw.w.AddSandbox("a"), lw.w.AddSandbox("b")
	require.NoError(t, lw.in.SetSandboxes([]SandboxKey{{CgroupID: a.CgroupID}, {NetnsCookie: b.NetnsCookie}}))
	dest := netip.AddrPortFrom(testLinkLocal4, linkLocalPort)

	t.Run("child cgroup", func(t *testing.T) {
		c := a.Start(t)
		require.NoError(t, c.MoveTo(filepath.Join(a.ChildCgroup("worker"))))
		fd, err := c.Socket(4)
		require.NoError(t, err)
		_, err = c.Connect(fd, dest)
		require.NoError(t, err)
		rec, err := lw.in.Lookup(lw.token.accept())
		require.NoError(t, err)
		assert.Equal(t, a.NetnsCookie, rec.NetnsCookie)
	})
	t.Run("netns only", func(t *testing.T) {
		var peerAddr netip.AddrPort
		require.NoError(t, netnsutil.Do(b.Netns, func() error {
			c, err := net.Dial("tcp6", netip.AddrPortFrom(testLinkLocal6, linkLocalPort).String())
			if err != nil {
				return err
			}
			defer c.Close()
			peerAddr = c.RemoteAddr().(*net.TCPAddr).AddrPort()
			return nil
		}))
		assert.Equal(t, netip.AddrPortFrom(testLinkLocal6, linkLocalPort), peerAddr, "getpeername (as Go's Dial reads it)")
		rec, err := lw.in.Lookup(lw.token.accept())
		require.NoError(t, err)
		assert.Equal(t, b.NetnsCookie, rec.NetnsCookie)
	})
	t.Run("IPv6-only socket to an IPv4 endpoint", func(t *testing.T) {
		// Sent to an IPv4-mapped address, which such a socket cannot
		// reach: connect fails, nothing goes anywhere.
		require.NoError(t, netnsutil.Do(b.Netns, func() error {
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1); err != nil {
				return err
			}
			err = unix.Connect(fd, &unix.SockaddrInet6{Addr: testLinkLocal6b.As16(), Port: linkLocalPort})
			assert.ErrorIs(t, err, unix.ENETUNREACH)
			return nil
		}))
	})
}

func TestLinkLocalConfiguration(t *testing.T) {
	in, opts := install(t)
	ap := netip.MustParseAddrPort
	to4, to6 := ap("10.1.2.3:7123"), ap("[fd00::1]:7123")
	for _, bad := range [][]Redirect{
		{{From: ap("169.254.77.77:80"), To: to6}}, // IPv4 socket to an IPv6 endpoint
		{{From: ap("0.0.0.0:80"), To: to4}},       // no wildcards
		{{From: ap("169.254.77.77:0"), To: to4}},  // no port
		{{From: ap("169.254.77.77:80")}},          // no endpoint
		{{From: to4, To: to4}},                    // itself
		{{From: ap("169.254.77.77:80"), To: to4}, {From: ap("169.254.77.77:80"), To: to4}},
	} {
		assert.Error(t, in.SetLinkLocal(bad), "%v", bad)
	}
	rules := []Redirect{{From: ap("169.254.77.77:80"), To: to4}, {From: ap("[fd00:77::77]:80"), To: to4}}
	require.NoError(t, in.SetLinkLocal(rules))
	got, err := in.LinkLocal()
	require.NoError(t, err)
	assert.Equal(t, rules, got)
	require.NoError(t, in.SetLinkLocal(rules[1:]))
	got, err = in.LinkLocal()
	require.NoError(t, err)
	assert.Equal(t, rules[1:], got)

	ports, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), attribMapLinkLocalPorts), nil)
	require.NoError(t, err)
	defer ports.Close()
	var bm attribPortBitmap
	require.NoError(t, ports.Lookup(uint32(0), &bm))
	assert.Equal(t, uint64(1)<<(80-64), bm.Bits[1], "only port 80 passes the bitmap")

	require.NoError(t, in.SetSandboxes([]SandboxKey{{CgroupID: 1, NetnsCookie: 2}, {NetnsCookie: 3}, {CgroupID: 4}}))
	require.NoError(t, in.SetSandboxes([]SandboxKey{{CgroupID: 4}, {NetnsCookie: 5}}))
	sbs, err := in.Sandboxes()
	require.NoError(t, err)
	assert.ElementsMatch(t, []SandboxKey{{CgroupID: 4}, {NetnsCookie: 5}}, sbs)
	assert.Error(t, in.AddSandbox(SandboxKey{}))
}

// TestNoRedirectStorageOnOtherSockets: the note a redirected socket keeps
// for getpeername is never allocated for other connections.
func TestNoRedirectStorageOnOtherSockets(t *testing.T) {
	in, opts := install(t)
	token := listenLoopback(t)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{addrOf(token)}))
	require.NoError(t, in.SetLinkLocal([]Redirect{{From: netip.AddrPortFrom(testLinkLocal4, linkLocalPort), To: addrOf(token)}}))
	redirects, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), attribMapRedirects), nil)
	require.NoError(t, err)
	defer redirects.Close()

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Connect(fd, &unix.SockaddrInet4{Addr: addrOf(token).Addr().As4(), Port: int(addrOf(token).Port())}))
	var note attribRedirected
	assert.ErrorIs(t, redirects.Lookup(uint32(fd), &note), ebpf.ErrKeyNotExist)
}
