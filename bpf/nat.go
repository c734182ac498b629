package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	"github.com/identityd/identityd/internal/netnsutil"
)

// NATError is ErrNoRecord for a connection that netfilter's connection
// tracking says was rewritten on its way (DNAT, REDIRECT, SNAT or
// MASQUERADE): the client socket's record, if it published one, is under
// the tuple it connected with, which the server never sees. It unwraps to
// ErrNoRecord.
type NATError struct {
	// Sent is the connection as its client sent it; Arrived as the server
	// accepted it (client, then server).
	SentFrom, SentTo       netip.AddrPort
	ArrivedFrom, ArrivedTo netip.AddrPort
}

func (e *NATError) Error() string {
	return fmt.Sprintf("%v: its addresses were rewritten by NAT on the way (conntrack: sent %s -> %s, arrived %s -> %s); "+
		"NAT after connect() hides the socket that opened it, so it cannot be attributed: "+
		"use --link-local-endpoint instead of a DNAT rule", ErrNoRecord, e.SentFrom, e.SentTo, e.ArrivedFrom, e.ArrivedTo)
}

func (e *NATError) Unwrap() error { return ErrNoRecord }

// natProbe asks conntrack about connections that arrived with no record.
// The questions are rate limited: whoever can connect to the endpoint can
// make connections without records, and each question costs a thread and a
// netlink round trip in the accept path.
type natProbe struct {
	limit *rate.Limiter
}

func newNATProbe() *natProbe {
	return &natProbe{limit: rate.NewLimiter(rate.Every(50*time.Millisecond), 20)}
}

// explain returns a *NATError if conntrack, in the accepted socket's own
// network namespace, has the connection with rewritten addresses, and nil
// if it does not, cannot be asked, or the rate limit is spent.
func (p *natProbe) explain(fd int) error {
	if !p.limit.Allow() {
		return nil
	}
	local, err1 := unix.Getsockname(fd)
	remote, err2 := unix.Getpeername(fd)
	if err1 != nil || err2 != nil {
		return nil
	}
	server, ok1 := sockaddrAddrPort(local)
	client, ok2 := sockaddrAddrPort(remote)
	if !ok1 || !ok2 {
		return nil
	}
	ns, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
	if err != nil {
		return nil
	}
	defer unix.Close(ns)
	var sent [2]netip.AddrPort
	var status uint32
	err = netnsutil.Do(fmt.Sprintf("/proc/self/fd/%d", ns), func() error {
		var err error
		sent, status, err = conntrackByReply(server, client)
		return err
	})
	// IPS_SRC_NAT and IPS_DST_NAT: the kernel rewrote this connection.
	const ipsSrcNAT, ipsDstNAT = 1 << 4, 1 << 5
	if err != nil || status&(ipsSrcNAT|ipsDstNAT) == 0 {
		return nil
	}
	return &NATError{SentFrom: sent[0], SentTo: sent[1], ArrivedFrom: client, ArrivedTo: server}
}

func sockaddrAddrPort(sa unix.Sockaddr) (netip.AddrPort, bool) {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), true
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port)), true
	}
	return netip.AddrPort{}, false
}

// Netlink constants of ctnetlink (linux/netfilter/nfnetlink*.h).
const (
	nfnlSubsysCtnetlink = 1
	ipctnlMsgCtGet      = 1
	ctaTupleOrig        = 1
	ctaTupleReply       = 2
	ctaStatus           = 3
	ctaTupleIP          = 1
	ctaTupleProto       = 2
	ctaIPv4Src          = 1
	ctaIPv4Dst          = 2
	ctaIPv6Src          = 3
	ctaIPv6Dst          = 4
	ctaProtoNum         = 1
	ctaProtoSrcPort     = 2
	ctaProtoDstPort     = 3
	nlaFNested          = 1 << 15
	nlaTypeMask         = ^uint16(3 << 14)
)

