package controllers

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// The attacker in these tests is sandbox B, root in its own netns with
// CAP_NET_RAW (the test process is root): it sends forged ARP and packets
// with A's source address. The full attacks against a real daemon are in
// cmd/identityd; these check the network the controller builds.

// TestRoutedSandboxesResistARPAndSpoofing: on routed links, B's forged ARP
// for A's and the router's addresses changes nothing the host or A uses,
// A's traffic never passes B, packets B sends with A's address are dropped
// by the host's reverse-path filter, and A and B are still served.
func TestRoutedSandboxesResistARPAndSpoofing(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	ctx := context.Background()
	idA, idB := "net-a-"+suffix(), "net-b-"+suffix()
	a, err := c.Create(ctx, CreateRequest{ID: idA, App: "victim"})
	require.NoError(t, err)
	b, err := c.Create(ctx, CreateRequest{ID: idB, App: "attacker"})
	require.NoError(t, err)
	addrA, addrB, router := a.Sandbox.Addresses[0].Addr(), b.Sandbox.Addresses[0].Addr(), c.Router()
	assert.Equal(t, 32, a.Sandbox.Addresses[0].Bits(), "the record holds the /32 the sandbox has")

	host, err := netnsutil.Handle(cfg.HostNetns)
	require.NoError(t, err)
	defer host.Close()
	vethA, vethB := link(t, host, a.Sandbox.Veth), link(t, host, b.Sandbox.Veth)
	for _, v := range []netlink.Link{vethA, vethB} {
		assert.Zero(t, v.Attrs().MasterIndex, "%s is no bridge's port", v.Attrs().Name)
		for key, want := range map[string]string{"rp_filter": "1"} {
			got, err := netnsutil.Sysctl(cfg.HostNetns, "net/ipv4/conf/"+v.Attrs().Name+"/"+key)
			require.NoError(t, err)
			assert.Equal(t, want, got, key)
		}
		got, err := netnsutil.Sysctl(cfg.HostNetns, "net/ipv6/conf/"+v.Attrs().Name+"/disable_ipv6")
		require.NoError(t, err)
		assert.Equal(t, "1", got, "nothing IPv6 from the sandbox reaches the host")
	}
	ln, err := w.Listen("tcp", netip.AddrPortFrom(router, 0).String())
	require.NoError(t, err)
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	// A talks to the router once, so that the host and A hold neighbour
	// entries B could try to overwrite.
	require.Equal(t, addrA, exchange(t, a.Sandbox.NetnsPath, ln, netip.AddrPortFrom(router, port)))
	macA, macB := link(t, handle(t, a.Sandbox.NetnsPath), "eth0").Attrs().HardwareAddr, link(t, handle(t, b.Sandbox.NetnsPath), "eth0").Attrs().HardwareAddr

	// (1) B claims A's address and the router's, by gratuitous ARP and by
	// unsolicited replies to the host, while sniffing its own link.
	sniff := sniffer(t, b.Sandbox.NetnsPath)
	for _, claim := range []netip.Addr{addrA, router} {
		forgeARP(t, b.Sandbox.NetnsPath, macB, vethB.Attrs().HardwareAddr, claim, addrA, router)
	}
	require.Equal(t, addrA, exchange(t, a.Sandbox.NetnsPath, ln, netip.AddrPortFrom(router, port)),
		"A's connection reaches the router, from A's address")
	assert.Zero(t, sniff(addrA), "none of A's packets passes B's link")
	routes, err := host.RouteGet(addrA.AsSlice())
	require.NoError(t, err)
	require.Len(t, routes, 1)
	assert.Equal(t, vethA.Attrs().Index, routes[0].LinkIndex, "the host's route to A still goes to A's veth")
	assert.Equal(t, macA.String(), neighbour(t, host, vethA.Attrs().Index, addrA), "the host's entry for A is A's MAC")
	hA := handle(t, a.Sandbox.NetnsPath)
	assert.Equal(t, vethA.Attrs().HardwareAddr.String(), neighbour(t, hA, link(t, hA, "eth0").Attrs().Index, router),
		"A's entry for the router is the host's veth")

	// (2) B sends with A's source address, towards the router: a UDP
	// datagram and a TCP SYN (IP_TRANSPARENT needs only CAP_NET_RAW). The
	// host drops both: the datagram B sends next, from its own address, is
	// the first to arrive, and the reverse-path filter counts the drops.
	var udp net.PacketConn
	require.NoError(t, w.Do(func() (err error) {
		udp, err = net.ListenPacket("udp", netip.AddrPortFrom(router, 0).String())
		return err
	}))
	defer udp.Close()
	udpPort := uint16(udp.LocalAddr().(*net.UDPAddr).Port)
	drops := rpFilterDrops(t, cfg.HostNetns)
	spoofUDP(t, b.Sandbox.NetnsPath, netip.AddrPortFrom(addrA, 40000), netip.AddrPortFrom(router, udpPort), "spoofed")
	require.NoError(t, netnsutil.Do(b.Sandbox.NetnsPath, func() error {
		conn, err := net.Dial("udp", netip.AddrPortFrom(router, udpPort).String())
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write([]byte("honest"))
		return err
	}))
	buf := make([]byte, 64)
	n, from, err := udp.ReadFrom(buf)
	require.NoError(t, err)
	assert.Equal(t, "honest", string(buf[:n]), "the datagram with A's source never arrived")
	assert.Equal(t, addrB, from.(*net.UDPAddr).AddrPort().Addr().Unmap())
	require.Eventually(t, func() bool { return rpFilterDrops(t, cfg.HostNetns) > drops }, timeout, tick,
		"the host's reverse-path filter dropped the datagram")

	drops = rpFilterDrops(t, cfg.HostNetns)
	closeSYN := spoofSYN(t, b.Sandbox.NetnsPath, netip.AddrPortFrom(addrA, 40001), netip.AddrPortFrom(router, port))
	require.Eventually(t, func() bool { return rpFilterDrops(t, cfg.HostNetns) > drops }, timeout, tick,
		"the host's reverse-path filter dropped the SYN with A's address")
	closeSYN()

	// (3) Both are still served, each from its own address.
	assert.Equal(t, addrA, exchange(t, a.Sandbox.NetnsPath, ln, netip.AddrPortFrom(router, port)))
	assert.Equal(t, addrB, exchange(t, b.Sandbox.NetnsPath, ln, netip.AddrPortFrom(router, port)))
}

