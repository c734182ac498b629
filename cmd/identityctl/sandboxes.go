package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netns"

	"github.com/identityd/identityd/controllers"
)

// exitCode carries a child's exit status out of Run.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func asExit(err error, out *exitCode) bool { return errors.As(err, out) }

type runCmd struct {
	App  string `required:"" help:"App name (the token's app claim)."`
	Org  string `help:"Organisation (the token's organization_id claim)."`
	ID   string `help:"Sandbox id (generated if empty)."`
	Keep bool   `help:"Keep the sandbox after the command exits."`
	User string `placeholder:"USER[:GROUP]" help:"Run the command as this user and group (names or numbers; default nobody, 65534:65534 if there is none), without supplementary groups or capabilities, with no_new_privs, in pid, mount and IPC namespaces of its own."`
	// Privileged is how run started commands before confinement, kept for
	// trusted commands that need the host.
	Privileged bool     `help:"Run the command as host root with every capability, in the host's pid and mount namespaces. It can then read other sandboxes' secrets from /proc/<pid>/environ, join their cgroups and netns, and get tokens naming them: only for commands trusted as much as root."`
	Cmd        []string `arg:"" passthrough:"" help:"Command and arguments."`
}

// Run creates the sandbox, then starts the command in its cgroup (at clone
// time) and its netns (joined before exec), with the identity environment,
// confined unless --privileged. The command does not depend on identityd
// staying up.
func (r *runCmd) Run(ctx context.Context, c *cli) error {
	// Resolved before the sandbox exists, so a bad --user leaves nothing.
	var as *identity
	switch {
	case r.Privileged && r.User != "":
		return errors.New("--user and --privileged exclude each other: --privileged runs the command as host root")
	case !r.Privileged:
		id, err := resolveUser(r.User)
		if err != nil {
			return err
		}
		as = &id
	}
	api := c.admin()
	var created controllers.Created
	req := controllers.CreateRequest{ID: r.ID, App: r.App, Org: r.Org}
	if as != nil {
		req.Group = as.gid // the credentials files are the workload's to read
	}
	if err := api.Do(ctx, "POST", "/v1/sandboxes", req, &created); err != nil {
		return err
	}
	sb := created.Sandbox
	fmt.Fprintf(os.Stderr, "identityctl: sandbox %s (cgroup %s, netns %s)\n", sb.ID, sb.CgroupPath, sb.NetnsPath)
	code, err := runIn(sb, created.Env, created.Credentials, r.Cmd, as)
	if !r.Keep {
		// The command is gone, but its children may linger: kill them.
		if derr := api.Do(context.Background(), "DELETE", "/v1/sandboxes/"+sb.ID+"?kill=true", nil, nil); derr != nil {
			err = errors.Join(err, fmt.Errorf("delete sandbox %s: %w", sb.ID, derr))
		}
	}
	if err != nil {
		return err
	}
	if code != 0 {
		return exitCode(code)
	}
	return nil
}

