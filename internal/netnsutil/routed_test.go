package netnsutil

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// testNetns makes a named netns unique to this test process and removes it
// in t.Cleanup.
func testNetns(t *testing.T, name string) string {
	t.Helper()
	n := fmt.Sprintf("idt%d-netnsutil-%s", os.Getpid(), name)
	require.NoError(t, NewNamed(n))
	t.Cleanup(func() { DeleteNamed(n) })
	return filepath.Join(Dir, n)
}

func TestAttachRouted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	rootRPF, err := Sysctl("", "net/ipv4/conf/all/rp_filter")
	require.NoError(t, err)

	hostNS := testNetns(t, "host")
	host, err := Handle(hostNS)
	require.NoError(t, err)
	defer host.Close()
	lo, err := host.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, host.LinkSetUp(lo))
	// The router address lives on a bridge of its own, as the controller's.
	router := netip.MustParseAddr("10.231.7.1")
	require.NoError(t, host.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "rt0"}}))
	br, err := host.LinkByName("rt0")
	require.NoError(t, err)
	require.NoError(t, AddAddr(host, br, netip.PrefixFrom(router, 24)))
	require.NoError(t, host.LinkSetUp(br))

	sbNS := testNetns(t, "sb")
	addr := netip.MustParseAddr("10.231.7.9")
	require.NoError(t, AttachRouted(host, RoutedLink{HostNetns: hostNS, Veth: "rtv0", Netns: sbNS, Addr: addr, Router: netip.PrefixFrom(router, 24)}))

	for key, want := range map[string]string{"net/ipv4/conf/rtv0/rp_filter": "1", "net/ipv6/conf/rtv0/disable_ipv6": "1"} {
		v, err := Sysctl(hostNS, key)
		require.NoError(t, err)
		assert.Equal(t, want, v, key)
	}
	veth, err := host.LinkByName("rtv0")
	require.NoError(t, err)
	assert.Zero(t, veth.Attrs().MasterIndex, "a routed link is no bridge's port")
	routes, err := host.RouteGet(addr.AsSlice())
	require.NoError(t, err)
	require.Len(t, routes, 1)
	assert.Equal(t, veth.Attrs().Index, routes[0].LinkIndex, "the host reaches the sandbox through its veth")

	sb, err := Handle(sbNS)
	require.NoError(t, err)
	defer sb.Close()
	eth0, err := sb.LinkByName("eth0")
	require.NoError(t, err)
	addrs, err := sb.AddrList(eth0, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	assert.Equal(t, "10.231.7.9/32", addrs[0].IPNet.String())
	routes, err = sb.RouteGet(net.IPv4(192, 0, 2, 1))
	require.NoError(t, err)
	require.Len(t, routes, 1)
	assert.Equal(t, router.String(), routes[0].Gw.String(), "the default route goes via the router")

	// The sandbox reaches the router's address (on the bridge, not on its
	// link) in the host netns.
	var ln net.Listener
	require.NoError(t, Do(hostNS, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(router, 0).String())
		return err
	}))
	defer ln.Close()
	require.NoError(t, Do(sbNS, func() error {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Close()
		}
		return err
	}))
	c, err := ln.Accept()
	require.NoError(t, err)
	assert.Equal(t, addr.String(), c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().String())
	c.Close()

	ports, err := HostPorts(host, hostNS, sbNS)
	require.NoError(t, err)
	assert.Equal(t, []HostPort{{Veth: "rtv0"}}, ports)

	// A sandbox on the bridge: a port, not isolated until told.
	bridged := testNetns(t, "bridged")
	require.NoError(t, Attach(host, br.Attrs().Index, "rtv1", bridged, []netip.Prefix{netip.MustParsePrefix("10.231.7.10/24")}, nil))
	ports, err = HostPorts(host, hostNS, bridged)
	require.NoError(t, err)
	assert.Equal(t, []HostPort{{Veth: "rtv1", Bridge: "rt0"}}, ports)
	port, err := host.LinkByName("rtv1")
	require.NoError(t, err)
	require.NoError(t, host.LinkSetIsolated(port, true))
	ports, err = HostPorts(host, hostNS, bridged)
	require.NoError(t, err)
	assert.Equal(t, []HostPort{{Veth: "rtv1", Bridge: "rt0", Isolated: true}}, ports)

	// A loose filter host-wide (in this test's netns) is refused, and
	// nothing is left behind.
	require.NoError(t, SetSysctl(hostNS, "net/ipv4/conf/all/rp_filter", "2"))
	refused := testNetns(t, "refused")
	err = AttachRouted(host, RoutedLink{HostNetns: hostNS, Veth: "rtv2", Netns: refused, Addr: netip.MustParseAddr("10.231.7.11"), Router: netip.PrefixFrom(router, 24)})
	require.ErrorIs(t, err, ErrLooseRPFilter)
	assert.ErrorContains(t, err, "net.ipv4.conf.all.rp_filter is 2 in netns "+hostNS)
	assert.ErrorContains(t, err, "sysctl -w net.ipv4.conf.all.rp_filter=1")
	_, err = host.LinkByName("rtv2")
	assert.ErrorAs(t, err, new(netlink.LinkNotFoundError))

	err = AttachRouted(host, RoutedLink{HostNetns: hostNS, Veth: "rtv3", Netns: refused, Addr: netip.MustParseAddr("fd00::9"), Router: netip.PrefixFrom(router, 24)})
	assert.ErrorContains(t, err, "only IPv4")

	require.NoError(t, TightenRPFilter(hostNS))
	v, err := Sysctl(hostNS, "net/ipv4/conf/all/rp_filter")
	require.NoError(t, err)
	assert.Equal(t, "1", v, "loose made strict")
	require.NoError(t, SetSysctl(hostNS, "net/ipv4/conf/all/rp_filter", "0"))
	require.NoError(t, TightenRPFilter(hostNS))
	v, err = Sysctl(hostNS, "net/ipv4/conf/all/rp_filter")
	require.NoError(t, err)
	assert.Equal(t, "0", v, "off is left as it is: the links' own strict filter counts")
	assert.Error(t, TightenRPFilter(""), "never the caller's own netns")

	after, err := Sysctl("", "net/ipv4/conf/all/rp_filter")
	require.NoError(t, err)
	assert.Equal(t, rootRPF, after, "the machine's own netns is never touched")
}

