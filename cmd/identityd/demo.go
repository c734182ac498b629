package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

// The demo is an instance of its own: its network namespaces are named
// apart from those of an identityd that runs on the host (prefix
// identityd-), whose fsck and start never see them.
const (
	demoHostNetns   = "identityd.demo"
	demoNetnsPrefix = "identityd.demo-"
)

type demoCmd struct {
	Keep bool `help:"Leave the demo's namespaces, cgroups, pins and state behind for inspection."`
}

func (d *demoCmd) Run(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root: it loads eBPF programs and creates cgroups and network namespaces")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctl := filepath.Join(filepath.Dir(self), "identityctl")
	if _, err := os.Stat(ctl); err != nil {
		if ctl, err = exec.LookPath("identityctl"); err != nil {
			return errors.New("identityctl not found next to identityd or on PATH (make demo builds both into bin/)")
		}
	}
	root, err := cgroup2.Root()
	if err != nil {
		return err
	}
	dm := &demo{
		self: self, ctl: ctl, start: time.Now(),
		hostNetns: filepath.Join(netnsutil.Dir, demoHostNetns),
		cgroups:   filepath.Join(root, "identityd-demo"),
		pins:      filepath.Join(bpf.DefaultBPFFS, "identityd-demo"),
		state:     "/var/tmp/identityd-demo",
		admin:     "/run/identityd-demo/admin.sock",
		events:    make(chan event, 256),
	}
	dm.cleanup() // leftovers of an interrupted earlier run
	if !d.Keep {
		defer dm.cleanup()
	}
	err = dm.run(ctx)
	if errors.Is(err, context.Canceled) {
		dm.say("interrupted: cleaning up")
		return nil
	}
	return err
}

// demo plays the original bug report's repro in a closed world: a "host"
// netns of its own holds the router address and the token endpoint (10.77.0.1:7123),
// and two sandboxes fetch tokens every second while the daemon is killed and
// restarted under them.
type demo struct {
	self, ctl                              string
	start                                  time.Time
	hostNetns, cgroups, pins, state, admin string
	daemon                                 *exec.Cmd
	watchers                               []*exec.Cmd
	events                                 chan event
}

type event struct {
	sandbox string
	ok      bool
	line    string
	at      time.Time
}

func (d *demo) say(format string, args ...any) {
	fmt.Printf("[%7.3fs] %s\n", time.Since(d.start).Seconds(), fmt.Sprintf(format, args...))
}

func (d *demo) step(title string) {
	fmt.Printf("\n[%7.3fs] === %s\n", time.Since(d.start).Seconds(), title)
}