// TestLooseRPFilterRefusesCreate: a host netns whose conf.all.rp_filter is
// loose would make every veth's strict filter loose; Create refuses with
// the sysctl and its fix, and leaves nothing behind.
func TestLooseRPFilterRefusesCreate(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	// The world's host netns, never the machine's.
	require.NoError(t, netnsutil.SetSysctl(w.HostNetns, "net/ipv4/conf/all/rp_filter", "2"))
	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	c := start(t, cfg) // it starts, to serve the sandboxes it has, and says why it cannot make more
	assert.NotEmpty(t, findLog(t, logs, "WARN", "sandboxes cannot be created until this is fixed"))

	id := "loose-" + suffix()
	_, err := c.Create(context.Background(), CreateRequest{ID: id, App: "web"})
	require.ErrorIs(t, err, netnsutil.ErrLooseRPFilter)
	assert.ErrorContains(t, err, "net.ipv4.conf.all.rp_filter is 2")
	assert.ErrorContains(t, err, "sysctl -w net.ipv4.conf.all.rp_filter=1")
	assert.Zero(t, c.Len())
	assert.NoDirExists(t, cfg.CgroupParent+"/"+id)
	assert.NoFileExists(t, netnsutil.Dir+"/"+c.netnsName(id))
	host := handle(t, w.HostNetns)
	_, err = host.LinkByName(c.vethName(id))
	assert.ErrorAs(t, err, new(netlink.LinkNotFoundError))

	require.NoError(t, netnsutil.SetSysctl(w.HostNetns, "net/ipv4/conf/all/rp_filter", "1"))
	_, err = c.Create(context.Background(), CreateRequest{ID: id, App: "web"})
	require.NoError(t, err, "strict host-wide is fine")
}

