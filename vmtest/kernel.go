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
	"slices"
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

// DebianKernel names a Debian kernel package and where apt finds it.
type DebianKernel struct {
	// Package is the binary package, e.g. "linux-image-6.1.0-56-cloud-amd64".
	Package string
	// Suite is the Debian suite to fetch it from with a source list of the
	// harness's own (e.g. "bullseye-security"); empty uses the machine's
	// own apt sources.
	Suite string
}

// ParseDebianKernel reads "package" or "package@suite".
func ParseDebianKernel(s string) DebianKernel {
	pkg, suite, _ := strings.Cut(s, "@")
	return DebianKernel{Package: pkg, Suite: suite}
}

func (d DebianKernel) String() string {
	if d.Suite == "" {
		return d.Package
	}
	return d.Package + "@" + d.Suite
}

// DebianMirror is where suites other than the machine's own are fetched
// from; security suites live under its sibling path debian-security.
const DebianMirror = "http://deb.debian.org/debian"

// FetchDebianKernel returns the kernel of Debian package k.Package,
// downloading it with apt-get and unpacking it with dpkg-deb into
// cacheDir/<package> on first use. Nothing is installed into /boot, and the
// machine's apt sources and state are never changed: a package of another
// suite is found through a source list and apt state kept under cacheDir.
func FetchDebianKernel(ctx context.Context, cacheDir string, k DebianKernel) (Kernel, error) {
	pkg := k.Package
	release := strings.TrimPrefix(pkg, "linux-image-")
	dir := filepath.Join(cacheDir, pkg)
	kern := Kernel{
		Name:    release,
		Vmlinuz: filepath.Join(dir, "root", "boot", "vmlinuz-"+release),
		Modules: filepath.Join(dir, "root", "lib", "modules", release),
	}
	if _, err := os.Stat(kern.Vmlinuz); err == nil {
		return kern, nil
	}
	// k is the package from here on; kern the result.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return kern, fmt.Errorf("create kernel cache: %w", err)
	}
	var aptOpts []string
	if k.Suite != "" {
		var err error
		if aptOpts, err = suiteApt(cacheDir, k.Suite); err != nil {
			return kern, err
		}
	}
	apt := func(args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, "apt-get", append(slices.Clone(aptOpts), args...)...)
		cmd.Dir = dir
		return cmd.CombinedOutput()
	}
	download := func() ([]byte, error) { return apt("download", pkg) }
	if out, err := download(); err != nil {
		// A fresh machine (or suite state) may have no package lists yet.
		if upd, uerr := apt("update", "-qq"); uerr != nil {
			return kern, fmt.Errorf("apt-get update for %s: %v: %s", k, uerr, upd)
		}
		if out2, err := download(); err != nil {
			return kern, fmt.Errorf("apt-get download %s: %v: %s%s", pkg, err, out, out2)
		}
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		return kern, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
	}
	tmp := filepath.Join(dir, "root.tmp")
	os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return kern, fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0], err, out)
	}
	// Rename last, so that an interrupted unpack is never taken for a
	// complete one.
	if err := os.Rename(tmp, filepath.Join(dir, "root")); err != nil {
		return kern, fmt.Errorf("finish kernel unpack: %w", err)
	}
	for _, d := range debs {
		os.Remove(d)
	}
	if _, err := os.Stat(kern.Vmlinuz); err != nil {
		return kern, fmt.Errorf("package %s has no %s: %w", pkg, kern.Vmlinuz, err)
	}
	return kern, nil
}

// suiteApt returns apt options that make apt-get work on Debian suite
// suite alone, with a source list, state and cache under cacheDir/apt/<suite>,
// creating them on first use. The archive's signatures are still checked
// against the machine's Debian keyring.
func suiteApt(cacheDir, suite string) ([]string, error) {
	root := filepath.Join(cacheDir, "apt", suite)
	for _, d := range []string{"sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("create apt state for %s: %w", suite, err)
		}
	}
	mirror := DebianMirror
	if strings.HasSuffix(suite, "-security") {
		mirror += "-security"
	}
	list := fmt.Sprintf("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n", mirror, suite)
	sources := filepath.Join(root, "sources.list")
	if err := os.WriteFile(sources, []byte(list), 0o644); err != nil {
		return nil, fmt.Errorf("write source list for %s: %w", suite, err)
	}
	return []string{
		"-o", "Dir::Etc::SourceList=" + sources,
		"-o", "Dir::Etc::SourceParts=" + filepath.Join(root, "sources.list.d"),
		"-o", "Dir::Etc::Preferences=" + filepath.Join(root, "preferences"),
		"-o", "Dir::Etc::PreferencesParts=" + filepath.Join(root, "preferences.d"),
		"-o", "Dir::State=" + filepath.Join(root, "state"),
		"-o", "Dir::State::status=/dev/null",
		"-o", "Dir::Cache=" + filepath.Join(root, "cache"),
	}, nil
}

// ResolveModules returns the module files to load for names, each after its
// dependencies (read from the modules' own .modinfo sections, since a
// kernel package unpacked without depmod has no modules.dep). Modules the
// kernel has built in are skipped. Compressed modules (.ko.xz, .ko.zst, as
// newer Debian kernels ship them) are decompressed into outDir, so that the
// guest loads plain ELF whatever its kernel's decompression support.
func ResolveModules(modulesDir string, names []string, outDir string) ([]string, error) {
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
		if !d.IsDir() && moduleFile(p) {
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
			return fmt.Errorf("module %s is neither built in nor in %s", name, modulesDir)
		}
		p, err := decompressModule(p, outDir)
		if err != nil {
			return err
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

// moduleDecompressors maps a compressed module's suffix to the command that
// writes it out plain (xz-utils and zstd, from Debian).
var moduleDecompressors = map[string][]string{
	".ko.xz":  {"xz", "-dc"},
	".ko.zst": {"zstd", "-dcq"},
}

func moduleFile(p string) bool {
	if strings.HasSuffix(p, ".ko") {
		return true
	}
	for suffix := range moduleDecompressors {
		if strings.HasSuffix(p, suffix) {
			return true
		}
	}
	return false
}

// decompressModule returns p itself for a plain module, or the path of its
// decompressed copy in outDir.
func decompressModule(p, outDir string) (string, error) {
	for suffix, cmd := range moduleDecompressors {
		if !strings.HasSuffix(p, suffix) {
			continue
		}
		out := filepath.Join(outDir, modName(p)+".ko")
		var plain, msg bytes.Buffer
		c := exec.Command(cmd[0], append(cmd[1:], p)...)
		c.Stdout, c.Stderr = &plain, &msg
		if err := c.Run(); err != nil {
			return "", fmt.Errorf("decompress module %s with %s (install Debian's xz-utils or zstd): %v: %s", p, cmd[0], err, msg.Bytes())
		}
		if err := os.WriteFile(out, plain.Bytes(), 0o644); err != nil {
			return "", fmt.Errorf("write decompressed module: %w", err)
		}
		return out, nil
	}
	return p, nil
}

// modName normalises a module path or name: "kernel/net/802/stp.ko",
// "stp.ko.xz" and "stp" are the same module, as are "nf-nat" and "nf_nat".
func modName(s string) string {
	s = filepath.Base(s)
	if i := strings.Index(s, ".ko"); i >= 0 {
		s = s[:i]
	}
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
