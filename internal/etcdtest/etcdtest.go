// Package etcdtest starts real etcd clusters for tests: n members of the etcd
// binary from Debian's etcd-server package, on loopback ports picked free for
// each test, with data directories under the test's temporary directory.
// Members can be killed, stopped and restarted to exercise quorum loss. The
// package never touches the package's own systemd service or its data.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Binary is where Debian's etcd-server package installs the server.
const Binary = "/usr/bin/etcd"

const (
	// startTimeout bounds how long a cluster (or a restarted member) may take
	// to elect a leader; the test machines are small and shared.
	startTimeout = 60 * time.Second
	// stopTimeout bounds a graceful stop before it becomes a SIGKILL.
	stopTimeout = 10 * time.Second
	// startAttempts covers the race between picking a free port and etcd
	// binding it: another process may take the port in between.
	startAttempts = 3
)

// Cluster is a running etcd cluster owned by one test.
type Cluster struct {
	t testing.TB
	// TLS is set for a cluster started with StartTLS: its clients must
	// present a certificate the CA signed.
	TLS     *TLSFiles
	token   string
	initial string // the --initial-cluster flag: every member's name=peerURL
	members []*member
}

type member struct {
	name      string
	dir       string
	clientURL string
	unixURL   string // "" when the cluster serves TLS
	peerURL   string
	logPath   string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Start starts an n-member cluster on 127.0.0.1 and waits until every member
// knows the leader. The cluster is killed when the test ends. If the etcd
// binary is missing the test fails, naming the script that installs it.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return startCluster(t, n, false)
}

// StartTLS is Start with client TLS: the members serve https and require a
// client certificate signed by the cluster's CA (Cluster.TLS).
func StartTLS(t testing.TB, n int) *Cluster {
	t.Helper()
	return startCluster(t, n, true)
}

func startCluster(t testing.TB, n int, withTLS bool) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("etcdtest.Start: %d members", n)
	}
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("etcd server binary %s: %v (install it with scripts/install-deps.sh, package etcd-server)", Binary, err)
	}
	var lastErr error
	for attempt := 0; attempt < startAttempts; attempt++ {
		c, err := start(t, n, withTLS)
		if err == nil {
			t.Cleanup(c.killAll)
			return c
		}
		c.killAll()
		lastErr = err
		t.Logf("etcdtest: start attempt %d: %v", attempt+1, err)
	}
	t.Fatalf("start %d-member etcd cluster: %v", n, lastErr)
	return nil
}

func start(t testing.TB, n int, withTLS bool) (*Cluster, error) {
	root := t.TempDir()
	id := uuid.NewString()[:8]
	c := &Cluster{t: t, token: "etcdtest-" + id}
	scheme := "http"
	if withTLS {
		f, err := newTLSFiles(root)
		if err != nil {
			return c, err
		}
		c.TLS, scheme = f, "https"
	}
	ports, err := freePorts(2 * n)
	if err != nil {
		return c, err
	}
	var initial []string
	for i := 0; i < n; i++ {
		// etcd wants host:port even for a socket; it names the file so.
		sock := filepath.Join(root, fmt.Sprintf("m%d.sock:1", i))
		m := &member{
			name:      fmt.Sprintf("m%d-%s", i, id),
			dir:       filepath.Join(root, fmt.Sprintf("m%d", i)),
			clientURL: fmt.Sprintf("%s://127.0.0.1:%d", scheme, ports[2*i]),
			peerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			logPath:   filepath.Join(root, fmt.Sprintf("m%d.log", i)),
		}
		if !withTLS && len(sock) < maxUnixPath {
			m.unixURL = "unix://" + sock
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL)
	}
	c.initial = strings.Join(initial, ",")
	for _, m := range c.members {
		if err := os.MkdirAll(m.dir, 0o700); err != nil {
			return c, fmt.Errorf("create data dir %s: %w", m.dir, err)
		}
		if err := c.launch(m); err != nil {
			return c, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for i := range c.members {
		if err := c.waitMember(ctx, i); err != nil {
			return c, err
		}
	}
	return c, nil
}

// freePorts asks the kernel for n free loopback ports. They are released
// before etcd binds them, hence the retries in Start.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free loopback port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// launch starts member m's process. etcd reads the initial-cluster flags only
// when the data directory is empty (the first start); restarts reuse the
// membership stored there.
func (c *Cluster) launch(m *member) error {
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open etcd log %s: %w", m.logPath, err)
	}
	defer logf.Close()
	args := []string{
		"--name", m.name,
		"--data-dir", m.dir,
		"--listen-client-urls", listenURLs(m),
		"--advertise-client-urls", m.clientURL,
		"--listen-peer-urls", m.peerURL,
		"--initial-advertise-peer-urls", m.peerURL,
		"--initial-cluster", c.initial,
		"--initial-cluster-state", "new",
		"--initial-cluster-token", c.token,
		"--logger", "zap",
		"--log-outputs", "stderr",
	}
	if c.TLS != nil {
		args = append(args, "--cert-file", c.TLS.serverCert, "--key-file", c.TLS.serverKey,
			"--trusted-ca-file", c.TLS.CA, "--client-cert-auth")
	}
	if m.unixURL != "" {
		// A killed member leaves its socket behind, and etcd will not bind
		// over it.
		if err := os.Remove(strings.TrimPrefix(m.unixURL, "unix://")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove stale socket of etcd member %s: %w", m.name, err)
		}
	}
	cmd := exec.Command(Binary, args...)
	cmd.Env = cleanEnv()
	cmd.Dir = filepath.Dir(m.dir)
	cmd.Stdout = logf
	cmd.Stderr = logf
	// The member must not outlive a test binary that dies without cleanup.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	// Pdeathsig follows the OS thread that forked the member, not the
	// process: a test that locks a thread to enter a netns and ends without
	// unlocking it takes the thread down, and would kill the member. So it
	// is started and waited for on a locked thread that lives exactly as
	// long as it does.
	started := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(done)
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start etcd member %s: %w", m.name, err)
	}
	m.mu.Lock()
	m.cmd, m.done = cmd, done
	m.mu.Unlock()
	return nil
}

