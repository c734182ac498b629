package controllers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/internal/secretstore"
)

// TestNetnsPrefixRule: a prefix is a safe file-name start that leaves room
// for the longest sandbox id; anything else is refused, by New and Fsck
// too, with the rule, before anything is made.
func TestNetnsPrefixRule(t *testing.T) {
	assert.Equal(t, unix.NAME_MAX, maxNetnsPrefix+secretstore.MaxIDLen, "prefix and id fill a file name at most")
	for _, ok := range []string{DefaultNetnsPrefix, "idt123-c0a1b2-", "a", "prod.eu_1-", strings.Repeat("p", maxNetnsPrefix)} {
		assert.NoError(t, CheckNetnsPrefix(ok), ok)
	}
	for _, bad := range []string{"", ".", "..", ".hidden-", "-x", "_x", "a/b-", "../x", "a b", "a\x00b", "ü-", strings.Repeat("p", maxNetnsPrefix+1)} {
		err := CheckNetnsPrefix(bad)
		assert.ErrorContains(t, err, "want 1-127 of [A-Za-z0-9_.-], not starting with . - or _", "%q", bad)
	}
	assert.Equal(t, "idt1-c2-web", NetnsName("idt1-c2-", "web"))

	state := filepath.Join(t.TempDir(), "state")
	_, err := New(context.Background(), Config{StateDir: state, NetnsPrefix: "../etc/"})
	assert.ErrorContains(t, err, `netns prefix "../etc/"`)
	assert.NoDirExists(t, state, "refused before anything is made")
	_, err = Fsck(Config{StateDir: state, NetnsPrefix: "a/b"})
	assert.ErrorContains(t, err, `netns prefix "a/b"`)
	_, err = ListNetns("")
	assert.ErrorContains(t, err, `netns prefix ""`, "an empty prefix would take in every name")
}

// TestVethNameIsTheInstances: the host veth is named after the netns, so
// the same id in two instances gets two names; the name fits IFNAMSIZ and
// is found again from the id and the prefix alone.
func TestVethNameIsTheInstances(t *testing.T) {
	a := &Controller{cfg: Config{NetnsPrefix: "ida-"}}
	b := &Controller{cfg: Config{NetnsPrefix: "idb-"}}
	long := strings.Repeat("x", secretstore.MaxIDLen)
	for _, id := range []string{"web", long} {
		assert.NotEqual(t, a.vethName(id), b.vethName(id), id)
		assert.Equal(t, a.vethName(id), a.vethName(id), "derivable again after a crash")
		assert.LessOrEqual(t, len(a.vethName(id)), unix.IFNAMSIZ-1)
		assert.Regexp(t, `^idv[0-9a-f]{10}$`, a.vethName(id))
	}
	sum := sha256.Sum256([]byte("web"))
	assert.NotEqual(t, "idv"+hex.EncodeToString(sum[:])[:10], (&Controller{cfg: Config{NetnsPrefix: DefaultNetnsPrefix}}).vethName("web"),
		"not the old name of the id alone, which another instance's sandbox of that id had")
}

// secondInstance is cfg for another instance in the same world: same host
// netns, everything else its own.
func secondInstance(t *testing.T, w *sandboxtest.World, cfg Config) Config {
	other := testConfig(t, w)
	other.Bridge = "identityd1"
	if other.Subnet == cfg.Subnet {
		a := cfg.Subnet.Addr().As4()
		a[2]++
		other.Subnet = netip.PrefixFrom(netip.AddrFrom4(a), 24)
	}
	other.CgroupParent = filepath.Join(w.CgroupDir, "sandboxes-2")
	return other
}

