package secretstore

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// clock is a settable time for the store's checks.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func accepts(t *testing.T, s *Store, id string, want map[string]bool) {
	t.Helper()
	for secret, ok := range want {
		got, err := s.Verify(id, secret)
		require.NoError(t, err)
		assert.Equal(t, ok, got, "secret %s accepted", secret)
	}
}

func TestRotateGraceWindow(t *testing.T) {
	clk := &clock{t: time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)}
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	s.now = clk.now
	require.NoError(t, s.Put("sb", "first"))
	st, err := s.Status("sb")
	require.NoError(t, err)
	assert.Equal(t, clk.t, st.Issued)
	assert.True(t, st.PreviousUntil.IsZero())

	clk.t = clk.t.Add(time.Minute)
	require.NoError(t, s.Rotate("sb", "second", time.Hour))
	accepts(t, s, "sb", map[string]bool{"first": true, "second": true})
	st, err = s.Status("sb")
	require.NoError(t, err)
	assert.Equal(t, clk.t, st.Issued)
	assert.Equal(t, clk.t.Add(time.Hour), st.PreviousUntil)
	cur, err := s.IsCurrent("sb", "second")
	require.NoError(t, err)
	assert.True(t, cur)
	cur, err = s.IsCurrent("sb", "first")
	require.NoError(t, err)
	assert.False(t, cur, "a secret in its grace window is accepted, not current")

	// The window's last instant still accepts; its end does not.
	clk.t = st.PreviousUntil.Add(-time.Nanosecond)
	accepts(t, s, "sb", map[string]bool{"first": true, "second": true})
	clk.t = st.PreviousUntil
	accepts(t, s, "sb", map[string]bool{"first": false, "second": true})

	// A store reopened over the directory (a restarted daemon) agrees.
	s2, err := Open(s.dir)
	require.NoError(t, err)
	s2.now = clk.now
	accepts(t, s2, "sb", map[string]bool{"first": false, "second": true})
}

func TestRotateKeepsAtMostTwo(t *testing.T) {
	clk := &clock{t: time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)}
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	s.now = clk.now
	require.NoError(t, s.Put("sb", "a"))
	require.NoError(t, s.Rotate("sb", "b", time.Hour))
	clk.t = clk.t.Add(time.Second)
	require.NoError(t, s.Rotate("sb", "c", time.Hour))
	accepts(t, s, "sb", map[string]bool{"a": false, "b": true, "c": true})

	// Replayed after a crash, a rotation changes nothing: b's window is
	// not restarted, nor cut short.
	before, err := s.Status("sb")
	require.NoError(t, err)
	clk.t = clk.t.Add(time.Minute)
	require.NoError(t, s.Rotate("sb", "c", time.Hour))
	after, err := s.Status("sb")
	require.NoError(t, err)
	assert.Equal(t, before, after)
}

func TestRotateWithoutGrace(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	require.NoError(t, s.Put("sb", "a"))
	require.NoError(t, s.Rotate("sb", "b", time.Hour))
	require.NoError(t, s.Rotate("sb", "c", 0))
	accepts(t, s, "sb", map[string]bool{"a": false, "b": false, "c": true})
	st, err := s.Status("sb")
	require.NoError(t, err)
	assert.True(t, st.PreviousUntil.IsZero())
}

func TestRotateMissing(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "secrets"))
	require.NoError(t, err)
	assert.ErrorIs(t, s.Rotate("nobody", "x", time.Hour), ErrNotFound)
}

// A record written before rotation existed (no issued_at, the current
// hash not first) still rotates from its current secret.
func TestRotateOldRecord(t *testing.T) {
	clk := &clock{t: time.Now()}
	dir := filepath.Join(t.TempDir(), "secrets")
	s, err := Open(dir)
	require.NoError(t, err)
	s.now = clk.now
	future := clk.t.Add(time.Minute).UTC().Format(time.RFC3339)
	writeRecord(t, dir, "x", `{"version":1,"hashes":[{"sha256":"`+hashOf("grace")+`","not_after":"`+future+`"},{"sha256":"`+hashOf("cur")+`"}]}`)
	st, err := s.Status("x")
	require.NoError(t, err)
	assert.True(t, st.Issued.IsZero())
	require.NoError(t, s.Rotate("x", "next", time.Hour))
	accepts(t, s, "x", map[string]bool{"grace": false, "cur": true, "next": true})
}

func writeRecord(t *testing.T, dir, id, rec string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(dir, id+".json"), []byte(rec), 0o600))
}
