package controllers

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/identityd/identityd/internal/atomicfile"
)

// Record is what the controller persists about a sandbox.
type Record struct {
	ID  string `json:"id"`
	App string `json:"app"`
	Org string `json:"org,omitempty"`
	// CgroupPath and CgroupID identify the sandbox's cgroup; a cgroup
	// re-created under the same path has another id and is not this sandbox.
	CgroupPath string `json:"cgroup_path,omitempty"`
	CgroupID   uint64 `json:"cgroup_id,omitempty"`
	// NetnsPath is the sandbox's network namespace; NetnsCookie is
	// recomputed from it at every start.
	NetnsPath   string `json:"netns_path,omitempty"`
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
	// Veth is the host end of the sandbox's veth pair, when the controller
	// made one.
	Veth      string         `json:"veth,omitempty"`
	Addresses []netip.Prefix `json:"addresses,omitempty"`
	// Owned sandboxes were created here, and Delete tears them down;
	// adopted ones belong to another runtime, and Delete only revokes them.
	Owned   bool      `json:"owned"`
	Created time.Time `json:"created"`
	// CredentialsMount is where the sandbox's credentials directory
	// appears inside it; empty for a sandbox made before credentials
	// directories existed, which has none.
	CredentialsMount string `json:"credentials_mount,omitempty"`
}

// recordStore is a directory of records, one 0600 file per sandbox, and a
// directory of pending markers: a marker is written before Create makes
// anything, and removed once the record exists, so that the leftovers of a
// Create cut short by a crash are known and removed at the next start.
type recordStore struct {
	dir, pending string
}

// recordDirs is where the records and pending markers of the state in
// stateDir live.
func recordDirs(stateDir string) *recordStore {
	return &recordStore{dir: filepath.Join(stateDir, "sandboxes"), pending: filepath.Join(stateDir, "pending")}
}

func openRecords(stateDir string) (*recordStore, error) {
	s := recordDirs(stateDir)
	for _, d := range []string{stateDir, s.dir, s.pending} {
		if err := atomicfile.MkdirPrivate(d); err != nil {
			return nil, fmt.Errorf("open sandbox records: %w", err)
		}
		if err := atomicfile.RemoveTemps(d); err != nil {
			return nil, fmt.Errorf("open sandbox records: %w", err)
		}
	}
	return s, nil
}

func (s *recordStore) put(r *Record) error { return writeJSON(filepath.Join(s.dir, r.ID+".json"), r) }

func (s *recordStore) putPending(r *Record) error {
	return writeJSON(filepath.Join(s.pending, r.ID+".json"), r)
}

func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

func (s *recordStore) remove(id string) error { return removeFile(filepath.Join(s.dir, id+".json")) }
func (s *recordStore) removePending(id string) error {
	return removeFile(filepath.Join(s.pending, id+".json"))
}

func removeFile(p string) error {
	if err := atomicfile.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// exists reports whether a record of id is on disk; an error means it
// could not be told.
func (s *recordStore) exists(id string) (bool, error) {
	_, err := os.Stat(filepath.Join(s.dir, id+".json"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look for the record of %s: %w", id, err)
	}
	return true, nil
}

// errCorrupt marks a record file that was read but does not parse, as
// opposed to one that could not be read at all.
var errCorrupt = errors.New("corrupt")

// list reads every record in dir. A file that does not parse is reported
// (wrapping errCorrupt), not trusted.
func list(dir string) ([]*Record, []error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, []error{err}
	}
	var out []*Record
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".json") || atomicfile.IsTemp(name) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var r Record
		if err := json.Unmarshal(b, &r); err != nil || r.ID+".json" != name {
			errs = append(errs, fmt.Errorf("sandbox record %s is %w: %v", name, errCorrupt, err))
			continue
		}
		out = append(out, &r)
	}
	return out, errs
}
