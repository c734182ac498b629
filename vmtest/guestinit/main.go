// Command guestinit is /init of the vmtest guest. It mounts the filesystems
// the kernel tests need (cgroup2 as a pure v2 hierarchy at /sys/fs/cgroup,
// bpffs at /sys/fs/bpf), loads kernel modules, brings lo up, runs each test
// binary from the manifest between console markers, and powers off.
//
// It must not import github.com/cilium/ebpf: that package reads
// /proc/self/mountinfo when it initialises, before main could mount /proc.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/vmtest"
)

func main() {
	err := run()
	if errors.Is(err, errPanic) {
		// Returning from init panics the kernel.
		os.Exit(1)
	}
	if err != nil {
		fmt.Printf("%s%v\n", vmtest.MarkerError, err)
	}
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		fmt.Printf("%spower off: %v\n", vmtest.MarkerError, err)
	}
	select {}
}

var errPanic = errors.New("panic requested")

func run() error {
	mounts := []struct{ src, dst, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", ""},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", ""},
		{"bpf", "/sys/fs/bpf", "bpf", "mode=0700"},
		{"tmpfs", "/tmp", "tmpfs", "mode=1777"},
		{"tmpfs", "/run", "tmpfs", "mode=0755"},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}

	raw, err := os.ReadFile(vmtest.ManifestPath)
	if err != nil {
		return err
	}
	var man vmtest.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		return fmt.Errorf("parse manifest: %w", err)
	}
	if man.Panic {
		return errPanic
	}

	for _, mod := range man.Modules {
		if err := loadModule(mod); err != nil {
			return err
		}
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring lo up: %w", err)
	}

	// The host programs (guestPrograms) keep their host paths.
	env := append([]string{"PATH=/bin:/usr/sbin:/usr/bin", "HOME=/root", "TMPDIR=/tmp"}, man.Env...)
	for _, t := range man.Tests {
		fmt.Printf("%s%s\n", vmtest.MarkerBegin, t.Name)
		cmd := exec.Command(t.Path, append([]string{"-test.v"}, t.Args...)...)
		cmd.Stdout, cmd.Stderr, cmd.Env, cmd.Dir = os.Stdout, os.Stdout, append(slices.Clone(env), t.Env...), "/tmp"
		code := 0
		if err := cmd.Run(); err != nil {
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				fmt.Printf("run %s: %v\n", t.Path, err)
				code = 127
			} else {
				code = exit.ExitCode()
			}
		}
		fmt.Printf("%s%s exit=%d\n", vmtest.MarkerEnd, t.Name, code)
	}
	fmt.Println(vmtest.MarkerDone)
	return nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open module: %w", err)
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("load module %s: %w", strings.TrimSuffix(path, ".ko"), err)
	}
	return nil
}
