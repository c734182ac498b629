package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// File is one entry of an initramfs.
type File struct {
	// Name is the path inside the archive, without a leading slash.
	Name string
	// Mode holds the type bits (S_IFREG, S_IFDIR, S_IFCHR) and permissions.
	Mode uint32
	// Source is a host file to copy, for regular files without Data.
	Source string
	// Data is the content of a regular file, when Source is empty.
	Data []byte
	// Major and Minor are the device numbers of a character device.
	Major, Minor uint32
}

const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeChar = 0o020000
)

// WriteInitramfs writes files as an uncompressed cpio archive in the "newc"
// format the kernel unpacks into its initial root filesystem. Parent
// directories are added where missing. The archive is left uncompressed:
// under TCG the guest's decompression would cost more than the copy.
func WriteInitramfs(w io.Writer, files []File) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := &cpioWriter{w: bw, ino: 1}
	dirs := map[string]bool{}
	var all []File
	for _, f := range files {
		for d := path.Dir(f.Name); d != "." && d != "/"; d = path.Dir(d) {
			if !dirs[d] {
				dirs[d] = true
				all = append(all, File{Name: d, Mode: modeDir | 0o755})
			}
		}
		if f.Mode&0o170000 == modeDir {
			if dirs[f.Name] {
				continue
			}
			dirs[f.Name] = true
		}
		all = append(all, f)
	}
	// Parents sort before their children.
	sort.SliceStable(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	for _, f := range all {
		if err := cw.add(f); err != nil {
			return fmt.Errorf("add %s to initramfs: %w", f.Name, err)
		}
	}
	if err := cw.header("TRAILER!!!", 0, 0, 0, 0, 0); err != nil {
		return err
	}
	return bw.Flush()
}

type cpioWriter struct {
	w   *bufio.Writer
	ino uint32
	n   int64 // bytes written, for padding
}

func (c *cpioWriter) add(f File) error {
	name := strings.TrimPrefix(f.Name, "/")
	switch f.Mode & 0o170000 {
	case modeDir:
		return c.header(name, f.Mode, 0, 0, 0, 2)
	case modeChar:
		return c.header(name, f.Mode, 0, f.Major, f.Minor, 1)
	case modeReg:
		data := f.Data
		if f.Source != "" {
			var err error
			if data, err = os.ReadFile(f.Source); err != nil {
				return err
			}
		}
		if err := c.header(name, f.Mode, uint32(len(data)), 0, 0, 1); err != nil {
			return err
		}
		if err := c.write(data); err != nil {
			return err
		}
		return c.pad()
	}
	return fmt.Errorf("unsupported file mode %o", f.Mode)
}

func (c *cpioWriter) header(name string, mode, size, rmaj, rmin, nlink uint32) error {
	ino := c.ino
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	if err := c.write([]byte(hdr + name + "\x00")); err != nil {
		return err
	}
	return c.pad()
}

func (c *cpioWriter) write(b []byte) error {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return err
}

func (c *cpioWriter) pad() error {
	if r := c.n % 4; r != 0 {
		return c.write(make([]byte, 4-r))
	}
	return nil
}
