package vmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// ModuleDir returns the root of the Go module being tested.
func ModuleDir(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside a Go module")
	}
	return filepath.Dir(mod), nil
}

// BuildTestBinaries compiles the packages (relative to moduleDir, for
// example "bpf") as static test binaries in outDir and returns them as guest
// tests named after the package path.
func BuildTestBinaries(ctx context.Context, moduleDir, outDir string, pkgs []string) ([]GuestTest, error) {
	args := []string{"test", "-c", "-o", outDir + "/"}
	for _, p := range pkgs {
		args = append(args, "./"+p)
	}
	if err := goBuild(ctx, moduleDir, args...); err != nil {
		return nil, err
	}
	var tests []GuestTest
	for _, p := range pkgs {
		bin := filepath.Join(outDir, path.Base(p)+".test")
		if _, err := os.Stat(bin); err != nil {
			return nil, fmt.Errorf("package %s built no test binary: %w", p, err)
		}
		tests = append(tests, GuestTest{Name: p, Path: "/tests/" + filepath.Base(bin)})
	}
	return tests, nil
}

// BuildInit compiles the guest init into outDir and returns its path.
func BuildInit(ctx context.Context, moduleDir, outDir string) (string, error) {
	bin := filepath.Join(outDir, "init")
	return bin, goBuild(ctx, moduleDir, "build", "-o", bin, "./vmtest/guestinit")
}

func goBuild(ctx context.Context, dir string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = dir
	// Static binaries: the guest has no libc. GOFLAGS is cleared so that a
	// -race from the host run does not reach (and need cgo for) the guest.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=-buildvcs=false")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// PackagesWithTests returns those of candidates (module-relative package
// directories) that have test files.
func PackagesWithTests(moduleDir string, candidates []string) []string {
	var out []string
	for _, p := range candidates {
		matches, _ := filepath.Glob(filepath.Join(moduleDir, p, "*_test.go"))
		if len(matches) > 0 {
			out = append(out, p)
		}
	}
	return out
}
