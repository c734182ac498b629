package bpf

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where a bpffs is mounted when the pin directory lies under
// it and nothing is mounted there yet.
const DefaultBPFFS = "/sys/fs/bpf"

// ensureBPFFS makes sure dir can be created on a bpffs. When the nearest
// existing ancestor of dir is DefaultBPFFS and it is not a bpffs, one is
// mounted there; any other non-bpffs location is an error.
func ensureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	existing := dir
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("check pin directory %s: %w", existing, err)
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}

	ok, err := isBPFFS(existing)
	if err != nil {
		return err
	}
	if ok {
		return nil
	}
	if existing != DefaultBPFFS {
		return fmt.Errorf("pin directory %s is not on a bpffs (%s is not a bpf filesystem)", dir, existing)
	}
	if err := unix.Mount("bpf", DefaultBPFFS, "bpf", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s (needs CAP_SYS_ADMIN): %w", DefaultBPFFS, err)
	}
	return nil
}

func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}
