package netnsutil

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
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
