package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Reasons a connection cannot be attributed. Lookup wraps exactly one of them.
var (
	// ErrNoRecord: the accepted socket carries no record. No socket on this
	// host completed this very handshake (4-tuple and sequence numbers) with
	// a configured endpoint: the connection came from elsewhere, someone
	// other than the socket that owns the 4-tuple completed it, or something
	// rewrote its addresses on the way (one that conntrack says was
	// rewritten by NAT is reported as a *NATError, which wraps it).
	ErrNoRecord = errors.New("no attribution record for this connection")
	// ErrUnattested: the program could not read which cgroup the connecting
	// socket belongs to, so its owner is unknown.
	ErrUnattested = errors.New("owner of the connecting socket could not be read")
)

// Flags qualify a record; they mirror RECORD_* in attrib.c.
type Flags uint32

// FlagUnattested: the record's owner could not be read.
const FlagUnattested Flags = 1 << 0

func (f Flags) String() string {
	var parts []string
	if f&FlagUnattested != 0 {
		parts = append(parts, "unattested")
	}
	if rest := f &^ FlagUnattested; rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint32(rest)))
	}
	return strings.Join(parts, "|")
}

// Record is what the kernel saw of the socket that opened a connection.
type Record struct {
	// CgroupID is the cgroup v2 id (directory inode) of the cgroup the socket
	// was created in, as the kernel stored it in the socket. Zero when
	// unattested.
	CgroupID uint64
	// NetnsCookie identifies the socket's network namespace (SO_NETNS_COOKIE).
	NetnsCookie uint64
	// SocketCookie identifies the connecting socket (SO_COOKIE).
	SocketCookie uint64
	// PID and TGID are the thread and process that called connect(), as seen
	// from the initial pid namespace. They are zero if unknown: the connect
	// hooks match the destination the caller named, so a connection whose
	// destination another program rewrote to the endpoint, or one to the
	// unspecified address that the kernel routed there, has no pid. They are
	// for logs: identity is decided by CgroupID and NetnsCookie.
	PID, TGID uint32
	// Established is CLOCK_BOOTTIME when the client's handshake completed.
	Established time.Duration
	Flags       Flags
}

// LogValue lets a Record be logged as a group of its fields.
func (r Record) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.Uint64("cgroup_id", r.CgroupID),
		slog.Uint64("netns_cookie", r.NetnsCookie),
		slog.Uint64("pid", uint64(r.TGID)),
		slog.Uint64("tid", uint64(r.PID)),
		slog.Uint64("socket_cookie", r.SocketCookie),
	}
	if r.Flags != 0 {
		attrs = append(attrs, slog.String("flags", r.Flags.String()))
	}
	return slog.GroupValue(attrs...)
}

// Lookup returns the record the kernel attached to an accepted connection:
// what it saw of the client socket that completed this very handshake with
// the server. c is the server's side of the connection (a *net.TCPConn, or
// anything else whose descriptor is such a socket).
//
// On failure the error wraps ErrNoRecord or ErrUnattested, and the returned
// Record holds whatever the kernel did record, for the refusal's log line.
func (in *Installation) Lookup(c syscall.Conn) (Record, error) {
	// Raw bytes instead of the generated structs: this runs once per accepted
	// connection, and the structs would go through reflection.
	var raw [recordSize]byte
	var lookupErr, natErr error
	rc, err := c.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) {
			lookupErr = in.attested.Lookup(uint32(fd), raw[:])
			if errors.Is(lookupErr, ebpf.ErrKeyNotExist) && in.nat != nil {
				natErr = in.nat.explain(int(fd))
			}
		})
	}
	if err != nil {
		return Record{}, fmt.Errorf("look up attribution: reach the connection's socket: %w", err)
	}
	if natErr != nil {
		return Record{}, fmt.Errorf("attribute connection: %w", natErr)
	}
	if errors.Is(lookupErr, ebpf.ErrKeyNotExist) {
		return Record{}, fmt.Errorf("attribute connection: %w", ErrNoRecord)
	}
	if lookupErr != nil {
		return Record{}, fmt.Errorf("look up attribution: %w", lookupErr)
	}
	rec := decodeRecord(raw)
	if rec.Flags&FlagUnattested != 0 {
		return rec, fmt.Errorf("attribute connection: %w", ErrUnattested)
	}
	return rec, nil
}