func (d *demo) run(ctx context.Context) error {
	d.step("1. a closed network world, and identityd in it")
	if err := netnsutil.NewNamed(filepath.Base(d.hostNetns)); err != nil {
		return err
	}
	h, err := netnsutil.Handle(d.hostNetns)
	if err != nil {
		return err
	}
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	h.Close()
	if err != nil {
		return fmt.Errorf("bring up lo in the demo netns: %w", err)
	}
	if err := netnsutil.TightenRPFilter(d.hostNetns); err != nil {
		return err
	}
	d.say("host netns %s (router 10.77.0.1 on identityd0, a routed /32 veth per sandbox, token endpoint :7123)", d.hostNetns)
	ready, err := d.startDaemon(ctx)
	if err != nil {
		return err
	}
	d.say("identityd ready in %s (log: %s)", ready.Round(time.Millisecond), filepath.Join(d.state, "daemon.log"))

	d.step("2. two sandboxes, each running a client that fetches a token every second")
	api := controllers.NewAdminClient(d.admin)
	sbs := map[string]controllers.Created{}
	for _, sb := range []struct{ id, app string }{{"demo-a", "billing"}, {"demo-b", "search"}} {
		var c controllers.Created
		if err := api.Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: sb.id, App: sb.app, Org: "acme"}, &c); err != nil {
			return err
		}
		sbs[sb.id] = c
		d.say("sandbox %s: app %s, cgroup %s, netns %s, address %s", sb.id, sb.app, c.Sandbox.CgroupPath,
			c.Sandbox.NetnsPath, c.Sandbox.Addresses[0].Addr())
		if err := d.watch(sb.id, c); err != nil {
			return err
		}
	}
	for _, id := range []string{"demo-a", "demo-b"} {
		e, err := d.next(ctx, id, true, 15*time.Second)
		if err != nil {
			return err
		}
		d.say("%s got a token; its claims: %s", id, e.line)
	}

	d.step("3. the daemon is killed with SIGKILL: every bit of its memory is gone")
	d.daemon.Process.Signal(syscall.SIGKILL)
	d.daemon.Wait()
	d.say("identityd killed; the sandboxes keep running and keep asking")
	for _, id := range []string{"demo-a", "demo-b"} {
		if e, err := d.next(ctx, id, false, 5*time.Second); err == nil {
			d.say("%s: %s", id, e.line)
		}
	}
	if err := sleep(ctx, 2*time.Second); err != nil {
		return err
	}

	d.step("4. identityd restarts: sandboxes rebuilt from records on disk and live cgroups")
	d.drain()
	ready, err = d.startDaemon(ctx)
	if err != nil {
		return err
	}
	readyAt := time.Now()
	d.say("identityd ready again in %s", ready.Round(time.Millisecond))
	for _, id := range []string{"demo-a", "demo-b"} {
		e, err := d.next(ctx, id, true, 10*time.Second)
		if err != nil {
			return err
		}
		d.say("%s (never restarted) got a token %s after readiness: %s", id, e.at.Sub(readyAt).Round(time.Millisecond), e.line)
	}

	d.step("5. impostors are refused")
	a, b := sbs["demo-a"], sbs["demo-b"]
	out := d.tokenOnce(ctx, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath, a.Env)
	d.say("sandbox demo-b presenting demo-a's secret: %s", out)
	out = d.tokenOnce(ctx, "", d.hostNetns, a.Env)
	d.say("a host process (in no sandbox) presenting demo-a's secret: %s", out)

	d.step("6. done")
	for _, w := range d.watchers {
		w.Process.Kill()
		w.Wait()
	}
	for id := range sbs {
		api.Do(context.Background(), "DELETE", "/v1/sandboxes/"+id+"?kill=true", nil, nil)
	}
	d.daemon.Process.Signal(syscall.SIGTERM)
	d.daemon.Wait()
	d.say("sandboxes deleted, identityd stopped with SIGTERM; cleaning up the demo world")
	return nil
}

