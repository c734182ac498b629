package bpf

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

const tokenPort = 7123

// testPinDir is a pin directory private to this test and process.
func testPinDir(t testing.TB) string {
	name := strings.NewReplacer("/", "-", " ", "_").Replace(t.Name())
	return filepath.Join(DefaultBPFFS, fmt.Sprintf("identityd-test-%d-%s", os.Getpid(), name))
}

// sweepOnce removes installations left by test processes that were killed
// before their cleanups ran: their programs would otherwise stay attached to
// the root cgroup.
var sweepOnce sync.Once

func sweepLeftoverPins() {
	entries, err := os.ReadDir(DefaultBPFFS)
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "identityd-test-")
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		Uninstall(context.Background(), Options{PinDir: filepath.Join(DefaultBPFFS, e.Name()), Logger: quiet})
	}
}

var quiet = slog.New(slog.DiscardHandler)

// install installs the programs for this test and uninstalls them when it
// ends, checking that nothing is left behind.
func install(t testing.TB) (*Installation, Options) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	sweepOnce.Do(sweepLeftoverPins)
	opts := Options{PinDir: testPinDir(t), Logger: quiet}
	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() {
		in.Close()
		assert.NoError(t, Uninstall(context.Background(), opts))
		assert.NoDirExists(t, opts.PinDir)
	})
	return in, opts
}

// server is a token-endpoint listener in a world's host netns.
type server struct {
	t  testing.TB
	ln *net.TCPListener
}

func listen(t testing.TB, w *sandboxtest.World, addr string) *server {
	t.Helper()
	ln, err := w.Listen("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return &server{t: t, ln: ln.(*net.TCPListener)}
}

func (s *server) addr() netip.AddrPort { return s.ln.Addr().(*net.TCPAddr).AddrPort() }

// accept accepts one connection.
func (s *server) accept() *net.TCPConn {
	s.t.Helper()
	s.ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := s.ln.AcceptTCP()
	require.NoError(s.t, err)
	s.t.Cleanup(func() { c.Close() })
	return c
}

// peer is the remote address of an accepted connection.
func peer(c *net.TCPConn) netip.AddrPort { return c.RemoteAddr().(*net.TCPAddr).AddrPort() }

func TestAttributesSandboxConnection(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	dual := listen(t, w, fmt.Sprintf(":%d", tokenPort)) // dual-stack [::]
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{
		netip.AddrPortFrom(w.Router4, tokenPort),
		netip.AddrPortFrom(w.Router6, tokenPort),
	}))
	client := a.Start(t)

	for _, tc := range []struct {
		name   string
		family int
		dest   netip.Addr
	}{
		{"ipv4", 4, w.Router4},
		{"ipv6", 6, w.Router6},
		{"ipv4-mapped-ipv6", 6, netip.AddrFrom16(w.Router4.As16())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd, err := client.Socket(tc.family)
			require.NoError(t, err)
			clientLocal, err := client.Connect(fd, netip.AddrPortFrom(tc.dest, tokenPort))
			require.NoError(t, err)

			conn := dual.accept()
			assert.Equal(t, clientLocal.Addr().Unmap(), peer(conn).Addr().Unmap(), "server sees the client's address")
			rec, err := in.Lookup(conn)
			require.NoError(t, err)
			assert.Equal(t, a.CgroupID, rec.CgroupID, "cgroup id is the inode of the sandbox's cgroup")
			assert.Equal(t, a.NetnsCookie, rec.NetnsCookie, "netns cookie is SO_NETNS_COOKIE inside the sandbox")
			assert.Equal(t, uint32(client.Pid), rec.TGID)
			assert.NotZero(t, rec.PID)
			assert.NotZero(t, rec.SocketCookie)
			assert.Zero(t, rec.Flags)
			assert.InDelta(t, float64(bootTime()), float64(rec.Established), float64(5*time.Second))
			assertNoRecords(t, in)
		})
	}
}

func TestNonEndpointLeavesNoRecord(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{netip.AddrPortFrom(w.Router4, tokenPort)}))
	other := listen(t, w, netip.AddrPortFrom(w.Router4, 8080).String())
	client := a.Start(t)

	_, err := client.Dial(other.addr(), 1)
	require.NoError(t, err)
	_, err = in.Lookup(other.accept())
	assert.ErrorIs(t, err, ErrNoRecord)
	assertNoRecords(t, in)
}