// TestRouterAnswersARPWhateverArpIgnore: the host answers a sandbox's ARP
// for the router on its veth with arp_ignore 1, 2 and 3 host-wide (set in the
// world's host netns), as with the default 0. The sandbox's permanent entry
// for the router is deleted first, as the sandbox itself may (root in its
// netns), so that it asks.
func TestRouterAnswersARPWhateverArpIgnore(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	ln, err := w.Listen("tcp", netip.AddrPortFrom(c.Router(), 0).String())
	require.NoError(t, err)
	defer ln.Close()
	for _, v := range []string{"1", "2", "3"} {
		require.NoError(t, netnsutil.SetSysctl(w.HostNetns, "net/ipv4/conf/all/arp_ignore", v))
		id := "arp" + v + "-" + suffix()
		sb, err := c.Create(context.Background(), CreateRequest{ID: id, App: "web"})
		require.NoError(t, err)
		h := handle(t, sb.Sandbox.NetnsPath)
		require.NoError(t, h.NeighDel(&netlink.Neigh{LinkIndex: link(t, h, "eth0").Attrs().Index, Family: netlink.FAMILY_V4, IP: c.Router().AsSlice()}))
		require.Empty(t, neighbour(t, h, link(t, h, "eth0").Attrs().Index, c.Router()))
		assert.Equal(t, sb.Sandbox.Addresses[0].Addr(), exchange(t, sb.Sandbox.NetnsPath, ln, ln.Addr().(*net.TCPAddr).AddrPort()),
			"arp_ignore=%s", v)
		assert.Equal(t, link(t, handle(t, w.HostNetns), sb.Sandbox.Veth).Attrs().HardwareAddr.String(), neighbour(t, h, link(t, h, "eth0").Attrs().Index, c.Router()),
			"arp_ignore=%s: ARP answered with the host end's MAC", v)
	}
}

func TestIPv6SubnetRefused(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	cfg.Subnet = netip.MustParsePrefix("fd00:77::/64")
	_, err := New(context.Background(), cfg)
	require.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "sandbox subnets must be IPv4")
}

