package controllers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestMissingIsOnlyDefiniteAbsence: only "nothing is there" counts as
// evidence; errors about the daemon's own resources do not.
func TestMissingIsOnlyDefiniteAbsence(t *testing.T) {
	for _, errno := range []syscall.Errno{unix.ENOENT, unix.ENOTDIR} {
		assert.True(t, missing(fmt.Errorf("stat cgroup x: %w", errno)), "%v", errno)
	}
	assert.True(t, missing(&fs.PathError{Op: "open", Path: "x", Err: unix.ENOENT}))
	for _, errno := range []syscall.Errno{unix.EMFILE, unix.ENFILE, unix.ENOMEM, unix.EINTR, unix.EAGAIN, unix.EACCES, unix.EIO, unix.ELOOP} {
		assert.False(t, missing(fmt.Errorf("open netns x: %w", errno)), "%v", errno)
	}
	assert.False(t, missing(nil))
	assert.False(t, missing(errors.New("something else")))
}

// withFreeFDs runs f while this process can open only free more files: the
// soft descriptor limit is lowered and the table filled up to it, as a
// daemon at its limit sees it. Nothing else in the test binary runs
// meanwhile.
func withFreeFDs(t *testing.T, free int, f func()) {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	highest := 0
	for _, e := range entries {
		if n, err := strconv.Atoi(e.Name()); err == nil && n > highest {
			highest = n
		}
	}
	var old unix.Rlimit
	require.NoError(t, unix.Getrlimit(unix.RLIMIT_NOFILE, &old))
	lim := old
	lim.Cur = uint64(highest + 64)
	require.NoError(t, unix.Setrlimit(unix.RLIMIT_NOFILE, &lim))
	defer func() { require.NoError(t, unix.Setrlimit(unix.RLIMIT_NOFILE, &old)) }()
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.EMFILE) {
			break
		}
		require.NoError(t, err)
		fds = append(fds, fd)
	}
	// The last ones opened are the highest: closing them leaves exactly
	// free slots.
	for range free {
		unix.Close(fds[len(fds)-1])
		fds = fds[:len(fds)-1]
	}
	f()
}

// TestProbe classifies real cgroups and network namespaces: removed or
// re-created is gone, present is alive, and a check the descriptor limit
// cuts short is unknown.
func TestProbe(t *testing.T) {
	w := sandboxtest.New(t)
	cg := filepath.Join(w.CgroupDir, "probe")
	require.NoError(t, os.Mkdir(cg, 0o755))
	cgID, err := cgroup2.ID(cg)
	require.NoError(t, err)
	// Named like a sandboxtest object, so a crashed run's leftover is swept.
	name := fmt.Sprintf("idt%d-probe-%s", os.Getpid(), suffix())
	require.NoError(t, netnsutil.NewNamed(name))
	t.Cleanup(func() { netnsutil.DeleteNamed(name) })
	ns := filepath.Join(netnsutil.Dir, name)
	cookie, err := netnsutil.Cookie(ns)
	require.NoError(t, err)
	r := &Record{ID: "probe", CgroupPath: cg, CgroupID: cgID, NetnsPath: ns, NetnsCookie: cookie}

	for _, deep := range []bool{false, true} {
		l := probe(r, deep)
		assert.Equal(t, alive, l.State, "deep=%v: %+v", deep, l)
	}
	assert.Equal(t, cookie, probe(r, true).Cookie)

	// At the descriptor limit: the cgroup needs no descriptor (a stat),
	// the netns does (an open), and entering it two (the netns and a
	// socket in it).
	withFreeFDs(t, 0, func() {
		l := probe(r, false)
		assert.Equal(t, unknown, l.State, "%+v", l)
		assert.Equal(t, "netns "+ns, l.Object)
		assert.ErrorIs(t, l.Err, unix.EMFILE)
		cgOnly := &Record{ID: "probe", CgroupPath: cg, CgroupID: cgID}
		assert.Equal(t, alive, probe(cgOnly, true).State)
	})
	withFreeFDs(t, 1, func() {
		assert.Equal(t, alive, probe(r, false).State)
		l := probe(r, true)
		assert.Equal(t, unknown, l.State, "%+v", l)
		assert.ErrorIs(t, l.Err, unix.EMFILE)
	})

	// Another netns under the recorded path.
	other := *r
	other.NetnsCookie = cookie + 1000
	l := probe(&other, true)
	assert.Equal(t, gone, l.State)
	assert.Contains(t, l.Reason, "was re-created (cookie")
	assert.Equal(t, alive, probe(&other, false).State, "the quick check does not enter the netns")

	// The netns unmounted, its mount point left: not a netns any more.
	require.NoError(t, unix.Unmount(ns, unix.MNT_DETACH))
	l = probe(r, false)
	assert.Equal(t, gone, l.State)
	assert.Contains(t, l.Reason, "is no longer a network namespace")
	require.NoError(t, os.Remove(ns))
	l = probe(r, false)
	assert.Equal(t, gone, l.State)
	assert.Contains(t, l.Reason, "its netns "+ns+" is gone")

	// The cgroup re-created under its path, then removed.
	require.NoError(t, os.Remove(cg))
	require.NoError(t, os.Mkdir(cg, 0o755))
	l = probe(r, false)
	assert.Equal(t, gone, l.State)
	assert.Contains(t, l.Reason, "was re-created (id")
	require.NoError(t, os.Remove(cg))
	l = probe(r, false)
	assert.Equal(t, gone, l.State)
	assert.Contains(t, l.Reason, "its cgroup "+cg+" is gone")
}

