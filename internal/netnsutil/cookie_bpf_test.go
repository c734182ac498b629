package netnsutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestCookieFromBPFMatchesTheKernel checks the fallback of kernels without
// SO_NETNS_COOKIE against the socket option where the kernel has it, and
// that two namespaces get two cookies everywhere.
func TestCookieFromBPFMatchesTheKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	var cookies []uint64
	for i := range 2 {
		name := fmt.Sprintf("idt%d-netnsutil-cookie-%d", os.Getpid(), i)
		require.NoError(t, NewNamed(name))
		t.Cleanup(func() { DeleteNamed(name) })
		p := filepath.Join(Dir, name)
		var viaBPF, viaOption uint64
		var optErr error
		require.NoError(t, Do(p, func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			viaOption, optErr = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
			unix.Close(fd)
			viaBPF, err = cookieFromBPF()
			return err
		}))
		assert.NotZero(t, viaBPF)
		if !errors.Is(optErr, unix.ENOPROTOOPT) {
			require.NoError(t, optErr)
			assert.Equal(t, viaOption, viaBPF)
		}
		got, err := Cookie(p)
		require.NoError(t, err)
		assert.Equal(t, viaBPF, got, "Cookie agrees with the fallback")
		cookies = append(cookies, got)
	}
	assert.NotEqual(t, cookies[0], cookies[1])
}
