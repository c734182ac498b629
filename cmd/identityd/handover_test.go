package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/daemon"
	"github.com/identityd/identityd/internal/etcdtest"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// handoverRig runs a world's daemons from a binary of the test's own (so
// that an upgrade can replace it on disk), logging to a file (a daemon
// started by SIGHUP inherits it, and outlives the process that made it).
type handoverRig struct {
	t   *testing.T
	ow  *world
	exe string   // the binary the daemons run: replaced to upgrade
	log *os.File // every daemon's stderr
	cur int      // pid of the daemon serving now
	// ours is the daemon process this test started and has not reaped;
	// nil when the serving one was started by SIGHUP.
	ours *exec.Cmd
}

func newHandoverRig(t *testing.T, ow *world) *handoverRig {
	dir := t.TempDir()
	r := &handoverRig{t: t, ow: ow, exe: filepath.Join(dir, "identityd")}
	copyFile(t, filepath.Join(ow.bin, "identityd"), r.exe)
	var err error
	r.log, err = os.OpenFile(filepath.Join(dir, "daemons.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(t, err)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(r.log.Name())
			t.Logf("daemons' log:\n%s", b)
		}
		if r.cur != 0 {
			syscall.Kill(r.cur, syscall.SIGKILL)
		}
		if r.ours != nil {
			r.ours.Wait()
		}
		r.log.Close()
	})
	return r
}

// copyFile replaces dst with src's content by a rename, as a package
// manager upgrades a binary: the running one keeps its (now unlinked) inode.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	require.NoError(t, err)
	tmp := dst + ".new"
	require.NoError(t, os.WriteFile(tmp, b, 0o755))
	require.NoError(t, os.Rename(tmp, dst))
}

// start starts a daemon from the rig's binary and waits until it serves
// the admin API; with a daemon already serving, the new one takes over and
// the old one exits 0.
func (r *handoverRig) start(extra ...string) {
	r.t.Helper()
	cmd := exec.Command(r.exe, append(slices.Clone(r.ow.args), extra...)...)
	cmd.Stdout, cmd.Stderr = nil, r.log // files, not pipes: a successor started by SIGHUP inherits them
	require.NoError(r.t, cmd.Start())
	prev, prevCmd := r.cur, r.ours
	r.ours = cmd
	r.waitServing(prev, prevCmd, cmd.Process.Pid)
}

// hup sends SIGHUP to the serving daemon, which starts the rig's binary as
// its successor; it waits until the successor serves.
func (r *handoverRig) hup() {
	r.t.Helper()
	prev, prevCmd := r.cur, r.ours
	require.NoError(r.t, syscall.Kill(prev, syscall.SIGHUP))
	r.ours = nil
	r.waitServing(prev, prevCmd, 0)
}

// waitServing waits until the daemon listening for successors is not prev
// (and is want, if set), and prev is gone, having exited 0 if this test
// started it.
func (r *handoverRig) waitServing(prev int, prevCmd *exec.Cmd, want int) {
	r.t.Helper()
	sock := daemon.HandoverSocket(r.ow.admin)
	var pid int
	require.Eventually(r.t, func() bool {
		pid = listenerPID(sock)
		return pid != 0 && pid != prev && (want == 0 || pid == want)
	}, 60*time.Second, 5*time.Millisecond, "no successor took over from %d", prev)
	r.cur = pid
	if prevCmd != nil {
		require.NoError(r.t, prevCmd.Wait(), "the daemon that handed over exits 0")
	} else if prev != 0 {
		require.Eventually(r.t, func() bool { return syscall.Kill(prev, 0) == syscall.ESRCH }, 30*time.Second, 5*time.Millisecond,
			"the daemon that handed over exits")
	}
}

// listenerPID is the pid of the process listening on a Unix socket (0 if
// none), read from the connection's peer credentials without a word said:
// the listener drops a connection that says no hello.
func listenerPID(path string) int {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return 0
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0
	}
	var pid int
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// loadClients are sandboxes each asking for a token every interval, each
// time on a new connection, until stopped.
type loadClients struct {
	mu       sync.Mutex
	attempts []sandboxtest.Attempt
	stop     atomic.Bool
	wg       sync.WaitGroup
}