// routedHost makes a host netns for routed links, as the controller's: lo
// up, a strict reverse-path filter, and router on a bridge of its own.
func routedHost(t *testing.T, name string, router netip.Prefix) (string, *netlink.Handle) {
	t.Helper()
	ns := testNetns(t, name)
	h, err := Handle(ns)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo))
	require.NoError(t, TightenRPFilter(ns))
	require.NoError(t, h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "rt0"}}))
	br, err := h.LinkByName("rt0")
	require.NoError(t, err)
	require.NoError(t, AddAddr(h, br, router))
	require.NoError(t, h.LinkSetUp(br))
	return ns, h
}

// neighbours returns h's IPv4 entries on link index for addr.
func neighbours(t *testing.T, h *netlink.Handle, index int, addr netip.Addr) []netlink.Neigh {
	t.Helper()
	all, err := h.NeighList(index, netlink.FAMILY_V4)
	require.NoError(t, err)
	var out []netlink.Neigh
	for _, n := range all {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr {
			out = append(out, n)
		}
	}
	return out
}

// assertPinned checks that h has one entry for addr on link index: a
// permanent one, for mac.
func assertPinned(t *testing.T, h *netlink.Handle, index int, addr netip.Addr, mac net.HardwareAddr, msg string) {
	t.Helper()
	got := neighbours(t, h, index, addr)
	if assert.Len(t, got, 1, msg) {
		assert.Equal(t, netlink.NUD_PERMANENT, got[0].State, "%s: state %#x", msg, got[0].State)
		assert.Equal(t, mac.String(), got[0].HardwareAddr.String(), msg)
	}
}

// connect opens a TCP connection from the netns at from to ln (listening
// at to) and returns the address ln saw it come from.
func connect(t *testing.T, from string, ln net.Listener, to netip.AddrPort) netip.Addr {
	t.Helper()
	require.NoError(t, Do(from, func() error {
		c, err := net.Dial("tcp", to.String())
		if err == nil {
			c.Close()
		}
		return err
	}), "connect from %s to %s", from, to)
	c, err := ln.Accept()
	require.NoError(t, err)
	defer c.Close()
	return c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
}

