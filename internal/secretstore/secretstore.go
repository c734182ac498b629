// Package secretstore keeps each sandbox's bearer secret on disk, so that a
// running sandbox keeps authenticating across any number of daemon restarts.
//
// Only a SHA-256 hash of the secret is stored: the secrets are 32 random
// bytes, so a fast hash loses nothing to guessing, and a leaked state
// directory does not leak usable secrets. Each sandbox has one file,
// <dir>/<id>.json (a daemon's <dir> is Dir of its state directory), 0600 in
// a 0700 directory, replaced atomically. A file
// holds a list of hashes, the current one first, each with an optional
// expiry, so that a rotated secret's predecessor can stay valid for a grace
// window. Rotate replaces the whole list in one atomic write, so a crash
// leaves either the old pair or the new one.
//
// A store from Open keeps the records it has read or written in memory, so
// that checking a secret reads no file: the daemon that opened it is the
// only writer of its directory, and every write goes through the same
// methods, which update memory once the disk has the new record. The disk
// stays the only source at start: a record is read from it the first time
// it is needed. A store from At reads the disk every time.
package secretstore

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/identityd/identityd/internal/atomicfile"
)

// ErrNotFound means no secret is stored for the sandbox.
var ErrNotFound = errors.New("no secret stored for sandbox")

// MaxIDLen is the longest sandbox id the store takes.
const MaxIDLen = 128

