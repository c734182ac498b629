package attacktest

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChecksumKnownHeader(t *testing.T) {
	// An IPv4 header whose checksum is 0xb861 (RFC 1071's algorithm, the
	// widely reproduced example), with its checksum field zeroed.
	hdr := []byte{0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7}
	assert.Equal(t, uint16(0xb861), checksum(0, hdr))
}

func TestSegmentRoundTripAndChecksums(t *testing.T) {
	s := segment{
		Src: netip.MustParseAddrPort("10.1.2.3:40001"), Dst: netip.MustParseAddrPort("10.9.8.1:7123"),
		Seq: 0xfffffff0, Ack: 12345, Flags: tcpPSH | tcpACK, Window: 65535,
		Options: []byte{2, 4, 5, 0xb4}, Payload: []byte("GET / HTTP/1.1\r\n\r\n!"), // odd length
	}
	b := s.marshal(7)
	assert.Zero(t, checksum(0, b[:ipv4HdrLen]), "a correct IPv4 header sums to zero")
	src, dst := s.Src.Addr().As4(), s.Dst.Addr().As4()
	assert.Zero(t, checksum(pseudoHeaderSum(src, dst, len(b)-ipv4HdrLen), b[ipv4HdrLen:]), "a correct TCP checksum sums to zero")
	assert.Equal(t, uint16(len(b)), binary.BigEndian.Uint16(b[2:4]))

	got, ok := parseSegment(b)
	require.True(t, ok)
	assert.Equal(t, s, got)

	_, ok = parseSegment(b[:ipv4HdrLen+10])
	assert.False(t, ok, "a truncated packet")
}

func TestARPRoundTrip(t *testing.T) {
	p := arpPacket{Op: arpReply, SenderHW: net.HardwareAddr{2, 0, 0, 0, 0, 1}, SenderIP: netip.MustParseAddr("10.0.0.1"),
		TargetHW: net.HardwareAddr{2, 0, 0, 0, 0, 2}, TargetIP: netip.MustParseAddr("10.0.0.2")}
	got, ok := parseARP(p.marshal())
	require.True(t, ok)
	assert.Equal(t, p, got)
}

func TestSeqLessWraps(t *testing.T) {
	assert.True(t, seqLess(0xfffffff0, 5))
	assert.False(t, seqLess(5, 0xfffffff0))
	assert.False(t, seqLess(5, 5))
}