// recordSize is the size of struct record in attrib.c.
const recordSize = 48

func decodeRecord(b [recordSize]byte) Record {
	u64 := func(off int) uint64 { return binary.NativeEndian.Uint64(b[off:]) }
	u32 := func(off int) uint32 { return binary.NativeEndian.Uint32(b[off:]) }
	return Record{
		CgroupID:     u64(0),
		NetnsCookie:  u64(8),
		SocketCookie: u64(16),
		Established:  time.Duration(u64(24)),
		PID:          u32(32),
		TGID:         u32(36),
		Flags:        Flags(u32(40)),
	}
}

// bootTime reads CLOCK_BOOTTIME, the clock bpf_ktime_get_boot_ns uses.
func bootTime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		// CLOCK_BOOTTIME exists on every kernel this package loads on.
		return 0
	}
	return time.Duration(ts.Nano())
}

// SetEndpoints makes eps the complete set of token endpoints whose
// connections are recorded. An unspecified address (0.0.0.0 or ::) matches
// any destination address with that port. An endpoint present before and
// after the call is never absent in between: new endpoints are enabled
// before old ones are removed.
func (in *Installation) SetEndpoints(eps []netip.AddrPort) error {
	want := make(map[attribEndpoint]bool, len(eps))
	for _, ep := range eps {
		if !ep.IsValid() || ep.Port() == 0 {
			return fmt.Errorf("set token endpoints: invalid endpoint %q", ep)
		}
		want[makeEndpoint(ep)] = true
	}
	var one uint32 = 1
	for ep := range want {
		if err := in.endpoints.Put(ep, one); err != nil {
			return fmt.Errorf("add token endpoint %s: %w", endpointString(ep), err)
		}
	}
	current, err := in.endpointSet()
	if err != nil {
		return err
	}
	// The union first, so that the ports of both old and new endpoints pass
	// the bitmap until the old ones are gone.
	if err := in.setPorts(current); err != nil {
		return err
	}
	for ep := range current {
		if want[ep] {
			continue
		}
		if err := in.endpoints.Delete(ep); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove token endpoint %s: %w", endpointString(ep), err)
		}
	}
	return in.setPorts(want)
}

func (in *Installation) endpointSet() (map[attribEndpoint]bool, error) {
	set := make(map[attribEndpoint]bool)
	var ep attribEndpoint
	var v uint32
	it := in.endpoints.Iterate()
	for it.Next(&ep, &v) {
		set[ep] = true
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list token endpoints: %w", err)
	}
	return set, nil
}

func (in *Installation) setPorts(eps map[attribEndpoint]bool) error {
	return putPorts(in.ports, eps)
}

// putPorts sets the port bitmap m to the ports of eps.
func putPorts(m *ebpf.Map, eps map[attribEndpoint]bool) error {
	var bm attribPortBitmap
	for ep := range eps {
		bm.Bits[ep.Port>>6] |= 1 << (ep.Port & 63)
	}
	if err := m.Put(uint32(0), &bm); err != nil {
		return fmt.Errorf("set the ports of %s: %w", m.String(), err)
	}
	return nil
}

// Endpoints returns the configured token endpoints.
func (in *Installation) Endpoints() ([]netip.AddrPort, error) {
	set, err := in.endpointSet()
	if err != nil {
		return nil, err
	}
	out := make([]netip.AddrPort, 0, len(set))
	for ep := range set {
		out = append(out, netip.AddrPortFrom(addrFromWords(ep.Addr), ep.Port))
	}
	slices.SortFunc(out, netip.AddrPort.Compare)
	return out, nil
}

// addrWords converts an address to the kernel's layout: IPv6, or IPv4-mapped
// IPv6, as four words holding the address bytes in network order.
func addrWords(a netip.Addr) [4]uint32 {
	b := a.As16() // IPv4 comes back as ::ffff:a.b.c.d
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func addrFromWords(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

func makeEndpoint(ep netip.AddrPort) attribEndpoint {
	out := attribEndpoint{Port: ep.Port()}
	if !ep.Addr().IsUnspecified() {
		out.Addr = addrWords(ep.Addr())
	}
	return out
}

func endpointString(ep attribEndpoint) string {
	return netip.AddrPortFrom(addrFromWords(ep.Addr), ep.Port).String()
}
