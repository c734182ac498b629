package netnsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrLooseRPFilter is returned when the host netns's reverse-path filter is
// loose: it overrides the strict filter a routed link relies on.
var ErrLooseRPFilter = errors.New("reverse-path filtering is loose")

// RoutedLink is a point-to-point link from a host netns to a sandbox netns,
// in the manner of routed container networks: no bridge, so the sandbox
// shares layer 2 with nobody but the host.
type RoutedLink struct {
	// HostNetns is the path of the host's netns; "" is the calling
	// process's own. Sysctls are written there.
	HostNetns string
	// Veth is the name of the host end.
	Veth string
	// Netns is the path of the sandbox's netns; its end becomes eth0.
	Netns string
	// Addr is the sandbox's address. IPv4 only, as Router: the source
	// check is IPv4's reverse-path filter, which IPv6 does not have.
	Addr netip.Addr
	// Router is the host's address the sandbox routes through, with the
	// prefix of the pool Addr comes from (10.88.0.1/16).
	Router netip.Prefix
}

// AttachRouted makes l. The host has a /32 route to Addr through the host
// end. The host end carries Router too, with its prefix but not the
// prefix's route, so that the host answers the sandbox's ARP for Router on
// this link whatever arp_ignore says up to 3 (1 wants Router on the link,
// 2 the sender inside its prefix). Strict reverse-path filtering on the
// host end drops every packet whose source is not routed back through it,
// so the sandbox cannot use a neighbour's address, and IPv6 is off on it,
// so nothing IPv6 from the sandbox reaches the host. The sandbox end is
// eth0 with Addr/32, an on-link route to Router and a default route via
// Router; lo is brought up too.
//
// Both ends get a permanent neighbour entry for the other, from the MACs
// the kernel gave them (see PinNeighbours): the kernel's IPv4 neighbour
// table is one for every network namespace of the machine, and the
// dynamic entries ARP would leave, two per sandbox, would reach its
// gc_thresh3 (1,024 by default) at about 500 sandboxes, after which new
// connections fail everywhere on the machine. Permanent entries are not
// counted against it.
//
// It refuses (ErrLooseRPFilter) when the host netns's
// net.ipv4.conf.all.rp_filter is 2, and on failure removes what it made.
func AttachRouted(host *netlink.Handle, l RoutedLink) (err error) {
	if !l.Addr.Is4() || !l.Router.Addr().Is4() {
		return fmt.Errorf("routed link %s: addresses %s and %s: only IPv4 has reverse-path filtering", l.Veth, l.Addr, l.Router)
	}
	if err := CheckStrictRPFilter(l.HostNetns); err != nil {
		return err
	}
	ns, err := netns.GetFromPath(l.Netns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", l.Netns, err)
	}
	defer ns.Close()
	if err := host.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: l.Veth},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(ns),
	}); err != nil {
		return fmt.Errorf("add veth %s: %w", l.Veth, err)
	}
	hostEnd, err := host.LinkByName(l.Veth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", l.Veth, err)
	}
	defer func() {
		if err != nil {
			host.LinkDel(hostEnd)
		}
	}()

	// Before the link is up, so that no packet is ever taken unchecked.
	if err := SetSysctl(l.HostNetns, "net/ipv4/conf/"+l.Veth+"/rp_filter", "1"); err != nil {
		return err
	}
	if err := SetSysctl(l.HostNetns, "net/ipv6/conf/"+l.Veth+"/disable_ipv6", "1"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err // (ErrNotExist: a kernel without IPv6 has nothing to turn off)
	}
	if err := host.AddrAdd(hostEnd, &netlink.Addr{IPNet: IPNet(l.Router), Flags: unix.IFA_F_NOPREFIXROUTE}); err != nil {
		return fmt.Errorf("add %s to %s: %w", l.Router, l.Veth, err)
	}
	if err := host.LinkSetUp(hostEnd); err != nil {
		return fmt.Errorf("bring %s up: %w", l.Veth, err)
	}
	if err := host.RouteAdd(&netlink.Route{LinkIndex: hostEnd.Attrs().Index, Dst: IPNet(netip.PrefixFrom(l.Addr, 32)),
		Scope: netlink.SCOPE_LINK, Src: l.Router.Addr().AsSlice()}); err != nil {
		return fmt.Errorf("route to %s via %s: %w", l.Addr, l.Veth, err)
	}

	h, err := Handle(l.Netns)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, name := range []string{"lo", "eth0"} {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", name, l.Netns, err)
		}
		if name == "eth0" {
			if err := AddAddr(h, link, netip.PrefixFrom(l.Addr, 32)); err != nil {
				return err
			}
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("bring %s up in %s: %w", name, l.Netns, err)
		}
		if name == "eth0" {
			onLink := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: IPNet(netip.PrefixFrom(l.Router.Addr(), 32)), Scope: netlink.SCOPE_LINK}
			if err := h.RouteAdd(onLink); err != nil {
				return fmt.Errorf("route to %s on eth0 in %s: %w", l.Router, l.Netns, err)
			}
			if err := h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: l.Router.Addr().AsSlice()}); err != nil {
				return fmt.Errorf("default route via %s in %s: %w", l.Router, l.Netns, err)
			}
			if err := pin(host, hostEnd, h, link, l); err != nil {
				return err
			}
		}
	}
	return nil
}