// maxUnixPath is under the kernel's 108-byte limit for a socket path.
const maxUnixPath = 100

// listenURLs is the member's TCP client URL and, if it has one, its unix
// socket, which etcd names after the URL's host part, relative to its
// working directory (the cluster's directory).
func listenURLs(m *member) string {
	if m.unixURL == "" {
		return m.clientURL
	}
	return m.clientURL + ",unix://" + filepath.Base(strings.TrimPrefix(m.unixURL, "unix://"))
}

// cleanEnv drops ETCD* variables: etcd reads its flags from them too, and a
// test cluster must not pick up a machine's configuration.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCD") {
			env = append(env, kv)
		}
	}
	return env
}

// waitMember waits until member i answers and knows a leader.
func (c *Cluster) waitMember(ctx context.Context, i int) error {
	m := c.members[i]
	cli, err := c.newClient([]string{m.clientURL})
	if err != nil {
		return err
	}
	defer cli.Close()
	var lastErr error
	for {
		m.mu.Lock()
		done := m.done
		m.mu.Unlock()
		select {
		case <-done:
			return fmt.Errorf("etcd member %s exited: %s", m.name, m.logTail())
		default:
		}
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := cli.Status(sctx, m.clientURL)
		cancel()
		if err == nil && st.Leader != 0 {
			return nil
		}
		if err == nil {
			err = errors.New("no leader yet")
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd member %s not ready: %v; log: %s", m.name, lastErr, m.logTail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) newClient(endpoints []string) (*clientv3.Client, error) {
	var tc *tls.Config
	if c.TLS != nil {
		var err error
		if tc, err = c.TLS.clientTLS(); err != nil {
			return nil, err
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		TLS:         tc,
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", endpoints, err)
	}
	return cli, nil
}

func (m *member) logTail() string {
	b, err := os.ReadFile(m.logPath)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", m.logPath, err)
	}
	const max = 2000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(bytes.TrimSpace(b))
}

// Endpoints are the client URLs of every member, in member order.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.members {
		eps = append(eps, m.clientURL)
	}
	return eps
}

// UnixEndpoints are the members' unix socket client URLs (unix:///path),
// which reach the cluster from any network namespace, in member order; nil
// for a TLS cluster or when the test's directory is too deep for a socket.
func (c *Cluster) UnixEndpoints() []string {
	var eps []string
	for _, m := range c.members {
		if m.unixURL == "" {
			return nil
		}
		eps = append(eps, m.unixURL)
	}
	return eps
}

// Endpoint is member i's client URL.
func (c *Cluster) Endpoint(i int) string { return c.members[i].clientURL }

// Client returns a client for the whole cluster, closed when the test ends.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := c.newClient(c.Endpoints())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Kill sends SIGKILL to member i and waits for it to exit.
func (c *Cluster) Kill(i int) {
	c.t.Helper()
	c.signal(i, syscall.SIGKILL, stopTimeout)
}

// Stop stops member i gracefully (SIGTERM), killing it if it takes longer
// than stopTimeout.
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	if !c.signal(i, syscall.SIGTERM, stopTimeout) {
		c.signal(i, syscall.SIGKILL, stopTimeout)
	}
}

// signal sends sig to member i and reports whether it exited within wait.
func (c *Cluster) signal(i int, sig syscall.Signal, wait time.Duration) bool {
	m := c.members[i]
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.mu.Unlock()
	if cmd == nil {
		return true
	}
	select {
	case <-done:
		return true
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return true
	case <-time.After(wait):
		if sig == syscall.SIGKILL {
			c.t.Errorf("etcd member %s did not exit %s after SIGKILL", m.name, wait)
		}
		return false
	}
}

// Restart starts member i again on its data directory and ports (after Kill
// or Stop; a running member is stopped first) and waits until it knows a
// leader, which needs a quorum of members running.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.Stop(i)
	m := c.members[i]
	if err := c.launch(m); err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := c.waitMember(ctx, i); err != nil {
		c.t.Fatalf("restart etcd member %d: %v", i, err)
	}
}

// Running reports whether member i's process is running.
func (c *Cluster) Running(i int) bool {
	m := c.members[i]
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return false
	}
	select {
	case <-m.done:
		return false
	default:
		return true
	}
}

func (c *Cluster) killAll() {
	for _, m := range c.members {
		m.mu.Lock()
		cmd, done := m.cmd, m.done
		m.mu.Unlock()
		if cmd == nil {
			continue
		}
		_ = cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(stopTimeout):
		}
	}
}
