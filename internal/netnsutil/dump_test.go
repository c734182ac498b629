package netnsutil

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/vishvananda/netlink"
)

func TestDumpReadsAgainWhenInterrupted(t *testing.T) {
	calls := 0
	got, err := Dump(func() ([]int, error) {
		calls++
		if calls < 3 {
			return []int{calls}, netlink.ErrDumpInterrupted
		}
		return []int{1, 2, 3}, nil
	})
	assert.NoError(t, err)
	assert.Equal(t, []int{1, 2, 3}, got)
	assert.Equal(t, 3, calls)

	calls = 0
	_, err = Dump(func() ([]int, error) { calls++; return nil, netlink.ErrDumpInterrupted })
	assert.ErrorIs(t, err, netlink.ErrDumpInterrupted, "gives up after a bounded number of reads")
	assert.Equal(t, dumpAttempts, calls)

	other := errors.New("permission denied")
	_, err = Dump(func() ([]int, error) { return nil, other })
	assert.ErrorIs(t, err, other)
}
