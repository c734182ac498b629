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
}

// startServerProcess starts the server process for h's sandboxes and waits
// until it serves.
func startServerProcess(h *harness, alg string) (*serverProc, error) {
	spec := serversSpec{Router: h.router, Dir: h.dir, Alg: alg}
	for _, sb := range h.sandboxes {
		r := sb.created.Sandbox
		spec.Sandboxes = append(spec.Sandboxes, serverSandbox{Addr: sb.addr, ID: r.ID, App: r.App, Org: r.Org, Secret: sb.secret})
	}
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

func (p *serverProc) pid() int { return p.cmd.Process.Pid }

// profile has the server process write its CPU profile over d, from now,
// to file; it returns when the profile is written.
func (p *serverProc) profile(d time.Duration, file string) error {
	if _, err := fmt.Fprintf(p.stdin, "profile %d %s\n", d, file); err != nil {
		return fmt.Errorf("profile the server process: %w", err)
	}
	line, err := p.out.ReadString('\n')
	if err != nil {
		return fmt.Errorf("profile the server process: %w", err)
	}
	if line = strings.TrimSpace(line); line != "ok" {
		return fmt.Errorf("profile the server process: %s", line)
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
		var d time.Duration
		var file string
		if _, err := fmt.Sscanf(line, "profile %d %s", &d, &file); err != nil {
			fmt.Fprintf(os.Stdout, "unknown command %q\n", strings.TrimSpace(line))
			continue
		}
		fmt.Fprintln(os.Stdout, profileFor(d, file))
	}
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
