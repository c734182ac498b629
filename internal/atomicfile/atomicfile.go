// Package atomicfile writes files so that a crash at any moment leaves
// either the old content or the new one, never a torn mix: the data goes to
// a temporary file in the same directory, which is fsynced, renamed over the
// target, and the directory is fsynced so that the rename itself is durable.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// TempPrefix starts the names of temporary files, so that leftovers of an
// interrupted write can be recognised and removed.
const TempPrefix = ".tmp-"

// WriteFile atomically replaces path with data, with permissions perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return WriteFileGroup(path, data, perm, -1)
}

// WriteFileGroup is WriteFile giving the file to group gid (unchanged if
// gid is negative) before it takes path's name, so that no reader ever
// sees it with another group or mode.
func WriteFileGroup(path string, data []byte, perm os.FileMode, gid int) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, TempPrefix+filepath.Base(path)+"-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if gid >= 0 {
		if err := f.Chown(-1, gid); err != nil {
			return fmt.Errorf("write %s: give it to group %d: %w", path, gid, err)
		}
	}
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace %s: %w", path, err)
	}
	return SyncDir(dir)
}

// Remove deletes path and makes the deletion durable.
func Remove(path string) error {
	if err := os.Remove(path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SyncDir fsyncs a directory, making renames and removals in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// MkdirPrivate creates dir (and parents) with mode 0700 and refuses a
// directory that anyone but this process's effective user could change or
// read: one owned by another user, one with group or other permissions, or
// one below a directory that another user owns or that others may write to
// without the sticky bit (they could rename dir away and put their own in
// its place). Symbolic links are followed, and both the path as given and
// the one it resolves to are checked.
func MkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if err := ownedByUs(dir, st); err != nil {
		return err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s has mode %o: group or others can reach it (want 0700)", dir, st.Mode().Perm())
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	for _, p := range []string{abs, real} {
		for a := filepath.Dir(p); ; a = filepath.Dir(a) {
			if err := checkAncestor(dir, a); err != nil {
				return err
			}
			if a == filepath.Dir(a) {
				break
			}
		}
	}
	return nil
}

// ownedByUs refuses a file that another user owns: its owner can change
// its mode or replace what is inside.
func ownedByUs(path string, st os.FileInfo) error {
	uid := st.Sys().(*syscall.Stat_t).Uid
	if euid := os.Geteuid(); int(uid) != euid {
		return fmt.Errorf("%s is owned by uid %d; it must be owned by uid %d, the user this process runs as", path, uid, euid)
	}
	return nil
}

// checkAncestor refuses an ancestor a of dir that lets another user swap
// dir for a directory of their own: owned by someone other than root or
// us, or writable by group or others without the sticky bit.
func checkAncestor(dir, a string) error {
	st, err := os.Stat(a)
	if err != nil {
		return fmt.Errorf("check %s, above %s: %w", a, dir, err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 0 && int(uid) != os.Geteuid() {
		return fmt.Errorf("%s, above %s, is owned by uid %d, who could replace %s; it must be owned by uid 0 or %d", a, dir, uid, dir, os.Geteuid())
	}
	if st.Mode().Perm()&0o022 != 0 && st.Mode()&os.ModeSticky == 0 {
		return fmt.Errorf("%s, above %s, has mode %o: group or others can write to it and replace %s (want it not writable by them, or sticky)", a, dir, st.Mode().Perm(), dir)
	}
	return nil
}

// IsTemp reports whether a file name is that of a temporary file of
// WriteFile: a write in flight, or the leftover of one a crash interrupted.
func IsTemp(name string) bool { return strings.HasPrefix(name, TempPrefix) }

// Temps returns the paths of the temporary files of WriteFile in dir.
func Temps(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("look for interrupted writes in %s: %w", dir, err)
	}
	var out []string
	for _, e := range entries {
		if IsTemp(e.Name()) {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	return out, nil
}

// RemoveTemps deletes leftovers of interrupted writes in dir.
func RemoveTemps(dir string) error {
	matches, err := Temps(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range matches {
		if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
