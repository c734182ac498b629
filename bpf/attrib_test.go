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
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
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

// accept accepts one connection and returns its local and remote addresses.
func (s *server) accept() (local, remote netip.AddrPort) {
	s.t.Helper()
	s.ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := s.ln.AcceptTCP()
	require.NoError(s.t, err)
	s.t.Cleanup(func() { c.Close() })
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

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

			local, remote := dual.accept()
			assert.Equal(t, clientLocal.Addr().Unmap(), remote.Addr().Unmap(), "server sees the client's address")
			rec, err := in.Lookup(local, remote)
			require.NoError(t, err)
			assert.Equal(t, a.CgroupID, rec.CgroupID, "cgroup id is the inode of the sandbox's cgroup")
			assert.Equal(t, a.NetnsCookie, rec.NetnsCookie, "netns cookie is SO_NETNS_COOKIE inside the sandbox")
			assert.Equal(t, uint32(client.Pid), rec.TGID)
			assert.NotZero(t, rec.PID)
			assert.NotZero(t, rec.SocketCookie)
			assert.Zero(t, rec.Flags)
			assert.InDelta(t, float64(bootTime()), float64(rec.Connected), float64(5*time.Second))

			_, err = in.Lookup(local, remote)
			assert.ErrorIs(t, err, ErrNoRecord, "a record is consumed by its lookup")
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
	local, remote := other.accept()
	_, err = in.Lookup(local, remote)
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
	connectors, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), attribMapConnectors), nil)
	require.NoError(t, err)
	defer connectors.Close()
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

			var got struct{ PID, TGID uint32 }
			err = connectors.Lookup(uint32(fd), &got)
			if !tc.stored {
				assert.ErrorIs(t, err, ebpf.ErrKeyNotExist, "storage allocated for a connection to another port")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, uint32(os.Getpid()), got.TGID)
			assert.NotZero(t, got.PID)
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
	var k attribConnKey
	var v attribRecord
	it := in.conns.Iterate()
	n := 0
	for it.Next(&k, &v) {
		n++
	}
	require.NoError(t, it.Err())
	assert.Zero(t, n, "records left in the map")
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
		local, remote := srv.accept()
		rec, err := in.Lookup(local, remote)
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
// record is written by hand: the program flags one only if the socket's
// cgroup cannot be read, which no socket reaching TCP_CONNECT_CB provokes.
func TestUnattestedRecordIsRefused(t *testing.T) {
	in, _ := install(t)
	local := netip.MustParseAddrPort("10.0.0.1:7123")
	remote := netip.MustParseAddrPort("10.0.0.2:40000")
	key := connKey(remote, local)
	require.NoError(t, in.conns.Put(key[:], attribRecord{NetnsCookie: 7, ConnectBootNs: uint64(bootTime()), Flags: uint32(FlagUnattested)}))
	got, err := in.Lookup(local, remote)
	require.ErrorIs(t, err, ErrUnattested)
	assert.Zero(t, got.CgroupID)
	assert.Equal(t, uint64(7), got.NetnsCookie)
}

// TestSameTupleFromTwoNetnsIsAmbiguous plays a sandbox that takes another's
// address and source port: neither connection can be attributed.
func TestSameTupleFromTwoNetnsIsAmbiguous(t *testing.T) {
	in, _ := install(t)
	w := sandboxtest.New(t)
	a, b := w.AddSandbox("a"), w.AddSandbox("b")
	srv := listen(t, w, fmt.Sprintf(":%d", tokenPort))
	dest := netip.AddrPortFrom(w.Router4, tokenPort)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{dest}))
	require.NoError(t, b.AddAddr(a.Addr4))

	source := netip.AddrPortFrom(a.Addr4, 40123)
	ca, cb := a.Start(t), b.Start(t)
	fa, err := ca.Socket(4)
	require.NoError(t, err)
	require.NoError(t, ca.Bind(fa, source))
	_, err = ca.Connect(fa, dest)
	require.NoError(t, err)

	fb, err := cb.Socket(4)
	require.NoError(t, err)
	require.NoError(t, cb.Bind(fb, source))
	require.NoError(t, cb.ConnectNonblock(fb, dest))

	rec, err := in.Lookup(srv.accept())
	assert.ErrorIs(t, err, ErrAmbiguous)
	assert.Equal(t, b.NetnsCookie, rec.NetnsCookie, "the record names the later publisher")
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

