package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/internal/secretstore"
)

// resyncInterval is the daemon's (controllers.Config's default).
const resyncInterval = 2 * time.Second

// linesWithMsg returns the JSON log lines of a daemon's stderr whose
// message is msg.
func linesWithMsg(stderr fmt.Stringer, msg string) []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(stderr.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// createKept creates a sandbox of app web. (Its netns has the world's
// prefix: no other test's cleanup can remove it, and the world's removes
// it when the test ends.)
func (ow *world) createKept(id string) controllers.Created {
	ow.t.Helper()
	return ow.create(id, "web")
}

// snapshot is what must survive a daemon that cannot look at its sandboxes:
// the state files (by content) and each sandbox's cgroup, netns and veth.
type snapshot struct {
	files   map[string][32]byte
	cgroups map[string]uint64
	netns   map[string]uint64 // path -> cookie
	veths   []string
}

// stateDirs are the directories of the world's records and secrets.
func stateDirs(ow *world) []string {
	return []string{filepath.Join(ow.state, "sandboxes"), secretstore.Dir(ow.state)}
}

func takeSnapshot(t *testing.T, ow *world, sbs []controllers.Created) snapshot {
	t.Helper()
	s := snapshot{files: map[string][32]byte{}, cgroups: map[string]uint64{}, netns: map[string]uint64{}}
	for _, dir := range stateDirs(ow) {
		for _, e := range must(os.ReadDir(dir)) {
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			require.NoError(t, err)
			s.files[filepath.Join(dir, e.Name())] = sha256.Sum256(b)
		}
	}
	for _, sb := range sbs {
		id, err := cgroup2.ID(sb.Sandbox.CgroupPath)
		require.NoError(t, err)
		s.cgroups[sb.Sandbox.CgroupPath] = id
		cookie, err := netnsutil.Cookie(sb.Sandbox.NetnsPath)
		require.NoError(t, err)
		s.netns[sb.Sandbox.NetnsPath] = cookie
		s.veths = append(s.veths, sb.Sandbox.Veth)
	}
	return s
}

func assertSnapshot(t *testing.T, ow *world, want snapshot, tag string) {
	t.Helper()
	got := snapshot{files: map[string][32]byte{}}
	for _, dir := range stateDirs(ow) {
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			require.NoError(t, err)
			got.files[filepath.Join(dir, e.Name())] = sha256.Sum256(b)
		}
	}
	assert.Equal(t, want.files, got.files, "%s: records and secrets are untouched", tag)
	for p, id := range want.cgroups {
		now, err := cgroup2.ID(p)
		assert.NoError(t, err, "%s: cgroup %s", tag, p)
		assert.Equal(t, id, now, "%s: cgroup %s is the same", tag, p)
	}
	for p, cookie := range want.netns {
		now, err := netnsutil.Cookie(p)
		assert.NoError(t, err, "%s: netns %s", tag, p)
		assert.Equal(t, cookie, now, "%s: netns %s is the same", tag, p)
	}
	h, err := netnsutil.Handle(ow.w.HostNetns)
	require.NoError(t, err)
	defer h.Close()
	for _, v := range want.veths {
		_, err := h.LinkByName(v)
		assert.NoError(t, err, "%s: veth %s", tag, v)
	}
}

// descriptorsOf counts the descriptors process pid holds.
func descriptorsOf(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	require.NoError(t, err)
	return len(entries)
}

// TestDescriptorExhaustionRetiresNothing: the running daemon is held at its
// descriptor limit (every open fails with EMFILE) for several resync
// intervals. It logs that it cannot check its sandboxes and keeps them; once
// descriptors are available again, every sandbox is still registered, has
// its secret, netns and veth, and gets tokens as itself.
func TestDescriptorExhaustionRetiresNothing(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	var sbs []controllers.Created
	var clients []*sandboxtest.Client
	for i := range 3 {
		sb := ow.createKept(fmt.Sprintf("fdkeep%d-%s", i, tag))
		sbs = append(sbs, sb)
		c := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
		clients = append(clients, c)
		require.Equal(t, sb.Sandbox.ID, fetch(t, c, sb.Env)["sandbox_id"])
	}
	before := takeSnapshot(t, ow, sbs)

	// Below the lowest free descriptor: no open, socket or accept succeeds.
	pid := ow.daemon.Process.Pid
	n := descriptorsOf(t, pid)
	var old unix.Rlimit
	require.NoError(t, unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &old))
	require.NoError(t, unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: 3, Max: old.Max}, nil))
	restored := false
	restore := func() {
		if !restored {
			restored = true
			require.NoError(t, unix.Prlimit(pid, unix.RLIMIT_NOFILE, &old, nil))
		}
	}
	defer restore()
	t.Logf("daemon holds %d descriptors; soft limit lowered from %d to 3", n, old.Cur)

	require.Eventually(t, func() bool { return len(linesWithMsg(ow.stderr, "cannot check sandbox; kept")) >= len(sbs) },
		5*resyncInterval, 100*time.Millisecond, "the daemon did not log the failed checks:\n%s", ow.stderr)
	time.Sleep(3 * resyncInterval) // several more resyncs at the limit
	restore()

	for _, line := range linesWithMsg(ow.stderr, "cannot check sandbox; kept") {
		assert.Equal(t, "WARN", line["level"])
		assert.Contains(t, line["object"], "netns ")
		assert.Contains(t, line["error"], "too many open files")
	}
	ids := map[string]bool{}
	for _, line := range linesWithMsg(ow.stderr, "cannot check sandbox; kept") {
		ids[line["sandbox"].(string)] = true
	}
	for _, sb := range sbs {
		assert.True(t, ids[sb.Sandbox.ID], "the failed check of %s is logged", sb.Sandbox.ID)
	}
	assert.Empty(t, linesWithMsg(ow.stderr, "sandbox retired"), "nothing retired")

	// Served again once descriptors are free: the admin API, then tokens.
	api := controllers.NewAdminClient(ow.admin)
	var all []controllers.Record
	require.Eventually(t, func() bool {
		return api.Do(context.Background(), "GET", "/v1/sandboxes", nil, &all) == nil
	}, 30*time.Second, 100*time.Millisecond)
	assert.Len(t, all, len(sbs), "every sandbox still registered")
	assertSnapshot(t, ow, before, "after the exhaustion")
	for i, sb := range sbs {
		assert.Equal(t, sb.Sandbox.ID, fetch(t, clients[i], sb.Env)["sandbox_id"])
	}
	require.Eventually(t, func() bool { return len(linesWithMsg(ow.stderr, "sandbox can be checked again")) >= len(sbs) },
		3*resyncInterval, 100*time.Millisecond, "the daemon says when it can check again")
}