// listen listens on TCP at addr, port 0, in the netns at ns.
func listen(t *testing.T, ns string, addr netip.Addr) (net.Listener, netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	require.NoError(t, Do(ns, func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	return ln, ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestAttachRoutedPinsNeighbours: after AttachRouted the host end holds a
// permanent entry for the sandbox's address with eth0's MAC and the
// sandbox one for the router with the host end's MAC, so traffic both
// ways leaves no dynamic entry on either end, the kind the machine-wide
// table limit (gc_thresh3) counts.
func TestAttachRoutedPinsNeighbours(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	p := newRoutedPair(t, "10.231.8", "pinhost", "pinsb")
	router, hostNS, host, sbNS, addr, veth, sb, eth0 := p.router, p.hostNS, p.host, p.sbNS, p.addr, p.veth, p.sb, p.eth0
	assertPinned(t, host, veth.Attrs().Index, addr, eth0.Attrs().HardwareAddr, "the host's entry for the sandbox")
	assertPinned(t, sb, eth0.Attrs().Index, router.Addr(), veth.Attrs().HardwareAddr, "the sandbox's entry for the router")

	ln, to := listen(t, hostNS, router.Addr())
	assert.Equal(t, addr, connect(t, sbNS, ln, to), "the sandbox reaches the router")
	lnSB, toSB := listen(t, sbNS, addr)
	assert.Equal(t, router.Addr(), connect(t, hostNS, lnSB, toSB), "the host reaches the sandbox")
	for _, end := range []struct {
		h     *netlink.Handle
		index int
	}{{host, veth.Attrs().Index}, {sb, eth0.Attrs().Index}} {
		all, err := end.h.NeighList(end.index, netlink.FAMILY_V4)
		require.NoError(t, err)
		for _, n := range all {
			assert.Equal(t, netlink.NUD_PERMANENT, n.State, "entry %s is state %#x: ARP was used", n.IP, n.State)
		}
	}

	// Again: the entries are replaced, not refused.
	require.NoError(t, PinNeighbours(host, p.link))
	assertPinned(t, host, veth.Attrs().Index, addr, eth0.Attrs().HardwareAddr, "the host's entry, pinned again")
	assertPinned(t, sb, eth0.Attrs().Index, router.Addr(), veth.Attrs().HardwareAddr, "the sandbox's entry, pinned again")
}

// TestPinNeighboursOfAnOlderLink: a link made before AttachRouted pinned
// its neighbours, with the dynamic entries ARP left, gets permanent ones,
// found through the host end's peer even when the sandbox renamed it.
func TestPinNeighboursOfAnOlderLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	p := newRoutedPair(t, "10.231.9", "oldhost", "oldsb")
	router, hostNS, host, sbNS, addr, l, veth, sb, eth0 := p.router, p.hostNS, p.host, p.sbNS, p.addr, p.link, p.veth, p.sb, p.eth0
	renameSandboxEnd(t, sb, eth0, "wan0", router.Addr())
	// As an older AttachRouted left it, once traffic went both ways.
	for _, n := range append(neighbours(t, host, veth.Attrs().Index, addr), neighbours(t, sb, eth0.Attrs().Index, router.Addr())...) {
		h := host
		if n.LinkIndex == eth0.Attrs().Index {
			h = sb
		}
		require.NoError(t, h.NeighDel(&n))
	}
	ln, to := listen(t, hostNS, router.Addr())
	assert.Equal(t, addr, connect(t, sbNS, ln, to))
	learnt := append(neighbours(t, host, veth.Attrs().Index, addr), neighbours(t, sb, eth0.Attrs().Index, router.Addr())...)
	require.Len(t, learnt, 2, "ARP made an entry at each end")
	for _, n := range learnt {
		assert.NotEqual(t, netlink.NUD_PERMANENT, n.State, "ARP made entry %s", n.IP)
	}

	require.NoError(t, PinNeighbours(host, l))
	assertPinned(t, host, veth.Attrs().Index, addr, eth0.Attrs().HardwareAddr, "the host's entry for the sandbox")
	assertPinned(t, sb, eth0.Attrs().Index, router.Addr(), veth.Attrs().HardwareAddr, "the sandbox's entry for the router")
	assert.Equal(t, addr, connect(t, sbNS, ln, to))

	l.Veth = "nosuch0"
	assert.ErrorContains(t, PinNeighbours(host, l), "find veth nosuch0")
}

// routedPair is a routed link, made by AttachRouted, between a host netns
// and a sandbox netns of the test's own, with both ends' links.
type routedPair struct {
	router     netip.Prefix
	hostNS     string
	host       *netlink.Handle
	sbNS       string
	addr       netip.Addr
	link       RoutedLink
	veth, eth0 netlink.Link
	sb         *netlink.Handle
}

// newRoutedPair links hostName and sbName (netns names unique to the test)
// in net.0/24: the router is net.1, the sandbox net.9.
func newRoutedPair(t *testing.T, net, hostName, sbName string) routedPair {
	t.Helper()
	p := routedPair{router: netip.MustParsePrefix(net + ".1/24"), addr: netip.MustParseAddr(net + ".9")}
	p.hostNS, p.host = routedHost(t, hostName, p.router)
	p.sbNS = testNetns(t, sbName)
	p.link = RoutedLink{HostNetns: p.hostNS, Veth: "rtv0", Netns: p.sbNS, Addr: p.addr, Router: p.router}
	require.NoError(t, AttachRouted(p.host, p.link))
	var err error
	p.veth, err = p.host.LinkByName("rtv0")
	require.NoError(t, err)
	p.sb, err = Handle(p.sbNS)
	require.NoError(t, err)
	t.Cleanup(func() { p.sb.Close() })
	p.eth0, err = p.sb.LinkByName("eth0")
	require.NoError(t, err)
	return p
}

// renameSandboxEnd renames a routed link's sandbox end, as the sandbox's
// code may. Kernels before 6.2 refuse to rename an interface that is up
// (EBUSY): there it goes down and up around the rename and gets back the
// routes AttachRouted gave it, which going down removed.
func renameSandboxEnd(t *testing.T, h *netlink.Handle, link netlink.Link, name string, router netip.Addr) {
	t.Helper()
	err := h.LinkSetName(link, name)
	if !errors.Is(err, unix.EBUSY) {
		require.NoError(t, err)
		return
	}
	require.NoError(t, h.LinkSetDown(link))
	require.NoError(t, h.LinkSetName(link, name))
	require.NoError(t, h.LinkSetUp(link))
	idx := link.Attrs().Index
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: IPNet(netip.PrefixFrom(router, 32)), Scope: netlink.SCOPE_LINK}))
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: idx, Gw: router.AsSlice()}))
}

