package handover

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A listening socket passed to a successor keeps its accept queue: a
// connection made before the handover, never accepted by the running side,
// is accepted by the successor.
func TestHandOverListeners(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handover.sock")
	l, err := Listen(path)
	require.NoError(t, err)
	defer l.Close()
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	f, err := tcp.(*net.TCPListener).File()
	require.NoError(t, err)
	queued, err := net.Dial("tcp", tcp.Addr().String())
	require.NoError(t, err)
	defer queued.Close()

	done := make(chan error, 1)
	go func() {
		s, err := l.Accept()
		if err != nil {
			done <- err
			return
		}
		assert.Equal(t, os.Getpid(), s.PID)
		assert.Equal(t, "v2", s.Version)
		if err := s.Send(map[string]*os.File{"token": f}); err != nil {
			done <- err
			return
		}
		if err := s.WaitReady(context.Background()); err != nil {
			done <- err
			return
		}
		tcp.Close() // the running side stops accepting
		f.Close()
		done <- s.Released()
	}()

	p, err := Dial(context.Background(), path, "v2")
	require.NoError(t, err)
	files, err := p.Receive()
	require.NoError(t, err)
	require.Contains(t, files, "token")
	require.NoError(t, p.Ready(context.Background()))
	require.NoError(t, <-done)

	ln, err := net.FileListener(files["token"])
	require.NoError(t, err)
	files["token"].Close()
	defer ln.Close()
	c, err := ln.Accept()
	require.NoError(t, err, "the connection queued before the handover is accepted after it")
	c.Write([]byte("x"))
	c.Close()
	b, _ := io.ReadAll(queued)
	assert.Equal(t, "x", string(b))
}

func TestNoPredecessor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handover.sock")
	_, err := Dial(context.Background(), path, "v")
	assert.ErrorIs(t, err, ErrNoPredecessor, "no socket")
	l, err := Listen(path)
	require.NoError(t, err)
	l.Close()
	_, err = Dial(context.Background(), path, "v")
	assert.ErrorIs(t, err, ErrNoPredecessor, "a stale socket nobody listens on")
	l, err = Listen(path)
	require.NoError(t, err, "a stale socket is replaced")
	l.Close()
}

// A successor that fails, or goes away, leaves the running side serving,
// with the reason.
func TestSuccessorFails(t *testing.T) {
	path := filepath.Join(t.TempDir(), "handover.sock")
	l, err := Listen(path)
	require.NoError(t, err)
	defer l.Close()
	for _, how := range []string{"fail", "vanish", "timeout"} {
		t.Run(how, func(t *testing.T) {
			errc := make(chan error, 1)
			go func() {
				s, err := l.Accept()
				if err != nil {
					errc <- err
					return
				}
				s.Send(map[string]*os.File{})
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				defer cancel()
				errc <- s.WaitReady(ctx)
			}()
			p, err := Dial(context.Background(), path, "v")
			require.NoError(t, err)
			_, err = p.Receive()
			require.NoError(t, err)
			switch how {
			case "fail":
				p.Fail(errors.New("cannot load programs"))
				assert.ErrorContains(t, <-errc, "cannot load programs")
			case "vanish":
				p.Close()
				assert.ErrorContains(t, <-errc, "went away")
			case "timeout":
				assert.ErrorIs(t, <-errc, context.DeadlineExceeded)
				p.Close()
			}
		})
	}
}