func startLoad(t *testing.T, ow *world, n int, interval time.Duration) *loadClients {
	l := &loadClients{}
	tag := suffix()
	for i := range n {
		c := ow.create(fmt.Sprintf("e2e-ho%02d-%s", i, tag), "load")
		client := sandboxtest.StartClient(t, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)
		req := sandboxtest.HTTPRequest{Method: "GET", URL: c.Env["MIREN_IDENTITY_TOKEN_URL"], Timeout: 2 * time.Second,
			Header: map[string]string{"Authorization": "Bearer " + c.Env["MIREN_IDENTITY_TOKEN_SECRET"]}}
		l.wg.Go(func() {
			for !l.stop.Load() {
				got, err := client.Poll(req, interval, 2*time.Second)
				if err != nil {
					t.Error(err)
					return
				}
				l.mu.Lock()
				l.attempts = append(l.attempts, got...)
				l.mu.Unlock()
			}
		})
	}
	return l
}

func (l *loadClients) finish() []sandboxtest.Attempt {
	l.stop.Store(true)
	l.wg.Wait()
	return l.attempts
}

type span struct{ from, to int64 }

// latencyStats reports the count, failures and p50/p99/max latency of the
// attempts that overlap any of spans (inside) or none (outside).
func latencyStats(attempts []sandboxtest.Attempt, spans []span, inside bool) (n, failed int, p50, p99, worst time.Duration) {
	var lat []time.Duration
	for _, a := range attempts {
		in := slices.ContainsFunc(spans, func(s span) bool { return a.End >= s.from && a.Start <= s.to })
		if in != inside {
			continue
		}
		n++
		if a.Status != 200 {
			failed++
		}
		lat = append(lat, time.Duration(a.End-a.Start))
	}
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	return n, failed, lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
}

// TestHandoverUnderLoad: the reliability suite's load (50 sandboxes, a
// token every 100 ms each, a new connection per request) across 20
// handovers to a new process started with the same configuration, 20 by
// SIGHUP, and 5 upgrades (the binary replaced on disk by one whose sockops
// program differs, then SIGHUP): not one request fails, and every upgrade
// replaces the program in place. The p99 latency during handovers is
// reported next to the steady state's.
func TestHandoverUnderLoad(t *testing.T) {
	const handovers, upgrades = 20, 5
	ow := newWorld(t)
	variant := buildVariant(t)
	r := newHandoverRig(t, ow)
	r.start()
	load := startLoad(t, ow, 50, 100*time.Millisecond)
	time.Sleep(3 * time.Second) // steady state

	var spans []span
	timed := func(f func()) {
		from := time.Now().UnixNano()
		f()
		spans = append(spans, span{from, time.Now().UnixNano()})
	}
	began := time.Now()
	for range handovers {
		timed(func() { r.start() })
	}
	for range handovers {
		timed(r.hup)
	}
	shipped := filepath.Join(ow.bin, "identityd")
	for i := range upgrades {
		copyFile(t, []string{variant, shipped}[i%2], r.exe)
		timed(r.hup)
	}
	t.Logf("%d handovers in %s", len(spans), time.Since(began).Round(time.Millisecond))
	time.Sleep(3 * time.Second) // steady state again
	attempts := load.finish()
	require.False(t, t.Failed())

	n, failed, p50, p99, worst := latencyStats(attempts, spans, true)
	sn, sfailed, sp50, sp99, sworst := latencyStats(attempts, spans, false)
	t.Logf("RESULT handovers=%d (same-config start %d, SIGHUP %d, upgrade %d) requests=%d failed=%d | during handovers: n=%d failed=%d p50=%s p99=%s max=%s | steady: n=%d failed=%d p50=%s p99=%s max=%s",
		len(spans), handovers, handovers, upgrades, len(attempts), failed+sfailed,
		n, failed, p50.Round(time.Microsecond), p99.Round(time.Microsecond), worst.Round(time.Microsecond),
		sn, sfailed, sp50.Round(time.Microsecond), sp99.Round(time.Microsecond), sworst.Round(time.Microsecond))
	for _, a := range attempts {
		if a.Status != 200 {
			t.Errorf("failed: status %d %s at %s..%s", a.Status, a.Error,
				time.Unix(0, a.Start).UTC().Format("15:04:05.000000"), time.Unix(0, a.End).UTC().Format("15:04:05.000000"))
		}
	}
	assert.Zero(t, failed+sfailed, "no request fails across handovers")
	assert.Positive(t, n)

	log := readFile(t, r.log.Name())
	assert.Equal(t, len(spans), strings.Count(log, "handed over; finishing in-flight requests"), "every handover completed")
	assert.GreaterOrEqual(t, strings.Count(log, "replaced pinned program in place"), upgrades, "each upgrade replaced the changed program through its link")
	assert.NotContains(t, log, "handover failed")
	out, err := ow.fsck()
	assert.NoError(t, err, out)
}