// TestStorageOnlyForTokenConnections: socket-local storage, the one
// allocation the programs make, exists only on sockets that connected to a
// token endpoint, through either connect hook, and names the task that
// called connect(). Checked on the test's own sockets over loopback, by
// looking them up by descriptor.
func TestStorageOnlyForTokenConnections(t *testing.T) {
	in, opts := install(t)
	token := listenLoopback(t)
	other := listenLoopback(t)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{addrOf(token)}))
	clients, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), attribMapClients), nil)
	require.NoError(t, err)
	defer clients.Close()
	mapped := func(ln *net.TCPListener) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom16(addrOf(ln).Addr().As16()), addrOf(ln).Port())
	}

	cases := []struct {
		name   string
		dest   netip.AddrPort
		stored bool
	}{
		{"ipv4 token", addrOf(token), true},
		{"ipv4 other", addrOf(other), false},
		{"ipv4-mapped token", mapped(token), true},
		{"ipv4-mapped other", mapped(other), false},
	}
	if ln6, err := net.Listen("tcp6", "[::1]:0"); err == nil {
		t.Cleanup(func() { ln6.Close() })
		cases = append(cases, struct {
			name   string
			dest   netip.AddrPort
			stored bool
		}{"ipv6 other", ln6.Addr().(*net.TCPAddr).AddrPort(), false})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var family int
			var sa unix.Sockaddr
			if tc.dest.Addr().Is4() {
				family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: tc.dest.Addr().As4(), Port: int(tc.dest.Port())}
			} else {
				family, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: tc.dest.Addr().As16(), Port: int(tc.dest.Port())}
			}
			fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			require.NoError(t, err)
			defer unix.Close(fd)
			require.NoError(t, unix.Connect(fd, sa))

			var got attribClient
			err = clients.Lookup(uint32(fd), &got)
			if !tc.stored {
				assert.ErrorIs(t, err, ebpf.ErrKeyNotExist, "storage allocated for a connection to another port")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, uint32(os.Getpid()), got.Tgid)
			assert.NotZero(t, got.Pid)
			assert.Equal(t, uint32(1), got.Published, "the client published its record when its handshake completed")
		})
	}
}

func listenLoopback(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

func assertNoRecords(t *testing.T, in *Installation) {
	t.Helper()
	assert.Zero(t, countRecords(t, in), "records left waiting for a server")
}

func countRecords(t *testing.T, in *Installation) int {
	t.Helper()
	var k attribHandshakeKey
	var v attribRecord
	it := in.maps[attribMapHandshakes].Iterate()
	n := 0
	for it.Next(&k, &v) {
		n++
	}
	require.NoError(t, it.Err())
	return n
}

func TestWildcardEndpoint(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{netip.MustParseAddrPort("[::]:7123")}))
	eps, err := in.Endpoints()
	require.NoError(t, err)
	assert.Equal(t, []netip.AddrPort{netip.MustParseAddrPort("[::]:7123")}, eps)

	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	client := a.Start(t)
	_, err = client.Dial(netip.AddrPortFrom(w.Router6, tokenPort), 1)
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, a.CgroupID, rec.CgroupID)

	// Replacing the set removes the wildcard.
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{netip.AddrPortFrom(w.Router4, tokenPort)}))
	_, err = client.Dial(netip.AddrPortFrom(w.Router6, tokenPort), 1)
	require.NoError(t, err)
	_, err = in.Lookup(srv.accept())
	assert.ErrorIs(t, err, ErrNoRecord)
}

func TestConcurrentSandboxesNeverMisattributed(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a, b := w.AddSandbox("a"), w.AddSandbox("b")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{
		netip.AddrPortFrom(w.Router4, tokenPort),
		netip.AddrPortFrom(w.Router6, tokenPort),
	}))
	owner := map[netip.Addr]*sandboxtest.Sandbox{a.Addr4: a, a.Addr6: a, b.Addr4: b, b.Addr6: b}

	const perFamily = 150
	clients := []*sandboxtest.Client{a.Start(t), b.Start(t)}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, c := range clients {
		for _, dest := range []netip.Addr{w.Router4, w.Router6} {
			wg.Go(func() {
				if _, err := c.Dial(netip.AddrPortFrom(dest, tokenPort), perFamily); err != nil {
					errs <- err
				}
			})
		}
	}

	total := len(clients) * 2 * perFamily
	for i := range total {
		conn := srv.accept()
		remote := peer(conn)
		rec, err := in.Lookup(conn)
		require.NoError(t, err, "connection %d from %s", i, remote)
		want := owner[remote.Addr().Unmap()]
		require.NotNil(t, want, "unexpected peer %s", remote)
		require.Equal(t, want.CgroupID, rec.CgroupID, "connection from %s attributed to the wrong cgroup", remote)
		require.Equal(t, want.NetnsCookie, rec.NetnsCookie, "connection from %s attributed to the wrong netns", remote)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assertNoRecords(t, in)
}

