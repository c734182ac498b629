// Package sandboxtest builds closed network worlds for tests that need the
// real kernel: a "host" network namespace with a bridge carrying the router
// addresses, and sandboxes that each own a cgroup v2 directory and a network
// namespace joined to the bridge by a veth pair. Processes started in a
// sandbox are real child processes placed in its cgroup at clone time and in
// its netns before they make any socket.
//
// Nothing touches the machine's root network namespace: every address lives
// inside namespaces the world created, and everything is removed again in
// t.Cleanup, also when the test fails. Leftovers of killed test processes are
// swept by the next New.
//
// Test binaries that use [Sandbox.Start] must call [RunChildIfRequested] at
// the top of TestMain.
package sandboxtest

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

const (
	netnsDir   = netnsutil.Dir
	namePrefix = "idt"
)

// worldSeq keeps names unique between worlds of one test process; the pid
// keeps them unique between processes.
var worldSeq atomic.Uint32

// World is one closed network world.
type World struct {
	t         testing.TB
	name      string
	HostNetns string // path of the host netns
	// CgroupDir is the parent of every sandbox cgroup of this world, under
	// the cgroup2 root.
	CgroupDir string
	Router4   netip.Addr // router address on the host bridge, /24
	Router6   netip.Addr // router address on the host bridge, /64
	host      *netlink.Handle
	bridge    netlink.Link
	nextHost  atomic.Uint32
}

// Sandbox is a cgroup plus a netns joined to the world's bridge.
type Sandbox struct {
	w           *World
	deleteOnce  sync.Once
	Name        string
	CgroupDir   string
	CgroupID    uint64
	Netns       string // path of the sandbox netns
	NetnsCookie uint64
	Addr4       netip.Addr
	Addr6       netip.Addr
}

// New makes a world and registers its removal with t.Cleanup. It skips the
// test when not running as root.
func New(t testing.TB) *World {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and cgroups")
	}
	sweepLeftovers()

	root, err := cgroup2.Root()
	if err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	var r [2]byte
	rand.Read(r[:])
	// A random /24 (and /64) per world, so that records of parallel worlds
	// sharing one attribution map do not collide on their 4-tuples.
	w := &World{
		t:       t,
		name:    fmt.Sprintf("%s%d-%d", namePrefix, os.Getpid(), worldSeq.Add(1)),
		Router4: netip.AddrFrom4([4]byte{10, 100 + r[0]%100, r[1], 1}),
		Router6: netip.AddrFrom16([16]byte{0xfd, 0x00, 0x1d, 0x7d, 0, 0, r[0], r[1], 15: 1}),
	}
	w.HostNetns = filepath.Join(netnsDir, w.name+"-host")
	w.CgroupDir = filepath.Join(root, w.name)
	w.nextHost.Store(1)
	t.Cleanup(w.cleanup)

	if err := os.Mkdir(w.CgroupDir, 0o755); err != nil {
		t.Fatalf("sandboxtest: create cgroup: %v", err)
	}
	if err := netnsutil.NewNamed(filepath.Base(w.HostNetns)); err != nil {
		t.Fatalf("sandboxtest: create host netns: %v", err)
	}
	w.host, err = netnsutil.Handle(w.HostNetns)
	if err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	if err := w.setupHost(); err != nil {
		t.Fatalf("sandboxtest: set up host netns: %v", err)
	}
	return w
}

func (w *World) setupHost() error {
	lo, err := w.host.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := w.host.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}
	if err := netnsutil.TightenRPFilter(w.HostNetns); err != nil {
		return err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := w.host.LinkAdd(br); err != nil {
		return fmt.Errorf("add bridge: %w", err)
	}
	w.bridge, err = w.host.LinkByName("br0")
	if err != nil {
		return err
	}
	for _, p := range []netip.Prefix{netip.PrefixFrom(w.Router4, 24), netip.PrefixFrom(w.Router6, 64)} {
		if err := netnsutil.AddAddr(w.host, w.bridge, p); err != nil {
			return err
		}
	}
	return w.host.LinkSetUp(w.bridge)
}

// AddSandbox makes a sandbox with a cgroup, a netns, a veth to the bridge and
// one IPv4 and one IPv6 address; it is removed in t.Cleanup.
func (w *World) AddSandbox(name string) *Sandbox {
	n := w.nextHost.Add(1)
	return w.AddSandboxAt(name, w.hostAddr4(n), w.hostAddr6(n))
}

