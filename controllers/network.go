package controllers

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

// netnsName is the named netns of a sandbox the controller creates.
func netnsName(id string) string { return "identityd-" + id }

// vethName is the host end of a sandbox's veth: derived from the id, so
// that cleanup after a crash finds it, and short enough for IFNAMSIZ.
func vethName(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "idv" + hex.EncodeToString(sum[:])[:10]
}

// ensureBridge makes sure the bridge exists in the host netns, carries the
// router address and is up.
func (c *Controller) ensureBridge() error {
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
	router := netip.PrefixFrom(c.router, c.cfg.Subnet.Bits())
	addrs, err := h.AddrList(br, netlink.FAMILY_ALL)
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
	if err := h.LinkSetUp(br); err != nil {
		return fmt.Errorf("bring %s up: %w", c.cfg.Bridge, err)
	}
	c.bridgeIndex = br.Attrs().Index
	return nil
}

// createNetwork makes the sandbox's netns and joins it to the bridge with a
// veth pair carrying addr, with a default route via the router.
func (c *Controller) createNetwork(r *Record, addr netip.Prefix) error {
	if err := netnsutil.NewNamed(netnsName(r.ID)); err != nil {
		return err
	}
	if err := netnsutil.Attach(c.host, c.bridgeIndex, r.Veth, r.NetnsPath, []netip.Prefix{addr}, []netip.Addr{c.router}); err != nil {
		return fmt.Errorf("network of sandbox %s: %w", r.ID, err)
	}
	return nil
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
			killCgroup(r.CgroupPath)
		}
		if err := removeCgroup(r.CgroupPath); err != nil {
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

// removeCgroup removes a cgroup and any cgroups below it, deepest first.
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroup(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("remove cgroup %s: tasks are still running in it: %w", dir, err)
		}
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	return nil
}