func TestOwnerIsFixedAtSocketCreation(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a, b := w.AddSandbox("a"), w.AddSandbox("b")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))

	client := a.Start(t)
	fd, err := client.Socket(4)
	require.NoError(t, err)
	require.NoError(t, client.MoveTo(b.CgroupDir))

	_, err = client.Connect(fd, dest)
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, a.CgroupID, rec.CgroupID, "a socket belongs to the cgroup it was created in")

	_, err = client.Dial(dest, 1)
	require.NoError(t, err)
	rec, err = in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, b.CgroupID, rec.CgroupID, "a socket created after the move belongs to the new cgroup")
	assert.Equal(t, a.NetnsCookie, rec.NetnsCookie, "the netns did not change")
}

func TestChildCgroupIsReported(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	child := a.ChildCgroup("worker")
	childID, err := cgroup2.ID(child)
	require.NoError(t, err)
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))

	client := a.Start(t)
	require.NoError(t, client.MoveTo(child))
	_, err = client.Dial(dest, 1)
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, childID, rec.CgroupID, "the record names the leaf cgroup; mapping it to its sandbox is the registry's job")
}

// TestSocketBeforeInstallIsAttributedToItsCreator: a socket created before
// the programs were attached, by a task that then moved to another cgroup,
// is attributed to the cgroup it was created in. The owner is the one the
// kernel stored in the socket at socket(), not anything inferred later, so
// no socket is left unattested by the order of start-up. The pid is the task
// that called connect(), which ran after Install.
func TestSocketBeforeInstallIsAttributedToItsCreator(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	w := sandboxtest.New(t)
	a, b := w.AddSandbox("a"), w.AddSandbox("b")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	client := a.Start(t)
	early, err := client.Socket(4)
	require.NoError(t, err)
	require.NoError(t, client.MoveTo(b.CgroupDir))

	in, _ := install(t)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))

	_, err = client.Connect(early, dest)
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, a.CgroupID, rec.CgroupID, "the cgroup the socket was created in, not the connecting task's")
	assert.Equal(t, a.NetnsCookie, rec.NetnsCookie)
	assert.Equal(t, uint32(client.Pid), rec.TGID, "the process that called connect()")
	assert.Zero(t, rec.Flags)
}

// TestUnattestedRecordIsRefused: a record whose owner the kernel program
// could not read is reported as such, with what it did see for the log. The
// record is written by hand onto a real accepted socket: the program flags
// one only if the socket's cgroup cannot be read, which no socket reaching
// ESTABLISHED provokes.
func TestUnattestedRecordIsRefused(t *testing.T) {
	in, _ := install(t)
	ln := listenLoopback(t)
	c, err := net.Dial("tcp4", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	conn, err := ln.AcceptTCP()
	require.NoError(t, err)
	defer conn.Close()
	_, err = in.Lookup(conn)
	require.ErrorIs(t, err, ErrNoRecord, "not an endpoint: nothing attached")

	raw, err := conn.SyscallConn()
	require.NoError(t, err)
	require.NoError(t, raw.Control(func(fd uintptr) {
		err = in.attested.Put(uint32(fd), attribRecord{NetnsCookie: 7, Flags: uint32(FlagUnattested)})
	}))
	require.NoError(t, err)
	got, err := in.Lookup(conn)
	require.ErrorIs(t, err, ErrUnattested)
	assert.Zero(t, got.CgroupID)
	assert.Equal(t, uint64(7), got.NetnsCookie)
}

// TestHandshakeCompletedByAnotherIsNotTheOwners plays the man in the middle
// of a shared bridge: A's socket calls connect() for a 4-tuple, but its SYN
// never reaches the server (A's neighbour entry for the router points
// nowhere), and B, holding A's address, completes a handshake with the
// server for that same 4-tuple (the server's neighbour entry for A points at
// B, as ARP poisoning would make it). The server's connection is B's, and the
// kernel says so: A's socket never completed a handshake, so it published
// nothing.
func TestHandshakeCompletedByAnotherIsNotTheOwners(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a, b := w.AddSandbox("a"), w.AddSandbox("b")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))
	require.NoError(t, b.AddAddr(a.Addr4))
	setNeighbour(t, a.Netns, w.Router4, net.HardwareAddr{0x02, 0, 0, 0, 0, 1})
	setNeighbour(t, w.HostNetns, a.Addr4, linkAddr(t, b.Netns, "eth0"))

	source := netip.AddrPortFrom(a.Addr4, 40123)
	ca, cb := a.Start(t), b.Start(t)
	fa, err := ca.Socket(4)
	require.NoError(t, err)
	require.NoError(t, ca.Bind(fa, source))
	require.NoError(t, ca.ConnectNonblock(fa, dest))

	fb, err := cb.Socket(4)
	require.NoError(t, err)
	require.NoError(t, cb.Bind(fb, source))
	_, err = cb.Connect(fb, dest)
	require.NoError(t, err)

	conn := srv.accept()
	require.Equal(t, source.Addr(), peer(conn).Addr().Unmap())
	require.Equal(t, source.Port(), peer(conn).Port())
	rec, err := in.Lookup(conn)
	require.NoError(t, err)
	assert.Equal(t, b.CgroupID, rec.CgroupID, "the socket that completed the handshake")
	assert.Equal(t, b.NetnsCookie, rec.NetnsCookie)
	assertNoRecords(t, in)
}

