package main

// Confinement of run's workload. Host root with the host's /proc could read
// any sandbox's secret from /proc/<pid>/environ, join its cgroup and netns,
// and be issued tokens naming it; so by default the workload runs as an
// unprivileged user with no capabilities and no_new_privs, in pid, mount and
// IPC namespaces of its own. os/exec cannot set no_new_privs or drop the
// bounding set, hence a shim: run re-executes identityctl (the hidden
// __init command) as the first process of the new namespaces; it mounts a
// fresh /proc, joins the sandbox's netns, drops what the workload must not
// have, then forks the workload and stays as its init, forwarding signals
// and passing its exit status on.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nobody is the default workload user, and its ids when the host's user
// database does not name it.
const (
	nobody    = "nobody"
	nobodyID  = 65534
	invalidID = ^uint32(0) // (uid_t)-1 means "unchanged" to the set*id calls
)

// forwardedSignals are the signals run passes on to its command, and the
// shim on to the workload.
var forwardedSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

// identity is the user and group the workload runs as; supplementary groups
// are always cleared.
type identity struct{ uid, gid uint32 }

// resolveUser reads --user (USER[:GROUP], names or numbers) against the
// host's user database. Empty means nobody (65534:65534 when the database
// has no nobody). A numeric user the database does not know gets the group
// of the same number. uid or gid 0 is refused: root without capabilities
// still owns the host's root-only files, the signing key among them.
func resolveUser(spec string) (identity, error) {
	if spec == "" {
		u, err := user.Lookup(nobody)
		if err != nil {
			return identity{nobodyID, nobodyID}, nil
		}
		return idsOf(u)
	}
	name, group, hasGroup := strings.Cut(spec, ":")
	var id identity
	switch n, err := parseID(name); {
	case name == "":
		return id, fmt.Errorf("--user %q: no user given", spec)
	case err == nil:
		id = identity{n, n}
		if u, err := user.LookupId(name); err == nil {
			if id, err = idsOf(u); err != nil {
				return id, fmt.Errorf("--user %q: %w", spec, err)
			}
		}
	default:
		u, err := user.Lookup(name)
		if err != nil {
			return id, fmt.Errorf("--user %q: %w", spec, err)
		}
		if id, err = idsOf(u); err != nil {
			return id, fmt.Errorf("--user %q: %w", spec, err)
		}
	}
	if hasGroup {
		n, err := parseID(group)
		if err != nil {
			g, lerr := user.LookupGroup(group)
			if lerr != nil {
				return id, fmt.Errorf("--user %q: %w", spec, lerr)
			}
			if n, err = parseID(g.Gid); err != nil {
				return id, fmt.Errorf("--user %q: group %s: %w", spec, group, err)
			}
		}
		id.gid = n
	}
	if id.uid == 0 || id.gid == 0 {
		return id, fmt.Errorf("--user %q is root (uid %d, gid %d): root owns the host's root-only files even without capabilities; use --privileged to run as host root", spec, id.uid, id.gid)
	}
	return id, nil
}

func idsOf(u *user.User) (identity, error) {
	uid, err := parseID(u.Uid)
	if err != nil {
		return identity{}, fmt.Errorf("user %s: %w", u.Username, err)
	}
	gid, err := parseID(u.Gid)
	if err != nil {
		return identity{}, fmt.Errorf("user %s: group: %w", u.Username, err)
	}
	return identity{uid, gid}, nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not a numeric id", s)
	}
	if uint32(n) == invalidID {
		return 0, fmt.Errorf("%s is not a valid id", s)
	}
	return uint32(n), nil
}

// confinedCloneFlags are the namespaces the shim is born into: a pid
// namespace (other processes' /proc entries, their environment among them,
// are out of sight and out of reach of kill and ptrace), a mount namespace
// for that namespace's own /proc, and an IPC namespace (System V IPC and
// POSIX message queues are otherwise shared by every process of a uid, and
// the default user is the same in every sandbox).
const confinedCloneFlags = syscall.CLONE_NEWPID | syscall.CLONE_NEWNS | syscall.CLONE_NEWIPC

type initCmd struct {
	Netns            string   `required:"" help:"Network namespace to join."`
	UID              uint32   `name:"uid" required:"" help:"User id of the workload."`
	GID              uint32   `name:"gid" required:"" help:"Group id of the workload."`
	Credentials      string   `help:"The sandbox's credentials directory on the host."`
	CredentialsMount string   `help:"Where to mount it, read-only, for the workload."`
	Cmd              []string `arg:"" passthrough:""`
}

