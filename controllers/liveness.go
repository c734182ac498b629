package controllers

import (
	"errors"
	"fmt"
	"io/fs"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/cgroup2"
	"github.com/identityd/identityd/internal/netnsutil"
)

// livenessState is what a check of a sandbox against the kernel concluded.
type livenessState int

const (
	// alive: the cgroup and netns are there and are the recorded ones.
	alive livenessState = iota
	// gone: definite evidence that the sandbox no longer exists.
	gone
	// unknown: the check could not be made; it says nothing either way.
	unknown
)

func (s livenessState) String() string {
	return [...]string{"alive", "gone", "unknown"}[s]
}

// liveness is the answer of probe.
type liveness struct {
	State livenessState
	// Reason says why the sandbox is gone, as a sentence fragment.
	Reason string
	// Object names what could not be checked, and Err why (unknown).
	Object string
	Err    error
	// Cookie is the live netns cookie when a deep probe read it.
	Cookie uint64
}

// probe is the one rule for whether a recorded sandbox still exists; the
// rebuild, the resync and Fsck all ask it. Only definite evidence makes a
// sandbox gone: its cgroup directory or netns file does not exist (ENOENT,
// ENOTDIR), its netns path holds something that is not a network namespace
// (the mount point left after an unmount), or the cgroup id or netns cookie
// differs from the record. Anything else that keeps the check from finishing
// (EMFILE at the descriptor limit, ENFILE, ENOMEM, EINTR, EAGAIN, ...) only
// makes it unknown: such errors say something about the daemon, not the
// sandbox. A deep probe also enters the netns to read its cookie, which
// costs a thread; the periodic resync does without.
func probe(r *Record, deep bool) liveness {
	if r.CgroupPath != "" {
		id, err := cgroup2.ID(r.CgroupPath)
		switch {
		case missing(err):
			return liveness{State: gone, Reason: fmt.Sprintf("its cgroup %s is gone", r.CgroupPath)}
		case err != nil:
			return liveness{State: unknown, Object: "cgroup " + r.CgroupPath, Err: err}
		case id != r.CgroupID:
			return liveness{State: gone, Reason: fmt.Sprintf("its cgroup %s was re-created (id %d, recorded %d)", r.CgroupPath, id, r.CgroupID)}
		}
	}
	if r.NetnsPath == "" {
		return liveness{State: alive}
	}
	err := netnsutil.CheckNetns(r.NetnsPath)
	switch {
	case errors.Is(err, netnsutil.ErrNotNetns):
		return liveness{State: gone, Reason: fmt.Sprintf("its netns %s is no longer a network namespace", r.NetnsPath)}
	case missing(err):
		return liveness{State: gone, Reason: fmt.Sprintf("its netns %s is gone", r.NetnsPath)}
	case err != nil:
		return liveness{State: unknown, Object: "netns " + r.NetnsPath, Err: err}
	case !deep:
		return liveness{State: alive}
	}
	cookie, err := netnsutil.Cookie(r.NetnsPath)
	switch {
	case missing(err):
		return liveness{State: gone, Reason: fmt.Sprintf("its netns %s is gone", r.NetnsPath)}
	case err != nil:
		return liveness{State: unknown, Object: "netns " + r.NetnsPath, Err: err}
	case r.NetnsCookie != 0 && cookie != r.NetnsCookie:
		return liveness{State: gone, Reason: fmt.Sprintf("its netns %s was re-created (cookie %d, recorded %d)", r.NetnsPath, cookie, r.NetnsCookie)}
	}
	return liveness{State: alive, Cookie: cookie}
}

// missing reports whether err is definite evidence that nothing is at the
// path it was about.
func missing(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR)
}
