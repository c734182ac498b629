// Package cgroup2 finds the cgroup v2 hierarchy and names cgroups the way the
// kernel's BPF helpers do.
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
	"os"
	"path/filepath"
	"strings"

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
