package bpf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
)

// DefaultPinDir is where links and maps are pinned unless told otherwise.
const DefaultPinDir = "/sys/fs/bpf/identityd"

// Options say where the programs are pinned and attached.
type Options struct {
	// PinDir is a directory on a bpffs for links and maps; DefaultPinDir if
	// empty. A bpffs is mounted at /sys/fs/bpf when needed.
	PinDir string
	// CgroupRoot is the cgroup v2 directory the programs attach to; the root
	// of the cgroup2 hierarchy from the mount table if empty. Both the
	// clients and the token server's own sockets must be below it: the
	// record reaches the server's socket through the program running on it.
	CgroupRoot string
	// Logger receives what Install did; slog.Default() if nil.
	Logger *slog.Logger
}

func (o Options) withDefaults() (Options, error) {
	if o.PinDir == "" {
		o.PinDir = DefaultPinDir
	}
	o.PinDir = filepath.Clean(o.PinDir)
	if o.CgroupRoot == "" {
		root, err := cgroup2.Root()
		if err != nil {
			return o, err
		}
		o.CgroupRoot = root
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// hook is one program and the cgroup hook it runs at.
type hook struct {
	program string
	attach  ebpf.AttachType
	// ownMap is a pinned map the program uses, by which a program of this
	// installation is told from another's.
	ownMap string
}

// hooks lists the programs in attach order: the connector recorders go first
// so that as few records as possible are published without a pid.
func hooks() []hook {
	return []hook{
		{attribProgRecordConnector4, ebpf.AttachCGroupInet4Connect, attribMapEndpoints},
		{attribProgRecordConnector6, ebpf.AttachCGroupInet6Connect, attribMapEndpoints},
		{attribProgRecordConnect, ebpf.AttachCGroupSockOps, attribMapEndpoints},
		{attribProgLinkLocalPeer4, ebpf.AttachCgroupInet4GetPeername, attribMapRedirects},
		{attribProgLinkLocalPeer6, ebpf.AttachCgroupInet6GetPeername, attribMapRedirects},
	}
}

func mapNames() []string {
	return []string{attribMapClients, attribMapHandshakes, attribMapAttested, attribMapEndpoints, attribMapEndpointPorts,
		attribMapLinkLocal, attribMapLinkLocalPorts, attribMapSandboxCgroups, attribMapSandboxNetns, attribMapRedirects}
}

func programNames() []string {
	var names []string
	for _, h := range hooks() {
		names = append(names, h.program)
	}
	return names
}

// retiredPrograms and retiredMaps name what earlier versions pinned and this
// one no longer uses: Install removes them so that an upgrade never leaves an
// old program running beside the new ones. Only pins named here or in use
// are ever touched; anything else under the pin directory is left alone.
func retiredPrograms() []string { return []string{"record_owner"} }
func retiredMaps() []string     { return []string{"sock_owners", "conns", "connectors"} }

func linkPin(pinDir, program string) string { return filepath.Join(pinDir, "links", program) }
func mapsDir(pinDir string) string          { return filepath.Join(pinDir, "maps") }

// Installation is the daemon's handle on the installed programs. Closing it
// releases the handle only; the programs stay attached through their pins.
type Installation struct {
	opts     Options // with defaults applied
	cgroupID uint64  // of opts.CgroupRoot
	maps     map[string]*ebpf.Map
	// The maps Lookup and SetEndpoints use, also in maps.
	attested  *ebpf.Map
	endpoints *ebpf.Map
	ports     *ebpf.Map // bitmap of the endpoints' ports
	nat       *natProbe // explains connections without a record
}

// Install loads the programs, attaches them to the cgroup root and pins them,
// or adopts what an earlier Install pinned: unchanged programs are left as
// they are, changed ones are swapped in place through their links, and a
// second copy is never attached. Maps are always reused, so records published
// while no daemon ran are still there. Links and map pins of an earlier
// version that this one no longer uses are removed.
func Install(ctx context.Context, opts Options) (*Installation, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("install attribution programs: %w", err)
	}
	in := &Installation{opts: opts, nat: newNATProbe()}
	if err := in.attach(ctx); err != nil {
		in.Close()
		return nil, err
	}
	return in, nil
}

// Repair puts the installation back after something detached its programs or
// removed its pins underneath the daemon (bpftool, an uninstall while it
// ran): map pins that are gone are pinned again from the maps this
// installation holds, and each program is attached or adopted as Install
// would, using those same maps. Records, endpoints and socket storage are
// kept.
func (in *Installation) Repair(ctx context.Context) error {
	return in.attach(ctx)
}

// Check reports, without changing anything, whether each program is attached
// to the cgroup root through its pinned link and uses this installation's
// maps. An error names the first program that is not.
func (in *Installation) Check() error {
	for _, h := range hooks() {
		want, err := mapIDOf(in.maps[h.ownMap])
		if err != nil {
			return err
		}
		pin := linkPin(in.opts.PinDir, h.program)
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", h.program, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return fmt.Errorf("%s: inspect pinned link %s: %w", h.program, pin, err)
		}
		if cg := info.Cgroup(); cg == nil || cg.CgroupId != in.cgroupID {
			return fmt.Errorf("%s: pinned link %s is not attached to %s", h.program, pin, in.opts.CgroupRoot)
		}
		prog, err := ebpf.NewProgramFromID(info.Program)
		if err != nil {
			return fmt.Errorf("%s: open program %d: %w", h.program, info.Program, err)
		}
		pinfo, err := prog.Info()
		prog.Close()
		if err != nil {
			return fmt.Errorf("%s: inspect program %d: %w", h.program, info.Program, err)
		}
		if ids, ok := pinfo.MapIDs(); ok && !slices.Contains(ids, want) {
			return fmt.Errorf("%s: the program behind %s does not use this installation's maps", h.program, pin)
		}
	}
	return nil
}

