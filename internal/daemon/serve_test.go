package daemon

import (
	"bufio"
	"context"
	"errors"
	"io"
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

// TestDrainAnswersAcceptedRequests: a connection accepted before the drain
// whose request arrives after it began is answered, not dropped (what
// http.Server.Shutdown alone does), and closed after its answer.
func TestDrainAnswersAcceptedRequests(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	var set serverSet
	g.Go(func() error { return set.shutdownWhenDone(gctx, slog.New(slog.DiscardHandler)) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	set.serve(g, "token", ln, &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("answered"))
	})})
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	require.Eventually(t, func() bool { return set.servers[0].open.Load() == 1 }, 10*time.Second, time.Millisecond, "accepted")

	cancel() // the drain begins with the request not yet sent
	time.Sleep(50 * time.Millisecond)
	_, err = c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	require.NoError(t, err)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err, "answered, not dropped")
	body, _ := io.ReadAll(resp.Body)
	assert.Equal(t, "answered", string(body))
	assert.True(t, resp.Close, "and told the connection closes")
	assert.NoError(t, g.Wait())
	_, err = net.Dial("tcp", ln.Addr().String())
	assert.Error(t, err, "no longer accepting")
}

func TestBoundAt(t *testing.T) {
	tcp := &net.TCPAddr{IP: net.ParseIP("10.88.0.1"), Port: 7123}
	for want, ok := range map[string]bool{
		"": true, "10.88.0.1:7123": true, "10.88.0.1:0": true, "10.88.0.2:7123": false, "10.88.0.1:7124": false,
		":7123": true, "localhost:7123": false,
	} {
		assert.Equal(t, ok, boundAt(tcp, want), "%q", want)
	}
	unix := &net.UnixAddr{Name: "/run/identityd/admin.sock", Net: "unix"}
	assert.True(t, boundAt(unix, "/run/identityd/admin.sock"))
	assert.False(t, boundAt(unix, "/run/other/admin.sock"))
}
