package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// sibling is a second identityd configuration in ow's world: the same host
// netns, and everything else its own (state, admin socket, pins, operator
// endpoint, cgroup parent, netns prefix, bridge and subnet).
func (ow *world) sibling() *world {
	t := ow.t
	t.Helper()
	tmp := t.TempDir()
	sb := &world{t: t, w: ow.w, bin: ow.bin, state: filepath.Join(tmp, "state"), admin: filepath.Join(tmp, "run", "admin.sock"),
		pins: ow.pins + "-sibling", cgroups: filepath.Join(ow.w.CgroupDir, "sandboxes-sibling"), netnsPrefix: testNetnsPrefix(),
		args: append([]string(nil), ow.args...)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	sb.operator = ln.Addr().String()
	ln.Close()
	subnet := netip.MustParsePrefix(ow.arg("--subnet")).Addr().As4()
	subnet[2]++
	for flag, value := range map[string]string{
		"--state-dir": sb.state, "--admin-socket": sb.admin, "--bpf-dir": sb.pins, "--operator-listen": sb.operator,
		"--cgroup-parent": sb.cgroups, "--netns-prefix": sb.netnsPrefix, "--bridge": "idtest1",
		"--subnet": netip.PrefixFrom(netip.AddrFrom4(subnet), 24).String(),
	} {
		sb.setArg(flag, value)
	}
	t.Cleanup(sb.cleanup)
	return sb
}

// arg is the value of flag in the daemon's arguments.
func (ow *world) arg(flag string) string {
	for i, a := range ow.args {
		if a == flag {
			return ow.args[i+1]
		}
	}
	ow.t.Fatalf("no %s in %q", flag, ow.args)
	return ""
}

// assertClean runs identityctl fsck for the world's daemon and expects
// nothing wrong.
func (ow *world) assertClean(what string) {
	ow.t.Helper()
	out, err := ow.fsck()
	assert.NoError(ow.t, err, "%s: fsck of %s:\n%s", what, ow.netnsPrefix, out)
	assert.Equal(ow.t, "consistent\n", out, what)
}

// TestTwoInstancesOnOneHost: two daemons in one host netns, each with its
// own state, cgroup parent, netns prefix, bridge and subnet, and a sandbox
// of the same id in each. Both sandboxes get their tokens, each daemon's
// fsck is clean, a restart of one rebuilds beside the other, and deleting
// the sandbox in one leaves the other's served and untouched.
func TestTwoInstancesOnOneHost(t *testing.T) {
	a := newWorld(t)
	b := a.sibling()
	a.start()
	b.start()
	id := "e2e-same-" + suffix()
	sa, sb := a.create(id, "web"), b.create(id, "web")
	assert.Equal(t, filepath.Join(netnsutil.Dir, a.netnsPrefix+id), sa.Sandbox.NetnsPath)
	assert.Equal(t, filepath.Join(netnsutil.Dir, b.netnsPrefix+id), sb.Sandbox.NetnsPath)
	assert.NotEqual(t, sa.Sandbox.Veth, sb.Sandbox.Veth, "one host netns: the veths must differ")

	ca := sandboxtest.StartClient(t, sa.Sandbox.CgroupPath, sa.Sandbox.NetnsPath)
	cb := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	ta, tb := fetch(t, ca, sa.Env), fetch(t, cb, sb.Env)
	assert.Equal(t, id, ta["sandbox_id"])
	assert.Equal(t, id, tb["sandbox_id"])
	assert.NotEqual(t, ta["iss"], tb["iss"], "each from its own daemon")
	a.assertClean("both running")
	b.assertClean("both running")

	// B restarts: its rebuild beside A keeps its sandbox and touches none of A's.
	b.kill(syscall.SIGKILL)
	b.start()
	assert.Equal(t, tb["sub"], fetch(t, cb, sb.Env)["sub"])
	assert.Equal(t, ta["sub"], fetch(t, ca, sa.Env)["sub"])
	assert.Empty(t, linesWithMsg(b.stderr, "network namespace with this instance's prefix has no record; never trusted"))
	assert.Empty(t, linesWithMsg(b.stderr, "sandbox retired"))
	a.assertClean("after B's restart")
	b.assertClean("after B's restart")

	// Deleting A's sandbox leaves B's as it was.
	cookie, err := netnsutil.Cookie(sb.Sandbox.NetnsPath)
	require.NoError(t, err)
	require.NoError(t, controllers.NewAdminClient(a.admin).Do(context.Background(), "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil))
	assert.NoFileExists(t, sa.Sandbox.NetnsPath)
	now, err := netnsutil.Cookie(sb.Sandbox.NetnsPath)
	require.NoError(t, err)
	assert.Equal(t, cookie, now)
	assert.Equal(t, tb["sub"], fetch(t, cb, sb.Env)["sub"])
	var got controllers.Record
	require.NoError(t, controllers.NewAdminClient(b.admin).Do(context.Background(), "GET", "/v1/sandboxes/"+id, nil, &got))
	a.assertClean("after A's delete")
	b.assertClean("after A's delete")
}

// TestBesideDefaultInstance: a daemon with the default netns prefix, as a
// deployed identityd runs, serves a sandbox while a test daemon (its own
// prefix) starts, makes a sandbox of the same id, restarts, finds its
// state clean and deletes its sandbox; the first daemon's sandbox is
// served throughout, and its own restart sees nothing of the other.
func TestBesideDefaultInstance(t *testing.T) {
	host := newWorld(t)
	host.netnsPrefix = controllers.DefaultNetnsPrefix
	host.setArg("--netns-prefix", host.netnsPrefix)
	host.start()
	// An id naming this process, so that sweepNeighbours removes its netns
	// if the test dies before its cleanup.
	id := fmt.Sprintf("idt%d-nb-%s", os.Getpid(), suffix())
	hs := host.create(id, "web")
	assert.Equal(t, filepath.Join(netnsutil.Dir, controllers.DefaultNetnsPrefix+id), hs.Sandbox.NetnsPath)
	hc := sandboxtest.StartClient(t, hs.Sandbox.CgroupPath, hs.Sandbox.NetnsPath)
	first := fetch(t, hc, hs.Env)

	test := newWorld(t)
	test.start()
	ts := test.create(id, "web")
	tc := sandboxtest.StartClient(t, ts.Sandbox.CgroupPath, ts.Sandbox.NetnsPath)
	assert.Equal(t, id, fetch(t, tc, ts.Env)["sandbox_id"])
	test.kill(syscall.SIGKILL)
	test.start()
	assert.Equal(t, id, fetch(t, tc, ts.Env)["sandbox_id"], "rebuilt")
	assert.Empty(t, linesWithMsg(test.stderr, "network namespace with this instance's prefix has no record; never trusted"))
	test.assertClean("beside the default instance")
	require.NoError(t, controllers.NewAdminClient(test.admin).Do(context.Background(), "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil))
	test.assertClean("after its delete")

	assert.Equal(t, first["sub"], fetch(t, hc, hs.Env)["sub"], "the default instance's sandbox is still served")
	host.kill(syscall.SIGTERM)
	host.start()
	assert.Equal(t, first["sub"], fetch(t, hc, hs.Env)["sub"])
	for _, l := range linesWithMsg(host.stderr, "network namespace with this instance's prefix has no record; never trusted") {
		assert.NotContains(t, l["netns"], test.netnsPrefix)
	}
}