func mapIDOf(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("inspect map: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("kernel does not report map ids")
	}
	return id, nil
}

// attach loads the programs and attaches or adopts each at its hook. The
// first time it takes the maps from their pins (creating what is missing) and
// keeps them; afterwards it uses the maps it kept, pinning again any whose pin
// is gone.
func (in *Installation) attach(ctx context.Context) error {
	opts := in.opts
	if err := checkPrivileges(); err != nil {
		return err
	}
	if err := raiseMemlock(); err != nil {
		return err
	}
	if ok, err := cgroup2.IsCgroup2(opts.CgroupRoot); err != nil {
		return fmt.Errorf("check cgroup root: %w", err)
	} else if !ok {
		return fmt.Errorf("cgroup root %s is not on a cgroup2 filesystem", opts.CgroupRoot)
	}
	cgroupID, err := cgroup2.ID(opts.CgroupRoot)
	if err != nil {
		return err
	}
	if err := ensureBPFFS(opts.PinDir); err != nil {
		return err
	}
	unlock, err := lockDir(ctx, opts.PinDir, true)
	if err != nil {
		return err
	}
	defer unlock()
	for _, dir := range []string{mapsDir(opts.PinDir), filepath.Join(opts.PinDir, "links")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create pin directory %s: %w", dir, err)
		}
	}

	spec, err := loadAttrib()
	if err != nil {
		return fmt.Errorf("parse embedded attribution object: %w", err)
	}
	// Only the maps that hold state are pinned and shared between installs;
	// the read-only globals (.rodata) belong to each load.
	for _, name := range mapNames() {
		spec.Maps[name].Pinning = ebpf.PinByName
	}
	if err := fitToKernel(spec); err != nil {
		return err
	}
	applyVariant(spec)
	for name, m := range in.maps {
		pin := filepath.Join(mapsDir(opts.PinDir), name)
		if _, err := os.Lstat(pin); !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		// The map remembers where it was pinned and would take Pin to the
		// same path for a no-op; the pin is gone, so forgetting it is safe.
		if err := m.Unpin(); err != nil {
			return fmt.Errorf("forget the removed pin of map %s: %w", name, err)
		}
		if err := m.Pin(pin); err != nil {
			return fmt.Errorf("pin map %s again at %s: %w", name, pin, err)
		}
		opts.Logger.Warn("pinned a map again that was removed underneath", "map", name, "pin", pin)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps:            ebpf.MapOptions{PinPath: mapsDir(opts.PinDir)},
		MapReplacements: in.maps,
	})
	if err != nil {
		return diagnose(fmt.Errorf("load attribution programs: %w", err))
	}
	defer coll.Close()

	cgroup, err := os.Open(opts.CgroupRoot)
	if err != nil {
		return fmt.Errorf("open cgroup root: %w", err)
	}
	defer cgroup.Close()

	for _, h := range hooks() {
		if err := attachOrAdopt(opts, cgroup, cgroupID, h, coll.Programs[h.program]); err != nil {
			return err
		}
	}
	retired, err := removePins(opts, retiredPrograms(), retiredMaps())
	for _, pin := range retired {
		opts.Logger.Info("removed the pin of a retired program or map", "pin", pin)
	}
	if err != nil {
		return fmt.Errorf("remove retired pins: %w", err)
	}

	in.cgroupID = cgroupID
	if in.maps == nil {
		in.maps = make(map[string]*ebpf.Map)
		for _, name := range mapNames() {
			in.maps[name] = coll.DetachMap(name)
		}
		in.attested = in.maps[attribMapAttested]
		in.endpoints = in.maps[attribMapEndpoints]
		in.ports = in.maps[attribMapEndpointPorts]
	}
	return nil
}

