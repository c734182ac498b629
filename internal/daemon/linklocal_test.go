package daemon

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/bpf"
)

func TestLinkLocalRedirects(t *testing.T) {
	ap := netip.MustParseAddrPort
	ep4 := tokenEndpoint{tokenURL: "http://10.88.0.1:7123/v1/token"}
	got, err := linkLocalRedirects([]netip.AddrPort{ap("169.254.169.254:80"), ap("[fd00:ec2::23]:80"), ap("169.254.169.254:80")}, ep4)
	require.NoError(t, err)
	assert.Equal(t, []bpf.Redirect{
		{From: ap("169.254.169.254:80"), To: ap("10.88.0.1:7123")},
		{From: ap("[fd00:ec2::23]:80"), To: ap("10.88.0.1:7123")},
	}, got, "both families go to the IPv4 endpoint; a repeated endpoint counts once")

	ep6 := tokenEndpoint{tokenURL: "http://[fd00::1]:7123/v1/token"}
	_, err = linkLocalRedirects([]netip.AddrPort{ap("169.254.169.254:80")}, ep6)
	assert.ErrorContains(t, err, "IPv6")
	got, err = linkLocalRedirects(nil, ep6)
	require.NoError(t, err)
	assert.Empty(t, got)
}

func TestLinkLocalURL(t *testing.T) {
	ap := netip.MustParseAddrPort
	assert.Equal(t, "http://169.254.169.254/v1/token", linkLocalURL(ap("169.254.169.254:80")))
	assert.Equal(t, "http://169.254.170.23:8080/v1/token", linkLocalURL(ap("169.254.170.23:8080")))
	assert.Equal(t, "http://[fd00:ec2::23]/v1/token", linkLocalURL(ap("[fd00:ec2::23]:80")))
	assert.Equal(t, "http://[fd00:ec2::23]:81/v1/token", linkLocalURL(ap("[fd00:ec2::23]:81")))
}