// TestUpgradeKeepsBridgedSandboxes: a sandbox made by an older identityd is
// a port of the shared bridge. A restarted controller serves it where it
// is and warns that it lacks isolation; it cannot use the address of a
// routed sandbox either (rp_filter on the bridge). The same forged ARP that
// is harmless on routed links poisons the host's entry there, which is why
// it is warned about.
func TestUpgradeKeepsBridgedSandboxes(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c1 := start(t, cfg)
	ctx := context.Background()
	idOld, idOld2, idNew := "old-"+suffix(), "old2-"+suffix(), "new-"+suffix()
	var olds []Created
	for _, id := range []string{idOld, idOld2} {
		sb, err := c1.Create(ctx, CreateRequest{ID: id, App: "legacy"})
		require.NoError(t, err)
		olds = append(olds, *sb)
		// Rewire it as the old design did: a port of the bridge, an address
		// of the subnet's size, a default route via the router.
		r := sb.Sandbox
		require.NoError(t, c1.host.LinkDel(link(t, c1.host, r.Veth)))
		r.Addresses = []netip.Prefix{netip.PrefixFrom(r.Addresses[0].Addr(), cfg.Subnet.Bits())}
		require.NoError(t, netnsutil.Attach(c1.host, c1.bridgeIndex, r.Veth, r.NetnsPath, r.Addresses, []netip.Addr{c1.Router()}))
		require.NoError(t, c1.records.put(&r))
	}
	require.NoError(t, c1.Close())

	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	c2 := start(t, cfg)
	require.Len(t, c2.List(), 2, "the old sandboxes are still served")
	for _, id := range []string{idOld, idOld2} {
		assert.NotEmpty(t, findLog(t, logs, "WARN", "sandbox is on the shared bridge of an older identityd", "sandbox", id))
	}
	old, old2 := olds[0].Sandbox, olds[1].Sandbox
	ln, err := w.Listen("tcp", netip.AddrPortFrom(c2.Router(), 0).String())
	require.NoError(t, err)
	defer ln.Close()
	to := ln.Addr().(*net.TCPAddr).AddrPort()
	assert.Equal(t, old.Addresses[0].Addr(), exchange(t, old.NetnsPath, ln, to), "an old sandbox reaches the router")

	nw, err := c2.Create(ctx, CreateRequest{ID: idNew, App: "web"})
	require.NoError(t, err)
	addrNew := nw.Sandbox.Addresses[0].Addr()
	assert.Equal(t, addrNew, exchange(t, nw.Sandbox.NetnsPath, ln, to))
	assert.Empty(t, findLog(t, logs, "WARN", "sandbox is on the shared bridge of an older identityd", "sandbox", idNew))

	// An old sandbox cannot send with the new one's address.
	var udp net.PacketConn
	require.NoError(t, w.Do(func() (err error) {
		udp, err = net.ListenPacket("udp", netip.AddrPortFrom(c2.Router(), 0).String())
		return err
	}))
	defer udp.Close()
	dst := udp.LocalAddr().(*net.UDPAddr).AddrPort()
	spoofUDP(t, old.NetnsPath, netip.AddrPortFrom(addrNew, 40000), dst, "spoofed")
	spoofUDP(t, old.NetnsPath, netip.AddrPortFrom(old.Addresses[0].Addr(), 40000), dst, "honest")
	buf := make([]byte, 64)
	n, _, err := udp.ReadFrom(buf)
	require.NoError(t, err)
	assert.Equal(t, "honest", string(buf[:n]))

	// On the bridge, old2's forged ARP overwrites the host's entry for old.
	hostBridge := link(t, c2.host, c2.cfg.Bridge)
	mac2 := link(t, handle(t, old2.NetnsPath), "eth0").Attrs().HardwareAddr
	oldAddr := old.Addresses[0].Addr()
	forgeARP(t, old2.NetnsPath, mac2, hostBridge.Attrs().HardwareAddr, oldAddr, oldAddr, c2.Router())
	require.Eventually(t, func() bool {
		return neighbour(t, c2.host, c2.bridgeIndex, oldAddr) == mac2.String()
	}, timeout, tick, "the shared bridge is open to ARP poisoning")
}

// TestAdoptWarnsOfSharedBridge: adopting a sandbox whose host veth is a
// port of a bridge without isolation logs a warning naming the port; an
// isolated port does not.
func TestAdoptWarnsOfSharedBridge(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	c := start(t, cfg)
	ctx := context.Background()
	shared, isolated := w.AddSandbox("shared"), w.AddSandbox("isolated")
	host := handle(t, w.HostNetns)
	ports, err := netnsutil.HostPorts(host, w.HostNetns, isolated.Netns)
	require.NoError(t, err)
	require.Len(t, ports, 1)
	require.NoError(t, host.LinkSetIsolated(link(t, host, ports[0].Veth), true))

	idShared, idIsolated := "shared-"+suffix(), "isolated-"+suffix()
	_, err = c.Adopt(ctx, AdoptRequest{ID: idShared, App: "web", CgroupPath: shared.CgroupDir, NetnsPath: shared.Netns})
	require.NoError(t, err)
	_, err = c.Adopt(ctx, AdoptRequest{ID: idIsolated, App: "web", CgroupPath: isolated.CgroupDir, NetnsPath: isolated.Netns})
	require.NoError(t, err)

	const msg = "adopted sandbox's network lets neighbours reach it at layer 2"
	warned := findLog(t, logs, "WARN", msg, "sandbox", idShared)
	require.Len(t, warned, 1, logs.String())
	assert.Equal(t, "br0", warned[0]["bridge"])
	assert.Contains(t, warned[0]["msg"], "guarantee against ARP man-in-the-middle does not hold")
	assert.NotEmpty(t, warned[0]["veth"])
	assert.Empty(t, findLog(t, logs, "WARN", msg, "sandbox", idIsolated), "an isolated port is fine")
}