// TestRecordOfAnotherHandshakeIsNotTaken: records published for a 4-tuple by
// sockets that completed a handshake with something other than this server
// (B, holding A's address and port, talking to a responder of its own) never
// meet A's connection with the same 4-tuple, whichever order they come in:
// the sequence numbers differ. The foreign records are written by hand with
// arbitrary sequence numbers, as such a socket's would be.
func TestRecordOfAnotherHandshakeIsNotTaken(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))
	source := netip.AddrPortFrom(a.Addr4, 40123)
	handshakes := in.maps[attribMapHandshakes]
	foreign := make([]attribHandshakeKey, 64)
	for i := range foreign {
		foreign[i] = attribHandshakeKey{
			Conn:       attribConnKey{Saddr: addrWords(source.Addr()), Daddr: addrWords(dest.Addr()), Sport: source.Port(), Dport: dest.Port()},
			ClientNext: uint32(i) * 0x01000193, ServerNext: uint32(i) * 0x9e3779b9,
		}
		require.NoError(t, handshakes.Put(&foreign[i], attribRecord{CgroupId: 999, NetnsCookie: 999}))
	}

	ca := a.Start(t)
	fa, err := ca.Socket(4)
	require.NoError(t, err)
	require.NoError(t, ca.Bind(fa, source))
	_, err = ca.Connect(fa, dest)
	require.NoError(t, err)
	rec, err := in.Lookup(srv.accept())
	require.NoError(t, err)
	assert.Equal(t, a.CgroupID, rec.CgroupID)
	assert.Equal(t, a.NetnsCookie, rec.NetnsCookie)
	for i := range foreign {
		var v attribRecord
		assert.NoError(t, handshakes.Lookup(&foreign[i], &v), "foreign record %d was taken", i)
	}
}

// setNeighbour pins a permanent neighbour entry for addr in the netns at path.
func setNeighbour(t *testing.T, netnsPath string, addr netip.Addr, mac net.HardwareAddr) {
	t.Helper()
	h, err := netnsutil.Handle(netnsPath)
	require.NoError(t, err)
	defer h.Close()
	dev := "eth0"
	links, err := h.LinkList()
	require.NoError(t, err)
	idx := 0
	for _, l := range links {
		if l.Attrs().Name == dev || l.Type() == "bridge" {
			idx = l.Attrs().Index
		}
	}
	require.NotZero(t, idx, "no eth0 or bridge in %s", netnsPath)
	require.NoError(t, h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: addr.AsSlice(), HardwareAddr: mac}))
}

// linkAddr is the MAC address of the named link in the netns at path.
func linkAddr(t *testing.T, netnsPath, name string) net.HardwareAddr {
	t.Helper()
	h, err := netnsutil.Handle(netnsPath)
	require.NoError(t, err)
	defer h.Close()
	l, err := h.LinkByName(name)
	require.NoError(t, err)
	return l.Attrs().HardwareAddr
}

func TestRecordClosedBeforeLookupIsDropped(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))
	client := a.Start(t)

	// Nothing listens: the connection is refused and its socket closes.
	fd, err := client.Socket(4)
	require.NoError(t, err)
	_, err = client.Connect(fd, dest)
	require.ErrorContains(t, err, "connection refused")
	assertNoRecords(t, in)
}

// TestUnservedRecordIsDroppedAtClose: a record that no server socket of ours
// took (here the programs are attached below the listener's cgroup, as for a
// server on another host behind a wildcard endpoint) waits in the map until
// its client socket closes, and then goes.
func TestUnservedRecordIsDroppedAtClose(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	sweepOnce.Do(sweepLeftoverPins)
	opts := Options{PinDir: testPinDir(t), CgroupRoot: w.CgroupDir, Logger: quiet}
	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() {
		in.Close()
		assert.NoError(t, Uninstall(context.Background(), opts))
	})
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))

	client := a.Start(t)
	_, err = client.Dial(dest, 1)
	require.NoError(t, err)
	conn := srv.accept()
	_, err = in.Lookup(conn)
	assert.ErrorIs(t, err, ErrNoRecord, "the listener is outside the programs' cgroup")
	assert.Equal(t, 1, countRecords(t, in), "the client's record waits")

	conn.Close()
	client.Close()
	require.Eventually(t, func() bool { return countRecords(t, in) == 0 }, 10*time.Second, 20*time.Millisecond,
		"the record outlived its socket")
}

