package vmtest

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Kernel is a kernel image to boot, with its modules.
type Kernel struct {
	// Name identifies the kernel in test names, e.g. "6.1.0-56-cloud-amd64".
	Name string
	// Vmlinuz is the path of the bootable image.
	Vmlinuz string
	// Modules is the kernel's lib/modules/<release> directory; empty when
	// the kernel has everything built in.
	Modules string
}

// FetchDebianKernel returns the kernel of Debian package pkg (for example
// "linux-image-6.1.0-56-cloud-amd64"), downloading it with apt-get and
// unpacking it with dpkg-deb into cacheDir/<pkg> on first use. Nothing is
// installed into /boot.
func FetchDebianKernel(ctx context.Context, cacheDir, pkg string) (Kernel, error) {
	release := strings.TrimPrefix(pkg, "linux-image-")
	dir := filepath.Join(cacheDir, pkg)
	k := Kernel{
		Name:    release,
		Vmlinuz: filepath.Join(dir, "root", "boot", "vmlinuz-"+release),
		Modules: filepath.Join(dir, "root", "lib", "modules", release),
	}
	if _, err := os.Stat(k.Vmlinuz); err == nil {
		return k, nil
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return k, fmt.Errorf("create kernel cache: %w", err)
	}
	download := func() ([]byte, error) {
		cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
		cmd.Dir = dir
		return cmd.CombinedOutput()
	}
	if out, err := download(); err != nil {
		// A fresh machine may have no package lists yet.
		if upd, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
			return k, fmt.Errorf("apt-get update: %v: %s", uerr, upd)
		}
		if out2, err := download(); err != nil {
			return k, fmt.Errorf("apt-get download %s: %v: %s%s", pkg, err, out, out2)
		}
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		return k, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
	}
	tmp := filepath.Join(dir, "root.tmp")
	os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return k, fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0], err, out)
	}
	// Rename last, so that an interrupted unpack is never taken for a
	// complete one.
	if err := os.Rename(tmp, filepath.Join(dir, "root")); err != nil {
		return k, fmt.Errorf("finish kernel unpack: %w", err)
	}
	for _, d := range debs {
		os.Remove(d)
	}
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return k, fmt.Errorf("package %s has no %s: %w", pkg, k.Vmlinuz, err)
	}
	return k, nil
}

// ResolveModules returns the module files to load for names, each after its
// dependencies (read from the modules' own .modinfo sections, since a
// kernel package unpacked without depmod has no modules.dep). Modules the
// kernel has built in are skipped.
func ResolveModules(modulesDir string, names []string) ([]string, error) {
	if modulesDir == "" {
		return nil, nil
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modulesDir, "modules.builtin")); err == nil {
		for _, line := range strings.Fields(string(b)) {
			builtin[modName(line)] = true
		}
	}
	paths := map[string]string{}
	err := filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			paths[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules in %s: %w", modulesDir, err)
	}

	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		name = modName(name)
		switch {
		case state[name] == 2 || builtin[name]:
			return nil
		case state[name] == 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		}
		p, ok := paths[name]
		if !ok {
			return fmt.Errorf("module %s is neither built in nor in %s (compressed modules are not supported)", name, modulesDir)
		}
		state[name] = 1
		deps, err := moduleDepends(p)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, p)
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modName normalises a module path or name: "kernel/net/802/stp.ko" and
// "stp" are the same module, as are "nf-nat" and "nf_nat".
func modName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("read .modinfo of %s: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, errors.New("no depends= in .modinfo of " + path)
}
