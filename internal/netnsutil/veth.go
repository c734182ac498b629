package netnsutil

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Attach joins the netns at netnsPath to a bridge: a veth pair whose host
// end, named veth, is enslaved to the bridge (in host's netns) and whose
// other end becomes eth0 in the netns, carrying addrs, with lo up and a
// default route via each gateway. IPv6 addresses skip duplicate address
// detection, so they work at once.
func Attach(host *netlink.Handle, bridgeIndex int, veth, netnsPath string, addrs []netip.Prefix, gateways []netip.Addr) error {
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	defer ns.Close()
	if err := host.LinkAdd(&netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: veth, MasterIndex: bridgeIndex},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(ns),
	}); err != nil {
		return fmt.Errorf("add veth %s: %w", veth, err)
	}
	hostEnd, err := host.LinkByName(veth)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", veth, err)
	}
	if err := host.LinkSetUp(hostEnd); err != nil {
		return fmt.Errorf("bring %s up: %w", veth, err)
	}

	h, err := Handle(netnsPath)
	if err != nil {
		return err
	}
	defer h.Close()
	for _, name := range []string{"lo", "eth0"} {
		l, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s in %s: %w", name, netnsPath, err)
		}
		if name == "eth0" {
			for _, a := range addrs {
				if err := AddAddr(h, l, a); err != nil {
					return err
				}
			}
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("bring %s up in %s: %w", name, netnsPath, err)
		}
	}
	for _, gw := range gateways {
		if err := h.RouteAdd(&netlink.Route{Gw: gw.AsSlice()}); err != nil {
			return fmt.Errorf("default route via %s in %s: %w", gw, netnsPath, err)
		}
	}
	return nil
}

// AddAddr adds p to link l, without duplicate address detection.
func AddAddr(h *netlink.Handle, l netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: IPNet(p), Flags: unix.IFA_F_NODAD}
	if err := h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, l.Attrs().Name, err)
	}
	return nil
}

// IPNet converts a prefix for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// ForgetNeighbor drops h's neighbour entries for addr, so that a new owner
// of the address is reached at once instead of after the entry goes stale.
func ForgetNeighbor(h *netlink.Handle, addr netip.Addr) {
	neighs, _ := h.NeighList(0, 0)
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr {
			h.NeighDel(&n)
		}
	}
}