// TestLayout ties the hand-written decoding to the generated type, which
// bpf2go derives from attrib.c.
func TestLayout(t *testing.T) {
	assert.Equal(t, recordSize, binary.Size(attribRecord{}))
	want := attribRecord{CgroupId: 1, NetnsCookie: 2, SocketCookie: 3, EstablishedBootNs: 4, Pid: 5, Tgid: 6, Flags: 7}
	var raw bytes.Buffer
	require.NoError(t, binary.Write(&raw, binary.NativeEndian, want))
	assert.Equal(t, Record{CgroupID: 1, NetnsCookie: 2, SocketCookie: 3, Established: 4, PID: 5, TGID: 6, Flags: 7},
		decodeRecord([recordSize]byte(raw.Bytes())))
}

// TestCapacity checks that the connection map keeps the promised number of
// live records without evicting any.
func TestCapacity(t *testing.T) {
	in, _ := install(t)
	const live = 65536
	handshakes := in.maps[attribMapHandshakes]
	keys := make([]attribHandshakeKey, live)
	vals := make([]attribRecord, live)
	now := uint64(bootTime())
	server := addrWords(netip.MustParseAddr("10.0.0.1"))
	for i := range keys {
		keys[i] = attribHandshakeKey{
			Conn:       attribConnKey{Saddr: addrWords(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})), Daddr: server, Sport: 40000, Dport: 7123},
			ClientNext: uint32(i), ServerNext: ^uint32(i),
		}
		vals[i] = attribRecord{CgroupId: uint64(i + 1), EstablishedBootNs: now}
	}
	for i := range keys {
		require.NoError(t, handshakes.Put(&keys[i], vals[i]))
	}
	for i := range keys {
		var got attribRecord
		require.NoError(t, handshakes.Lookup(&keys[i], &got), "record %d was evicted", i)
		require.Equal(t, uint64(i+1), got.CgroupId)
	}
}

// attachedCopies counts programs at the cgroup's hook that use the map with
// id: other installations (parallel test packages) attach their own copies
// with their own maps.
func attachedCopies(t *testing.T, cgroupRoot string, attach ebpf.AttachType, mapID ebpf.MapID) int {
	t.Helper()
	n := 0
	for _, id := range attachedPrograms(t, cgroupRoot, attach) {
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue // detached meanwhile
		}
		info, err := prog.Info()
		prog.Close()
		require.NoError(t, err)
		ids, _ := info.MapIDs()
		if slices.Contains(ids, mapID) {
			n++
		}
	}
	return n
}

// attachedPrograms asks the kernel (BPF_PROG_QUERY) which programs run at
// the cgroup's hook.
func attachedPrograms(t *testing.T, cgroupDir string, attach ebpf.AttachType) []ebpf.ProgramID {
	t.Helper()
	cg, err := os.Open(cgroupDir)
	require.NoError(t, err)
	defer cg.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: attach})
	require.NoError(t, err)
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	require.NoError(t, err)
	id, ok := info.ID()
	require.True(t, ok)
	return id
}

// sharedMapID is the id of the map the attribution programs use.
func sharedMapID(t *testing.T, opts Options) ebpf.MapID {
	t.Helper()
	return pinnedMapID(t, opts, attribMapClients)
}

func pinnedMapID(t *testing.T, opts Options, name string) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), name), nil)
	require.NoError(t, err)
	defer m.Close()
	return mapID(t, m)
}

func assertOneCopyEach(t *testing.T, opts Options) {
	t.Helper()
	root, err := cgroup2.Root()
	require.NoError(t, err)
	for _, h := range hooks() {
		id := pinnedMapID(t, opts, h.ownMap)
		assert.Equal(t, 1, attachedCopies(t, root, h.attach, id), "copies of %s attached", h.program)
	}
}

func TestLoaderExitAdoptAndReinstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	w := sandboxtest.New(t)
	a := w.AddSandbox("a")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	opts := Options{PinDir: testPinDir(t), Logger: quiet}
	t.Cleanup(func() { assert.NoError(t, Uninstall(context.Background(), opts)) })

	// A loader process installs and exits; no process holds the programs.
	loader := exec.Command(os.Args[0], "-test.run=^$")
	loader.Env = append(os.Environ(), loaderPinDirEnv+"="+opts.PinDir, loaderEndpointsEnv+"="+dest.String())
	out, err := loader.CombinedOutput()
	require.NoError(t, err, "loader: %s", out)

	client := a.Start(t)
	_, err = client.Dial(dest, 1)
	require.NoError(t, err)
	conn := srv.accept()

	// A new loader adopts the pins and attributes that connection.
	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	rec, err := in.Lookup(conn)
	require.NoError(t, err)
	assert.Equal(t, a.CgroupID, rec.CgroupID)
	assertOneCopyEach(t, opts)
	in.Close()

	for range 5 {
		in, err := Install(context.Background(), opts)
		require.NoError(t, err)
		assertOneCopyEach(t, opts)
		in.Close()
	}
}