// TestInstancesDoNotSeeEachOther: two controllers share a host netns, each
// with its own prefix, state, cgroup parent, bridge and subnet. A sandbox
// of the same id in each gets its own netns and veth; each fsck is clean
// and names nothing of the other; deleting in one leaves the other's
// sandbox as it was, also across a restart; a stray netns with one's
// prefix is that one's problem only.
func TestInstancesDoNotSeeEachOther(t *testing.T) {
	w := sandboxtest.New(t)
	cfgA := testConfig(t, w)
	cfgB := secondInstance(t, w, cfgA)
	a, b := start(t, cfgA), start(t, cfgB)
	ctx := context.Background()
	id := "same-" + suffix()

	sa, err := a.Create(ctx, CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)
	sb, err := b.Create(ctx, CreateRequest{ID: id, App: "web"})
	require.NoError(t, err, "the same id in another instance is no conflict")
	assert.Equal(t, filepath.Join(netnsutil.Dir, cfgA.NetnsPrefix+id), sa.Sandbox.NetnsPath)
	assert.Equal(t, filepath.Join(netnsutil.Dir, cfgB.NetnsPrefix+id), sb.Sandbox.NetnsPath)
	assert.NotEqual(t, sa.Sandbox.Veth, sb.Sandbox.Veth)

	reaches := func(t *testing.T, c *Controller, r Record) {
		t.Helper()
		ln, err := w.Listen("tcp", netip.AddrPortFrom(c.Router(), 0).String())
		require.NoError(t, err)
		defer ln.Close()
		assert.Equal(t, r.Addresses[0].Addr(), exchange(t, r.NetnsPath, ln, ln.Addr().(*net.TCPAddr).AddrPort()))
	}
	reaches(t, a, sa.Sandbox)
	reaches(t, b, sb.Sandbox)
	clean := func(t *testing.T, cfg Config) {
		t.Helper()
		problems, err := Fsck(cfg)
		require.NoError(t, err)
		assert.Empty(t, problems)
	}
	clean(t, cfgA)
	clean(t, cfgB)
	// A cgroup whose name is no sandbox id (the daemon's readiness probe's)
	// is not a sandbox's either.
	require.NoError(t, os.Mkdir(filepath.Join(cfgA.CgroupParent, ".probe"), 0o755))
	clean(t, cfgA)

	// A stray netns with B's prefix: B's fsck and start say so, A's do not.
	stray := cfgB.NetnsPrefix + "stray-" + suffix()
	require.NoError(t, netnsutil.NewNamed(stray))
	problems, err := Fsck(cfgB)
	require.NoError(t, err)
	assert.Equal(t, []string{"netns " + filepath.Join(netnsutil.Dir, stray) + " has no record"}, problems)
	clean(t, cfgA)
	require.NoError(t, b.Close())
	logs := &sandboxtest.LogBuffer{}
	cfgB.Logger = slogTo(logs)
	b = start(t, cfgB)
	assert.Equal(t, filepath.Join(netnsutil.Dir, stray), logLine(t, logs, "network namespace with this instance's prefix has no record; never trusted")["netns"])
	assert.True(t, netnsutil.IsNetns(filepath.Join(netnsutil.Dir, stray)), "never removed: what made it is unknown")
	require.NoError(t, netnsutil.DeleteNamed(stray))

	// Deleting A's sandbox leaves B's as it was.
	cgB, err := cgroup2.ID(sb.Sandbox.CgroupPath)
	require.NoError(t, err)
	cookieB, err := netnsutil.Cookie(sb.Sandbox.NetnsPath)
	require.NoError(t, err)
	require.NoError(t, a.Delete(ctx, id, true))
	assert.NoFileExists(t, sa.Sandbox.NetnsPath)
	_, err = a.host.LinkByName(sa.Sandbox.Veth)
	assert.ErrorAs(t, err, new(netlink.LinkNotFoundError))
	now, err := cgroup2.ID(sb.Sandbox.CgroupPath)
	require.NoError(t, err)
	assert.Equal(t, cgB, now)
	cookie, err := netnsutil.Cookie(sb.Sandbox.NetnsPath)
	require.NoError(t, err)
	assert.Equal(t, cookieB, cookie)
	link(t, b.host, sb.Sandbox.Veth)
	_, err = b.reg.Resolve(sb.Sandbox.CgroupID, sb.Sandbox.NetnsCookie)
	assert.NoError(t, err)
	reaches(t, b, sb.Sandbox)
	clean(t, cfgA)
	clean(t, cfgB)

	// A restarts beside B: nothing of B is retired or touched.
	require.NoError(t, a.Close())
	a = start(t, cfgA)
	assert.Empty(t, a.List())
	got, err := b.Get(id)
	require.NoError(t, err)
	assert.Equal(t, sb.Sandbox.NetnsPath, got.NetnsPath)
	reaches(t, b, sb.Sandbox)
	clean(t, cfgB)
}

// TestPrefixChangeKeepsRecordedNames: the names of a sandbox are its
// record's: after the prefix changes (or for a sandbox an earlier version
// made), the sandbox is served, checked and torn down by the names it was
// made with, and only new sandboxes get the new ones.
func TestPrefixChangeKeepsRecordedNames(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	ctx := context.Background()
	id := "kept-" + suffix()
	old, err := c.Create(ctx, CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)
	require.NoError(t, c.Close())

	cfg.NetnsPrefix = testNetnsPrefix(t)
	c = start(t, cfg)
	got, err := c.Get(id)
	require.NoError(t, err)
	assert.Equal(t, old.Sandbox, got)
	problems, err := Fsck(cfg)
	require.NoError(t, err)
	assert.Empty(t, problems, "its recorded netns is its own, whatever the prefix now")

	nw, err := c.Create(ctx, CreateRequest{ID: "new-" + suffix(), App: "web"})
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(netnsutil.Dir, cfg.NetnsPrefix+nw.Sandbox.ID), nw.Sandbox.NetnsPath)

	require.NoError(t, c.Delete(ctx, id, true))
	assert.NoFileExists(t, old.Sandbox.NetnsPath)
	_, err = c.host.LinkByName(old.Sandbox.Veth)
	assert.ErrorAs(t, err, new(netlink.LinkNotFoundError))
	_, err = os.Stat(old.Sandbox.CgroupPath)
	assert.ErrorIs(t, err, os.ErrNotExist)
}
