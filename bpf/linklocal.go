package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
)

// Redirect sends sandboxes' TCP connections to a link-local address and
// port (From) to a token endpoint (To) at connect time, in the kernel, so
// that the connection is recorded and attributed under the tuple the server
// accepts. getpeername on the redirected socket still reports From.
type Redirect struct {
	From netip.AddrPort
	To   netip.AddrPort
}

// SandboxKey is what the kernel tells a sandbox's sockets by, following the
// registry's rule (internal/registry): a sandbox registered by cgroup owns
// sockets made in its cgroup or below it, and only in its netns if
// NetnsCookie is set; one registered by netns alone (CgroupID zero) owns
// the sockets of that netns.
type SandboxKey struct {
	CgroupID    uint64
	NetnsCookie uint64
}

// SetLinkLocal makes rs the complete set of link-local redirects; none
// turns the feature off. A From may appear once. An IPv4 From needs an IPv4
// To (an IPv4 socket cannot be sent to an IPv6 address); an IPv6 From may
// have either, an IPv4 To then being reached as an IPv4-mapped address.
// Only sockets of the sandboxes given to AddSandbox or SetSandboxes are
// redirected.
func (in *Installation) SetLinkLocal(rs []Redirect) error {
	want := make(map[attribEndpoint]attribRedirect, len(rs))
	for _, r := range rs {
		if err := checkRedirect(r); err != nil {
			return fmt.Errorf("set link-local endpoints: %w", err)
		}
		from := makeEndpoint(r.From)
		if _, dup := want[from]; dup {
			return fmt.Errorf("set link-local endpoints: %s given twice", r.From)
		}
		want[from] = attribRedirect{Addr: addrWords(r.To.Addr()), Port: r.To.Port()}
	}
	rules, ports := in.maps[attribMapLinkLocal], in.maps[attribMapLinkLocalPorts]
	for from, to := range want {
		if err := rules.Put(from, to); err != nil {
			return fmt.Errorf("add link-local endpoint %s: %w", endpointString(from), err)
		}
	}
	current, err := in.linkLocalSet()
	if err != nil {
		return err
	}
	// As in SetEndpoints: the ports of old and new rules pass the bitmap
	// until the old rules are gone.
	if err := putPorts(ports, keys(current)); err != nil {
		return err
	}
	for from := range current {
		if _, ok := want[from]; ok {
			continue
		}
		if err := rules.Delete(from); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove link-local endpoint %s: %w", endpointString(from), err)
		}
	}
	return putPorts(ports, keys(want))
}

func checkRedirect(r Redirect) error {
	switch {
	case !r.From.IsValid() || r.From.Port() == 0 || r.From.Addr().IsUnspecified() || r.From.Addr().Zone() != "":
		return fmt.Errorf("link-local endpoint %q: want an address (no zone) and a port", r.From)
	case !r.To.IsValid() || r.To.Port() == 0 || r.To.Addr().IsUnspecified():
		return fmt.Errorf("link-local endpoint %s: token endpoint %q is not an address and a port", r.From, r.To)
	case r.From.Addr().Unmap().Is4() && !r.To.Addr().Unmap().Is4():
		return fmt.Errorf("link-local endpoint %s: an IPv4 address can only be sent to an IPv4 token endpoint, not %s", r.From, r.To)
	case r.From == r.To:
		return fmt.Errorf("link-local endpoint %s is the token endpoint itself", r.From)
	}
	return nil
}

func keys[K comparable, V any](m map[K]V) map[K]bool {
	out := make(map[K]bool, len(m))
	for k := range m {
		out[k] = true
	}
	return out
}

func (in *Installation) linkLocalSet() (map[attribEndpoint]attribRedirect, error) {
	set := make(map[attribEndpoint]attribRedirect)
	var from attribEndpoint
	var to attribRedirect
	it := in.maps[attribMapLinkLocal].Iterate()
	for it.Next(&from, &to) {
		set[from] = to
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list link-local endpoints: %w", err)
	}
	return set, nil
}