// PinNeighbours gives both ends of the routed link l, made by
// AttachRouted, a permanent neighbour entry for the other, as AttachRouted
// does: the host end one for l.Addr, the sandbox's end one for l.Router.
// It is for links made before AttachRouted did so; entries already there
// are replaced, so it can be called again. The sandbox's end is found as
// the host end's peer, whatever the sandbox named it.
//
// The sandbox is root in its netns and may delete or change its own entry
// afterwards, or its end's MAC: that only breaks, or leaves to ARP, its
// own link, since the host's entry is on that link alone.
func PinNeighbours(host *netlink.Handle, l RoutedLink) error {
	if !l.Addr.Is4() || !l.Router.Addr().Is4() {
		return fmt.Errorf("pin neighbours of %s: addresses %s and %s: routed links are IPv4 only", l.Veth, l.Addr, l.Router)
	}
	hostEnd, err := host.LinkByName(l.Veth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", l.Veth, err)
	}
	h, err := Handle(l.Netns)
	if err != nil {
		return err
	}
	defer h.Close()
	peer, err := h.LinkByIndex(hostEnd.Attrs().ParentIndex)
	if err != nil {
		return fmt.Errorf("find the peer of %s in %s: %w", l.Veth, l.Netns, err)
	}
	if peer.Type() != "veth" {
		return fmt.Errorf("find the peer of %s in %s: link %d is %s, a %s, not a veth", l.Veth, l.Netns, peer.Attrs().Index, peer.Attrs().Name, peer.Type())
	}
	return pin(host, hostEnd, h, peer, l)
}

// pin sets the host end's permanent entry for l.Addr (the sandbox end's
// MAC) and the sandbox end's for l.Router (the host end's MAC), each link
// as the kernel returned it after it was made. NeighSet replaces whatever
// entry ARP left.
func pin(host *netlink.Handle, hostEnd netlink.Link, sb *netlink.Handle, sbEnd netlink.Link, l RoutedLink) error {
	if err := host.NeighSet(&netlink.Neigh{LinkIndex: hostEnd.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: l.Addr.AsSlice(), HardwareAddr: sbEnd.Attrs().HardwareAddr}); err != nil {
		return fmt.Errorf("permanent neighbour %s on %s: %w", l.Addr, l.Veth, err)
	}
	if err := sb.NeighSet(&netlink.Neigh{LinkIndex: sbEnd.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: l.Router.Addr().AsSlice(), HardwareAddr: hostEnd.Attrs().HardwareAddr}); err != nil {
		return fmt.Errorf("permanent neighbour %s on %s in %s: %w", l.Router.Addr(), sbEnd.Attrs().Name, l.Netns, err)
	}
	return nil
}