// attachOrAdopt makes sure exactly one link runs prog at h on the cgroup,
// pinned at its path under opts.PinDir.
func attachOrAdopt(opts Options, cgroup *os.File, cgroupID uint64, h hook, prog *ebpf.Program) error {
	pin := linkPin(opts.PinDir, h.program)
	log := opts.Logger.With("program", h.program, "cgroup", opts.CgroupRoot, "pin", pin)

	l, err := link.LoadPinnedLink(pin, nil)
	if err == nil {
		defer l.Close()
		info, err := l.Info()
		if err != nil {
			return fmt.Errorf("inspect pinned link %s: %w", pin, err)
		}
		cg := info.Cgroup()
		switch {
		case cg == nil:
			return fmt.Errorf("pinned link %s is not a cgroup link", pin)
		case cg.CgroupId == 0:
			// Detached underneath us (cgroup gone, or BPF_LINK_DETACH):
			// drop the pin and attach afresh below.
			log.Warn("pinned link is defunct; attaching a new one")
			if err := l.Unpin(); err != nil {
				return fmt.Errorf("unpin defunct link %s: %w", pin, err)
			}
		case cg.CgroupId != cgroupID:
			return fmt.Errorf("pinned link %s is attached to cgroup id %d, not to %s (id %d): uninstall it first",
				pin, cg.CgroupId, opts.CgroupRoot, cgroupID)
		default:
			same, err := sameProgram(info.Program, prog)
			if err != nil {
				return fmt.Errorf("compare program behind %s: %w", pin, err)
			}
			if same {
				log.Debug("adopted pinned program")
				return nil
			}
			if err := l.Update(prog); err != nil {
				return fmt.Errorf("replace program behind %s: %w", pin, err)
			}
			log.Info("replaced pinned program in place")
			return nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}

	l, err = link.AttachRawLink(link.RawLinkOptions{
		Target:  int(cgroup.Fd()),
		Program: prog,
		Attach:  h.attach,
	})
	if err != nil {
		return diagnose(fmt.Errorf("attach %s to %s: %w", h.program, opts.CgroupRoot, err))
	}
	// Closing an unpinned link detaches it, so a failed Pin leaves nothing behind.
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin %s link at %s: %w", h.program, pin, err)
	}
	log.Info("attached program")
	return nil
}

// removePins detaches the named links and removes the named map pins under
// opts.PinDir, those that exist, and returns the paths it removed.
func removePins(opts Options, links, maps []string) ([]string, error) {
	var removed []string
	var errs []error
	for _, name := range links {
		pin := linkPin(opts.PinDir, name)
		if _, err := os.Lstat(pin); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := detachPinned(pin); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, pin)
	}
	for _, name := range maps {
		pin := filepath.Join(mapsDir(opts.PinDir), name)
		if err := os.Remove(pin); errors.Is(err, fs.ErrNotExist) {
			continue
		} else if err != nil {
			errs = append(errs, fmt.Errorf("remove map pin %s: %w", pin, err))
			continue
		}
		removed = append(removed, pin)
	}
	return removed, errors.Join(errs...)
}

