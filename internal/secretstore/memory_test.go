package secretstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestChecksReadNoFile: once a store of Open has written or read a record,
// its checks answer from memory: a file changed behind its back (here,
// corrupted) changes nothing for it, while At, which reads the disk, a
// restarted store, which starts from the disk, and the store itself after
// Reload see the file as it is and fail closed.
func TestChecksReadNoFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	require.NoError(t, s.Put("sb", secretA))
	p, err := s.Path("sb")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(p, []byte(`{"version":1,"hashes":[{"sha256":"zz"}]}`), 0o600))

	ok, err := s.Verify("sb", secretA)
	require.NoError(t, err)
	assert.True(t, ok, "answered from memory")
	cur, err := s.IsCurrent("sb", secretA)
	require.NoError(t, err)
	assert.True(t, cur)
	_, err = s.Status("sb")
	require.NoError(t, err)

	for name, other := range map[string]*Store{"At": At(dir), "a restarted store": must(Open(dir)), "a reloaded store": reloaded(s)} {
		for range 2 {
			ok, err := other.Verify("sb", secretA)
			assert.ErrorContains(t, err, "corrupt hash", name)
			assert.False(t, ok, "%s: a corrupt record never matches", name)
			_, err = other.IsCurrent("sb", secretA)
			assert.Error(t, err, name)
		}
	}
}

// TestRestartRotationDeletionSeenAtOnce: what one store wrote, a store
// opened after it (a restarted daemon) reads from disk; a rotation and a
// deletion change the answer of the store that made them as soon as they
// return, and expiries are checked against the clock at every call.
func TestRestartRotationDeletionSeenAtOnce(t *testing.T) {
	clk := &clock{t: time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)}
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	s.now = clk.now
	require.NoError(t, s.Put("sb", "first"))
	require.NoError(t, s.Put("other", "o"))
	accepts(t, s, "sb", map[string]bool{"first": true, "second": false})

	// Restart: a new store over the directory, nothing in memory yet.
	s2, err := Open(dir)
	require.NoError(t, err)
	s2.now = clk.now
	accepts(t, s2, "sb", map[string]bool{"first": true, "second": false})

	// Rotation with a grace window, then without.
	require.NoError(t, s2.Rotate("sb", "second", time.Minute))
	accepts(t, s2, "sb", map[string]bool{"first": true, "second": true})
	clk.t = clk.t.Add(time.Minute)
	accepts(t, s2, "sb", map[string]bool{"first": false, "second": true})
	require.NoError(t, s2.Rotate("sb", "third", 0))
	accepts(t, s2, "sb", map[string]bool{"first": false, "second": false, "third": true})
	cur, err := s2.IsCurrent("sb", "third")
	require.NoError(t, err)
	assert.True(t, cur)

	// Deletion.
	require.NoError(t, s2.Delete("sb"))
	_, err = s2.Verify("sb", "third")
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = s2.Status("sb")
	assert.ErrorIs(t, err, ErrNotFound)
	has, err := s2.Has("sb")
	require.NoError(t, err)
	assert.False(t, has)
	accepts(t, s2, "other", map[string]bool{"o": true})

	// And a third store agrees with all of it.
	s3, err := Open(dir)
	require.NoError(t, err)
	_, err = s3.Verify("sb", "third")
	assert.ErrorIs(t, err, ErrNotFound)
	accepts(t, s3, "other", map[string]bool{"o": true})
}

// TestFailedWriteLeavesTheDisk: when a write fails, memory does not keep
// the record the write replaced: the next check reads the disk, whatever it
// holds (here something that is not a record), and fails closed.
func TestFailedWriteLeavesTheDisk(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	require.NoError(t, s.Put("sb", "first"))
	p, err := s.Path("sb")
	require.NoError(t, err)
	// A directory in the record's place: the rename of every write fails.
	require.NoError(t, os.Remove(p))
	require.NoError(t, os.Mkdir(p, 0o700))
	require.Error(t, s.Put("sb", "second"))
	for _, secret := range []string{"first", "second"} {
		ok, err := s.Verify("sb", secret)
		assert.Error(t, err)
		assert.False(t, ok, secret)
	}
	require.Error(t, s.Rotate("sb", "third", time.Hour))
	ok, err := s.Verify("sb", "third")
	assert.Error(t, err)
	assert.False(t, ok)
}

// TestConcurrentChecksAndWrites: many readers during rotations and
// deletions see, at each call, a secret the store held at some point of the
// call, and never a torn state (run with -race).
func TestConcurrentChecksAndWrites(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	const ids = 4
	for i := range ids {
		require.NoError(t, s.Put(fmt.Sprint("sb", i), "s0"))
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r := range 8 {
		wg.Go(func() {
			id := fmt.Sprint("sb", r%ids)
			for {
				select {
				case <-stop:
					return
				default:
				}
				for v := range 3 {
					if _, err := s.Verify(id, fmt.Sprint("s", v)); err != nil && !isNotFound(err) {
						t.Errorf("verify %s: %v", id, err)
						return
					}
				}
				s.Status(id)
				s.IsCurrent(id, "s1")
			}
		})
	}
	for round := range 50 {
		id := fmt.Sprint("sb", round%ids)
		require.NoError(t, s.Rotate(id, fmt.Sprint("s", 1+round%2), time.Hour))
		if round%7 == 0 {
			require.NoError(t, s.Delete(id))
			require.NoError(t, s.Put(id, "s0"))
		}
	}
	close(stop)
	wg.Wait()
	// Memory ends as the disk does.
	disk := At(s.dir)
	for i := range ids {
		id := fmt.Sprint("sb", i)
		for v := range 3 {
			secret := fmt.Sprint("s", v)
			want, err := disk.Verify(id, secret)
			require.NoError(t, err)
			got, err := s.Verify(id, secret)
			require.NoError(t, err)
			assert.Equal(t, want, got, "%s %s", id, secret)
		}
	}
}

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

func reloaded(s *Store) *Store {
	s.Reload()
	return s
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// BenchmarkVerify is the secret check of every token request: from memory
// (a store of Open, as the daemon has) and, as before memory, reading and
// parsing the record's file at every call (a store of At).
//
//	go test -run '^$' -bench Verify -count 5 ./internal/secretstore/
func BenchmarkVerify(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(b, err)
	require.NoError(b, s.Put("sb", secretA))
	require.NoError(b, s.Rotate("sb", secretA[1:]+"0", time.Hour))
	for name, st := range map[string]*Store{"memory": s, "file": At(dir)} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				ok, err := st.Verify("sb", secretA)
				if err != nil || !ok {
					b.Fatal(ok, err)
				}
			}
		})
	}
}