// LinkLocal returns the configured link-local redirects, by From.
func (in *Installation) LinkLocal() ([]Redirect, error) {
	set, err := in.linkLocalSet()
	if err != nil {
		return nil, err
	}
	out := make([]Redirect, 0, len(set))
	for from, to := range set {
		out = append(out, Redirect{
			From: netip.AddrPortFrom(addrFromWords(from.Addr), from.Port),
			To:   netip.AddrPortFrom(addrFromWords(to.Addr), to.Port),
		})
	}
	slices.SortFunc(out, func(a, b Redirect) int { return a.From.Compare(b.From) })
	return out, nil
}

// AddSandbox lets the sockets of sandbox s be redirected. Adding it again
// is harmless.
func (in *Installation) AddSandbox(s SandboxKey) error {
	m, key, val, err := in.sandboxEntry(s)
	if err != nil {
		return err
	}
	if err := m.Put(key, val); err != nil {
		return fmt.Errorf("add sandbox (cgroup %d, netns cookie %d) to the link-local redirects: %w", s.CgroupID, s.NetnsCookie, err)
	}
	return nil
}

// RemoveSandbox stops redirecting the sockets of sandbox s. Removing one
// that is not there is harmless.
func (in *Installation) RemoveSandbox(s SandboxKey) error {
	m, key, _, err := in.sandboxEntry(s)
	if err != nil {
		return err
	}
	if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("remove sandbox (cgroup %d, netns cookie %d) from the link-local redirects: %w", s.CgroupID, s.NetnsCookie, err)
	}
	return nil
}

func (in *Installation) sandboxEntry(s SandboxKey) (m *ebpf.Map, key, val uint64, err error) {
	switch {
	case s.CgroupID != 0:
		return in.maps[attribMapSandboxCgroups], s.CgroupID, s.NetnsCookie, nil
	case s.NetnsCookie != 0:
		return in.maps[attribMapSandboxNetns], s.NetnsCookie, 1, nil
	}
	return nil, 0, 0, errors.New("link-local redirects: a sandbox needs a cgroup or a netns")
}

// SetSandboxes makes ss the complete set of sandboxes whose sockets are
// redirected: it adds them all first, then removes the others.
func (in *Installation) SetSandboxes(ss []SandboxKey) error {
	cgroups := make(map[uint64]bool)
	netns := make(map[uint64]bool)
	for _, s := range ss {
		if err := in.AddSandbox(s); err != nil {
			return err
		}
		if s.CgroupID != 0 {
			cgroups[s.CgroupID] = true
		} else {
			netns[s.NetnsCookie] = true
		}
	}
	for _, set := range []struct {
		m    *ebpf.Map
		keep map[uint64]bool
	}{{in.maps[attribMapSandboxCgroups], cgroups}, {in.maps[attribMapSandboxNetns], netns}} {
		stale, err := mapKeys(set.m)
		if err != nil {
			return err
		}
		for _, k := range stale {
			if set.keep[k] {
				continue
			}
			if err := set.m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove a stale sandbox from the link-local redirects: %w", err)
			}
		}
	}
	return nil
}

// Sandboxes returns the sandboxes whose sockets are redirected.
func (in *Installation) Sandboxes() ([]SandboxKey, error) {
	var out []SandboxKey
	var k, v uint64
	it := in.maps[attribMapSandboxCgroups].Iterate()
	for it.Next(&k, &v) {
		out = append(out, SandboxKey{CgroupID: k, NetnsCookie: v})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list sandboxes of the link-local redirects: %w", err)
	}
	cookies, err := mapKeys(in.maps[attribMapSandboxNetns])
	if err != nil {
		return nil, err
	}
	for _, c := range cookies {
		out = append(out, SandboxKey{NetnsCookie: c})
	}
	return out, nil
}

func mapKeys(m *ebpf.Map) ([]uint64, error) {
	var out []uint64
	var k, v uint64
	it := m.Iterate()
	for it.Next(&k, &v) {
		out = append(out, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list sandboxes of the link-local redirects: %w", err)
	}
	return out, nil
}
