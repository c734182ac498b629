// Package registry maps what the kernel attested about a caller (the
// cgroup id and netns cookie of the connecting socket) to the live sandbox it
// belongs to.
//
// A sandbox is registered by its cgroup, its network namespace, or both. A
// caller belongs to a sandbox registered by cgroup when its cgroup is the
// sandbox's or any cgroup below it; to one registered by netns when its netns
// cookie matches; and to one registered with both only when both match.
// Anything else is unknown and must be refused.
//
// Cgroups below a sandbox are found from the kernel, not guessed: an unknown
// cgroup id is turned into its path with open_by_handle_at on the cgroup2
// mount, and the path's ancestors are checked against the registered
// sandboxes (whose directories must still carry the registered id, so a
// cgroup deleted and re-created under the same name is not the same
// sandbox).
package registry

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
)

// ErrUnknownCaller means the caller belongs to no live sandbox.
var ErrUnknownCaller = errors.New("caller belongs to no live sandbox")

// Sandbox is what the token server needs to know about a sandbox, and how
// callers are tied to it.
type Sandbox struct {
	ID  string
	App string
	Org string
	// CgroupPath and CgroupID identify the sandbox's cgroup; empty and zero
	// for a sandbox registered by netns only.
	CgroupPath string
	CgroupID   uint64
	// NetnsCookie identifies the sandbox's network namespace; zero for a
	// sandbox registered by cgroup only.
	NetnsCookie uint64
}

// negativeCap bounds the cache of cgroup ids known to belong to no sandbox.
const negativeCap = 4096

// Index is the live registry. It is safe for concurrent use.
type Index struct {
	mountFD int // cgroup2 mount, for open_by_handle_at

	mu          sync.RWMutex
	byID        map[string]*Sandbox
	byCgroupID  map[uint64]*Sandbox // the sandboxes' own cgroups
	byPath      map[string]*Sandbox
	byNetns     map[uint64]*Sandbox // sandboxes registered by netns only
	descendants map[uint64]*Sandbox // cgroups found below a sandbox
	unknown     map[uint64]bool     // cgroups found below no sandbox
	watcher     Watcher             // nil: none (see Watch)
}

// New returns an empty index resolving cgroups on the cgroup2 hierarchy
// mounted at cgroupRoot.
func New(cgroupRoot string) (*Index, error) {
	fd, err := unix.Open(cgroupRoot, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open cgroup2 mount %s: %w", cgroupRoot, err)
	}
	return &Index{
		mountFD:     fd,
		byID:        map[string]*Sandbox{},
		byCgroupID:  map[uint64]*Sandbox{},
		byPath:      map[string]*Sandbox{},
		byNetns:     map[uint64]*Sandbox{},
		descendants: map[uint64]*Sandbox{},
		unknown:     map[uint64]bool{},
	}, nil
}

// Close releases the cgroup2 mount.
func (x *Index) Close() error { return unix.Close(x.mountFD) }