const (
	timeout = 5_000_000_000 // 5s: a bound for Eventually, never a measurement
	tick    = 10_000_000
)

func link(t *testing.T, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	require.NoError(t, err)
	return l
}

func handle(t *testing.T, netnsPath string) *netlink.Handle {
	t.Helper()
	h, err := netnsutil.Handle(netnsPath)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	return h
}

// neighbour returns the MAC of h's entry for addr on link index, "" if none.
func neighbour(t *testing.T, h *netlink.Handle, index int, addr netip.Addr) string {
	t.Helper()
	neighs, err := h.NeighList(index, netlink.FAMILY_V4)
	require.NoError(t, err)
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr && n.HardwareAddr != nil {
			return n.HardwareAddr.String()
		}
	}
	return ""
}

// exchange connects from the netns at netnsPath to to, where ln listens,
// trades a line each way, and returns the address the listener saw.
func exchange(t *testing.T, netnsPath string, ln net.Listener, to netip.AddrPort) netip.Addr {
	t.Helper()
	var conn net.Conn
	require.NoError(t, netnsutil.Do(netnsPath, func() (err error) {
		conn, err = net.Dial("tcp", to.String())
		return err
	}))
	defer conn.Close()
	srv, err := ln.Accept()
	require.NoError(t, err)
	defer srv.Close()
	_, err = conn.Write([]byte("ping\n"))
	require.NoError(t, err)
	line, err := bufio.NewReader(srv).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "ping\n", line)
	_, err = srv.Write([]byte("pong\n"))
	require.NoError(t, err)
	line, err = bufio.NewReader(conn).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "pong\n", line)
	return srv.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
}

// packetSocket opens an AF_PACKET socket on eth0 in the netns at netnsPath.
func packetSocket(t *testing.T, netnsPath string, proto uint16) (fd, ifindex int) {
	t.Helper()
	require.NoError(t, netnsutil.Do(netnsPath, func() error {
		l, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		ifindex = l.Index
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(proto)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: ifindex})
	}))
	t.Cleanup(func() { unix.Close(fd) })
	return fd, ifindex
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// forgeARP sends, from eth0 in the netns at netnsPath, everything that
// claims claim is at mac: a gratuitous request and a gratuitous reply
// (broadcast), and unsolicited replies to hostMAC for each of targets.
func forgeARP(t *testing.T, netnsPath string, mac, hostMAC net.HardwareAddr, claim netip.Addr, targets ...netip.Addr) {
	t.Helper()
	fd, ifindex := packetSocket(t, netnsPath, unix.ETH_P_ARP)
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	frame := func(dst net.HardwareAddr, op uint16, tha net.HardwareAddr, tpa netip.Addr) []byte {
		var b bytes.Buffer
		b.Write(dst)
		b.Write(mac)
		binary.Write(&b, binary.BigEndian, []uint16{unix.ETH_P_ARP, 1, unix.ETH_P_IP})
		b.Write([]byte{6, 4})
		binary.Write(&b, binary.BigEndian, op)
		b.Write(mac)
		b.Write(claim.AsSlice())
		b.Write(tha)
		b.Write(tpa.AsSlice())
		return b.Bytes()
	}
	frames := [][]byte{
		frame(bcast, 1, make(net.HardwareAddr, 6), claim),
		frame(bcast, 2, bcast, claim),
	}
	for _, tpa := range targets {
		frames = append(frames, frame(hostMAC, 2, hostMAC, tpa))
	}
	for range 3 {
		for _, f := range frames {
			require.NoError(t, unix.Sendto(fd, f, 0, &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Addr: [8]byte(append(append([]byte{}, f[:6]...), 0, 0))}))
		}
	}
}

