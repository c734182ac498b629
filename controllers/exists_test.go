package controllers

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestCreateOverSomeoneElsesObjects: a cgroup, netns or veth with the new
// sandbox's name that Create did not make is answered 409 and left exactly
// as it was; nothing of the failed Create is left behind.
func TestCreateOverSomeoneElsesObjects(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	api := serveAdmin(t, c)
	ctx := context.Background()
	records := recordDirs(cfg.StateDir)

	assertNothingLeft := func(t *testing.T, id string, keep ...string) {
		t.Helper()
		for _, p := range []string{filepath.Join(records.dir, id+".json"), filepath.Join(records.pending, id+".json")} {
			assert.NoFileExists(t, p)
		}
		assert.False(t, hasSecret(t, cfg, id))
		kept := map[string]bool{}
		for _, k := range keep {
			kept[k] = true
		}
		if !kept["cgroup"] {
			assert.NoDirExists(t, filepath.Join(cfg.CgroupParent, id))
		}
		if !kept["netns"] {
			assert.NoFileExists(t, filepath.Join(netnsutil.Dir, c.netnsName(id)))
		}
		if !kept["veth"] {
			h, err := netnsutil.Handle(w.HostNetns)
			require.NoError(t, err)
			defer h.Close()
			_, err = h.LinkByName(c.vethName(id))
			assert.Error(t, err, "no veth left")
		}
		_, err := c.Get(id)
		assert.ErrorIs(t, err, ErrNotFound)
	}

	t.Run("cgroup with a running task", func(t *testing.T) {
		id := "taken-cg-" + suffix()
		cg := filepath.Join(cfg.CgroupParent, id)
		require.NoError(t, os.Mkdir(cg, 0o755))
		cgID, err := cgroup2.ID(cg)
		require.NoError(t, err)
		task := startIn(t, cg)

		err = api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id, App: "web"}, nil)
		assert.Equal(t, 409, apiStatus(err), "%v", err)
		assert.ErrorContains(t, err, "cgroup "+cg+" already exists and is not this sandbox's; left untouched")

		now, err := cgroup2.ID(cg)
		require.NoError(t, err, "the cgroup is still there")
		assert.Equal(t, cgID, now, "and it is the same cgroup")
		busy, err := cgroup2.Populated(cg)
		require.NoError(t, err)
		assert.True(t, busy, "its task still runs")
		assert.NoError(t, task.Process.Signal(syscall.Signal(0)), "the task is alive")
		procs, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
		require.NoError(t, err)
		assert.Contains(t, strings.Fields(string(procs)), strconv.Itoa(task.Process.Pid), "and still in its cgroup")
		assertNothingLeft(t, id, "cgroup")
	})

	t.Run("netns", func(t *testing.T) {
		id := "taken-ns-" + suffix()
		require.NoError(t, netnsutil.NewNamed(c.netnsName(id)))
		ns := filepath.Join(netnsutil.Dir, c.netnsName(id))
		cookie, err := netnsutil.Cookie(ns)
		require.NoError(t, err)

		_, err = c.Create(ctx, CreateRequest{ID: id, App: "web"})
		assert.ErrorIs(t, err, ErrExists)
		assert.ErrorContains(t, err, "netns "+ns+" already exists and is not this sandbox's; left untouched")
		now, err := netnsutil.Cookie(ns)
		require.NoError(t, err, "the netns is still mounted")
		assert.Equal(t, cookie, now, "and it is the same netns")
		assertNothingLeft(t, id, "netns")
	})

	t.Run("veth", func(t *testing.T) {
		id := "taken-veth-" + suffix()
		h, err := netnsutil.Handle(w.HostNetns)
		require.NoError(t, err)
		defer h.Close()
		// Someone else's veth pair, both ends in the host netns.
		require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: c.vethName(id)}, PeerName: "idtp" + suffix()}))
		before, err := h.LinkByName(c.vethName(id))
		require.NoError(t, err)

		err = api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id, App: "web"}, nil)
		assert.Equal(t, 409, apiStatus(err), "%v", err)
		assert.ErrorContains(t, err, "veth "+c.vethName(id)+" already exists")
		after, err := h.LinkByName(c.vethName(id))
		require.NoError(t, err, "the link is still there")
		assert.Equal(t, before.Attrs().Index, after.Attrs().Index)
		assertNothingLeft(t, id, "veth")
	})

	t.Run("cgroup made between the check and the mkdir", func(t *testing.T) {
		id := "race-cg-" + suffix()
		cg := filepath.Join(cfg.CgroupParent, id)
		cfg := cfg
		cfg.StateDir = filepath.Join(t.TempDir(), "state")
		c := start(t, cfg)
		c.fault = func(point string) {
			if point == "create:pending" {
				require.NoError(t, os.Mkdir(cg, 0o755))
			}
		}
		_, err := c.Create(ctx, CreateRequest{ID: id, App: "web"})
		assert.ErrorIs(t, err, ErrExists)
		assert.ErrorContains(t, err, "cgroup "+cg+" already exists and is not this sandbox's; left untouched")
		assert.DirExists(t, cg)
		assert.NoFileExists(t, filepath.Join(c.records.pending, id+".json"))
		assert.NoFileExists(t, filepath.Join(netnsutil.Dir, c.netnsName(id)))
	})

	// A fresh Create still works.
	id := "fresh-" + suffix()
	_, err := c.Create(ctx, CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)
}
