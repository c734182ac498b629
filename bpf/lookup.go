package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Reasons a connection cannot be attributed. Lookup wraps exactly one of them.
var (
	// ErrNoRecord: no record for the 4-tuple. The connection did not come
	// through connect() on this host to a configured endpoint, or its tuple
	// was rewritten on the way, or the record was already consumed.
	ErrNoRecord = errors.New("no attribution record for this connection")
	// ErrUnattested: the connecting socket was created before the programs
	// were attached, so its owner is unknown.
	ErrUnattested = errors.New("connecting socket predates the attribution programs")
	// ErrStale: the record is older than the configured maximum age.
	ErrStale = errors.New("attribution record is stale")
	// ErrAmbiguous: the same 4-tuple was published from two network
	// namespaces, so the record cannot say which one the server accepted.
	ErrAmbiguous = errors.New("connection 4-tuple was published from more than one network namespace")
)

// Flags qualify a record; they mirror RECORD_* in attrib.c.
type Flags uint32

const (
	FlagUnattested Flags = 1 << 0
	FlagAmbiguous  Flags = 1 << 1
)

func (f Flags) String() string {
	var parts []string
	if f&FlagUnattested != 0 {
		parts = append(parts, "unattested")
	}
	if f&FlagAmbiguous != 0 {
		parts = append(parts, "ambiguous")
	}
	if rest := f &^ (FlagUnattested | FlagAmbiguous); rest != 0 {
		parts = append(parts, fmt.Sprintf("0x%x", uint32(rest)))
	}
	return strings.Join(parts, "|")
}

// Record is what the kernel saw of the socket that opened a connection.
type Record struct {
	// CgroupID is the cgroup v2 id (directory inode) of the task that created
	// the socket, at creation time. Zero when unattested.
	CgroupID uint64
	// NetnsCookie identifies the socket's network namespace (SO_NETNS_COOKIE).
	NetnsCookie uint64
	// SocketCookie identifies the connecting socket (SO_COOKIE).
	SocketCookie uint64
	// PID and TGID are the creating thread and process, as seen from the
	// initial pid namespace. Zero when unattested.
	PID, TGID uint32
	// Connected is CLOCK_BOOTTIME when connect() ran.
	Connected time.Duration
	Flags     Flags
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

// Lookup returns the record for an accepted connection, given the server's
// local address and the peer's address, and consumes it: a second Lookup of
// the same connection reports ErrNoRecord, so callers attribute a connection
// once, when it is accepted.
//
// On failure the error wraps ErrNoRecord, ErrUnattested, ErrStale or
// ErrAmbiguous, and the returned Record holds whatever the kernel did record,
// for the refusal's log line.
func (in *Installation) Lookup(local, remote netip.AddrPort) (Record, error) {
	key := makeConnKey(remote, local)
	var raw attribRecord
	if err := in.conns.LookupAndDelete(&key, &raw); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return Record{}, fmt.Errorf("attribute %s -> %s: %w", remote, local, ErrNoRecord)
		}
		return Record{}, fmt.Errorf("look up attribution of %s -> %s: %w", remote, local, err)
	}
	rec := Record{
		CgroupID:     raw.CgroupId,
		NetnsCookie:  raw.NetnsCookie,
		SocketCookie: raw.SocketCookie,
		PID:          raw.Pid,
		TGID:         raw.Tgid,
		Connected:    time.Duration(raw.ConnectBootNs),
		Flags:        Flags(raw.Flags),
	}
	switch {
	case rec.Flags&FlagAmbiguous != 0:
		return rec, fmt.Errorf("attribute %s -> %s: %w", remote, local, ErrAmbiguous)
	case rec.Flags&FlagUnattested != 0:
		return rec, fmt.Errorf("attribute %s -> %s: %w", remote, local, ErrUnattested)
	}
	if age := bootTime() - rec.Connected; age > in.maxAge {
		return rec, fmt.Errorf("attribute %s -> %s: record is %s old: %w", remote, local, age.Round(time.Millisecond), ErrStale)
	}
	return rec, nil
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
// any destination address with that port. New endpoints are added before old
// ones are removed, so an endpoint present in both sets is never absent.
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
	var stale []attribEndpoint
	var ep attribEndpoint
	var v uint32
	it := in.endpoints.Iterate()
	for it.Next(&ep, &v) {
		if !want[ep] {
			stale = append(stale, ep)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list token endpoints: %w", err)
	}
	for _, ep := range stale {
		if err := in.endpoints.Delete(ep); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("remove token endpoint %s: %w", endpointString(ep), err)
		}
	}
	return nil
}

// Endpoints returns the configured token endpoints.
func (in *Installation) Endpoints() ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	var ep attribEndpoint
	var v uint32
	it := in.endpoints.Iterate()
	for it.Next(&ep, &v) {
		out = append(out, netip.AddrPortFrom(addrFromWords(ep.Addr), ep.Port))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list token endpoints: %w", err)
	}
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

func makeConnKey(client, server netip.AddrPort) attribConnKey {
	return attribConnKey{
		Saddr: addrWords(client.Addr()),
		Daddr: addrWords(server.Addr()),
		Sport: client.Port(),
		Dport: server.Port(),
	}
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
