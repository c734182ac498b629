package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"github.com/identityd/identityd/internal/daemon"
)

// serversSpec is what the server process needs: where to listen, keys, and
// the sandboxes the baseline knows by source address.
type serversSpec struct {
	Router    netip.Addr      `json:"router"`
	Dir       string          `json:"dir"`
	Alg       string          `json:"alg"`
	Sandboxes []serverSandbox `json:"sandboxes"`
}

type serverSandbox struct {
	Addr   netip.Addr `json:"addr"`
	ID     string     `json:"id"`
	App    string     `json:"app"`
	Org    string     `json:"org"`
	Secret string     `json:"secret"`
}

// serverProc is the baseline and the bare handler, run in a process of
// their own in the world's host netns, as identityd runs in its own: neither
// side shares a process (its scheduler, its heap, the clients' reports this
// one reads) with what it is compared to.
type serverProc struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	out      *bufio.Reader
	tokenLen int
	// mu keeps one command and its reply together.
	mu sync.Mutex
}

// startServerProcess starts the server process for h's sandboxes and waits
// until it serves.
func startServerProcess(h *harness, alg string) (*serverProc, error) {
	spec := serversSpec{Router: h.router, Dir: h.dir, Alg: alg, Sandboxes: serverSandboxes(h.sandboxes)}
	cmd, stdin, out, err := startInNetns(h.self, "__servers", h.world.HostNetns, nil)
	if err != nil {
		return nil, fmt.Errorf("start the server process: %w", err)
	}
	p := &serverProc{cmd: cmd, stdin: stdin, out: out}
	if err := json.NewEncoder(stdin).Encode(spec); err != nil {
		p.close()
		return nil, fmt.Errorf("server process: %w", err)
	}
	var ready struct {
		TokenLen int    `json:"token_bytes"`
		Error    string `json:"error"`
	}
	line, err := p.out.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &ready)
	}
	if err == nil && ready.Error != "" {
		err = errors.New(ready.Error)
	}
	if err != nil {
		p.close()
		return nil, fmt.Errorf("server process: %w", err)
	}
	p.tokenLen = ready.TokenLen
	return p, nil
}

// serverSandboxes is what the baseline knows of sbs.
func serverSandboxes(sbs []*benchSandbox) []serverSandbox {
	out := make([]serverSandbox, 0, len(sbs))
	for _, sb := range sbs {
		r := sb.created.Sandbox
		out = append(out, serverSandbox{Addr: sb.addr, ID: r.ID, App: r.App, Org: r.Org, Secret: sb.secret})
	}
	return out
}

func (p *serverProc) pid() int { return p.cmd.Process.Pid }

// profile has the server process write its CPU profile over d, from now,
// to file; it returns when the profile is written.
func (p *serverProc) profile(d time.Duration, file string) error {
	if err := p.do(fmt.Sprintf("profile %d %s", d, file)); err != nil {
		return fmt.Errorf("profile the server process: %w", err)
	}
	return nil
}

// add tells the baseline of sandboxes made after it started.
func (p *serverProc) add(sbs []*benchSandbox) error {
	b, err := json.Marshal(serverSandboxes(sbs))
	if err != nil {
		return err
	}
	if err := p.do("add " + string(b)); err != nil {
		return fmt.Errorf("tell the baseline of new sandboxes: %w", err)
	}
	return nil
}

// drop tells the baseline of sandboxes deleted.
func (p *serverProc) drop(sbs []*benchSandbox) error {
	ids := make([]string, 0, len(sbs))
	for _, sb := range sbs {
		ids = append(ids, sb.created.Sandbox.ID)
	}
	b, err := json.Marshal(ids)
	if err != nil {
		return err
	}
	if err := p.do("drop " + string(b)); err != nil {
		return fmt.Errorf("tell the baseline of deleted sandboxes: %w", err)
	}
	return nil
}

// do sends one command line and waits for its "ok". One caller at a time:
// the benchmark's main goroutine, or a profile it waits for.
func (p *serverProc) do(line string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := fmt.Fprintln(p.stdin, line); err != nil {
		return err
	}
	reply, err := p.out.ReadString('\n')
	if err != nil {
		return err
	}
	if reply = strings.TrimSpace(reply); reply != "ok" {
		return errors.New(reply)
	}
	return nil
}

// close stops the server process: its stdin closing is its signal.
func (p *serverProc) close() {
	p.stdin.Close()
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

// serversCmd is the server process: re-executed into the world's host
// netns, it serves until its stdin closes.
type serversCmd struct{}

func (serversCmd) Run() error {
	// The same server as identityd's, collected as identityd's is.
	go daemon.TuneGC(context.Background())
	in := bufio.NewReader(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	var spec serversSpec
	line, err := in.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &spec)
	}
	var srv *servers
	if err == nil {
		srv, err = startServers(spec)
	}
	if err != nil {
		out.Encode(map[string]string{"error": err.Error()})
		return err
	}
	defer srv.close()
	out.Encode(map[string]int{"token_bytes": srv.tokenLen})
	for {
		line, err := in.ReadString('\n')
		if err != nil {
			return nil // stdin closed: the benchmark is done, or gone
		}
		fmt.Fprintln(os.Stdout, srv.command(strings.TrimSpace(line)))
	}
}

// command carries out one line from the benchmark and says "ok" or why
// not: "profile DURATION FILE", "add [serverSandbox...]" (JSON) or "drop
// [id...]" (JSON).
func (s *servers) command(line string) string {
	verb, arg, _ := strings.Cut(line, " ")
	switch verb {
	case "profile":
		var d time.Duration
		var file string
		if _, err := fmt.Sscanf(arg, "%d %s", &d, &file); err != nil {
			return fmt.Sprintf("bad profile command %q: %v", line, err)
		}
		return profileFor(d, file)
	case "add":
		var sbs []serverSandbox
		if err := json.Unmarshal([]byte(arg), &sbs); err != nil {
			return fmt.Sprintf("bad add command: %v", err)
		}
		s.known.add(sbs)
		return "ok"
	case "drop":
		var ids []string
		if err := json.Unmarshal([]byte(arg), &ids); err != nil {
			return fmt.Sprintf("bad drop command: %v", err)
		}
		s.known.drop(ids)
		return "ok"
	}
	return fmt.Sprintf("unknown command %q", line)
}

// profileFor writes this process's CPU profile over d to file, and says
// "ok" or why not.
func profileFor(d time.Duration, file string) string {
	f, err := os.Create(file)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		return err.Error()
	}
	time.Sleep(d)
	pprof.StopCPUProfile()
	return "ok"
}