// TestReplacesChangedProgramInPlace plays an upgrade: the pinned link runs
// some other program, and Install swaps ours in through the same link.
func TestReplacesChangedProgramInPlace(t *testing.T) {
	_, opts := install(t)
	pin := linkPin(opts.PinDir, attribProgRecordConnect)
	l, err := link.LoadPinnedLink(pin, nil)
	require.NoError(t, err)
	defer l.Close()
	before, err := l.Info()
	require.NoError(t, err)

	old, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SockOps,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	})
	require.NoError(t, err)
	defer old.Close()
	require.NoError(t, l.Update(old))

	in2, err := Install(context.Background(), opts)
	require.NoError(t, err)
	defer in2.Close()
	after, err := l.Info()
	require.NoError(t, err)
	assert.Equal(t, before.ID, after.ID, "the same link carries the new program")
	oldInfo, err := old.Info()
	require.NoError(t, err)
	oldID, _ := oldInfo.ID()
	assert.NotEqual(t, oldID, after.Program, "the old program was replaced")
	assertOneCopyEach(t, opts)
}

func TestUninstallLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	opts := Options{PinDir: testPinDir(t), Logger: quiet}
	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	ids := make(map[string]ebpf.MapID)
	for _, h := range hooks() {
		ids[h.program] = pinnedMapID(t, opts, h.ownMap)
	}
	in.Close()
	root, err := cgroup2.Root()
	require.NoError(t, err)

	require.NoError(t, Uninstall(context.Background(), opts))
	assert.NoDirExists(t, opts.PinDir)
	for _, h := range hooks() {
		assert.Zero(t, attachedCopies(t, root, h.attach, ids[h.program]), "%s still attached", h.program)
	}
	require.NoError(t, Uninstall(context.Background(), opts), "a second Uninstall has nothing to do")
}

// TestUpgradeRemovesRetiredPrograms plays an upgrade from the release that
// recorded owners with a cgroup/sock_create program and a socket-storage map
// of its own, and ran an older sockops program: Install swaps the sockops
// program in place, detaches the retired one, removes both retired pins, and
// leaves alone a link it does not know.
func TestUpgradeRemovesRetiredPrograms(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	sweepOnce.Do(sweepLeftoverPins)
	opts := Options{PinDir: testPinDir(t), Logger: quiet}
	stray := filepath.Join(opts.PinDir, "links", "not-ours")
	t.Cleanup(func() {
		detachPinned(stray)
		assert.NoError(t, Uninstall(context.Background(), opts))
	})
	root, err := cgroup2.Root()
	require.NoError(t, err)

	// What the older release left behind.
	for _, dir := range []string{filepath.Join(opts.PinDir, "links"), mapsDir(opts.PinDir)} {
		require.NoError(t, os.MkdirAll(dir, 0o700))
	}
	other := pinNoopLink(t, root, ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate, stray)
	oldOwner := pinNoopLink(t, root, ebpf.CGroupSock, ebpf.AttachCGroupInetSockCreate, linkPin(opts.PinDir, "record_owner"))
	oldConnect := pinNoopLink(t, root, ebpf.SockOps, ebpf.AttachCGroupSockOps, linkPin(opts.PinDir, attribProgRecordConnect))
	// Any map stands in for its socket storage: only the pin's name matters.
	storage, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 16, MaxEntries: 1})
	require.NoError(t, err)
	require.NoError(t, storage.Pin(filepath.Join(mapsDir(opts.PinDir), "sock_owners")))
	storage.Close()

	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	in.Close()
	assert.False(t, slices.Contains(attachedPrograms(t, root, ebpf.AttachCGroupInetSockCreate), oldOwner), "the retired program is detached")
	assert.False(t, slices.Contains(attachedPrograms(t, root, ebpf.AttachCGroupSockOps), oldConnect), "the old sockops program is replaced")
	assert.NoFileExists(t, linkPin(opts.PinDir, "record_owner"))
	assert.NoFileExists(t, filepath.Join(mapsDir(opts.PinDir), "sock_owners"))
	assertOneCopyEach(t, opts)
	assert.True(t, slices.Contains(attachedPrograms(t, root, ebpf.AttachCGroupInetSockCreate), other), "a link Install does not know is left alone")
	assert.FileExists(t, stray)
}