// TestLayout ties the hand-written encodings to the generated types, which
// bpf2go derives from attrib.c.
func TestLayout(t *testing.T) {
	assert.Equal(t, connKeySize, binary.Size(attribConnKey{}))
	assert.Equal(t, recordSize, binary.Size(attribRecord{}))

	client := netip.MustParseAddrPort("10.1.2.3:40000")
	server := netip.MustParseAddrPort("[fd00::1]:7123")
	k := connKey(client, server)
	var got attribConnKey
	require.NoError(t, binary.Read(bytes.NewReader(k[:]), binary.NativeEndian, &got))
	assert.Equal(t, attribConnKey{Saddr: addrWords(client.Addr()), Daddr: addrWords(server.Addr()), Sport: 40000, Dport: 7123}, got)

	want := attribRecord{CgroupId: 1, NetnsCookie: 2, SocketCookie: 3, ConnectBootNs: 4, Pid: 5, Tgid: 6, Flags: 7}
	var raw bytes.Buffer
	require.NoError(t, binary.Write(&raw, binary.NativeEndian, want))
	assert.Equal(t, Record{CgroupID: 1, NetnsCookie: 2, SocketCookie: 3, Connected: 4, PID: 5, TGID: 6, Flags: 7},
		decodeRecord([recordSize]byte(raw.Bytes())))
}

func TestStaleRecord(t *testing.T) {
	in, _ := install(t)
	local := netip.MustParseAddrPort("10.0.0.1:7123")
	remote := netip.MustParseAddrPort("10.0.0.2:40000")
	rec := attribRecord{CgroupId: 42, NetnsCookie: 7, ConnectBootNs: uint64(bootTime() - 2*DefaultMaxRecordAge)}
	key := connKey(remote, local)
	require.NoError(t, in.conns.Put(key[:], rec))
	got, err := in.Lookup(local, remote)
	assert.ErrorIs(t, err, ErrStale)
	assert.Equal(t, uint64(42), got.CgroupID)
}

// TestCapacity checks that the connection map keeps the promised number of
// live records without evicting any.
func TestCapacity(t *testing.T) {
	in, _ := install(t)
	const live = 65536
	keys := make([][connKeySize]byte, live)
	vals := make([]attribRecord, live)
	now := uint64(bootTime())
	for i := range keys {
		keys[i] = connKey(
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 40000),
			netip.MustParseAddrPort("10.0.0.1:7123"))
		vals[i] = attribRecord{CgroupId: uint64(i + 1), ConnectBootNs: now}
	}
	for i := range keys {
		require.NoError(t, in.conns.Put(keys[i][:], vals[i]))
	}
	for i := range keys {
		var got attribRecord
		require.NoError(t, in.conns.Lookup(keys[i][:], &got), "record %d was evicted", i)
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

// sharedMapID is the id of the map all three programs use.
func sharedMapID(t *testing.T, opts Options) ebpf.MapID {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(mapsDir(opts.PinDir), attribMapConnectors), nil)
	require.NoError(t, err)
	defer m.Close()
	return mapID(t, m)
}

func assertOneCopyEach(t *testing.T, opts Options) {
	t.Helper()
	root, err := cgroup2.Root()
	require.NoError(t, err)
	id := sharedMapID(t, opts)
	for _, h := range hooks() {
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
	local, remote := srv.accept()

	// A new loader adopts the pins and attributes that connection.
	in, err := Install(context.Background(), opts)
	require.NoError(t, err)
	rec, err := in.Lookup(local, remote)
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
	id := sharedMapID(t, opts)
	in.Close()
	root, err := cgroup2.Root()
	require.NoError(t, err)

	require.NoError(t, Uninstall(context.Background(), opts))
	assert.NoDirExists(t, opts.PinDir)
	for _, h := range hooks() {
		assert.Zero(t, attachedCopies(t, root, h.attach, id), "%s still attached", h.program)
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
	assert.ElementsMatch(t, slices.Collect(maps.Keys(spec.Maps)), mapNames())
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
	rec, err := in.Lookup(s.LocalAddr().(*net.TCPAddr).AddrPort(), s.RemoteAddr().(*net.TCPAddr).AddrPort())
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