// CheckStrictRPFilter refuses a host netns whose
// net.ipv4.conf.all.rp_filter is 2 (loose): the kernel applies the larger
// of conf.all and the interface's own value, so a loose conf.all turns
// every routed link's strict filter loose, and a sandbox could then send
// packets with a neighbour's address. The host-wide setting is the
// operator's to change, not ours, so this says how and stops.
func CheckStrictRPFilter(hostNetns string) error {
	v, err := Sysctl(hostNetns, "net/ipv4/conf/all/rp_filter")
	if err != nil {
		return err
	}
	if v == "2" {
		return fmt.Errorf("%w: net.ipv4.conf.all.rp_filter is 2%s, which overrides the strict (1) filter identityd sets on each sandbox's veth and would let a sandbox send packets with another sandbox's address; set it to 1 (or 0) on the host: sysctl -w net.ipv4.conf.all.rp_filter=1, and persist it in /etc/sysctl.d/", ErrLooseRPFilter, where(hostNetns))
	}
	return nil
}

// TightenRPFilter makes a loose (2) net.ipv4.conf.all.rp_filter strict in
// the netns at path, and leaves 0 and 1 alone. Only for a "host" netns the
// caller made and owns (the test worlds, the demo), never the machine's: a
// new netns copies conf.all from the machine's, and with Ubuntu's loose
// default the controller would refuse to build sandboxes there.
func TightenRPFilter(path string) error {
	if path == "" {
		return errors.New("tighten rp_filter: only in a netns the caller made, never its own")
	}
	if err := CheckStrictRPFilter(path); !errors.Is(err, ErrLooseRPFilter) {
		return err
	}
	return SetSysctl(path, "net/ipv4/conf/all/rp_filter", "1")
}

// HostPort is the host end of one of a netns's veths, as the host netns
// sees it.
type HostPort struct {
	// Veth is the host end's name.
	Veth string
	// Bridge is the bridge it is a port of, "" when none.
	Bridge string
	// Isolated is the bridge port's isolated flag: isolated ports do not
	// forward to one another.
	Isolated bool
}

// HostPorts finds the host ends of the veths in the netns at netnsPath
// whose peers live in the host netns (hostNetns: a path, "" for the calling
// process's own), and what bridge each is a port of. Peers in other
// namespaces are not visible and not returned.
func HostPorts(host *netlink.Handle, hostNetns, netnsPath string) ([]HostPort, error) {
	h, err := Handle(netnsPath)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	// Listing first: dumping a veth gives its peer's netns an id in this
	// netns, which GetNetNsIdByFd then reads.
	links, err := Dump(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links in %s: %w", netnsPath, err)
	}
	if hostNetns == "" {
		hostNetns = "/proc/self/ns/net"
	}
	fd, err := unix.Open(hostNetns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", hostNetns, err)
	}
	defer unix.Close(fd)
	hostID, err := h.GetNetNsIdByFd(fd)
	if err != nil {
		return nil, fmt.Errorf("id of netns %s in %s: %w", hostNetns, netnsPath, err)
	}
	var out []HostPort
	for _, l := range links {
		a := l.Attrs()
		if l.Type() != "veth" || hostID < 0 || a.NetNsID != hostID || a.ParentIndex == 0 {
			continue
		}
		peer, err := host.LinkByIndex(a.ParentIndex)
		if err != nil {
			return nil, fmt.Errorf("peer of %s in %s: %w", a.Name, netnsPath, err)
		}
		p := HostPort{Veth: peer.Attrs().Name}
		if m := peer.Attrs().MasterIndex; m != 0 {
			master, err := host.LinkByIndex(m)
			if err != nil {
				return nil, fmt.Errorf("master of %s: %w", p.Veth, err)
			}
			if master.Type() == "bridge" {
				p.Bridge = master.Attrs().Name
				pi, err := host.LinkGetProtinfo(peer)
				if err != nil {
					return nil, fmt.Errorf("bridge port flags of %s: %w", p.Veth, err)
				}
				p.Isolated = pi.Isolated
			}
		}
		out = append(out, p)
	}
	return out, nil
}
