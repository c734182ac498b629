package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"
)

// brokenListener fails the way a listener whose socket went away does.
type brokenListener struct{}

func (brokenListener) Accept() (net.Conn, error) { return nil, errors.New("accept: socket gone") }
func (brokenListener) Close() error              { return nil }
func (brokenListener) Addr() net.Addr            { return &net.TCPAddr{} }

// TestAServerFailingStopsTheDaemon: one server's Serve failing ends the
// group with that error, and the other servers are shut down, instead of the
// daemon running on without that listener.
func TestAServerFailingStopsTheDaemon(t *testing.T) {
	g, gctx := errgroup.WithContext(context.Background())
	var set serverSet
	g.Go(func() error { return set.shutdownWhenDone(gctx, slog.New(slog.DiscardHandler)) })

	good, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	set.serve(g, "operator", good, &http.Server{Handler: http.NotFoundHandler()})
	// Serving before the failure, so that its shutdown is what stops it.
	require.Eventually(t, func() bool {
		c, err := net.Dial("tcp", good.Addr().String())
		if err == nil {
			c.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	set.serve(g, "token", brokenListener{}, &http.Server{Handler: http.NotFoundHandler()})

	done := make(chan error, 1)
	go func() { done <- g.Wait() }()
	select {
	case err := <-done:
		require.Error(t, err)
		assert.Contains(t, err.Error(), "token server stopped: accept: socket gone")
	case <-time.After(30 * time.Second):
		t.Fatal("the group did not end when a server failed")
	}
	_, err = net.Dial("tcp", good.Addr().String())
	assert.Error(t, err, "the other server was shut down")
}

// TestShutdownIsNotAnError: the group's context ending stops every server
// gracefully, and the group reports no error.
func TestShutdownIsNotAnError(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	var set serverSet
	g.Go(func() error { return set.shutdownWhenDone(gctx, slog.New(slog.DiscardHandler)) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	set.serve(g, "operator", ln, &http.Server{Handler: http.NotFoundHandler()})
	cancel()
	assert.NoError(t, g.Wait())
}