// validID keeps ids usable as file names: no separators, no leading dot.
var validID = regexp.MustCompile(fmt.Sprintf(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}$`, MaxIDLen-1))

// ValidID reports whether id can name a sandbox in the store.
func ValidID(id string) bool { return validID.MatchString(id) }

// Store is a directory of secret hashes. It is safe for concurrent use.
type Store struct {
	dir string
	now func() time.Time
	// mem holds the records already read or written; nil for a store of
	// At, which reads the disk every time.
	mem *memory
}

// memory is the records of a store's directory as its writes left them.
type memory struct {
	mu   sync.RWMutex
	recs map[string]*loaded
	// gen counts writes, so that a record read from disk while a write of
	// it was in flight is not kept in place of what the write left.
	gen uint64
	// writers serializes the writes of each sandbox (by a stripe of ids),
	// so that memory ends as the last write left the disk.
	writers [64]sync.Mutex
}

// loaded is a record with its hashes decoded.
type loaded struct {
	rec  record
	sums [][sha256.Size]byte
	// corrupt is why a hash cannot be compared; such a record is never
	// kept in memory, and never matches.
	corrupt error
}

// record is the on-disk form.
type record struct {
	Version int         `json:"version"`
	Hashes  []hashEntry `json:"hashes"`
}

type hashEntry struct {
	SHA256   string     `json:"sha256"`
	NotAfter *time.Time `json:"not_after,omitempty"`
	// IssuedAt is when the secret was made; absent in records written
	// before rotation existed.
	IssuedAt *time.Time `json:"issued_at,omitempty"`
}

// dirName is the store's directory within a daemon's state directory.
const dirName = "secrets"

// Dir is where a daemon whose state lives in stateDir keeps its secrets.
func Dir(stateDir string) string { return filepath.Join(stateDir, dirName) }

// fileSuffix ends the name of every sandbox's file: <id>.json.
const fileSuffix = ".json"

// Open opens (creating if needed) the store in dir, and removes leftovers of
// writes a crash interrupted.
func Open(dir string) (*Store, error) {
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return nil, fmt.Errorf("open secret store: %w", err)
	}
	if err := atomicfile.RemoveTemps(dir); err != nil {
		return nil, fmt.Errorf("open secret store: remove interrupted writes: %w", err)
	}
	s := At(dir)
	s.mem = &memory{recs: map[string]*loaded{}}
	return s, nil
}

// At is the store in dir as it is: nothing is created or cleaned up, and
// nothing is kept in memory, so that a check such as fsck only reads, and
// reads what is on disk now.
func At(dir string) *Store { return &Store{dir: dir, now: time.Now} }

// Reload drops what the store holds in memory, so that the next checks
// read the disk. A daemon calls it when it takes up writing again after
// another process may have written the directory: a predecessor that
// resumes after its successor failed to take over.
func (s *Store) Reload() {
	if s.mem == nil {
		return
	}
	s.mem.mu.Lock()
	defer s.mem.mu.Unlock()
	s.mem.gen++
	clear(s.mem.recs)
}

// lockWriter serializes the writes of sandbox id; it returns the unlock.
func (s *Store) lockWriter(id string) func() {
	if s.mem == nil {
		return func() {}
	}
	h := uint32(2166136261) // FNV-1a
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	mu := &s.mem.writers[h%uint32(len(s.mem.writers))]
	mu.Lock()
	return mu.Unlock
}

// remember makes l what memory holds of sandbox id (nil: nothing, so the
// disk is read next time), after a write.
func (s *Store) remember(id string, l *loaded) {
	if s.mem == nil {
		return
	}
	s.mem.mu.Lock()
	defer s.mem.mu.Unlock()
	s.mem.gen++
	if l == nil || l.corrupt != nil {
		delete(s.mem.recs, id)
		return
	}
	s.mem.recs[id] = l
}

// Path is the file that holds the secrets of sandbox id.
func (s *Store) Path(id string) (string, error) {
	if !ValidID(id) {
		return "", fmt.Errorf("invalid sandbox id %q", id)
	}
	return filepath.Join(s.dir, id+fileSuffix), nil
}

// IDs lists the sandboxes that have a secret stored, in file name order.
// Temporary files of writes in flight, and names that cannot be a
// sandbox's, are left out.
func (s *Store) IDs() ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list secrets: %w", err)
	}
	var ids []string
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), fileSuffix)
		if ok && !atomicfile.IsTemp(e.Name()) && ValidID(id) {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

func hashOf(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// Put makes secret the only valid secret of sandbox id, durably.
func (s *Store) Put(id, secret string) error {
	p, err := s.Path(id)
	if err != nil {
		return fmt.Errorf("store secret: %w", err)
	}
	defer s.lockWriter(id)()
	now := s.now().UTC()
	return s.write(id, p, record{Version: 1, Hashes: []hashEntry{{SHA256: hashOf(secret), IssuedAt: &now}}})
}

// write replaces sandbox id's record, on disk then in memory. The caller
// holds id's writer lock.
func (s *Store) write(id, p string, rec record) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(p, b, 0o600); err != nil {
		// The disk may hold either record now: memory forgets it, so
		// the next check reads what the disk holds.
		s.remember(id, nil)
		return fmt.Errorf("store secret of %s: %w", id, err)
	}
	s.remember(id, decode(rec))
	return nil
}

// Rotate makes next the current secret of sandbox id, durably, and keeps
// the one it replaces valid for grace (not at all if grace is zero). Only
// that one: a secret rotated out earlier, still in its own grace window,
// is revoked, so that at most two secrets are ever valid. Rotating to the
// secret that is already current changes nothing, so a rotation replayed
// after a crash does not cut the grace window short.
func (s *Store) Rotate(id, next string, grace time.Duration) error {
	p, err := s.Path(id)
	if err != nil {
		return fmt.Errorf("rotate secret: %w", err)
	}
	defer s.lockWriter(id)()
	l, err := s.load(id)
	if err != nil {
		return fmt.Errorf("rotate secret: %w", err)
	}
	rec := l.rec
	h := hashOf(next)
	cur := rec.Hashes[current(rec)]
	if cur.SHA256 == h {
		return nil
	}
	now := s.now().UTC()
	hashes := []hashEntry{{SHA256: h, IssuedAt: &now}}
	if prev := cur; grace > 0 && (prev.NotAfter == nil || now.Before(*prev.NotAfter)) {
		until := now.Add(grace)
		if prev.NotAfter != nil && prev.NotAfter.Before(until) {
			until = *prev.NotAfter
		}
		prev.NotAfter = &until
		hashes = append(hashes, prev)
	}
	return s.write(id, p, record{Version: 1, Hashes: hashes})
}

// Status is what the store says of a sandbox's secrets, without them.
type Status struct {
	// Issued is when the current secret was made; zero if the record
	// predates rotation.
	Issued time.Time `json:"issued,omitzero"`
	// PreviousUntil is when the secret rotated out last stops being
	// accepted; zero if none is accepted any more.
	PreviousUntil time.Time `json:"previous_until,omitzero"`
}

// Status reports when sandbox id's current secret was made and until when
// its predecessor is accepted.
func (s *Store) Status(id string) (Status, error) {
	l, err := s.load(id)
	if err != nil {
		return Status{}, err
	}
	rec := l.rec
	var st Status
	cur := current(rec)
	if t := rec.Hashes[cur].IssuedAt; t != nil {
		st.Issued = *t
	}
	now := s.now()
	for i, h := range rec.Hashes {
		if i != cur && h.NotAfter != nil && now.Before(*h.NotAfter) && h.NotAfter.After(st.PreviousUntil) {
			st.PreviousUntil = *h.NotAfter
		}
	}
	return st, nil
}

// IsCurrent reports whether secret is sandbox id's current secret (not
// merely one still accepted).
func (s *Store) IsCurrent(id, secret string) (bool, error) {
	l, err := s.load(id)
	if err != nil {
		return false, err
	}
	if l.corrupt != nil {
		return false, fmt.Errorf("secret of %s: %w", id, l.corrupt)
	}
	want := sha256.Sum256([]byte(secret))
	got := l.sums[current(l.rec)]
	return subtle.ConstantTimeCompare(got[:], want[:]) == 1, nil
}

// current is the index of the current secret's entry: the first without
// an expiry (Put and Rotate write it first), else the first.
func current(rec record) int {
	for i, h := range rec.Hashes {
		if h.NotAfter == nil {
			return i
		}
	}
	return 0
}

// load returns sandbox id's record: from memory if it is there, else
// from disk, and then kept in memory unless a write of it went on
// meanwhile. Records that are missing, unreadable or corrupt are not kept:
// they are read again next time, and never match.
func (s *Store) load(id string) (*loaded, error) {
	if s.mem == nil {
		return s.read(id)
	}
	s.mem.mu.RLock()
	l, ok := s.mem.recs[id]
	gen := s.mem.gen
	s.mem.mu.RUnlock()
	if ok {
		return l, nil
	}
	l, err := s.read(id)
	if err != nil || l.corrupt != nil {
		return l, err
	}
	s.mem.mu.Lock()
	defer s.mem.mu.Unlock()
	if s.mem.gen == gen {
		s.mem.recs[id] = l
	}
	return l, nil
}

// read reads sandbox id's record from disk.
func (s *Store) read(id string) (*loaded, error) {
	p, err := s.Path(id)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("secret of %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read secret of %s: %w", id, err)
	}
	rec, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("secret of %s: %w", id, err)
	}
	l := decode(rec)
	if l.corrupt != nil {
		l.corrupt = fmt.Errorf("%w in %s", l.corrupt, p)
	}
	return l, nil
}

// decode decodes rec's hashes, once for every check of them.
func decode(rec record) *loaded {
	l := &loaded{rec: rec, sums: make([][sha256.Size]byte, len(rec.Hashes))}
	for i, h := range rec.Hashes {
		got, err := hex.DecodeString(h.SHA256)
		if err != nil || len(got) != sha256.Size {
			l.corrupt = errors.New("corrupt hash")
			continue
		}
		copy(l.sums[i][:], got)
	}
	return l
}

// Verify reports whether bearer is a currently valid secret of sandbox id.
// The comparison runs in constant time; expiries are checked against the
// clock at each call. A missing record is ErrNotFound; an unreadable or
// corrupt one is an error, never a match.
func (s *Store) Verify(id, bearer string) (bool, error) {
	l, err := s.load(id)
	if err != nil {
		return false, fmt.Errorf("verify: %w", err)
	}
	if l.corrupt != nil {
		return false, fmt.Errorf("verify secret of %s: %w", id, l.corrupt)
	}
	want := sha256.Sum256([]byte(bearer))
	now := s.now()
	match := 0
	for i, h := range l.rec.Hashes {
		valid := h.NotAfter == nil || now.Before(*h.NotAfter)
		// Every entry is compared, valid or not, so that timing says
		// nothing about which one matched.
		if subtle.ConstantTimeCompare(l.sums[i][:], want[:]) == 1 && valid {
			match = 1
		}
	}
	return match == 1, nil
}

func parse(b []byte) (record, error) {
	var rec record
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rec); err != nil {
		return rec, fmt.Errorf("corrupt secret record: %w", err)
	}
	if rec.Version != 1 {
		return rec, fmt.Errorf("secret record has unknown version %d", rec.Version)
	}
	if len(rec.Hashes) == 0 {
		return rec, errors.New("secret record holds no hash")
	}
	return rec, nil
}

// Has reports whether any secret is stored for sandbox id.
func (s *Store) Has(id string) (bool, error) {
	p, err := s.Path(id)
	if err != nil {
		return false, err
	}
	if s.mem != nil {
		s.mem.mu.RLock()
		_, ok := s.mem.recs[id]
		s.mem.mu.RUnlock()
		if ok {
			return true, nil
		}
	}
	_, err = os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

// Delete revokes every secret of sandbox id, durably. Deleting a missing
// record is not an error.
func (s *Store) Delete(id string) error {
	p, err := s.Path(id)
	if err != nil {
		return fmt.Errorf("delete secret: %w", err)
	}
	defer s.lockWriter(id)()
	// Memory forgets the record whatever the removal did: the next check
	// reads the disk, and finds the record gone or, if the removal
	// failed, still there.
	defer s.remember(id, nil)
	if err := atomicfile.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete secret of %s: %w", id, err)
	}
	return nil
}