// conntrackByReply asks the calling thread's netns' conntrack for the TCP
// connection whose reply direction goes from server to client (what the
// accepted socket sees) and returns its original direction's source and
// destination and its status bits.
func conntrackByReply(server, client netip.AddrPort) ([2]netip.AddrPort, uint32, error) {
	var none [2]netip.AddrPort
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return none, 0, fmt.Errorf("open ctnetlink: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 1}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return none, 0, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return none, 0, fmt.Errorf("bind ctnetlink: %w", err)
	}
	family := uint8(unix.AF_INET)
	if server.Addr().Is6() {
		family = unix.AF_INET6
	}
	body := []byte{family, 0 /* NFNETLINK_V0 */, 0, 0}
	body = append(body, nlAttr(ctaTupleReply|nlaFNested, tupleAttrs(server, client))...)
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], nfnlSubsysCtnetlink<<8|ipctnlMsgCtGet)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(msg[8:], 1) // sequence number
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return none, 0, fmt.Errorf("ask ctnetlink: %w", err)
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return none, 0, fmt.Errorf("read ctnetlink: %w", err)
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil || len(msgs) == 0 {
		return none, 0, fmt.Errorf("parse ctnetlink reply: %v", err)
	}
	m := msgs[0]
	if m.Header.Type == unix.NLMSG_ERROR {
		if len(m.Data) >= 4 {
			if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
				return none, 0, fmt.Errorf("ctnetlink: %w", unix.Errno(-errno))
			}
		}
		return none, 0, errors.New("ctnetlink: no answer")
	}
	if len(m.Data) < 4 {
		return none, 0, errors.New("ctnetlink: short reply")
	}
	var sent [2]netip.AddrPort
	var status uint32
	for typ, val := range nlAttrs(m.Data[4:]) {
		switch typ {
		case ctaTupleOrig:
			sent = parseTuple(val)
		case ctaStatus:
			if len(val) >= 4 {
				status = binary.BigEndian.Uint32(val)
			}
		}
	}
	return sent, status, nil
}

// tupleAttrs encodes a TCP tuple from src to dst.
func tupleAttrs(src, dst netip.AddrPort) []byte {
	var ip []byte
	if src.Addr().Is4() {
		s, d := src.Addr().As4(), dst.Addr().Unmap().As4()
		ip = append(nlAttr(ctaIPv4Src, s[:]), nlAttr(ctaIPv4Dst, d[:])...)
	} else {
		s, d := src.Addr().As16(), dst.Addr().As16()
		ip = append(nlAttr(ctaIPv6Src, s[:]), nlAttr(ctaIPv6Dst, d[:])...)
	}
	proto := nlAttr(ctaProtoNum, []byte{unix.IPPROTO_TCP})
	proto = append(proto, nlAttr(ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, src.Port()))...)
	proto = append(proto, nlAttr(ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, dst.Port()))...)
	return append(nlAttr(ctaTupleIP|nlaFNested, ip), nlAttr(ctaTupleProto|nlaFNested, proto)...)
}

func parseTuple(b []byte) [2]netip.AddrPort {
	var addrs [2]netip.Addr
	var ports [2]uint16
	for typ, val := range nlAttrs(b) {
		switch typ {
		case ctaTupleIP:
			for t, v := range nlAttrs(val) {
				if a, ok := netip.AddrFromSlice(v); ok && t >= ctaIPv4Src && t <= ctaIPv6Dst {
					addrs[(t-1)%2] = a
				}
			}
		case ctaTupleProto:
			for t, v := range nlAttrs(val) {
				if len(v) >= 2 && (t == ctaProtoSrcPort || t == ctaProtoDstPort) {
					ports[t-ctaProtoSrcPort] = binary.BigEndian.Uint16(v)
				}
			}
		}
	}
	return [2]netip.AddrPort{netip.AddrPortFrom(addrs[0], ports[0]), netip.AddrPortFrom(addrs[1], ports[1])}
}

// nlAttr encodes one netlink attribute, padded to 4 bytes.
func nlAttr(typ uint16, val []byte) []byte {
	b := make([]byte, 4, 4+len(val)+3)
	binary.NativeEndian.PutUint16(b[0:], uint16(4+len(val)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	b = append(b, val...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// nlAttrs iterates over the netlink attributes in b, by type without flags.
func nlAttrs(b []byte) func(yield func(uint16, []byte) bool) {
	return func(yield func(uint16, []byte) bool) {
		for len(b) >= 4 {
			n := int(binary.NativeEndian.Uint16(b[0:]))
			typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
			if n < 4 || n > len(b) {
				return
			}
			if !yield(typ, b[4:n]) {
				return
			}
			n = (n + 3) &^ 3
			if n >= len(b) {
				return
			}
			b = b[n:]
		}
	}
}
