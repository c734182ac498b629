package controllers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/secretstore"
)

// DefaultNetnsPrefix begins the names of the network namespaces of an
// instance that was given no prefix of its own.
const DefaultNetnsPrefix = "identityd-"

// maxNetnsPrefix keeps a prefix followed by the longest sandbox id a file
// name.
const maxNetnsPrefix = unix.NAME_MAX - secretstore.MaxIDLen

// netnsPrefixRE: the characters of sandbox ids, and no leading . - or _, so
// that every name is an ordinary file in /run/netns and an ordinary
// argument to ip netns.
var netnsPrefixRE = regexp.MustCompile(fmt.Sprintf(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}$`, maxNetnsPrefix-1))

// CheckNetnsPrefix refuses a prefix that cannot begin the names of an
// instance's network namespaces.
func CheckNetnsPrefix(prefix string) error {
	if !netnsPrefixRE.MatchString(prefix) {
		return fmt.Errorf("netns prefix %q: want 1-%d of [A-Za-z0-9_.-], not starting with . - or _ (it begins file names in %s, before sandbox ids of up to %d characters)",
			prefix, maxNetnsPrefix, netnsutil.Dir, secretstore.MaxIDLen)
	}
	return nil
}

// netnsPrefix is the configured prefix, or the default, checked.
func (cfg Config) netnsPrefix() (string, error) {
	if cfg.NetnsPrefix == "" {
		return DefaultNetnsPrefix, nil
	}
	return cfg.NetnsPrefix, CheckNetnsPrefix(cfg.NetnsPrefix)
}

// NetnsName is the name under /run/netns of the network namespace that an
// instance with prefix (see CheckNetnsPrefix) creates for sandbox id.
func NetnsName(prefix, id string) string { return prefix + id }

// ListNetns returns the names of the network namespaces under /run/netns
// that an instance with prefix may have made: those that begin with it and
// go on with a sandbox id. Nothing else there is ever an instance's to
// report or remove. Prefixes of instances on one host must not begin one
// another: the default, identityd-, takes in identityd-x-<id> too.
func ListNetns(prefix string) ([]string, error) {
	if err := CheckNetnsPrefix(prefix); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(netnsutil.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list network namespaces: %w", err)
	}
	var names []string
	for _, e := range entries {
		if id, ok := strings.CutPrefix(e.Name(), prefix); ok && secretstore.ValidID(id) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// netnsName is the named netns of a sandbox this controller creates.
func (c *Controller) netnsName(id string) string { return NetnsName(c.cfg.NetnsPrefix, id) }

// vethName is the host end of the veth of a sandbox whose netns is named
// netns: derived from that name, which is unique on the host, so that two
// instances sharing a host netns never pick the same, and cleanup after a
// crash finds it; short enough for IFNAMSIZ. (Sandboxes made by earlier
// versions have a name derived from the id alone; their records hold it.)
func vethName(netns string) string {
	sum := sha256.Sum256([]byte(netns))
	return "idv" + hex.EncodeToString(sum[:])[:10]
}

// vethName is the host end of the veth of a sandbox this controller creates.
func (c *Controller) vethName(id string) string { return vethName(c.netnsName(id)) }

// ensureBridge makes sure the router device exists in the host netns,
// carries the router address and is up. It is a bridge, named by
// Config.Bridge: sandboxes made by versions before routed links are ports
// of it, and the bridge module is one the kernel tests already load. New
// sandboxes are not its ports (see createNetwork); it only holds the router
// address, which the token endpoint binds even when no sandbox exists.
func (c *Controller) ensureBridge() error {
	if !c.cfg.Subnet.Addr().Is4() {
		return fmt.Errorf("%w: subnet %s: sandbox subnets must be IPv4: a sandbox's source address is checked by IPv4 reverse-path filtering, which IPv6 does not have", ErrInvalid, c.cfg.Subnet)
	}
	h := c.host
	br, err := h.LinkByName(c.cfg.Bridge)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if !errors.As(err, &notFound) {
			return fmt.Errorf("find bridge %s: %w", c.cfg.Bridge, err)
		}
		if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: c.cfg.Bridge}}); err != nil {
			return fmt.Errorf("create bridge %s: %w", c.cfg.Bridge, err)
		}
		if br, err = h.LinkByName(c.cfg.Bridge); err != nil {
			return fmt.Errorf("find bridge %s: %w", c.cfg.Bridge, err)
		}
	}
	// The subnet's prefix keeps the old sandboxes on the bridge reachable;
	// each routed sandbox's /32 is more specific.
	router := netip.PrefixFrom(c.router, c.cfg.Subnet.Bits())
	addrs, err := netnsutil.Dump(func() ([]netlink.Addr, error) { return h.AddrList(br, netlink.FAMILY_ALL) })
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", c.cfg.Bridge, err)
	}
	have := false
	for _, a := range addrs {
		if p, ok := netip.AddrFromSlice(a.IP); ok && p.Unmap() == c.router {
			have = true
		}
	}
	if !have {
		if err := netnsutil.AddAddr(h, br, router); err != nil {
			return fmt.Errorf("router address: %w", err)
		}
	}
	// Old sandboxes on the bridge may not use a routed sandbox's address
	// either.
	if err := netnsutil.SetSysctl(c.cfg.HostNetns, "net/ipv4/conf/"+c.cfg.Bridge+"/rp_filter", "1"); err != nil {
		return err
	}
	if err := h.LinkSetUp(br); err != nil {
		return fmt.Errorf("bring %s up: %w", c.cfg.Bridge, err)
	}
	c.bridgeIndex = br.Attrs().Index
	if err := netnsutil.CheckStrictRPFilter(c.cfg.HostNetns); err != nil {
		c.log.Warn("sandboxes cannot be created until this is fixed", "error", err)
	}
	return nil
}

// createNetwork makes the sandbox's netns and links it to the host netns
// with a routed point-to-point veth (netnsutil.AttachRouted): the sandbox
// shares layer 2 with no other sandbox, so it cannot poison a neighbour's
// ARP entries, and the host drops its packets whose source is not its own
// address.
func (c *Controller) createNetwork(r *Record, addr netip.Prefix) error {
	// Refused before anything is made.
	if err := netnsutil.CheckStrictRPFilter(c.cfg.HostNetns); err != nil {
		return err
	}
	if err := netnsutil.NewNamed(filepath.Base(r.NetnsPath)); err != nil {
		return err
	}
	if err := netnsutil.AttachRouted(c.host, c.routedLink(r, addr.Addr())); err != nil {
		return fmt.Errorf("network of sandbox %s: %w", r.ID, err)
	}
	return nil
}

// routedLink is the routed link of sandbox r, whose address is addr.
func (c *Controller) routedLink(r *Record, addr netip.Addr) netnsutil.RoutedLink {
	return netnsutil.RoutedLink{HostNetns: c.cfg.HostNetns, Veth: r.Veth, Netns: r.NetnsPath, Addr: addr, Router: netip.PrefixFrom(c.router, c.cfg.Subnet.Bits())}
}

// routedAddr is the address of r's routed link: its IPv4 address.
func routedAddr(r *Record) (netip.Addr, bool) {
	for _, p := range r.Addresses {
		if p.Addr().Is4() {
			return p.Addr(), true
		}
	}
	return netip.Addr{}, false
}

// checkLinks looks, after the rebuild, at the host end of the veth of each
// sandbox created here.
//
// One that is a port of the shared bridge was made before routed links: it
// is served as before, but a neighbour on the bridge can reach it at layer
// 2, so the guarantee against ARP man-in-the-middle does not hold for it
// until it is re-created; that is logged. It is left in place because
// moving a running sandbox to a new link would break its open connections.
//
// One on a routed link whose host end has no permanent neighbour entry for
// the sandbox's address was made before AttachRouted pinned them: it has
// ARP's dynamic entries, which count against the machine-wide neighbour
// table's limit (see netnsutil.AttachRouted), and gets permanent ones. Not
// getting them is a warning: the sandbox works as it did.
func (c *Controller) checkLinks(ctx context.Context) {
	links, err := netnsutil.Dump(c.host.LinkList)
	if err != nil {
		c.log.Warn("cannot list host links to find sandboxes on the shared bridge or without permanent neighbour entries", "error", err)
		return
	}
	byName := make(map[string]netlink.Link, len(links))
	for _, l := range links {
		byName[l.Attrs().Name] = l
	}
	// (A failed list leaves pinned empty, and each routed sandbox is
	// pinned again: NeighSet replaces what is there.)
	neighs, err := netnsutil.Dump(func() ([]netlink.Neigh, error) { return c.host.NeighList(0, netlink.FAMILY_V4) })
	if err != nil {
		c.log.Warn("cannot list the host's neighbour entries; giving every routed sandbox permanent ones again", "error", err)
	}
	type entry struct {
		index int
		addr  netip.Addr
	}
	pinned := map[entry]bool{}
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
			pinned[entry{n.LinkIndex, ip.Unmap()}] = true
		}
	}
	for _, r := range c.live {
		if ctx.Err() != nil {
			return
		}
		l, ok := byName[r.Veth]
		if !r.Owned || r.Veth == "" || !ok {
			continue
		}
		if l.Attrs().MasterIndex == c.bridgeIndex {
			c.log.Warn("sandbox is on the shared bridge of an older identityd: neighbours on the bridge reach it at layer 2 and the guarantee against ARP man-in-the-middle does not hold for it; re-create it to move it to a routed link",
				"sandbox", r.ID, "veth", r.Veth, "bridge", c.cfg.Bridge)
			continue
		}
		addr, ok := routedAddr(r)
		if !ok || l.Attrs().MasterIndex != 0 || pinned[entry{l.Attrs().Index, addr}] {
			continue
		}
		if err := netnsutil.PinNeighbours(c.host, c.routedLink(r, addr)); err != nil {
			c.log.Warn("cannot give a sandbox of an older identityd permanent neighbour entries; it keeps ARP's, which count against the host's neighbour table limit (net.ipv4.neigh.default.gc_thresh3)",
				"sandbox", r.ID, "veth", r.Veth, "error", err)
			continue
		}
		c.log.Info("sandbox of an older identityd given permanent neighbour entries", "sandbox", r.ID, "veth", r.Veth)
	}
}

// warnSharedL2 logs, for an adopted sandbox, each host end of its veths
// that is a port of a bridge without port isolation: its neighbours on that
// bridge reach it at layer 2, so they can poison the ARP entries between it
// and the router and read or take over its token exchange. What the
// network of an adopted sandbox must guarantee is in the README's security
// model; this is the part the host can see.
func (c *Controller) warnSharedL2(r *Record) {
	if r.NetnsPath == "" {
		return
	}
	ports, err := netnsutil.HostPorts(c.host, c.cfg.HostNetns, r.NetnsPath)
	if err != nil {
		c.log.Warn("cannot inspect the network of an adopted sandbox", "sandbox", r.ID, "netns", r.NetnsPath, "error", err)
		return
	}
	if len(ports) == 0 {
		c.log.Debug("adopted sandbox has no veth whose host end is in the host netns", "sandbox", r.ID, "netns", r.NetnsPath)
	}
	for _, p := range ports {
		if p.Bridge != "" && !p.Isolated {
			c.log.Warn("adopted sandbox's network lets neighbours reach it at layer 2: its host veth is a port of a bridge without port isolation, so identityd's guarantee against ARP man-in-the-middle does not hold for it",
				"sandbox", r.ID, "netns", r.NetnsPath, "veth", p.Veth, "bridge", p.Bridge,
				"fix", "bridge link set dev "+p.Veth+" isolated on (and source address anti-spoofing), or a routed link")
		}
	}
}

// teardown removes what Create made for r: the veth, the netns and the
// cgroup. Missing pieces are fine; it also cleans up after a Create that a
// crash cut short.
func (c *Controller) teardown(r *Record, kill bool) error {
	var errs []error
	// A recorded cgroup id that no longer matches means someone else's
	// cgroup now has that path: it is not ours to touch. (A pending marker
	// has no id yet; its path is ours by construction.)
	ours := true
	if r.CgroupID != 0 {
		id, err := cgroup2.ID(r.CgroupPath)
		ours = err == nil && id == r.CgroupID
	}
	if r.CgroupPath != "" && ours {
		if kill {
			if err := cgroup2.Kill(r.CgroupPath); err != nil {
				errs = append(errs, err)
			}
		}
		if err := cgroup2.Remove(r.CgroupPath); err != nil {
			errs = append(errs, err)
		}
	}
	if r.Veth != "" {
		if l, err := c.host.LinkByName(r.Veth); err == nil {
			if err := c.host.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete veth %s: %w", r.Veth, err))
			}
		}
	}
	if r.NetnsPath != "" {
		if err := netnsutil.DeleteNamed(filepath.Base(r.NetnsPath)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