// sniffer starts capturing every frame on eth0 in the netns at netnsPath
// and returns a function that counts, among the frames captured so far,
// the IPv4 packets from or to addr.
func sniffer(t *testing.T, netnsPath string) func(addr netip.Addr) int {
	fd, _ := packetSocket(t, netnsPath, unix.ETH_P_ALL)
	return func(addr netip.Addr) int {
		n := 0
		buf := make([]byte, 65536)
		for {
			m, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
			if err != nil {
				return n
			}
			if m >= 34 && binary.BigEndian.Uint16(buf[12:]) == unix.ETH_P_IP {
				src, dst := netip.AddrFrom4([4]byte(buf[26:30])), netip.AddrFrom4([4]byte(buf[30:34]))
				if src == addr || dst == addr {
					n++
				}
			}
		}
	}
}

// transparentSocket makes a socket in the netns at netnsPath bound to from,
// an address that need not be its own (IP_TRANSPARENT: CAP_NET_RAW).
func transparentSocket(t *testing.T, netnsPath string, typ int, from netip.AddrPort) int {
	t.Helper()
	var fd int
	require.NoError(t, netnsutil.Do(netnsPath, func() (err error) {
		if fd, err = unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrInet4{Addr: from.Addr().As4(), Port: int(from.Port())})
	}))
	return fd
}

func spoofUDP(t *testing.T, netnsPath string, from, to netip.AddrPort, payload string) {
	t.Helper()
	fd := transparentSocket(t, netnsPath, unix.SOCK_DGRAM, from)
	defer unix.Close(fd)
	require.NoError(t, unix.Sendto(fd, []byte(payload), 0, &unix.SockaddrInet4{Addr: to.Addr().As4(), Port: int(to.Port())}))
}

// spoofSYN starts a TCP connect from from to to (the kernel sends and
// resends the SYN) and returns a function that abandons it.
func spoofSYN(t *testing.T, netnsPath string, from, to netip.AddrPort) func() {
	t.Helper()
	fd := transparentSocket(t, netnsPath, unix.SOCK_STREAM|unix.SOCK_NONBLOCK, from)
	err := unix.Connect(fd, &unix.SockaddrInet4{Addr: to.Addr().As4(), Port: int(to.Port())})
	require.ErrorIs(t, err, unix.EINPROGRESS)
	return func() { unix.Close(fd) }
}

// rpFilterDrops reads TcpExt IPReversePathFilter, the packets the netns at
// netnsPath dropped for failing the reverse-path check (/proc/thread-self:
// the thread's netns, not the process's).
func rpFilterDrops(t *testing.T, netnsPath string) uint64 {
	t.Helper()
	var b []byte
	require.NoError(t, netnsutil.Do(netnsPath, func() (err error) {
		b, err = os.ReadFile("/proc/thread-self/net/netstat")
		return err
	}))
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(values) != len(names) {
			continue
		}
		for j, name := range names {
			if name == "IPReversePathFilter" {
				v, err := strconv.ParseUint(values[j], 10, 64)
				require.NoError(t, err)
				return v
			}
		}
	}
	t.Fatalf("no TcpExt IPReversePathFilter in netstat:\n%s", b)
	return 0
}