// TestStartAtDescriptorLimitRetiresNothing: a daemon started under every
// descriptor limit from 3 up to what a start needs either starts and serves
// every sandbox of the previous run, or refuses to start with an error; it
// never removes a record, a secret, a cgroup, a netns or a veth.
func TestStartAtDescriptorLimitRetiresNothing(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	tag := suffix()
	var sbs []controllers.Created
	var clients []*sandboxtest.Client
	for i := range 3 {
		sb := ow.createKept(fmt.Sprintf("fdstart%d-%s", i, tag))
		sbs = append(sbs, sb)
		clients = append(clients, sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath))
	}
	needed := descriptorsOf(t, ow.daemon.Process.Pid)
	require.Equal(t, 0, ow.kill(syscall.SIGTERM))
	before := takeSnapshot(t, ow, sbs)

	outcomes := map[string][]int{}
	started := 0
	for limit := 3; limit <= needed+8; limit++ {
		outcome := startAtLimit(t, ow, limit, len(sbs))
		if strings.HasPrefix(outcome, "started") {
			started++
		}
		outcomes[outcome] = append(outcomes[outcome], limit)
		assertSnapshot(t, ow, before, fmt.Sprintf("limit %d (%s)", limit, outcome))
	}
	for o, limits := range outcomes {
		t.Logf("limits %v: %s", limits, o)
	}
	// The daemon names the least limit it starts under; there it starts
	// and keeps every sandbox.
	if started == 0 {
		least := 0
		for o := range outcomes {
			if m := leastLimit.FindStringSubmatch(o); m != nil {
				least, _ = strconv.Atoi(m[1])
			}
		}
		require.NotZero(t, least, "no limit up to %d starts the daemon, and it names no least limit", needed+8)
		outcome := startAtLimit(t, ow, least, len(sbs))
		assert.True(t, strings.HasPrefix(outcome, "started"), "limit %d: %s", least, outcome)
		assertSnapshot(t, ow, before, fmt.Sprintf("limit %d (%s)", least, outcome))
		t.Logf("limit %d: %s", least, outcome)
	}

	// A normal start serves every sandbox, as itself.
	ow.start()
	for i, sb := range sbs {
		assert.Equal(t, sb.Sandbox.ID, fetch(t, clients[i], sb.Env)["sandbox_id"])
	}
}

var leastLimit = regexp.MustCompile(`needs at least (\d+)`)

// lastMessage is the last line of a daemon's stderr, shortened: the error it
// exited with.
func lastMessage(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	last := lines[len(lines)-1]
	if i := strings.Index(last, "identityd: "); i >= 0 {
		last = last[i:]
	}
	return last
}

// startAtLimit runs the daemon with at most limit descriptors until it is
// ready or exits, and says which. A daemon that got ready is stopped.
func startAtLimit(t *testing.T, ow *world, limit, sandboxes int) string {
	t.Helper()
	// ulimit -n sets the hard limit too, which the Go runtime would
	// otherwise raise the soft one to.
	cmd := exec.Command("sh", "-c", `ulimit -n "$0" && exec "$@"`, strconv.Itoa(limit), filepath.Join(ow.bin, "identityd"))
	cmd.Args = append(cmd.Args, ow.args...)
	logs := &sandboxtest.LogBuffer{}
	cmd.Stderr = logs
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		assert.NotContains(t, logs.String(), "sandbox retired", "limit %d", limit)
	}()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case <-exited:
			return "refused: " + lastMessage(logs.String())
		case <-deadline:
			t.Fatalf("limit %d: neither ready nor exited:\n%s", limit, logs)
		case <-time.After(20 * time.Millisecond):
		}
		if ready := linesWithMsg(logs, "identityd ready"); len(ready) > 0 {
			assert.EqualValues(t, sandboxes, ready[0]["sandboxes"], "limit %d: ready with every sandbox", limit)
			if len(linesWithMsg(logs, "cannot check sandbox at start; kept as recorded")) > 0 {
				return "started, keeping sandboxes it could not check"
			}
			return "started"
		}
	}
}