// AddSandboxAt is AddSandbox with the sandbox's addresses given, for
// example those of a deleted sandbox.
func (w *World) AddSandboxAt(name string, addr4, addr6 netip.Addr) *Sandbox {
	t := w.t
	t.Helper()
	n := w.nextHost.Add(1)
	s := &Sandbox{
		w:         w,
		Name:      name,
		CgroupDir: filepath.Join(w.CgroupDir, name),
		Netns:     filepath.Join(netnsDir, w.name+"-"+name),
		Addr4:     addr4,
		Addr6:     addr6,
	}
	t.Cleanup(s.Delete)

	if err := os.Mkdir(s.CgroupDir, 0o755); err != nil {
		t.Fatalf("sandboxtest: create cgroup: %v", err)
	}
	var err error
	if s.CgroupID, err = cgroup2.ID(s.CgroupDir); err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	if err := netnsutil.NewNamed(filepath.Base(s.Netns)); err != nil {
		t.Fatalf("sandboxtest: create netns: %v", err)
	}
	if err := w.connect(s, n); err != nil {
		t.Fatalf("sandboxtest: wire sandbox %s: %v", name, err)
	}
	if s.NetnsCookie, err = netnsutil.Cookie(s.Netns); err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	return s
}

func (w *World) hostAddr4(n uint32) netip.Addr {
	a := w.Router4.As4()
	a[3] = byte(n)
	return netip.AddrFrom4(a)
}

func (w *World) hostAddr6(n uint32) netip.Addr {
	a := w.Router6.As16()
	a[15] = byte(n)
	return netip.AddrFrom16(a)
}

// connect joins sandbox s to the bridge with a veth pair.
func (w *World) connect(s *Sandbox, n uint32) error {
	return netnsutil.Attach(w.host, w.bridge.Attrs().Index, fmt.Sprintf("veth%d", n), s.Netns,
		[]netip.Prefix{netip.PrefixFrom(s.Addr4, 24), netip.PrefixFrom(s.Addr6, 64)},
		[]netip.Addr{w.Router4, w.Router6})
}

// AddAddr gives the sandbox's eth0 one more address, as a sandbox holding
// CAP_NET_ADMIN in its own netns could.
func (s *Sandbox) AddAddr(a netip.Addr) error {
	h, err := netnsutil.Handle(s.Netns)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	bits := 24
	if a.Is6() {
		bits = 64
	}
	return netnsutil.AddAddr(h, l, netip.PrefixFrom(a, bits))
}

// ChildCgroup makes a cgroup below the sandbox's and returns its path.
func (s *Sandbox) ChildCgroup(name string) string {
	s.w.t.Helper()
	dir := filepath.Join(s.CgroupDir, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		s.w.t.Fatalf("sandboxtest: create child cgroup: %v", err)
	}
	return dir
}

// Do runs f on a thread inside the host netns; sockets f creates (listeners
// included) belong to the host netns for good.
func (w *World) Do(f func() error) error { return netnsutil.Do(w.HostNetns, f) }

// Listen opens a listener inside the host netns.
func (w *World) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := w.Do(func() (err error) {
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// Delete tears the sandbox down now: its processes are killed, its netns
// and cgroup removed, and the host forgets its addresses' neighbour entries
// so that a later sandbox can take them over at once.
func (s *Sandbox) Delete() {
	s.deleteOnce.Do(func() {
		if err := removeCgroupTree(s.CgroupDir); err != nil {
			s.w.t.Errorf("sandboxtest: %v", err)
		}
		if err := netns.DeleteNamed(filepath.Base(s.Netns)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.w.t.Errorf("sandboxtest: delete netns %s: %v", s.Netns, err)
		}
		if s.w.host != nil {
			netnsutil.ForgetNeighbor(s.w.host, s.Addr4)
			netnsutil.ForgetNeighbor(s.w.host, s.Addr6)
		}
	})
}

func (w *World) cleanup() {
	if w.host != nil {
		w.host.Close()
	}
	if err := netns.DeleteNamed(filepath.Base(w.HostNetns)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		w.t.Errorf("sandboxtest: delete netns %s: %v", w.HostNetns, err)
	}
	if err := removeCgroupTree(w.CgroupDir); err != nil {
		w.t.Errorf("sandboxtest: %v", err)
	}
}

// removeCgroupTree kills the processes still in dir and below it, and
// removes the cgroups, deepest first.
func removeCgroupTree(dir string) error {
	return errors.Join(cgroup2.Kill(dir), cgroup2.Remove(dir))
}

// sweepLeftovers removes netns and cgroups left by test processes that died
// before their cleanups ran.
func sweepLeftovers() {
	dead := func(name string) bool {
		rest, ok := strings.CutPrefix(name, namePrefix)
		if !ok {
			return false
		}
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid == os.Getpid() {
			return false
		}
		return unix.Kill(pid, 0) == unix.ESRCH
	}
	if entries, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range entries {
			if dead(e.Name()) {
				netns.DeleteNamed(e.Name())
			}
		}
	}
	if root, err := cgroup2.Root(); err == nil {
		if entries, err := os.ReadDir(root); err == nil {
			for _, e := range entries {
				if e.IsDir() && dead(e.Name()) {
					removeCgroupTree(filepath.Join(root, e.Name()))
				}
			}
		}
	}
}
