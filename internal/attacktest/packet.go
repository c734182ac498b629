package attacktest

import (
	"encoding/binary"
	"net"
	"net/netip"
)

const (
	ethHdrLen     = 14
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	ipv4HdrLen    = 20
	tcpHdrLen     = 20
	protoTCP      = 6
)

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
)

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// ethFrame prepends an Ethernet header to payload.
func ethFrame(dst, src net.HardwareAddr, etherType uint16, payload []byte) []byte {
	b := make([]byte, ethHdrLen, ethHdrLen+len(payload))
	copy(b[0:6], dst)
	copy(b[6:12], src)
	binary.BigEndian.PutUint16(b[12:14], etherType)
	return append(b, payload...)
}

// arpPacket is an Ethernet/IPv4 ARP packet.
type arpPacket struct {
	Op       uint16 // 1 request, 2 reply
	SenderHW net.HardwareAddr
	SenderIP netip.Addr
	TargetHW net.HardwareAddr
	TargetIP netip.Addr
}

const (
	arpRequest = 1
	arpReply   = 2
)

func (p arpPacket) marshal() []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b[0:2], 1) // Ethernet
	binary.BigEndian.PutUint16(b[2:4], etherTypeIPv4)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:8], p.Op)
	copy(b[8:14], p.SenderHW)
	s := p.SenderIP.As4()
	copy(b[14:18], s[:])
	copy(b[18:24], p.TargetHW)
	d := p.TargetIP.As4()
	copy(b[24:28], d[:])
	return b
}

func parseARP(b []byte) (arpPacket, bool) {
	if len(b) < 28 || binary.BigEndian.Uint16(b[2:4]) != etherTypeIPv4 || b[4] != 6 || b[5] != 4 {
		return arpPacket{}, false
	}
	return arpPacket{
		Op:       binary.BigEndian.Uint16(b[6:8]),
		SenderHW: net.HardwareAddr(append([]byte(nil), b[8:14]...)),
		SenderIP: netip.AddrFrom4([4]byte(b[14:18])),
		TargetHW: net.HardwareAddr(append([]byte(nil), b[18:24]...)),
		TargetIP: netip.AddrFrom4([4]byte(b[24:28])),
	}, true
}

// segment is one IPv4 TCP segment.
type segment struct {
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8
	Window   uint16
	Options  []byte // a multiple of 4 bytes
	Payload  []byte
}

// marshal returns the IPv4 packet carrying s, checksums filled in.
func (s segment) marshal(id uint16) []byte {
	tcpLen := tcpHdrLen + len(s.Options) + len(s.Payload)
	b := make([]byte, ipv4HdrLen+tcpLen)
	ip := b[:ipv4HdrLen]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(len(b)))
	binary.BigEndian.PutUint16(ip[4:6], id)
	binary.BigEndian.PutUint16(ip[6:8], 0x4000) // don't fragment
	ip[8] = 64
	ip[9] = protoTCP
	src, dst := s.Src.Addr().As4(), s.Dst.Addr().As4()
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:12], checksum(0, ip))

	t := b[ipv4HdrLen:]
	binary.BigEndian.PutUint16(t[0:2], s.Src.Port())
	binary.BigEndian.PutUint16(t[2:4], s.Dst.Port())
	binary.BigEndian.PutUint32(t[4:8], s.Seq)
	binary.BigEndian.PutUint32(t[8:12], s.Ack)
	t[12] = byte((tcpHdrLen + len(s.Options)) / 4 << 4)
	t[13] = s.Flags
	binary.BigEndian.PutUint16(t[14:16], s.Window)
	copy(t[tcpHdrLen:], s.Options)
	copy(t[tcpHdrLen+len(s.Options):], s.Payload)
	binary.BigEndian.PutUint16(t[16:18], checksum(pseudoHeaderSum(src, dst, tcpLen), t))
	return b
}

// parseSegment reads an IPv4 packet carrying TCP. Checksums are not
// checked: packets seen on the sender's side of a veth may carry partial ones.
func parseSegment(b []byte) (segment, bool) {
	if len(b) < ipv4HdrLen || b[0]>>4 != 4 || b[9] != protoTCP {
		return segment{}, false
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:4]))
	if ihl < ipv4HdrLen || total > len(b) || total < ihl+tcpHdrLen {
		return segment{}, false
	}
	if binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 { // a fragment
		return segment{}, false
	}
	src := netip.AddrFrom4([4]byte(b[12:16]))
	dst := netip.AddrFrom4([4]byte(b[16:20]))
	t := b[ihl:total]
	off := int(t[12]>>4) * 4
	if off < tcpHdrLen || off > len(t) {
		return segment{}, false
	}
	return segment{
		Src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(t[0:2])),
		Dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(t[2:4])),
		Seq:     binary.BigEndian.Uint32(t[4:8]),
		Ack:     binary.BigEndian.Uint32(t[8:12]),
		Flags:   t[13],
		Window:  binary.BigEndian.Uint16(t[14:16]),
		Options: t[tcpHdrLen:off],
		Payload: t[off:],
	}, true
}

// pseudoHeaderSum is the unfolded sum of the IPv4 pseudo header that the TCP
// checksum covers.
func pseudoHeaderSum(src, dst [4]byte, tcpLen int) uint32 {
	var sum uint32
	for _, a := range [][4]byte{src, dst} {
		sum += uint32(binary.BigEndian.Uint16(a[0:2])) + uint32(binary.BigEndian.Uint16(a[2:4]))
	}
	return sum + protoTCP + uint32(tcpLen)
}

// checksum is the Internet checksum (RFC 1071) of b, starting from the
// unfolded partial sum sum.
func checksum(sum uint32, b []byte) uint16 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// seqLess compares sequence numbers modulo 2^32.
func seqLess(a, b uint32) bool { return int32(a-b) < 0 }
