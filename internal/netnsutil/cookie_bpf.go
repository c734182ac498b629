package netnsutil

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
)

// cookieFromBPF returns the cookie of the calling thread's network namespace
// on kernels without SO_NETNS_COOKIE (before 5.14), where only BPF programs
// can read it: a cgroup/sock_create program, attached for the duration of
// the call to the process's own cgroup, notes the cookie of the namespace of
// a socket this thread creates. On kernels before 5.12 this also gives the
// namespace its cookie, which is assigned on first use there. The caller
// must hold its OS thread locked.
func cookieFromBPF() (uint64, error) {
	cgroup, err := ownCgroup()
	if err != nil {
		return 0, err
	}
	result, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return 0, fmt.Errorf("create netns cookie map: %w", err)
	}
	defer result.Close()
	tid := int32(unix.Gettid())
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSock,
		AttachType: ebpf.AttachCGroupInetSockCreate,
		License:    "Dual MIT/GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			// Only this thread's socket: others of the cgroup may be
			// creating theirs meanwhile.
			asm.FnGetCurrentPidTgid.Call(),
			asm.JNE.Imm32(asm.R0, tid, "out"),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.FnGetNetnsCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.StoreImm(asm.RFP, -16, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, result.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -16),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnMapUpdateElem.Call(),
			asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		return 0, fmt.Errorf("load netns cookie program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroup, Attach: ebpf.AttachCGroupInetSockCreate, Program: prog})
	if err != nil {
		return 0, fmt.Errorf("attach netns cookie program to %s: %w", cgroup, err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	l.Close()
	if err != nil {
		return 0, err
	}
	unix.Close(fd)
	var cookie uint64
	if err := result.Lookup(uint32(0), &cookie); err != nil {
		return 0, fmt.Errorf("read netns cookie map: %w", err)
	}
	if cookie == 0 {
		return 0, errors.New("the netns cookie program did not run")
	}
	return cookie, nil
}

// ownCgroup returns the cgroup v2 directory of the calling process.
func ownCgroup() (string, error) {
	root, err := cgroup2.Root()
	if err != nil {
		return "", err
	}
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if p, ok := strings.CutPrefix(s.Text(), "0::"); ok {
			return filepath.Join(root, p), nil
		}
	}
	if err := s.Err(); err != nil {
		return "", fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	return "", errors.New("no cgroup v2 line in /proc/self/cgroup")
}
