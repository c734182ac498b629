package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Capability bits, from linux/capability.h.
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// checkPrivileges fails early, and by name, when the process cannot load
// and attach cgroup programs.
func checkPrivileges() error {
	eff, err := effectiveCaps()
	if err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	has := func(c uint) bool { return eff&(1<<c) != 0 }
	var missing []string
	if !has(capBPF) && !has(capSysAdmin) {
		missing = append(missing, "CAP_BPF")
	}
	// Reading the socket's cgroup through BTF pointers is a perfmon
	// privilege for the verifier.
	if !has(capPerfmon) && !has(capSysAdmin) {
		missing = append(missing, "CAP_PERFMON")
	}
	if !has(capNetAdmin) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	if len(missing) > 0 {
		return fmt.Errorf("loading the attribution programs needs root with %s (running as uid %d without)",
			joinAnd(missing), os.Geteuid())
	}
	return nil
}

// raiseMemlock lifts RLIMIT_MEMLOCK on kernels that charge BPF maps and
// programs to it (before 5.11, when memory cgroups took over); the default
// limit of a service or a fresh init is far below what the maps take, and
// every map creation would fail with EPERM. Elsewhere it changes nothing.
func raiseMemlock() error {
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%s, and raising it failed (needs CAP_SYS_RESOURCE, or start the daemon with the limit already unlimited, e.g. systemd's LimitMEMLOCK=infinity): %w", memlockCharged, err)
	}
	return nil
}

const memlockCharged = "this kernel charges BPF memory to RLIMIT_MEMLOCK (Linux before 5.11)"

// fitToKernel sets the programs' read-only globals that choose between what
// different kernels offer.
func fitToKernel(spec *ebpf.CollectionSpec) error {
	has := uint32(1)
	err := features.HaveProgramHelper(ebpf.SockOps, asm.FnGetNetnsCookie)
	switch {
	case errors.Is(err, ebpf.ErrNotSupported):
		has = 0
	case err != nil:
		return diagnose(fmt.Errorf("probe bpf_get_netns_cookie in sockops: %w", err))
	}
	if err := spec.Variables[attribVarSockopsHasNetnsCookie].Set(has); err != nil {
		return fmt.Errorf("set %s: %w", attribVarSockopsHasNetnsCookie, err)
	}
	return nil
}

// joinAnd joins ["a", "b", "c"] as "a, b and c".
func joinAnd(items []string) string {
	if len(items) < 2 {
		return strings.Join(items, "")
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}

func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	if err := s.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

// requirement is one kernel feature the programs depend on.
type requirement struct {
	what  string // as an operator would search for it
	since string // first upstream release with it
	probe func() error
}

func requirements() []requirement {
	helper := func(pt ebpf.ProgramType, fn asm.BuiltinFunc) func() error {
		return func() error { return features.HaveProgramHelper(pt, fn) }
	}
	return []requirement{
		{"kernel BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)", "5.4", func() error {
			_, err := btf.LoadKernelSpec()
			return err
		}},
		// Before, the socket's cgroup shared a word with net_cls and net_prio
		// data, and hybrid hosts could lose it to the root.
		{"a cgroup pointer of its own in struct sock_cgroup_data", "5.15, or a 5.10 stable update that has it,", sockCgroupPointer},
		// Before 5.15 sockops reads the cookie from struct net (see attrib.c),
		// which the connect programs make sure is assigned.
		{"bpf_get_netns_cookie in cgroup/connect", "5.7", helper(ebpf.CGroupSockAddr, asm.FnGetNetnsCookie)},
		// The user space side reads cookies with SO_NETNS_COOKIE (5.14) or,
		// before, with a cgroup/sock_create program (internal/netnsutil).
		{"bpf_get_netns_cookie in cgroup/sock_create", "5.7", helper(ebpf.CGroupSock, asm.FnGetNetnsCookie)},
		{"sockops programs", "4.13", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"cgroup/connect4 and connect6 programs", "4.17", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
		{"LRU hash maps", "4.10", func() error { return features.HaveMapType(ebpf.LRUHash) }},
		{"socket local storage (BPF_MAP_TYPE_SK_STORAGE)", "5.2", func() error { return features.HaveMapType(ebpf.SkStorage) }},
		{"bpf_skc_to_tcp_sock in sockops", "5.9", helper(ebpf.SockOps, asm.FnSkcToTcpSock)},
		{"bpf_sk_storage_get in sockops", "5.2", helper(ebpf.SockOps, asm.FnSkStorageGet)},
		{"bpf_ktime_get_boot_ns in sockops", "5.8", helper(ebpf.SockOps, asm.FnKtimeGetBootNs)},
		{"bpf_get_socket_cookie in sockops", "5.1", helper(ebpf.SockOps, asm.FnGetSocketCookie)},
		{"bpf_sock_ops_cb_flags_set in sockops", "4.16", helper(ebpf.SockOps, asm.FnSockOpsCbFlagsSet)},
		{"bpf_sk_storage_get in cgroup/connect", "", helper(ebpf.CGroupSockAddr, asm.FnSkStorageGet)},
		{"bpf_get_current_pid_tgid in cgroup/connect", "", helper(ebpf.CGroupSockAddr, asm.FnGetCurrentPidTgid)},
		// Link-local endpoints: the connect programs read the socket's
		// cgroup as sockops does, and getpeername hooks (5.8) report the
		// address a redirected socket named.
		{"bpf_skc_to_tcp_sock in cgroup/connect", "", helper(ebpf.CGroupSockAddr, asm.FnSkcToTcpSock)},
	}
}

// sockCgroupPointer checks the kernel's BTF for the pointer of its own that
// struct sock_cgroup_data has since 5.15 (and in later 5.10 stable kernels).
func sockCgroupPointer() error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return err
	}
	var data *btf.Struct
	if err := spec.TypeByName("sock_cgroup_data", &data); err != nil {
		return err
	}
	for _, m := range data.Members {
		if m.Name == "cgroup" {
			return nil
		}
	}
	return errors.New("struct sock_cgroup_data has no cgroup member")
}

// diagnose turns a load or attach failure into one that names the cause: a
// missing privilege, or the first kernel feature the programs need that this
// kernel lacks. Unexplained errors are returned unchanged.
func diagnose(err error) error { return diagnoseWith(err, requirements()) }

// diagnoseWith is diagnose against a given list of requirements (tests).
func diagnoseWith(err error, reqs []requirement) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w (needs root with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, and no lockdown or seccomp policy forbidding bpf())", err)
	}
	var uname unix.Utsname
	release := "unknown"
	if unix.Uname(&uname) == nil {
		release = unix.ByteSliceToString(uname.Release[:])
	}
	for _, r := range reqs {
		if perr := r.probe(); perr != nil {
			if r.since == "" {
				return fmt.Errorf("kernel %s is too old: it lacks %s (present in Linux 5.10): %w", release, r.what, err)
			}
			return fmt.Errorf("kernel %s is too old: it lacks %s (Linux %s or newer): %w", release, r.what, r.since, err)
		}
	}
	if errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("kernel %s lacks bpf_link for cgroup programs (Linux 5.7 or newer): %w", release, err)
	}
	return err
}