// TestStartPinsNeighboursOfOlderSandboxes: each routed sandbox the
// controller creates has a permanent neighbour entry at both ends of its
// veth, so that it uses none of the machine-wide neighbour table that ARP's
// entries fill (see netnsutil.AttachRouted). A start gives them to
// sandboxes an older identityd made with ARP's entries only, leaves those
// that have them alone, and keeps serving one whose entries it cannot set
// (it moved its end of the veth away), with a warning.
func TestStartPinsNeighboursOfOlderSandboxes(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c1 := start(t, cfg)
	ctx := context.Background()
	idOld, idNew, idMoved := "old-"+suffix(), "new-"+suffix(), "moved-"+suffix()
	sbs := map[string]Record{}
	for _, id := range []string{idOld, idNew, idMoved} {
		sb, err := c1.Create(ctx, CreateRequest{ID: id, App: "web"})
		require.NoError(t, err)
		sbs[id] = sb.Sandbox
	}
	host := handle(t, w.HostNetns)
	for id, r := range sbs {
		veth, h := link(t, host, r.Veth), handle(t, r.NetnsPath)
		eth0 := link(t, h, "eth0")
		assertPermanent(t, host, veth.Attrs().Index, r.Addresses[0].Addr(), eth0.Attrs().HardwareAddr, id+": the host's entry")
		assertPermanent(t, h, eth0.Attrs().Index, c1.Router(), veth.Attrs().HardwareAddr, id+": the sandbox's entry for the router")
	}
	ln, err := w.Listen("tcp", netip.AddrPortFrom(c1.Router(), 0).String())
	require.NoError(t, err)
	defer ln.Close()
	to := ln.Addr().(*net.TCPAddr).AddrPort()
	require.NoError(t, c1.Close())

	// old: as an older identityd left it, with ARP's entries.
	old := sbs[idOld]
	hOld := handle(t, old.NetnsPath)
	vethOld, eth0Old := link(t, host, old.Veth), link(t, hOld, "eth0")
	require.NoError(t, host.NeighDel(&netlink.Neigh{LinkIndex: vethOld.Attrs().Index, Family: netlink.FAMILY_V4, IP: old.Addresses[0].Addr().AsSlice()}))
	require.NoError(t, hOld.NeighDel(&netlink.Neigh{LinkIndex: eth0Old.Attrs().Index, Family: netlink.FAMILY_V4, IP: c1.Router().AsSlice()}))
	assert.Equal(t, old.Addresses[0].Addr(), exchange(t, old.NetnsPath, ln, to))
	require.Equal(t, eth0Old.Attrs().HardwareAddr.String(), neighbour(t, host, vethOld.Attrs().Index, old.Addresses[0].Addr()), "ARP's entry")
	// moved: without permanent entries, and its end of the veth in another
	// netns.
	moved := sbs[idMoved]
	hMoved := handle(t, moved.NetnsPath)
	vethMoved, eth0Moved := link(t, host, moved.Veth), link(t, hMoved, "eth0")
	require.NoError(t, host.NeighDel(&netlink.Neigh{LinkIndex: vethMoved.Attrs().Index, Family: netlink.FAMILY_V4, IP: moved.Addresses[0].Addr().AsSlice()}))
	elsewhere := w.AddSandbox("elsewhere")
	// (Down first: kernels before 6.2 refuse to rename an interface that is
	// up, and this one leaves for another netns anyway.)
	require.NoError(t, hMoved.LinkSetDown(eth0Moved))
	require.NoError(t, hMoved.LinkSetName(eth0Moved, "away0"))
	fd, err := unix.Open(elsewhere.Netns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, hMoved.LinkSetNsFd(eth0Moved, fd))

	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	c2 := start(t, cfg)
	assert.Len(t, c2.List(), 3, "all are served")
	assert.Len(t, findLog(t, logs, "INFO", "given permanent neighbour entries", "sandbox", idOld), 1, logs.String())
	assertPermanent(t, host, vethOld.Attrs().Index, old.Addresses[0].Addr(), eth0Old.Attrs().HardwareAddr, "old: the host's entry")
	assertPermanent(t, hOld, eth0Old.Attrs().Index, c2.Router(), vethOld.Attrs().HardwareAddr, "old: the sandbox's entry for the router")
	assert.Equal(t, old.Addresses[0].Addr(), exchange(t, old.NetnsPath, ln, to))
	assert.Empty(t, findLog(t, logs, "INFO", "given permanent neighbour entries", "sandbox", idNew), "new had them")
	warned := findLog(t, logs, "WARN", "cannot give a sandbox of an older identityd permanent neighbour entries", "sandbox", idMoved)
	if assert.Len(t, warned, 1, logs.String()) {
		assert.Contains(t, warned[0]["error"], "find the peer of "+moved.Veth)
	}
	assert.Empty(t, findLog(t, logs, "WARN", "retir"), "nobody is retired for it")
}