// runIn runs argv in the sandbox and returns its exit status. With as, the
// command is confined (see confine.go) and runs as that user, with the
// credentials directory mounted where its environment says; without, it
// runs as host root in the host's pid and mount namespaces, and its
// environment names the credentials files where they are on the host.
func runIn(sb controllers.Record, env map[string]string, creds *controllers.Credentials, argv []string, as *identity) (int, error) {
	if len(argv) == 0 {
		return 0, errors.New("no command given")
	}
	if argv[0] == "--" {
		argv = argv[1:]
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cg, err := os.Open(sb.CgroupPath)
	if err != nil {
		return 0, fmt.Errorf("open sandbox cgroup: %w", err)
	}
	defer cg.Close()
	attr := &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	shim := []string{"__exec", "--netns", sb.NetnsPath}
	if as != nil {
		shim = []string{"__init", "--netns", sb.NetnsPath, "--uid", fmt.Sprint(as.uid), "--gid", fmt.Sprint(as.gid)}
		if creds != nil {
			shim = append(shim, "--credentials", creds.Dir, "--credentials-mount", creds.Mount)
		}
		attr.Cloneflags = confinedCloneFlags
	} else if creds != nil {
		env = hostCredentialPaths(env, creds)
	}
	cmd := exec.Command(self, append(append(shim, "--"), argv...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.SysProcAttr = attr
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s in sandbox: %w", argv[0], err)
	}
	// Forward signals to the command; its exit decides ours.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, forwardedSignals...)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	return 0, err
}

// hostCredentialPaths returns env with the credentials files named where
// they are on the host, for a command that does not get the mount.
func hostCredentialPaths(env map[string]string, creds *controllers.Credentials) map[string]string {
	out := make(map[string]string, len(env))
	for k, v := range env {
		if rest, ok := strings.CutPrefix(v, creds.Mount+"/"); ok {
			v = filepath.Join(creds.Dir, rest)
		}
		out[k] = v
	}
	return out
}

type execCmd struct {
	Netns string   `required:"" help:"Network namespace to join."`
	Cmd   []string `arg:"" passthrough:""`
}

// Run joins the netns on this thread and execs the command: the new image
// starts inside the netns, before it makes any socket.
func (e *execCmd) Run() error {
	argv := e.Cmd
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return errors.New("no command given")
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return err
	}
	runtime.LockOSThread()
	ns, err := netns.GetFromPath(e.Netns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", e.Netns, err)
	}
	if err := netns.Set(ns); err != nil {
		return fmt.Errorf("enter netns %s: %w", e.Netns, err)
	}
	return syscall.Exec(path, argv, os.Environ())
}

type lsCmd struct {
	Output string `short:"o" default:"table" enum:"table,json" help:"table or json."`
}

func (l *lsCmd) Run(ctx context.Context, c *cli) error {
	var recs []controllers.Record
	if err := c.admin().Do(ctx, "GET", "/v1/sandboxes", nil, &recs); err != nil {
		return err
	}
	if l.Output == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(recs)
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].ID < recs[j].ID })
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tAPP\tORG\tOWNED\tADDRESS\tCGROUP\tNETNS\tCREATED")
	for _, r := range recs {
		var addrs []string
		for _, a := range r.Addresses {
			addrs = append(addrs, a.Addr().String())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\t%s\t%s\t%s\n", r.ID, r.App, dash(r.Org), r.Owned,
			dash(strings.Join(addrs, ",")), dash(r.CgroupPath), dash(r.NetnsPath), r.Created.Format("2006-01-02 15:04:05"))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

type rmCmd struct {
	ID   string `arg:"" help:"Sandbox id."`
	Kill bool   `default:"true" negatable:"" help:"Kill tasks still running in the sandbox (--no-kill refuses instead)."`
}

func (r *rmCmd) Run(ctx context.Context, c *cli) error {
	return c.admin().Do(ctx, "DELETE", fmt.Sprintf("/v1/sandboxes/%s?kill=%v", r.ID, r.Kill), nil, nil)
}

type adoptCmd struct {
	App        string `required:"" help:"App name."`
	Org        string `help:"Organisation."`
	ID         string `help:"Sandbox id (generated if empty)."`
	Cgroup     string `help:"Existing cgroup (path under the cgroup2 root)."`
	Netns      string `help:"Existing network namespace (path)."`
	Group      uint32 `help:"Host group id that may read the credentials files: the workload's group as the host sees it (default 0, root only)."`
	CredsMount string `name:"credentials-mount" help:"Where the sandbox's runtime mounts the credentials directory inside it (default: identityd's --credentials-mount)."`
	Output     string `short:"o" default:"env" enum:"env,json" help:"env (the environment, then the mount on stderr) or json."`
}

func (a *adoptCmd) Run(ctx context.Context, c *cli) error {
	var created controllers.Created
	if err := c.admin().Do(ctx, "POST", "/v1/sandboxes/adopt", controllers.AdoptRequest{
		ID: a.ID, App: a.App, Org: a.Org, CgroupPath: a.Cgroup, NetnsPath: a.Netns,
		Group: a.Group, CredentialsMount: a.CredsMount,
	}, &created); err != nil {
		return err
	}
	if a.Output == "json" {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(created)
	}
	if cr := created.Credentials; cr != nil {
		// A directory, not its files: a rename in a bind-mounted
		// directory is seen inside, a bind-mounted file never changes.
		fmt.Fprintf(os.Stderr, "identityctl: bind-mount the directory %s at %s in the sandbox, read-only (for example: mount --bind %s %s, then mount -o remount,bind,ro %s)\n",
			cr.Dir, cr.Mount, cr.Dir, cr.Mount, cr.Mount)
	}
	keys := make([]string, 0, len(created.Env))
	for k := range created.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("%s=%s\n", k, created.Env[k])
	}
	return nil
}

