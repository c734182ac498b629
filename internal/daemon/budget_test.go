package daemon

import (
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/tokenserver"
)

func TestConnectionLimitsFitTheDescriptorLimit(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	got, err := fitLimits(tokenserver.ConnLimits{}, 1<<20, quiet)
	require.NoError(t, err)
	assert.Equal(t, tokenserver.DefaultMaxConns, got.Total, "room to spare: the default stands")

	got, err = fitLimits(tokenserver.ConnLimits{Total: 4096, PerSandbox: 8}, 1024, quiet)
	require.NoError(t, err)
	assert.Equal(t, 1024-descriptorReserve, got.Total, "lowered, keeping the reserve")
	assert.Equal(t, 8, got.PerSandbox)

	got, err = fitLimits(tokenserver.ConnLimits{Total: 100}, unix.RLIM_INFINITY, quiet)
	require.NoError(t, err)
	assert.Equal(t, 100, got.Total)

	_, err = fitLimits(tokenserver.ConnLimits{}, descriptorReserve, quiet)
	assert.ErrorContains(t, err, "descriptor limit")
}