// startDaemon starts identityd in the demo world and returns how long it
// took to become ready (admin API answering; it opens after the rebuild).
func (d *demo) startDaemon(ctx context.Context) (time.Duration, error) {
	if err := os.MkdirAll(d.state, 0o700); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(filepath.Join(d.state, "daemon.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	d.daemon = exec.Command(d.self, "serve",
		"--state-dir", d.state, "--cgroup-parent", d.cgroups, "--bpf-dir", d.pins,
		"--admin-socket", d.admin, "--host-netns", d.hostNetns, "--netns-prefix", demoNetnsPrefix, "--subnet", "10.77.0.0/24",
		"--operator-listen", "", "--signing-alg", "EdDSA", "--issuer", "http://10.77.0.1:7123")
	d.daemon.Stdout, d.daemon.Stderr = logf, logf
	start := time.Now()
	if err := d.daemon.Start(); err != nil {
		return 0, fmt.Errorf("start identityd: %w", err)
	}
	exited := make(chan error, 1)
	go func() { _, err := d.daemon.Process.Wait(); exited <- err }()
	api := controllers.NewAdminClient(d.admin)
	for {
		if err := api.Do(ctx, "GET", "/v1/sandboxes", nil, nil); err == nil {
			return time.Since(start), nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-exited:
			return 0, fmt.Errorf("identityd exited during start; see %s", filepath.Join(d.state, "daemon.log"))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Since(start) > 30*time.Second {
			return 0, errors.New("identityd did not become ready within 30s")
		}
	}
}

// watch starts, inside the sandbox, a client fetching a token every second.
func (d *demo) watch(id string, c controllers.Created) error {
	cmd := d.inSandbox(c.Sandbox.CgroupPath, c.Sandbox.NetnsPath, c.Env,
		d.ctl, "token", "--decode", "--every", "1s", "--max-backoff", "500ms")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start client in %s: %w", id, err)
	}
	d.watchers = append(d.watchers, cmd)
	pump := func(r io.Reader, ok bool) {
		s := bufio.NewScanner(r)
		for s.Scan() {
			line := s.Text()
			if ok {
				line = summarize(line)
			} else if _, rest, found := strings.Cut(line, "identityctl: "); found {
				line = rest
			}
			d.events <- event{sandbox: id, ok: ok, line: line, at: time.Now()}
		}
	}
	go pump(stdout, true)
	go pump(stderr, false)
	return nil
}

// summarize shortens a decoded-claims line to what the demo is about.
func summarize(line string) string {
	_, js, _ := strings.Cut(line, " ")
	var c map[string]any
	if json.Unmarshal([]byte(js), &c) != nil {
		return line
	}
	return fmt.Sprintf("sub=%v sandbox_id=%v app=%v aud=%v jti=%v", c["sub"], c["sandbox_id"], c["app"], c["aud"], c["jti"])
}

// next waits for the sandbox's next success (or failure), dropping others.
func (d *demo) next(ctx context.Context, id string, ok bool, limit time.Duration) (event, error) {
	timeout := time.After(limit)
	var pending []event
	defer func() {
		for _, e := range pending {
			d.events <- e
		}
	}()
	for {
		select {
		case e := <-d.events:
			if e.sandbox == id && e.ok == ok {
				return e, nil
			}
			if e.sandbox != id {
				pending = append(pending, e)
			}
		case <-timeout:
			return event{}, fmt.Errorf("%s: no %v result within %s", id, map[bool]string{true: "successful", false: "failed"}[ok], limit)
		case <-ctx.Done():
			return event{}, ctx.Err()
		}
	}
}

func (d *demo) drain() {
	for {
		select {
		case <-d.events:
		default:
			return
		}
	}
}

// tokenOnce runs one token request in the given cgroup (none: the demo's
// own) and netns with env, and returns what it said.
func (d *demo) tokenOnce(ctx context.Context, cgroup, netnsPath string, env map[string]string) string {
	cmd := d.inSandbox(cgroup, netnsPath, env, d.ctl, "token", "--max-attempts", "1")
	out, err := cmd.CombinedOutput()
	text := strings.TrimSpace(string(out))
	if _, rest, ok := strings.Cut(text, "identityctl: "); ok {
		text = rest
	}
	if err == nil {
		return "ISSUED A TOKEN (this must not happen): " + text
	}
	return "refused, " + text
}

// inSandbox prepares a command that starts in cgroup (at clone time) and
// joins netnsPath before exec, with env added to its environment.
func (d *demo) inSandbox(cgroup, netnsPath string, env map[string]string, argv ...string) *exec.Cmd {
	cmd := exec.Command(d.ctl, append([]string{"__exec", "--netns", netnsPath, "--"}, argv...)...)
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if cgroup != "" {
		if f, err := os.Open(cgroup); err == nil {
			// The descriptor must stay open until Start; the process
			// exits soon enough for that not to matter.
			cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
		}
	}
	return cmd
}

// cleanup removes everything the demo makes, whatever state it is in.
func (d *demo) cleanup() {
	for _, w := range d.watchers {
		w.Process.Kill()
		w.Wait()
	}
	if d.daemon != nil && d.daemon.Process != nil {
		d.daemon.Process.Kill()
		d.daemon.Wait()
	}
	if err := errors.Join(cgroup2.Kill(d.cgroups), cgroup2.Remove(d.cgroups)); err != nil {
		d.say("cleanup: %v", err)
	}
	names, err := controllers.ListNetns(demoNetnsPrefix)
	if err != nil {
		d.say("cleanup: %v", err)
	}
	for _, name := range names {
		if err := netnsutil.DeleteNamed(name); err != nil {
			d.say("cleanup: %v", err)
		}
	}
	netnsutil.DeleteNamed(filepath.Base(d.hostNetns))
	bpf.Uninstall(context.Background(), bpf.Options{PinDir: d.pins})
	os.RemoveAll(d.state)
	os.RemoveAll(filepath.Dir(d.admin))
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
