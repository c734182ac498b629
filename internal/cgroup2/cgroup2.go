// Package cgroup2 finds the cgroup v2 hierarchy, names cgroups the way the
// kernel's BPF helpers do, and kills and removes cgroup trees.
//
// A cgroup v2 id, as returned by bpf_get_current_cgroup_id, is the inode
// number of the cgroup's directory in the cgroup2 filesystem. On a pure v2
// host the hierarchy is mounted at /sys/fs/cgroup; on a hybrid v1/v2 host it
// usually sits at /sys/fs/cgroup/unified. Both are found through the mount
// table rather than assumed.
package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNoCgroup2 is returned when no cgroup2 filesystem is mounted.
var ErrNoCgroup2 = errors.New("no cgroup2 filesystem is mounted (cgroup v2 is required)")

// Root returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mounts.
func Root() (string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	return rootFrom(f)
}

func rootFrom(r io.Reader) (string, error) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return unescapeMount(fields[1]), nil
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read mount table: %w", err)
	}
	return "", ErrNoCgroup2
}

// unescapeMount undoes the octal escapes (\040 for a space, ...) that the
// kernel applies to paths in the mount table.
func unescapeMount(p string) string {
	if !strings.Contains(p, `\`) {
		return p
	}
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if p[i] == '\\' && i+4 <= len(p) {
			if v, ok := octal(p[i+1 : i+4]); ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(p[i])
	}
	return b.String()
}

func octal(s string) (byte, bool) {
	if len(s) != 3 {
		return 0, false
	}
	var v int
	for _, c := range s {
		if c < '0' || c > '7' {
			return 0, false
		}
		v = v*8 + int(c-'0')
	}
	if v > 255 {
		return 0, false
	}
	return byte(v), true
}

// ID returns the cgroup v2 id of the cgroup directory at path: its inode
// number, which is what the kernel's cgroup id helpers report.
func ID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return 0, fmt.Errorf("cgroup %s: %w", path, unix.ENOTDIR)
	}
	return st.Ino, nil
}

// IsCgroup2 reports whether path lies on a cgroup2 filesystem.
func IsCgroup2(path string) (bool, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return fs.Type == unix.CGROUP2_SUPER_MAGIC, nil
}

// Within reports whether path is root or lies below it, lexically.
func Within(root, path string) bool {
	rel, err := filepath.Rel(filepath.Clean(root), filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// Enter moves the process pid into the cgroup directory at path.
func Enter(path string, pid int) error {
	procs := filepath.Join(path, "cgroup.procs")
	if err := os.WriteFile(procs, []byte(fmt.Sprintf("%d\n", pid)), 0); err != nil {
		return fmt.Errorf("move pid %d into cgroup %s: %w", pid, path, err)
	}
	return nil
}

// Populated reports whether any task runs in the cgroup at dir or below it
// (the populated field of its cgroup.events).
func Populated(dir string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("read events of cgroup %s: %w", dir, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v == "1", nil
		}
	}
	return false, fmt.Errorf("cgroup %s: no populated field in cgroup.events", dir)
}

// killWait bounds how long Kill waits for killed tasks to be gone.
const killWait = 5 * time.Second

// Kill kills every task in the cgroup at dir and below it, and waits
// (a few seconds at most) until none is left. It writes cgroup.kill (Linux
// 5.14), which also catches tasks forking meanwhile; on older kernels it
// sends SIGKILL to each pid of every cgroup.procs in the tree, round after
// round until the tree is empty. A cgroup that does not exist has nothing
// to kill.
func Kill(dir string) error { return kill(dir, true) }

// kill is Kill; with useKillFile unset it goes straight to the signals of
// older kernels (tests).
func kill(dir string, useKillFile bool) error {
	busy, err := Populated(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil || !busy {
		return err
	}
	signals := !useKillFile
	if useKillFile {
		err := writeKill(dir)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			signals = true // no cgroup.kill before Linux 5.14
		case err != nil:
			return err
		}
	}
	for deadline := time.Now().Add(killWait); ; {
		if signals {
			if err := signalTree(dir); err != nil {
				return err
			}
		}
		busy, err := Populated(dir)
		if errors.Is(err, fs.ErrNotExist) || err == nil && !busy {
			return nil
		}
		if err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kill cgroup %s: tasks still running %s after SIGKILL", dir, killWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func writeKill(dir string) error {
	f, err := os.OpenFile(filepath.Join(dir, "cgroup.kill"), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("kill cgroup %s: %w", dir, err)
	}
	defer f.Close()
	if _, err := f.WriteString("1"); err != nil {
		return fmt.Errorf("kill cgroup %s: %w", dir, err)
	}
	return nil
}

// signalTree sends SIGKILL to every task of the cgroups at and below dir.
func signalTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // removed meanwhile
		}
		if err != nil {
			return fmt.Errorf("kill cgroup %s: %w", dir, err)
		}
		if !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("kill cgroup %s: %w", p, err)
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
				unix.Kill(pid, unix.SIGKILL) // ESRCH: exited meanwhile
			}
		}
		return nil
	})
}

// Remove removes the cgroup at dir and every cgroup below it, deepest
// first. A cgroup in which tasks still run cannot be removed (EBUSY): Kill
// them first. A cgroup that does not exist is already removed.
func Remove(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := Remove(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("remove cgroup %s: tasks are still running in it: %w", dir, err)
		}
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	return nil
}