// assertPermanent checks that h has one IPv4 entry for addr on link index,
// a permanent one, for mac.
func assertPermanent(t *testing.T, h *netlink.Handle, index int, addr netip.Addr, mac net.HardwareAddr, msg string) {
	t.Helper()
	neighs, err := h.NeighList(index, netlink.FAMILY_V4)
	require.NoError(t, err)
	var found []netlink.Neigh
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr {
			found = append(found, n)
		}
	}
	if assert.Len(t, found, 1, msg) {
		assert.Equal(t, netlink.NUD_PERMANENT, found[0].State, "%s: state %#x", msg, found[0].State)
		assert.Equal(t, mac.String(), found[0].HardwareAddr.String(), msg)
	}
}

// findLog returns the JSON log lines at level whose msg contains msg and
// whose attributes match attrs (key, value pairs).
func findLog(t *testing.T, logs *sandboxtest.LogBuffer, level, msg string, attrs ...string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(logs.String(), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &m), line)
		if m["level"] != level || !strings.Contains(fmt.Sprint(m["msg"]), msg) {
			continue
		}
		match := true
		for i := 0; i+1 < len(attrs); i += 2 {
			match = match && fmt.Sprint(m[attrs[i]]) == attrs[i+1]
		}
		if match {
			out = append(out, m)
		}
	}
	return out
}

// BenchmarkCreateNetwork measures making and removing one sandbox's network:
// the routed link against the old bridge port, in the same world.
//
//	go test -run '^$' -bench CreateNetwork -benchtime 200x ./controllers/
func BenchmarkCreateNetwork(b *testing.B) {
	w := sandboxtest.New(b)
	cfg := Config{StateDir: b.TempDir() + "/state", CgroupParent: w.CgroupDir + "/sandboxes", HostNetns: w.HostNetns,
		NetnsPrefix: testNetnsPrefix(b), Subnet: netip.MustParsePrefix("10.250.0.0/24"), Logger: quiet}
	c, err := New(context.Background(), cfg)
	require.NoError(b, err)
	defer c.Close()
	addr := netip.PrefixFrom(c.Router().Next(), 32)
	for _, variant := range []string{"routed", "bridge"} {
		b.Run(variant, func(b *testing.B) {
			id := "bench-" + suffix()
			rec := &Record{ID: id, NetnsPath: netnsutil.Dir + "/" + c.netnsName(id), Veth: c.vethName(id), Owned: true}
			defer c.teardown(rec, false)
			for b.Loop() {
				if variant == "routed" {
					require.NoError(b, c.createNetwork(rec, addr))
				} else {
					require.NoError(b, netnsutil.NewNamed(c.netnsName(id)))
					require.NoError(b, netnsutil.Attach(c.host, c.bridgeIndex, rec.Veth, rec.NetnsPath,
						[]netip.Prefix{netip.PrefixFrom(addr.Addr(), 24)}, []netip.Addr{c.Router()}))
				}
				require.NoError(b, c.teardown(rec, false))
			}
		})
	}
}
