package cgroup2

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const sleeperEnv = "IDENTITYD_CGROUP2_TEST_SLEEPER"

func TestMain(m *testing.M) {
	if os.Getenv(sleeperEnv) != "" {
		time.Sleep(5 * time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startIn starts a task in the cgroup at dir: this test binary, so that it
// exists in the QEMU guest too.
func startIn(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	cg, err := os.Open(dir)
	require.NoError(t, err)
	defer cg.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), sleeperEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// TestKillAndRemove: Remove refuses a tree with tasks and says why; Kill
// empties it, with cgroup.kill and with the signals older kernels need;
// then Remove takes it away, deepest first. Both accept a missing cgroup.
func TestKillAndRemove(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create cgroups")
	}
	root, err := Root()
	require.NoError(t, err)
	for _, useKillFile := range []bool{true, false} {
		t.Run(fmt.Sprintf("cgroup.kill=%v", useKillFile), func(t *testing.T) {
			dir := filepath.Join(root, fmt.Sprintf("identityd-cgroup2-test-%d-kill-%v", os.Getpid(), useKillFile))
			sub := filepath.Join(dir, "a", "b")
			require.NoError(t, os.MkdirAll(sub, 0o755))
			t.Cleanup(func() { Kill(dir); Remove(dir) })
			top, deep := startIn(t, dir), startIn(t, sub)
			busy, err := Populated(dir)
			require.NoError(t, err)
			assert.True(t, busy)

			err = Remove(dir)
			require.ErrorIs(t, err, unix.EBUSY)
			assert.ErrorContains(t, err, "remove cgroup "+sub+": tasks are still running in it")
			assert.DirExists(t, sub)

			require.NoError(t, kill(dir, useKillFile))
			busy, err = Populated(dir)
			require.NoError(t, err)
			assert.False(t, busy)
			for _, cmd := range []*exec.Cmd{top, deep} {
				err := cmd.Wait()
				var exit *exec.ExitError
				require.ErrorAs(t, err, &exit)
				assert.Equal(t, syscall.SIGKILL, exit.Sys().(syscall.WaitStatus).Signal())
			}

			require.NoError(t, Remove(dir))
			assert.NoDirExists(t, dir)
			require.NoError(t, Kill(dir), "nothing to kill")
			require.NoError(t, Remove(dir), "already removed")
			_, err = Populated(dir)
			assert.ErrorIs(t, err, os.ErrNotExist)
		})
	}
}
