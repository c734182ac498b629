// Package netnsutil runs code inside network namespaces without letting the
// namespace leak into the rest of the process: each call gets a fresh OS
// thread that joins the namespace and dies with the call.
package netnsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Dir is where named network namespaces are bind-mounted, as iproute2 does.
const Dir = "/run/netns"

// Do runs f on a fresh OS thread that has joined the netns at path. Sockets
// f creates belong to that netns for good, wherever they are used later.
func Do(path string, f func() error) error {
	return onThread(func() error {
		ns, err := netns.GetFromPath(path)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", path, err)
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return f()
	})
}

// onThread runs f on a locked OS thread that is never handed back to the
// scheduler: Go ends a thread whose goroutine exits while locked, so
// namespace changes never reach other goroutines.
func onThread(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- f()
	}()
	return <-errc
}

// NewNamed creates a network namespace bind-mounted at Dir/name.
func NewNamed(name string) error {
	return onThread(func() error {
		ns, err := netns.NewNamed(name)
		if err != nil {
			return fmt.Errorf("create netns %s: %w", name, err)
		}
		return ns.Close()
	})
}

// DeleteNamed removes the bind mount of a named netns and its mount point;
// the namespace itself goes away with its last user. A mount point whose
// bind mount never happened (a create killed half way) is removed too.
func DeleteNamed(name string) error {
	p := filepath.Join(Dir, name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	return nil
}

// Handle returns a route-only netlink handle working inside the netns at
// path, or in the calling process's netns when path is empty. Route only:
// kernels without xfrm would refuse the default set of families.
func Handle(path string) (*netlink.Handle, error) {
	if path == "" {
		return netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	return h, nil
}

// Cookie reads SO_NETNS_COOKIE from a socket made inside the netns at path
// (Linux 5.14 or newer; before, through a BPF program, see cookieFromBPF).
// It is what the kernel's attribution reports.
func Cookie(path string) (uint64, error) {
	var cookie uint64
	err := Do(path, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if errors.Is(err, unix.ENOPROTOOPT) {
			cookie, err = cookieFromBPF()
		}
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("read netns cookie of %s: %w", path, err)
	}
	return cookie, nil
}

// ErrNotNetns means the path exists but is not a network namespace (for
// example the mount point left after the namespace was unmounted).
var ErrNotNetns = errors.New("not a network namespace")

// IsNetns reports whether path is a network namespace file.
func IsNetns(path string) bool { return CheckNetns(path) == nil }

// CheckNetns returns nil if path is a network namespace file. Otherwise the
// error says why: fs.ErrNotExist (wrapped) if nothing is there, ErrNotNetns
// if something else is, or the error that kept the check from finishing
// (EMFILE, ENOMEM, ...), which says nothing about the namespace.
func CheckNetns(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("check netns %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("check netns %s: %w", path, ErrNotNetns)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("check netns %s: %w", path, err)
	}
	defer unix.Close(fd)
	// NS_GET_NSTYPE answers CLONE_NEWNET for a network namespace.
	const nsGetNstype = 0xb703
	t, err := unix.IoctlRetInt(fd, nsGetNstype)
	if err != nil {
		return fmt.Errorf("check netns %s: namespace type: %w", path, err)
	}
	if t != unix.CLONE_NEWNET {
		return fmt.Errorf("check netns %s: another kind of namespace: %w", path, ErrNotNetns)
	}
	return nil
}