// TestResyncRetiresOnlyConfirmedAndKnown: a sandbox is kept through any
// number of resyncs that cannot check it, and is retired only at the second
// resync that finds it gone.
func TestResyncRetiresOnlyConfirmedAndKnown(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slogTo(logs)
	c := start(t, cfg)
	ctx := context.Background()
	id := "fd-" + suffix()
	created, err := c.Create(ctx, CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)
	sb := created.Sandbox

	withFreeFDs(t, 0, func() {
		for range 5 {
			c.Resync()
		}
	})
	assert.Equal(t, 1, c.Len(), "kept through checks that could not be made")
	assert.Equal(t, uint64(5), c.InconclusiveChecks())
	assert.True(t, hasSecret(t, cfg, id))
	assert.True(t, netnsutil.IsNetns(sb.NetnsPath))
	warn := logLine(t, logs, "cannot check sandbox; kept")
	assert.Equal(t, "WARN", warn["level"])
	assert.Equal(t, id, warn["sandbox"])
	assert.Equal(t, "netns "+sb.NetnsPath, warn["object"])
	assert.Contains(t, warn["error"], "too many open files")
	assert.Equal(t, 1, strings.Count(logs.String(), "cannot check sandbox; kept"), "logged once per episode")
	c.Resync()
	assert.Contains(t, logs.String(), "sandbox can be checked again")

	// Gone: the first resync only notes it, the second retires it.
	r := c.live[id]
	require.NoError(t, unix.Unmount(sb.NetnsPath, unix.MNT_DETACH))
	c.Resync()
	assert.Equal(t, 1, c.Len(), "a single reading retires nothing")
	assert.Contains(t, logs.String(), "retired if the next check agrees")
	c.Resync()
	assert.Equal(t, 0, c.Len())
	assert.False(t, hasSecret(t, cfg, id))
	assert.NoDirExists(t, r.CgroupPath, "a retired sandbox made here is torn down")

	// Gone once, then back (an odd reading): kept.
	id2 := "odd-" + suffix()
	_, err = c.Create(ctx, CreateRequest{ID: id2, App: "web"})
	require.NoError(t, err)
	r2 := c.live[id2]
	c.judge(r2, liveness{State: gone, Reason: "a test says so"})
	c.Resync()
	assert.Equal(t, 1, c.Len())
	assert.Contains(t, logs.String(), "sandbox looked gone, then alive; kept")
	c.Resync()
	assert.Equal(t, 1, c.Len())
}

// TestRebuildKeepsWhatItCannotCheck: a start at the descriptor limit keeps
// every sandbox, as recorded, or refuses to start; it never retires one.
func TestRebuildKeepsWhatItCannotCheck(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	ctx := context.Background()
	secrets := map[string]string{}
	for i := range 3 {
		id := fmt.Sprintf("keep%d-%s", i, suffix())
		cr, err := c.Create(ctx, CreateRequest{ID: id, App: "web"})
		require.NoError(t, err)
		secrets[id] = cr.Env["MIREN_IDENTITY_TOKEN_SECRET"]
	}
	want := c.List()
	require.NoError(t, c.Close())

	assertIntact := func(t *testing.T) {
		t.Helper()
		for _, r := range want {
			assert.FileExists(t, filepath.Join(recordDirs(cfg.StateDir).dir, r.ID+".json"))
			assert.True(t, hasSecret(t, cfg, r.ID))
			assert.DirExists(t, r.CgroupPath)
			assert.True(t, netnsutil.IsNetns(r.NetnsPath), r.NetnsPath)
		}
	}

	for _, free := range []int{0, 1} {
		t.Run(fmt.Sprintf("%d free", free), func(t *testing.T) {
			logs := &sandboxtest.LogBuffer{}
			cfg := cfg
			cfg.Logger = slogTo(logs)
			c, err := open(cfg)
			require.NoError(t, err)
			defer c.Close()
			withFreeFDs(t, free, func() { err = c.rebuild(ctx) })
			switch free {
			case 0: // the records cannot be read: no start
				require.Error(t, err)
				assert.ErrorIs(t, err, unix.EMFILE)
				assert.Contains(t, err.Error(), "read sandbox records")
			case 1: // readable, but no netns can be entered
				require.NoError(t, err)
				assert.Equal(t, want, c.List(), "every sandbox kept as recorded")
				assert.Contains(t, logs.String(), "cannot check sandbox at start; kept as recorded")
				assert.Equal(t, uint64(len(want)), c.InconclusiveChecks())
			}
			assertIntact(t)
		})
	}

	// A normal start afterwards serves them all.
	c = start(t, cfg)
	assert.Equal(t, want, c.List())
	for id, secret := range secrets {
		ok, err := c.secrets.Verify(id, secret)
		require.NoError(t, err)
		assert.True(t, ok, id)
	}
}