// detachPinned detaches the link pinned at pin and removes the pin.
// Detaching explicitly matters: another process holding the link open would
// otherwise keep it attached after the pin is gone.
func detachPinned(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	defer l.Close()
	var errs []error
	if err := l.Detach(); err != nil && !errors.Is(err, link.ErrNotSupported) {
		errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
	}
	if err := l.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
	}
	return errors.Join(errs...)
}

// sameProgram reports whether the program with id has the same instructions
// (its tag ignores map descriptors) and uses the same maps as prog.
func sameProgram(id ebpf.ProgramID, prog *ebpf.Program) (bool, error) {
	cur, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false, fmt.Errorf("open program %d: %w", id, err)
	}
	defer cur.Close()
	curInfo, err := cur.Info()
	if err != nil {
		return false, fmt.Errorf("inspect program %d: %w", id, err)
	}
	newInfo, err := prog.Info()
	if err != nil {
		return false, fmt.Errorf("inspect new program: %w", err)
	}
	if curInfo.Tag != newInfo.Tag {
		return false, nil
	}
	curMaps, ok1 := curInfo.MapIDs()
	newMaps, ok2 := newInfo.MapIDs()
	if !ok1 || !ok2 {
		// Without map ids the safe answer is "different": an update to an
		// identical program is harmless.
		return false, nil
	}
	slices.Sort(curMaps)
	slices.Sort(newMaps)
	return slices.Equal(curMaps, newMaps), nil
}

// Close releases the daemon's handle. The programs stay attached and keep
// publishing records; use Uninstall to remove them.
func (in *Installation) Close() error {
	var errs []error
	for _, m := range in.maps {
		errs = append(errs, m.Close())
	}
	return errors.Join(errs...)
}

// Uninstall detaches the programs and removes their pins and the pin
// directory, along with the pins of programs and maps earlier versions
// used. It is safe to run when nothing, or only part of an installation, is
// there. A daemon still running attaches the programs again (see Repair).
func Uninstall(ctx context.Context, opts Options) error {
	opts, err := opts.withDefaults()
	if err != nil {
		return fmt.Errorf("uninstall attribution programs: %w", err)
	}
	if _, err := os.Stat(opts.PinDir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if ok, err := isBPFFS(opts.PinDir); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("pin directory %s is not on a bpffs: nothing of identityd's can be pinned there", opts.PinDir)
	}
	unlock, err := lockDir(ctx, opts.PinDir, false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // removed by another Uninstall while this one waited
	}
	if err != nil {
		return err
	}
	defer unlock()

	// What earlier versions pinned goes too; anything else is left alone,
	// and the directories are then not empty, which is reported below.
	_, err = removePins(opts, append(programNames(), retiredPrograms()...), append(mapNames(), retiredMaps()...))
	errs := []error{err}
	for _, dir := range []string{filepath.Join(opts.PinDir, "links"), mapsDir(opts.PinDir), opts.PinDir} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove pin directory %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// lockDir takes an exclusive flock on dir so that two daemons (or a daemon
// and an uninstall) never attach or remove programs at the same time. With
// create, dir is made first if missing. Uninstall removes dir, so a lock won
// after waiting may be on a directory that is gone or was made anew: the
// lock only counts if dir still names the locked directory, and is taken
// again otherwise (without create, a dir that is gone is fs.ErrNotExist).
func lockDir(ctx context.Context, dir string, create bool) (func(), error) {
	for {
		if create {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, fmt.Errorf("create pin directory %s: %w", dir, err)
			}
		}
		f, err := os.Open(dir)
		if err != nil {
			return nil, fmt.Errorf("open pin directory %s: %w", dir, err)
		}
		if err := flockWait(ctx, f); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock pin directory %s: %w", dir, err)
		}
		locked, err1 := f.Stat()
		current, err2 := os.Stat(dir)
		if err1 == nil && err2 == nil && os.SameFile(locked, current) {
			return func() { f.Close() }, nil
		}
		f.Close()
		if err1 != nil {
			return nil, fmt.Errorf("stat locked pin directory %s: %w", dir, err1)
		}
		if !create && errors.Is(err2, fs.ErrNotExist) {
			return nil, fmt.Errorf("pin directory %s was removed: %w", dir, err2)
		}
	}
}

// flockWait takes an exclusive flock on f, polling until ctx is done.
func flockWait(ctx context.Context, f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for lock: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
