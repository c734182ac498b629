package attacktest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// link is an AF_PACKET socket on one interface: frames written go out
// exactly as built, whatever their source addresses, and every frame of its
// protocol the interface carries can be read, also those addressed to
// others' IP addresses.
type link struct {
	fd  int
	ifc *net.Interface
	ip  netip.Addr // the interface's own first IPv4 address
}

// pollStep bounds each blocking read so that callers see their deadlines.
const pollStep = 50 * time.Millisecond

// openLink opens an AF_PACKET socket for etherType on the interface that
// routes to dst. It must run on the thread that is in the sandbox's netns.
func openLink(dst netip.Addr, etherType uint16) (*link, netip.Addr, error) {
	routes, err := netlink.RouteGet(dst.AsSlice())
	if err != nil || len(routes) == 0 {
		return nil, netip.Addr{}, fmt.Errorf("route to %s: %v", dst, err)
	}
	hop := dst
	if gw, ok := netip.AddrFromSlice(routes[0].Gw); ok {
		hop = gw.Unmap()
	}
	ifc, err := net.InterfaceByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("interface of the route to %s: %w", dst, err)
	}
	l := &link{ifc: ifc}
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("addresses of %s: %w", ifc.Name, err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !l.ip.IsValid() {
			l.ip, _ = netip.AddrFromSlice(n.IP.To4())
		}
	}
	if !l.ip.IsValid() {
		return nil, netip.Addr{}, fmt.Errorf("%s has no IPv4 address", ifc.Name)
	}
	l.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(etherType)))
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("packet socket: %w", err)
	}
	if err := unix.Bind(l.fd, &unix.SockaddrLinklayer{Protocol: htons(etherType), Ifindex: ifc.Index}); err != nil {
		unix.Close(l.fd)
		return nil, netip.Addr{}, fmt.Errorf("bind packet socket to %s: %w", ifc.Name, err)
	}
	tv := unix.NsecToTimeval(pollStep.Nanoseconds())
	if err := unix.SetsockoptTimeval(l.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(l.fd)
		return nil, netip.Addr{}, fmt.Errorf("receive timeout: %w", err)
	}
	unix.SetsockoptInt(l.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	return l, hop, nil
}

func (l *link) close() { unix.Close(l.fd) }

func (l *link) send(frame []byte) error {
	if _, err := unix.Write(l.fd, frame); err != nil {
		return fmt.Errorf("send on %s: %w", l.ifc.Name, err)
	}
	return nil
}

// recv returns the payload of the next frame that arrived from the wire (not
// one this host sent), or nil when nothing came within pollStep.
func (l *link) recv(buf []byte) ([]byte, error) {
	for {
		n, from, err := unix.Recvfrom(l.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("receive on %s: %w", l.ifc.Name, err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if n < ethHdrLen {
			continue
		}
		return buf[ethHdrLen:n], nil
	}
}

// resolve asks for ip's hardware address with an ARP request from this
// interface's own address, as any host on the segment can.
func resolve(ip netip.Addr, timeout time.Duration) (net.HardwareAddr, error) {
	l, _, err := openLink(ip, etherTypeARP)
	if err != nil {
		return nil, err
	}
	defer l.close()
	req := ethFrame(broadcast, l.ifc.HardwareAddr, etherTypeARP, arpPacket{
		Op: arpRequest, SenderHW: l.ifc.HardwareAddr, SenderIP: l.ip, TargetHW: make(net.HardwareAddr, 6), TargetIP: ip,
	}.marshal())
	buf := make([]byte, 2048)
	deadline := time.Now().Add(timeout)
	for next := time.Now(); time.Now().Before(deadline); {
		if time.Now().After(next) {
			if err := l.send(req); err != nil {
				return nil, err
			}
			next = time.Now().Add(200 * time.Millisecond)
		}
		b, err := l.recv(buf)
		if err != nil {
			return nil, err
		}
		if p, ok := parseARP(b); ok && p.Op == arpReply && p.SenderIP == ip {
			return p.SenderHW, nil
		}
	}
	return nil, fmt.Errorf("no ARP reply from %s on %s within %s", ip, l.ifc.Name, timeout)
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}