// TestRebuildConfirmsBeforeRetiring: a sandbox found gone at start is looked
// at a second time, after a delay, before it is retired.
func TestRebuildConfirmsBeforeRetiring(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	id := "back-" + suffix()
	cr, err := c.Create(context.Background(), CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)
	require.NoError(t, c.Close())

	// The netns mount disappears, and comes back before the second look:
	// a bind mount of the same namespace, kept open meanwhile.
	ns, err := os.Open(cr.Sandbox.NetnsPath)
	require.NoError(t, err)
	defer ns.Close()
	require.NoError(t, unix.Unmount(cr.Sandbox.NetnsPath, unix.MNT_DETACH))
	logs := &sandboxtest.LogBuffer{}
	cfg.Logger = slogTo(logs)
	c, err = open(cfg)
	require.NoError(t, err)
	defer c.Close()
	c.confirmWait = func(context.Context) error {
		assert.Contains(t, logs.String(), "sandbox looks gone; looking again before retiring it")
		return unix.Mount(fmt.Sprintf("/proc/self/fd/%d", ns.Fd()), cr.Sandbox.NetnsPath, "", unix.MS_BIND, "")
	}
	require.NoError(t, c.rebuild(context.Background()))
	assert.Len(t, c.List(), 1, "seen gone once, then alive: kept")
	assert.Contains(t, logs.String(), "sandbox looked gone at start, then did not; kept")
	require.NoError(t, c.Close())

	// Gone at both looks: retired.
	require.NoError(t, unix.Unmount(cr.Sandbox.NetnsPath, unix.MNT_DETACH))
	c = start(t, cfg)
	assert.Empty(t, c.List())
	assert.False(t, hasSecret(t, cfg, id))
}

// slogTo is a JSON logger writing into logs, at debug level.
func slogTo(logs *sandboxtest.LogBuffer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// logLine returns the first JSON log line whose message is msg.
func logLine(t *testing.T, logs *sandboxtest.LogBuffer, msg string) map[string]any {
	t.Helper()
	for _, line := range strings.Split(logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			return m
		}
	}
	t.Fatalf("no log line %q in:\n%s", msg, logs)
	return nil
}

// TestFsckReportsWhatItCannotCheck: fsck at the descriptor limit says it
// could not check a sandbox, never that the sandbox is gone.
func TestFsckReportsWhatItCannotCheck(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	c := start(t, cfg)
	id := "fsck-" + suffix()
	cr, err := c.Create(context.Background(), CreateRequest{ID: id, App: "web"})
	require.NoError(t, err)

	var problems []string
	withFreeFDs(t, 1, func() { problems, err = Fsck(cfg) })
	require.NoError(t, err)
	mine := func(problems []string) []string {
		var out []string
		for _, p := range problems {
			if strings.Contains(p, id) {
				out = append(out, p)
			}
		}
		return out
	}
	require.Len(t, mine(problems), 1, "%q", problems)
	assert.Contains(t, mine(problems)[0], "sandbox "+id+": cannot check its netns "+cr.Sandbox.NetnsPath)
	assert.Contains(t, mine(problems)[0], "too many open files")

	problems, err = Fsck(cfg)
	require.NoError(t, err)
	assert.Empty(t, problems, "with descriptors, all is well (and nothing of other instances is seen)")
	require.NoError(t, unix.Unmount(cr.Sandbox.NetnsPath, unix.MNT_DETACH))
	problems, err = Fsck(cfg)
	require.NoError(t, err)
	assert.Equal(t, []string{"sandbox " + id + ": its netns " + cr.Sandbox.NetnsPath + " is no longer a network namespace"}, mine(problems))
}
