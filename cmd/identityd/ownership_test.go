package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRefusesDirectoriesOthersControl: a state directory or admin socket
// directory that another user owns, or that others may write to, stops the
// daemon at start with a line naming the path and the owner, and nothing is
// written into it; a directory root owns privately is accepted.
func TestRefusesDirectoriesOthersControl(t *testing.T) {
	ow := newWorld(t)
	ow.start() // makes both directories, as root, 0700
	ow.kill(syscall.SIGTERM)
	const nobody = 65534

	refused := func(t *testing.T) string {
		t.Helper()
		cmd := exec.Command(filepath.Join(ow.bin, "identityd"), ow.args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		require.NoError(t, cmd.Start())
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Fatal("identityd did not refuse; it started")
		}
		assert.Equal(t, 1, cmd.ProcessState.ExitCode())
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		return lines[len(lines)-1]
	}
	// listing returns the names in dir and below it.
	listing := func(dir string) []string {
		var out []string
		filepath.WalkDir(dir, func(p string, _ os.DirEntry, err error) error {
			if err == nil {
				out = append(out, p)
			}
			return nil
		})
		return out
	}

	t.Run("state dir owned by another user", func(t *testing.T) {
		require.NoError(t, os.RemoveAll(ow.state))
		require.NoError(t, os.Mkdir(ow.state, 0o700))
		require.NoError(t, os.Chown(ow.state, nobody, nobody))
		defer os.Chown(ow.state, 0, 0)
		line := refused(t)
		assert.Contains(t, line, "state directory: "+ow.state+" is owned by uid 65534; it must be owned by uid 0")
		assert.Equal(t, []string{ow.state}, listing(ow.state), "nothing written into it, no key above all")
	})
	t.Run("state dir inside a directory of another user", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "theirs")
		require.NoError(t, os.Mkdir(parent, 0o755))
		require.NoError(t, os.Chown(parent, nobody, nobody))
		old := ow.state
		defer func() { ow.setArg("--state-dir", old) }()
		ow.setArg("--state-dir", filepath.Join(parent, "state"))
		line := refused(t)
		assert.Contains(t, line, parent+", above "+filepath.Join(parent, "state")+", is owned by uid 65534")
	})
	t.Run("state dir others can write to", func(t *testing.T) {
		require.NoError(t, os.Chmod(ow.state, 0o770))
		defer os.Chmod(ow.state, 0o700)
		assert.Contains(t, refused(t), "has mode 770: group or others can reach it")
	})

	adminDir := filepath.Dir(ow.admin)
	t.Run("admin socket dir owned by another user", func(t *testing.T) {
		require.NoError(t, os.Chown(adminDir, nobody, nobody))
		defer os.Chown(adminDir, 0, 0)
		line := refused(t)
		assert.Contains(t, line, "admin socket directory: "+adminDir+" is owned by uid 65534; it must be owned by uid 0")
		assert.NoFileExists(t, ow.admin, "no socket made in it")
	})
	t.Run("admin socket dir others can write to", func(t *testing.T) {
		require.NoError(t, os.Chmod(adminDir, 0o733))
		defer os.Chmod(adminDir, 0o700)
		assert.Contains(t, refused(t), "admin socket directory: "+adminDir+" has mode 733")
	})

	// Owned by root, private: accepted, and the daemon serves.
	ow.start()
	ow.createKept("own-" + suffix())
}

// setArg replaces the value of flag in the daemon's arguments.
func (ow *world) setArg(flag, value string) {
	for i := range ow.args {
		if ow.args[i] == flag {
			ow.args[i+1] = value
		}
	}
	if flag == "--state-dir" {
		ow.state = value
	}
}
