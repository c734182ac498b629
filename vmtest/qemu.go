package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// Config describes one guest boot.
type Config struct {
	Kernel Kernel
	// Init is the guest init binary (see BuildInit).
	Init string
	// Binaries maps a guest path (as in Manifest.Tests) to a host file.
	Binaries map[string]string
	Manifest Manifest
	// Modules are module names to load (dependencies are added).
	Modules []string
	// HostPrograms are host executables copied into the guest at the same
	// path, with the shared libraries they load; those missing on the host
	// are left out (the tests that need them say so).
	HostPrograms []string
	// Timeout bounds the whole boot; the guest is killed past it.
	Timeout time.Duration
	// Accel is "kvm" or "tcg"; empty picks KVM when /dev/kvm can be opened.
	Accel string
	// WorkDir holds the initramfs.
	WorkDir string
	// Console, if set, receives the guest console as it arrives.
	Console io.Writer
}

// Result is what a boot produced.
type Result struct {
	Accel    string
	Duration time.Duration
	Console  string
	Packages []PackageResult
	// Done is true when the guest printed MarkerDone.
	Done bool
	// Problem explains a boot that did not finish normally: a timeout, a
	// kernel panic, an init error, or QEMU failing. Empty otherwise.
	Problem string
}

// Failed reports whether anything in the boot failed.
func (r *Result) Failed() bool {
	if r.Problem != "" || !r.Done {
		return true
	}
	for _, p := range r.Packages {
		if p.Failed() {
			return true
		}
	}
	return false
}

func kvmUsable() bool {
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	kvm.Close()
	return true
}

// ChooseAccel picks the accelerator for k: "kvm" when /dev/kvm opens and a
// guest that does nothing but power off finishes under it within probe,
// "tcg" otherwise. Some nested setups expose a /dev/kvm whose guests never
// get past early boot; the probe keeps those from hanging every run. The
// reason says what was decided and why.
func ChooseAccel(ctx context.Context, k Kernel, init, workDir string, probe time.Duration) (accel, reason string) {
	if !kvmUsable() {
		return "tcg", "no usable /dev/kvm"
	}
	res, err := Run(ctx, Config{Kernel: k, Init: init, Timeout: probe, Accel: "kvm", WorkDir: workDir})
	switch {
	case err != nil:
		return "tcg", fmt.Sprintf("KVM probe failed: %v", err)
	case res.Failed():
		return "tcg", fmt.Sprintf("KVM probe guest did not finish: %s", res.Problem)
	}
	return "kvm", fmt.Sprintf("KVM probe guest finished in %s", res.Duration.Round(time.Millisecond))
}

// Run boots the kernel with an initramfs holding the init, the test binaries
// and the modules, and parses the console.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	mods, err := ResolveModules(cfg.Kernel.Modules, cfg.Modules, cfg.WorkDir)
	if err != nil {
		return nil, err
	}
	files := []File{
		{Name: "init", Mode: modeReg | 0o755, Source: cfg.Init},
		{Name: "dev/console", Mode: modeChar | 0o600, Major: 5, Minor: 1},
		{Name: "dev/null", Mode: modeChar | 0o666, Major: 1, Minor: 3},
		{Name: "root", Mode: modeDir | 0o700},
		{Name: "bin", Mode: modeDir | 0o755},
	}
	man := cfg.Manifest
	man.Modules = nil
	for _, m := range mods {
		guest := "lib/modules/" + filepath.Base(m)
		files = append(files, File{Name: guest, Mode: modeReg | 0o644, Source: m})
		man.Modules = append(man.Modules, "/"+guest)
	}
	progs, err := hostProgramFiles(ctx, cfg.HostPrograms)
	if err != nil {
		return nil, err
	}
	files = append(files, progs...)
	for guest, host := range cfg.Binaries {
		files = append(files, File{Name: strings.TrimPrefix(guest, "/"), Mode: modeReg | 0o755, Source: host})
	}
	manJSON, err := json.Marshal(man)
	if err != nil {
		return nil, err
	}
	files = append(files, File{Name: strings.TrimPrefix(ManifestPath, "/"), Mode: modeReg | 0o644, Data: manJSON})

	initrd := filepath.Join(cfg.WorkDir, "initramfs.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		return nil, fmt.Errorf("create initramfs: %w", err)
	}
	err = WriteInitramfs(f, files)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("write initramfs: %w", err)
	}

	accel := cfg.Accel
	if accel == "" {
		accel = "tcg"
		if kvmUsable() {
			accel = "kvm"
		}
	}
	cpu := "max"
	if accel == "kvm" {
		// Nested hypervisors often refuse to let a guest set
		// IA32_ARCH_CAPABILITIES, which QEMU asserts on.
		cpu = "host,-arch-capabilities"
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-accel", accel, "-cpu", cpu, "-m", "1G", "-smp", "2",
		"-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", cfg.Kernel.Vmlinuz, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer pr.Close()
	cmd.Stdout, cmd.Stderr = pw, pw
	start := time.Now()
	// Pdeathsig follows the OS thread that forked QEMU, so QEMU is started
	// and waited for on one locked thread that lives exactly as long.
	started := make(chan error, 1)
	exited := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		exited <- cmd.Wait()
	}()
	err = <-started
	pw.Close()
	if err != nil {
		return nil, fmt.Errorf("start qemu-system-x86_64 (install qemu-system-x86): %w", err)
	}
	var console bytes.Buffer
	sink := io.Writer(&console)
	if cfg.Console != nil {
		sink = io.MultiWriter(&console, cfg.Console)
	}
	// Normalise the serial console's CRLF while copying; EOF comes when
	// QEMU exits.
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fmt.Fprintln(sink, strings.TrimRight(sc.Text(), "\r"))
	}
	waitErr := <-exited

	res := parseConsole(console.String())
	res.Accel = accel
	res.Duration = time.Since(start)
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		res.Problem = fmt.Sprintf("guest timed out after %s (accel %s); %s", cfg.Timeout, accel, res.progress())
	case res.Problem != "":
	case waitErr != nil:
		res.Problem = fmt.Sprintf("qemu-system-x86_64 failed: %v", waitErr)
	case !res.Done:
		res.Problem = "guest powered off without finishing: " + res.progress()
	}
	return res, nil
}

// hostProgramFiles returns the initramfs entries for programs and the shared
// libraries ldd says each loads, at their host paths.
func hostProgramFiles(ctx context.Context, programs []string) ([]File, error) {
	seen := map[string]bool{}
	var files []File
	add := func(p string) {
		if !seen[p] {
			seen[p] = true
			files = append(files, File{Name: strings.TrimPrefix(p, "/"), Mode: modeReg | 0o755, Source: p})
		}
	}
	for _, prog := range programs {
		if _, err := os.Stat(prog); err != nil {
			continue
		}
		add(prog)
		out, err := exec.CommandContext(ctx, "ldd", prog).Output()
		if err != nil {
			// Static executables make ldd fail: they need nothing more.
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
			// "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no file.
			f := strings.Fields(line)
			for i, w := range f {
				if strings.HasPrefix(w, "/") && (i == 0 || f[i-1] == "=>") {
					add(w)
				}
			}
		}
	}
	return files, nil
}
