package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/atomicfile"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestFullAndReadOnlyStateDir: with the state directory on a small tmpfs the
// test mounts, a full disk and then a read-only one make Create fail with a
// clear error, while an existing sandbox keeps getting tokens and no file
// is torn.
func TestFullAndReadOnlyStateDir(t *testing.T) {
	ow := newWorld(t)
	mnt := filepath.Join(t.TempDir(), "fs")
	require.NoError(t, os.Mkdir(mnt, 0o700))
	require.NoError(t, unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=512k,mode=0700"))
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	ow.state = filepath.Join(mnt, "state")
	for i, a := range ow.args {
		if a == "--state-dir" {
			ow.args[i+1] = ow.state
		}
	}
	ow.start()
	a := ow.create("e2e-a-"+suffix(), "web")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	api := controllers.NewAdminClient(ow.admin)
	ctx := context.Background()

	assertServed := func() {
		t.Helper()
		status, body := get(t, ca, a.Env, a.Env["MIREN_IDENTITY_TOKEN_SECRET"], "")
		assert.Equal(t, 200, status, body)
	}
	assertNothingTorn := func() {
		t.Helper()
		filepath.Walk(ow.state, func(p string, info os.FileInfo, err error) error {
			if err != nil || info.IsDir() {
				return nil
			}
			assert.False(t, atomicfile.IsTemp(info.Name()), "temporary file left: %s", p)
			if strings.HasSuffix(p, ".json") {
				b, err := os.ReadFile(p)
				require.NoError(t, err)
				assert.True(t, json.Valid(b), "torn file %s", p)
			}
			return nil
		})
	}

	// Fill the disk.
	filler, err := os.Create(filepath.Join(mnt, "filler"))
	require.NoError(t, err)
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			require.True(t, errors.Is(err, syscall.ENOSPC), "%v", err)
			break
		}
	}
	filler.Close()
	err = api.Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: "e2e-full-" + suffix(), App: "web"}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no space left on device")
	assertServed()
	assertNothingTorn()

	// Free the space, then make the filesystem read-only.
	require.NoError(t, os.Remove(filepath.Join(mnt, "filler")))
	require.NoError(t, unix.Mount("", mnt, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""))
	err = api.Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: "e2e-ro-" + suffix(), App: "web"}, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "read-only file system")
	assertServed()
	assertNothingTorn()

	var all []controllers.Record
	require.NoError(t, api.Do(ctx, "GET", "/v1/sandboxes", nil, &all))
	assert.Len(t, all, 1, "the failed creates left no sandbox")
	require.NoError(t, unix.Mount("", mnt, "", unix.MS_REMOUNT, ""))
}