// buildVariant builds identityd with a sockops program that differs from
// the shipped one (the identityd_bpf_variant tag).
func buildVariant(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	out, err := exec.Command("go", "build", "-tags", "identityd_bpf_variant", "-o", dir+"/", "github.com/identityd/identityd/cmd/identityd").CombinedOutput()
	require.NoError(t, err, "%s", out)
	return filepath.Join(dir, "identityd")
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// TestHandoverFailedSuccessor: a successor killed while it takes over, and
// one that fails to start (its fleet store is out of reach), leave the
// running daemon serving: no request fails, and its admin API and
// background loops work again.
func TestHandoverFailedSuccessor(t *testing.T) {
	ow := newWorld(t)
	r := newHandoverRig(t, ow)
	r.start()
	load := startLoad(t, ow, 10, 100*time.Millisecond)
	serving := r.cur

	// Killed as soon as it has the sockets.
	cmd := exec.Command(r.exe, ow.args...)
	cmd.Stdout, cmd.Stderr = nil, r.log // files, not pipes: a successor started by SIGHUP inherits them
	require.NoError(t, cmd.Start())
	require.Eventually(t, func() bool { return strings.Contains(readFile(t, r.log.Name()), "taking over from the running daemon") },
		30*time.Second, 5*time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()
	require.Eventually(t, func() bool { return strings.Contains(readFile(t, r.log.Name()), "handover failed; serving on") },
		30*time.Second, 10*time.Millisecond)

	// Fails during its start: an etcd nobody runs.
	cmd = exec.Command(r.exe, append(slices.Clone(ow.args), "--etcd-endpoints", "http://127.0.0.1:9", "--issuer", "https://issuer.test")...)
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = io.Discard, &stderr
	err := cmd.Run()
	require.Error(t, err, "the successor that cannot start exits non-zero")
	t.Logf("failed successor said: %s", lastLine(stderr.String()))
	require.Eventually(t, func() bool { return strings.Count(readFile(t, r.log.Name()), "handover failed; serving on") == 2 },
		30*time.Second, 10*time.Millisecond)

	time.Sleep(time.Second)
	attempts := load.finish()
	_, failed, _, _, _ := latencyStats(attempts, nil, false)
	assert.Zero(t, failed, "no request failed while successors failed")
	assert.Equal(t, serving, listenerPID(daemon.HandoverSocket(ow.admin)), "the first daemon still serves")

	// Its admin API is back: a sandbox made now gets tokens.
	c := ow.create("after-failed-"+suffix(), "web")
	client := sandboxtest.StartClient(t, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)
	assert.Equal(t, c.Sandbox.ID, fetch(t, client, c.Env)["sandbox_id"])
	// And it still hands over.
	r.start()
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestSocketActivation: started the way systemd socket activation starts
// it (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), the daemon serves on the
// sockets it is given instead of binding its own. And with the sockets held
// as systemd holds them, a daemon killed with SIGKILL refuses nobody: a
// sandbox's request made while no daemon runs waits in the token socket's
// backlog and is answered, with the sandbox's identity, by the daemon
// started next.
func TestSocketActivation(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	require.Equal(t, 0, ow.kill(syscall.SIGTERM))
	held := holdSockets(t, ow)
	held.start(t)
	// Nobody accepts on the test's copies: the daemon does.
	c := ow.create("activated-"+suffix(), "web")
	client := sandboxtest.StartClient(t, c.Sandbox.CgroupPath, c.Sandbox.NetnsPath)
	assert.Equal(t, c.Sandbox.ID, fetch(t, client, c.Env)["sandbox_id"])
	assert.Contains(t, ow.stderr.String(), `"sockets_from":"systemd"`)

	require.Equal(t, -1, ow.kill(syscall.SIGKILL))
	type answer struct {
		resps []sandboxtest.HTTPResponse
		err   error
		at    time.Time
	}
	answered := make(chan answer, 1)
	asked := time.Now()
	go func() {
		resps, err := client.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: c.Env["MIREN_IDENTITY_TOKEN_URL"],
			Header: map[string]string{"Authorization": "Bearer " + c.Env["MIREN_IDENTITY_TOKEN_SECRET"]}, Timeout: 20 * time.Second})
		answered <- answer{resps, err, time.Now()}
	}()
	select {
	case a := <-answered:
		t.Fatalf("answered while no daemon ran: %+v", a)
	case <-time.After(time.Second):
	}
	restarted := time.Now()
	held.start(t)
	a := <-answered
	require.NoError(t, a.err)
	require.Equal(t, http.StatusOK, a.resps[0].Status, a.resps[0].Body)
	assert.Equal(t, c.Sandbox.ID, claimsOf(t, a.resps[0].Body)["sandbox_id"])
	assert.True(t, a.at.After(restarted), "answered by the restarted daemon")
	t.Logf("asked %s before the restart; answered %s after it",
		restarted.Sub(asked).Round(time.Millisecond), a.at.Sub(restarted).Round(time.Millisecond))
}

// heldSockets are the token and admin sockets as systemd would make them
// from identityd.socket, held by the test for the life of the test.
type heldSockets struct {
	ow    *world
	token net.Listener
	admin net.Listener
}

func holdSockets(t *testing.T, ow *world) *heldSockets {
	t.Helper()
	h := &heldSockets{ow: ow}
	require.NoError(t, ow.w.Do(func() (err error) {
		h.token, err = net.Listen("tcp", fmt.Sprintf("%s:%d", ow.router(), controllers.DefaultTokenPort))
		return err
	}))
	os.Remove(ow.admin)
	var err error
	h.admin, err = net.Listen("unix", ow.admin)
	require.NoError(t, err)
	t.Cleanup(func() {
		h.token.Close()
		h.admin.Close()
	})
	return h
}

// start runs the daemon on copies of the held sockets, as a socket-activated
// service is started, and waits until its admin API answers.
func (h *heldSockets) start(t *testing.T) {
	t.Helper()
	ow := h.ow
	var files []*os.File
	for _, ln := range []net.Listener{h.token, h.admin} {
		f, err := ln.(interface{ File() (*os.File, error) }).File()
		require.NoError(t, err)
		files = append(files, f)
	}
	cmd := exec.Command("sh", append([]string{"-c", `export LISTEN_PID=$$; exec "$0" "$@"`, filepath.Join(ow.bin, "identityd")}, ow.args...)...)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=2", "LISTEN_FDNAMES=token:admin")
	cmd.ExtraFiles = files
	ow.stderr = &sandboxtest.LogBuffer{}
	cmd.Stdout, cmd.Stderr = io.Discard, ow.stderr
	require.NoError(t, cmd.Start())
	ow.daemon = cmd
	for _, f := range files {
		f.Close()
	}
	api := controllers.NewAdminClient(ow.admin)
	require.Eventually(t, func() bool { return api.Do(context.Background(), "GET", "/v1/sandboxes", nil, nil) == nil },
		30*time.Second, 10*time.Millisecond, "%s", ow.stderr)
}

// TestHandoverInFleet: a node of a fleet hands over five times (a new
// process, then SIGHUP, alternately) while another node's JWKS, the union
// of the fleet's keys, is read every 20 ms: the node keeps its name and its
// key (no new kid, none withdrawn even for a moment), and its sandboxes'
// tokens keep verifying.
func TestHandoverInFleet(t *testing.T) {
	etcd := etcdtest.Start(t, 1)
	prefix := "/identityd-fleet-" + suffix() + "/"
	disc1, disc2 := freeLoopbackAside(t), freeLoopbackAside(t)
	issuer := "http://" + disc1
	w1 := fleetWorld(t, etcd, prefix, issuer, "node1-"+suffix(), disc1)
	r := newHandoverRig(t, w1)
	r.start()
	w1.waitReady()
	w2 := fleetWorld(t, etcd, prefix, issuer, "node2-"+suffix(), disc2)
	w2.start()
	w2.waitReady()
	var before []string
	require.Eventually(t, func() bool { before = jwksKids(t, disc2); return len(before) == 2 }, 10*time.Second, 20*time.Millisecond)

	sb := w1.create("fleet-ho-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	_, kid := header(t, tokenFrom(t, client, sb.Env, ""))
	require.Contains(t, before, kid)

	var stop atomic.Bool
	var reads atomic.Int64
	var gaps []string
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			var set jwks
			if status, _ := getJSON(t, "http://"+disc2+"/.well-known/jwks.json", &set); status == http.StatusOK {
				if kids := set.kids(); !slices.Equal(kids, before) {
					mu.Lock()
					gaps = append(gaps, fmt.Sprint(kids))
					mu.Unlock()
				}
				reads.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	for i := range 5 {
		if i%2 == 0 {
			r.start()
		} else {
			r.hup()
		}
		_, k := header(t, tokenFrom(t, client, sb.Env, ""))
		assert.Equal(t, kid, k, "handover %d: the same key signs", i)
	}
	stop.Store(true)
	<-done
	t.Logf("%d reads of node 2's JWKS across 5 handovers of node 1", reads.Load())
	assert.Empty(t, gaps, "node 2's JWKS never changed")
	assert.Equal(t, before, jwksKids(t, disc1), "node 1 serves the same keys")
}