// pinNoopLink attaches a program that only returns at the cgroup's hook,
// pins the link at pin, and returns the program's id.
func pinNoopLink(t *testing.T, cgroupDir string, typ ebpf.ProgramType, attach ebpf.AttachType, pin string) ebpf.ProgramID {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: typ, AttachType: attach, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
	})
	require.NoError(t, err)
	defer prog.Close()
	info, err := prog.Info()
	require.NoError(t, err)
	id, _ := info.ID()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: attach, Program: prog})
	require.NoError(t, err)
	defer l.Close()
	require.NoError(t, l.Pin(pin))
	require.True(t, slices.Contains(attachedPrograms(t, cgroupDir, attach), id))
	return id
}

// TestPinnedNamesMatchTheObject: the names Install keeps pinned are exactly
// the maps and programs of the compiled object; a map added to attrib.c
// without being listed would otherwise be left out of Uninstall.
func TestPinnedNamesMatchTheObject(t *testing.T) {
	spec, err := loadAttrib()
	require.NoError(t, err)
	// Sections of global variables (.rodata) are made anew by each load,
	// never pinned.
	var state []string
	for name := range spec.Maps {
		if !strings.HasPrefix(name, ".") {
			state = append(state, name)
		}
	}
	assert.ElementsMatch(t, state, mapNames())
	assert.ElementsMatch(t, slices.Collect(maps.Keys(spec.Programs)), programNames())
}

// TestConcurrentInstallAndUninstall: daemons installing while an operator
// uninstalls, over and over, never fail and never leave two copies.
func TestConcurrentInstallAndUninstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	sweepOnce.Do(sweepLeftoverPins)
	opts := Options{PinDir: testPinDir(t), Logger: quiet}
	t.Cleanup(func() { assert.NoError(t, Uninstall(context.Background(), opts)) })
	ctx := context.Background()
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for range 10 {
				in, err := Install(ctx, opts)
				if !assert.NoError(t, err) {
					return
				}
				in.Close()
			}
		})
	}
	wg.Go(func() {
		for range 10 {
			assert.NoError(t, Uninstall(ctx, opts))
		}
	})
	wg.Wait()
	in, err := Install(ctx, opts)
	require.NoError(t, err)
	in.Close()
	assertOneCopyEach(t, opts)
}

// TestLockIsRetakenWhenTheDirectoryIsRemoved: a lock won on a pin directory
// that Uninstall removed meanwhile does not count; the waiter locks the
// directory now at that path, so it still excludes everyone else.
func TestLockIsRetakenWhenTheDirectoryIsRemoved(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pins")
	ctx := context.Background()
	unlock, err := lockDir(ctx, dir, true)
	require.NoError(t, err)

	won := make(chan func())
	go func() {
		u, err := lockDir(ctx, dir, true)
		assert.NoError(t, err)
		won <- u
	}()
	time.Sleep(50 * time.Millisecond) // let it wait on the first directory
	require.NoError(t, os.Remove(dir))
	unlock()
	waiterUnlock := <-won
	defer waiterUnlock()

	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err = lockDir(short, dir, true)
	assert.ErrorIs(t, err, context.DeadlineExceeded, "the waiter holds the lock on the directory now at the path")

	_, err = lockDir(ctx, filepath.Join(t.TempDir(), "gone"), false)
	assert.ErrorIs(t, err, fs.ErrNotExist, "without create, a missing directory is reported")
}

// TestRepairAfterUninstall plays an uninstall (programs detached, every pin
// removed) while a daemon holds its installation: Check says so, Repair puts
// the same maps back under their pins and attaches the programs again, and a
// new connection is attributed with the endpoints set before.
func TestRepairAfterUninstall(t *testing.T) {
	in, opts := install(t)
	token := listenLoopback(t)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{addrOf(token)}))
	require.NoError(t, in.Check())
	before := sharedMapID(t, opts)

	require.NoError(t, Uninstall(context.Background(), opts))
	require.NoDirExists(t, opts.PinDir)
	err := in.Check()
	require.Error(t, err)
	t.Log(err)

	require.NoError(t, in.Repair(context.Background()))
	require.NoError(t, in.Check())
	assert.Equal(t, before, sharedMapID(t, opts), "the maps pinned again are the ones the installation held")
	assertOneCopyEach(t, opts)

	c, err := net.DialTCP("tcp4", nil, token.Addr().(*net.TCPAddr))
	require.NoError(t, err)
	defer c.Close()
	s, err := token.AcceptTCP()
	require.NoError(t, err)
	defer s.Close()
	rec, err := in.Lookup(s)
	require.NoError(t, err)
	assert.Equal(t, ownCgroupID(t), rec.CgroupID)
}