// Run is the shim: pid 1 of the pid namespace run made for it, in the
// sandbox's cgroup since clone. It prepares the workload's world, forks the
// workload into it and reaps until the workload exits, then exits as it did
// (128+signal when a signal ended it, as run reports).
func (c *initCmd) Run() error {
	// First, so that a signal forwarded while the workload starts is kept
	// for it: pid 1 ignores signals it has no handler for.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwardedSignals...)

	argv := c.Cmd
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return errors.New("no command given")
	}
	if os.Getpid() != 1 {
		return errors.New("__init runs only as the first process of a new pid namespace (identityctl run starts it)")
	}
	if c.UID == 0 || c.GID == 0 || c.UID == invalidID || c.GID == invalidID {
		return fmt.Errorf("refusing to run the workload as %d:%d", c.UID, c.GID)
	}
	// Never unlocked: this thread's netns and credentials are changed for
	// the workload, which is forked from it; the runtime must not hand the
	// thread to anything else.
	runtime.LockOSThread()

	// Slave, not private: the daemon's later netns mounts and unmounts
	// still reach this namespace, while the /proc below stays here.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make the workload's mounts a slave of the host's: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc for the workload's pid namespace: %w", err)
	}
	if c.Credentials != "" {
		if err := mountCredentials(c.Credentials, c.CredentialsMount); err != nil {
			return err
		}
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		return err
	}
	ns, err := netns.GetFromPath(c.Netns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", c.Netns, err)
	}
	err = netns.Set(ns)
	ns.Close()
	if err != nil {
		return fmt.Errorf("enter netns %s: %w", c.Netns, err)
	}
	if err := dropPrivileges(); err != nil {
		return err
	}
	// The child inherits this thread's netns, no_new_privs, bounding and
	// inheritable sets; setgroups, setgid and setuid to non-zero ids then
	// clear its permitted, effective and ambient sets, and no_new_privs
	// keeps execve from granting any back (setuid bits, file caps).
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{0, 1, 2},
		Sys: &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: c.UID, Gid: c.GID, Groups: []uint32{}},
		},
	})
	if err != nil {
		return fmt.Errorf("start %s as %d:%d: %w", argv[0], c.UID, c.GID, err)
	}
	go func() {
		for s := range sigs {
			syscall.Kill(pid, s.(syscall.Signal))
		}
	}()
	if code := reap(pid); code != 0 {
		return exitCode(code)
	}
	return nil
}

// mountCredentials binds the sandbox's credentials directory at target in
// this mount namespace, read-only: the directory itself, so that the files
// identityd replaces by rename are seen replaced. The mount point is made
// on the host if missing (an empty directory; the mount stays here).
func mountCredentials(dir, target string) error {
	if !filepath.IsAbs(target) {
		return fmt.Errorf("credentials mount %q is not an absolute path", target)
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("make the credentials mount point: %w", err)
	}
	if err := unix.Mount(dir, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("mount the credentials directory %s at %s: %w", dir, target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		return fmt.Errorf("make the credentials mount %s read-only: %w", target, err)
	}
	return nil
}

// dropPrivileges sets no_new_privs and empties the bounding, ambient and
// inheritable sets of the calling thread. Permitted and effective stay: the
// child still needs CAP_SETUID and CAP_SETGID to become the workload user.
func dropPrivileges() error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set no_new_privs: %w", err)
	}
	dropped := 0
	for c := 0; ; c++ {
		err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0)
		if errors.Is(err, unix.EINVAL) { // past the kernel's last capability
			break
		}
		if err != nil {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
		dropped++
	}
	if dropped == 0 {
		return errors.New("drop the bounding set: the kernel knows no capabilities")
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear the ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	data[0].Inheritable, data[1].Inheritable = 0, 0
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("clear the inheritable capabilities: %w", err)
	}
	return nil
}

// reap waits for children until pid exits, reaping orphans the workload
// leaves (the shim is their init), and returns pid's exit status.
func reap(pid int) int {
	for {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			// ECHILD: the workload is gone without a status we saw.
			fmt.Fprintf(os.Stderr, "identityctl: wait for the workload: %v\n", err)
			return 1
		}
		if got != pid {
			continue
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}