// Add registers a live sandbox. It refuses a duplicate id, and a cgroup or
// netns that another sandbox already holds.
func (x *Index) Add(s Sandbox) error {
	if s.CgroupID == 0 && s.NetnsCookie == 0 {
		return fmt.Errorf("register sandbox %q: neither a cgroup nor a netns to tie callers to", s.ID)
	}
	if s.CgroupID != 0 {
		s.CgroupPath = filepath.Clean(s.CgroupPath)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if _, ok := x.byID[s.ID]; ok {
		return fmt.Errorf("register sandbox %q: already registered", s.ID)
	}
	if other, ok := x.byCgroupID[s.CgroupID]; ok && s.CgroupID != 0 {
		return fmt.Errorf("register sandbox %q: cgroup %s already belongs to sandbox %q", s.ID, s.CgroupPath, other.ID)
	}
	if s.CgroupID == 0 {
		if other, ok := x.byNetns[s.NetnsCookie]; ok {
			return fmt.Errorf("register sandbox %q: netns already belongs to sandbox %q", s.ID, other.ID)
		}
	}
	if x.watcher != nil {
		if err := x.watcher.SandboxAdded(s); err != nil {
			return fmt.Errorf("register sandbox %q: %w", s.ID, err)
		}
	}
	sb := &s
	x.byID[s.ID] = sb
	if s.CgroupID != 0 {
		x.byCgroupID[s.CgroupID] = sb
		x.byPath[s.CgroupPath] = sb
	} else {
		x.byNetns[s.NetnsCookie] = sb
	}
	// A new sandbox may sit above cgroups that were unknown until now.
	clear(x.unknown)
	return nil
}

// Remove retires a sandbox: from now on nothing resolves to it.
func (x *Index) Remove(id string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	sb, ok := x.byID[id]
	if !ok {
		return
	}
	delete(x.byID, id)
	if sb.CgroupID != 0 {
		delete(x.byCgroupID, sb.CgroupID)
		delete(x.byPath, sb.CgroupPath)
	} else {
		delete(x.byNetns, sb.NetnsCookie)
	}
	for cg, owner := range x.descendants {
		if owner == sb {
			delete(x.descendants, cg)
		}
	}
	if x.watcher != nil {
		x.watcher.SandboxRemoved(*sb)
	}
}

// Len returns the number of live sandboxes.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.byID)
}

// Resolve returns the sandbox a caller with the attested cgroup id and netns
// cookie belongs to, or ErrUnknownCaller.
func (x *Index) Resolve(cgroupID, netnsCookie uint64) (Sandbox, error) {
	sb := x.byCgroup(cgroupID)
	if sb == nil {
		x.mu.RLock()
		sb = x.byNetns[netnsCookie]
		x.mu.RUnlock()
		if sb == nil {
			return Sandbox{}, ErrUnknownCaller
		}
		return *sb, nil
	}
	if sb.NetnsCookie != 0 && sb.NetnsCookie != netnsCookie {
		return Sandbox{}, fmt.Errorf("caller is in sandbox %q's cgroup but not in its netns: %w", sb.ID, ErrUnknownCaller)
	}
	return *sb, nil
}

// byCgroup finds the sandbox whose cgroup is id or an ancestor of id.
func (x *Index) byCgroup(id uint64) *Sandbox {
	if id == 0 {
		return nil
	}
	x.mu.RLock()
	sb := x.byCgroupID[id]
	if sb == nil {
		sb = x.descendants[id]
	}
	known := x.unknown[id]
	x.mu.RUnlock()
	if sb != nil || known {
		return sb
	}

	path, err := x.cgroupPath(id)
	if err != nil {
		// Gone already, or not a cgroup on this hierarchy: belongs to
		// nothing.
		return nil
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	for p := filepath.Dir(path); p != "/" && p != "."; p = filepath.Dir(p) {
		cand := x.byPath[p]
		if cand == nil {
			continue
		}
		// The ancestor directory must still be the registered cgroup. A
		// check that could not be made (out of descriptors, say) decides
		// nothing and is not remembered: this caller is refused, the next
		// one asks again.
		live, err := cgroup2.ID(p)
		if err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, unix.ENOTDIR) {
			return nil
		}
		if err != nil || live != cand.CgroupID {
			break
		}
		x.descendants[id] = cand
		return cand
	}
	if len(x.unknown) >= negativeCap {
		clear(x.unknown)
	}
	x.unknown[id] = true
	return nil
}

// cgroupPath turns a cgroup id into the cgroup's path, asking the kernel.
func (x *Index) cgroupPath(id uint64) (string, error) {
	var handle [8]byte
	binary.NativeEndian.PutUint64(handle[:], id)
	// FILEID_KERNFS: cgroup2 file handles are the 64-bit cgroup id.
	const fileidKernfs = 0xfe
	fd, err := unix.OpenByHandleAt(x.mountFD, unix.NewFileHandle(fileidKernfs, handle[:]), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	if err != nil {
		return "", fmt.Errorf("open cgroup %d by handle: %w", id, err)
	}
	defer unix.Close(fd)
	p, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", fmt.Errorf("path of cgroup %d: %w", id, err)
	}
	return p, nil
}