// ownCgroupID is the id of the test process's cgroup v2 (the "0::" line of
// /proc/self/cgroup).
func ownCgroupID(t *testing.T) uint64 {
	t.Helper()
	root, err := cgroup2.Root()
	require.NoError(t, err)
	raw, err := os.ReadFile("/proc/self/cgroup")
	require.NoError(t, err)
	for _, line := range strings.Split(string(raw), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			id, err := cgroup2.ID(filepath.Join(root, rel))
			require.NoError(t, err)
			return id
		}
	}
	t.Fatal("no cgroup v2 line in /proc/self/cgroup")
	return 0
}

// TestCheckNoticesADetachedProgram: one link detached through the kernel,
// its pin left in place, is reported by Check and reattached by Repair.
func TestCheckNoticesADetachedProgram(t *testing.T) {
	in, opts := install(t)
	l, err := link.LoadPinnedLink(linkPin(opts.PinDir, attribProgRecordConnect), nil)
	require.NoError(t, err)
	require.NoError(t, l.Detach())
	l.Close()
	assert.ErrorContains(t, in.Check(), attribProgRecordConnect)
	require.NoError(t, in.Repair(context.Background()))
	require.NoError(t, in.Check())
	assertOneCopyEach(t, opts)
}

// TestMemlockFailureNamesMemlock starts a loader that can neither use nor
// raise RLIMIT_MEMLOCK. Kernels before 5.11 charge BPF memory to it: there
// the loader must say so rather than blame capabilities. Later kernels do
// not, and the same loader installs.
func TestMemlockFailureNamesMemlock(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	pinDir := testPinDir(t)
	t.Cleanup(func() { assert.NoError(t, Uninstall(context.Background(), Options{PinDir: pinDir})) })
	loader := exec.Command("/proc/self/exe", "-test.run=^$")
	loader.Env = append(os.Environ(), loaderPinDirEnv+"="+pinDir, loaderMemlockEnv+"=65536")
	out, err := loader.CombinedOutput()
	var uname unix.Utsname
	require.NoError(t, unix.Uname(&uname))
	release := unix.ByteSliceToString(uname.Release[:])
	var major, minor int
	_, serr := fmt.Sscanf(release, "%d.%d", &major, &minor)
	require.NoError(t, serr)
	if major < 5 || major == 5 && minor < 11 {
		require.Error(t, err, "kernel %s charges BPF memory to RLIMIT_MEMLOCK", release)
		assert.Contains(t, string(out), "RLIMIT_MEMLOCK")
		assert.NotContains(t, string(out), "CAP_BPF")
		return
	}
	require.NoError(t, err, "kernel %s does not charge BPF memory to RLIMIT_MEMLOCK: %s", release, out)
}

// TestKernelBelowTheFloorIsNamed fakes a kernel that lacks one feature: the
// load failure becomes a one-line refusal naming that feature and the release
// that brought it.
func TestKernelBelowTheFloorIsNamed(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to probe BPF features")
	}
	missing := requirement{"bpf_frobnicate in sockops", "99.1", func() error { return ebpf.ErrNotSupported }}
	reqs := append(requirements(), missing)
	err := diagnoseWith(fmt.Errorf("load attribution programs: %w", unix.EINVAL), reqs)
	require.Error(t, err)
	assert.NotContains(t, err.Error(), "\n")
	assert.Regexp(t, `^kernel \S+ is too old: it lacks bpf_frobnicate in sockops \(Linux 99\.1 or newer\): load attribution programs: invalid argument$`, err.Error())
	assert.ErrorIs(t, err, unix.EINVAL, "the kernel's own error is kept")
}

// TestKernelMeetsRequirements runs every probe diagnose relies on, so that
// the list is known to hold on each kernel the suite runs on (vmtest).
func TestKernelMeetsRequirements(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to probe BPF features")
	}
	for _, r := range requirements() {
		assert.NoError(t, r.probe(), r.what)
	}
}

func TestInstallErrorsNameTheCause(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to load BPF programs")
	}
	ctx := context.Background()
	_, err := Install(ctx, Options{PinDir: testPinDir(t), CgroupRoot: t.TempDir()})
	assert.ErrorContains(t, err, "is not on a cgroup2 filesystem")

	_, err = Install(ctx, Options{PinDir: filepath.Join(t.TempDir(), "pins")})
	assert.ErrorContains(t, err, "is not on a bpffs")

	// An unprivileged loader is told what it lacks. It runs from a copy of
	// the test binary that the unprivileged user can reach.
	dir, err := os.MkdirTemp("", "identityd-loader-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	bin := filepath.Join(dir, "loader")
	self, err := os.ReadFile(os.Args[0])
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, self, 0o755))
	loader := exec.Command(bin, "-test.run=^$")
	loader.Env = append(os.Environ(), loaderPinDirEnv+"="+testPinDir(t))
	loader.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := loader.CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "needs root with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")
}