// TestSandboxChangesItsNeighbours: the sandbox is root in its netns. When
// it deletes its permanent entry for the router, it falls back to ARP and
// both directions still work; the host's entry, which it cannot reach, is
// still permanent. When it changes its MAC the host's entry keeps the old
// one: only its own link breaks, and pinning again mends it.
func TestSandboxChangesItsNeighbours(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	p := newRoutedPair(t, "10.231.10", "chhost", "chsb")
	router, hostNS, host, sbNS, addr, l, veth, sb, eth0 := p.router, p.hostNS, p.host, p.sbNS, p.addr, p.link, p.veth, p.sb, p.eth0
	ln, to := listen(t, hostNS, router.Addr())
	lnSB, toSB := listen(t, sbNS, addr)

	pinned := neighbours(t, sb, eth0.Attrs().Index, router.Addr())
	require.Len(t, pinned, 1)
	require.NoError(t, sb.NeighDel(&pinned[0]))
	assert.Equal(t, addr, connect(t, sbNS, ln, to), "the sandbox reaches the router by ARP")
	assert.Equal(t, router.Addr(), connect(t, hostNS, lnSB, toSB), "the host still reaches the sandbox")
	relearnt := neighbours(t, sb, eth0.Attrs().Index, router.Addr())
	if assert.Len(t, relearnt, 1) {
		assert.NotEqual(t, netlink.NUD_PERMANENT, relearnt[0].State, "ARP's entry")
		assert.Equal(t, veth.Attrs().HardwareAddr.String(), relearnt[0].HardwareAddr.String())
	}
	assertPinned(t, host, veth.Attrs().Index, addr, eth0.Attrs().HardwareAddr, "the host's entry is the host's")

	oldMAC := eth0.Attrs().HardwareAddr
	newMAC := net.HardwareAddr{0x02, 0x42, 0xac, 0x11, 0x00, 0x63}
	require.NoError(t, sb.LinkSetHardwareAddr(eth0, newMAC))
	assertPinned(t, host, veth.Attrs().Index, addr, oldMAC, "the host keeps the MAC it was given")
	require.NoError(t, PinNeighbours(host, l))
	assertPinned(t, host, veth.Attrs().Index, addr, newMAC, "pinned again, the host has the new MAC")
	assert.Equal(t, addr, connect(t, sbNS, ln, to), "the sandbox reaches the router again")
}