type rotateKeyCmd struct {
	Now bool `help:"Emergency rotation (a key believed compromised): the new key signs at once instead of after the publish delay. Verifiers that cached the JWKS and do not refetch it on an unknown kid reject the new tokens until their cache expires."`
}

func (r rotateKeyCmd) Run(ctx context.Context, c *cli) error {
	// The fields of tokenserver.KeyStatus the CLI shows.
	var status struct {
		Keys []struct {
			KeyID     string     `json:"kid"`
			Algorithm string     `json:"alg"`
			State     string     `json:"state"`
			SignsFrom time.Time  `json:"signs_from"`
			Retired   *time.Time `json:"retired"`
		} `json:"keys"`
	}
	if err := c.admin().Do(ctx, "POST", "/v1/keys/rotate?now="+strconv.FormatBool(r.Now), nil, &status); err != nil {
		return err
	}
	fmt.Println("published keys:")
	for _, k := range status.Keys {
		line := fmt.Sprintf("  %-7s %s %s", k.State, k.Algorithm, k.KeyID)
		switch {
		case k.State == "next":
			line += " signs from " + k.SignsFrom.Local().Format(time.RFC3339)
		case k.Retired != nil:
			line += " retired " + k.Retired.Local().Format(time.RFC3339)
		}
		fmt.Println(line)
	}
	return nil
}

type fsckCmd struct {
	StateDir     string `default:"/var/lib/identityd" env:"IDENTITYD_STATE_DIR" help:"identityd's state directory."`
	CgroupParent string `env:"IDENTITYD_CGROUP_PARENT" help:"Parent of sandbox cgroups (default <cgroup2 root>/identityd)."`
	NetnsPrefix  string `default:"${default_netns_prefix}" env:"IDENTITYD_NETNS_PREFIX" help:"The instance's netns prefix (identityd serve --netns-prefix): only named netns with it are checked."`
}

// Run checks records, secrets, cgroups and netns against each other, and
// exits 1 when anything disagrees.
func (f *fsckCmd) Run() error {
	problems, err := controllers.Fsck(controllers.Config{StateDir: f.StateDir, CgroupParent: f.CgroupParent, NetnsPrefix: f.NetnsPrefix})
	if err != nil {
		return err
	}
	for _, p := range problems {
		fmt.Println(p)
	}
	if len(problems) > 0 {
		return exitCode(1)
	}
	fmt.Println("consistent")
	return nil
}

type rotateCmd struct {
	ID             string `arg:"" help:"Sandbox id."`
	RevokePrevious bool   `help:"Stop accepting the replaced secret at once (a secret believed leaked): processes that read the secret only from their environment, or that cached it, are refused until they read the new file."`
}

func (r *rotateCmd) Run(ctx context.Context, c *cli) error {
	var st struct {
		Issued        time.Time `json:"issued"`
		PreviousUntil time.Time `json:"previous_until"`
	}
	if err := c.admin().Do(ctx, "POST", "/v1/sandboxes/"+r.ID+"/rotate", controllers.RotateRequest{RevokePrevious: r.RevokePrevious}, &st); err != nil {
		return err
	}
	if st.PreviousUntil.IsZero() {
		fmt.Printf("sandbox %s: secret rotated; the previous one is no longer accepted\n", r.ID)
		return nil
	}
	fmt.Printf("sandbox %s: secret rotated; the previous one is accepted until %s\n", r.ID, st.PreviousUntil.UTC().Format(time.RFC3339))
	return nil
}
