package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// serverSet runs HTTP servers as tasks of one group and drains them all
// when the group's context ends, which also happens when any of them
// fails.
//
// Draining is not http.Server.Shutdown alone: a request read after Shutdown
// began is dropped unanswered (net/http closes its connection), and with a
// successor accepting on the same sockets that is a request lost for
// nothing. So the listeners are closed first and keep-alives turned off;
// connections already accepted finish their request, answered, and close;
// only then does Shutdown run, with nothing left to drop.
type serverSet struct {
	mu       sync.Mutex
	servers  []*served
	draining atomic.Bool
}

// served is one server, its listener, and how many connections it has open.
type served struct {
	name    string
	srv     *http.Server
	ln      net.Listener
	open    atomic.Int64
	drained atomic.Bool
}

// serve runs srv on ln as a task of g. A server that stops for any reason
// but a drain or a shutdown is an error, and ends the group.
func (s *serverSet) serve(g *errgroup.Group, name string, ln net.Listener, srv *http.Server) *served {
	// Both drain and Shutdown close the listener; the second close must
	// not turn a clean stop into "use of closed network connection".
	ln = &closeOnce{Listener: ln}
	sv := &served{name: name, srv: srv, ln: ln}
	prev := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			sv.open.Add(1)
		case http.StateClosed, http.StateHijacked:
			sv.open.Add(-1)
		}
		if prev != nil {
			prev(c, st)
		}
	}
	s.mu.Lock()
	s.servers = append(s.servers, sv)
	s.mu.Unlock()
	g.Go(func() error {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) || s.draining.Load() || sv.stopped() {
			return nil
		}
		return fmt.Errorf("%s server stopped: %w", name, err)
	})
	return sv
}

// drainPoll paces the wait for a server's connections to close.
const drainPoll = 5 * time.Millisecond

// drain stops sv accepting, lets its connections finish their current
// request and close, then shuts it down; by ctx's end, whatever is left is
// shut down as it is.
func (sv *served) drain(ctx context.Context) error {
	sv.drained.Store(true)
	sv.srv.SetKeepAlivesEnabled(false) // also closes idle connections
	sv.ln.Close()
	for sv.open.Load() > 0 && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-time.After(drainPoll):
		}
	}
	if err := sv.srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("shut down the %s server: %w", sv.name, err)
	}
	return nil
}

// stopped says whether sv was drained on its own (the admin API during a
// handover): its Serve returning then is no failure.
func (sv *served) stopped() bool { return sv.drained.Load() }

// shutdownWhenDone waits for ctx to end, then drains every server together,
// letting in-flight requests finish within shutdownGrace.
func (s *serverSet) shutdownWhenDone(ctx context.Context, log *slog.Logger) error {
	<-ctx.Done()
	log.Info("identityd stopping: finishing in-flight requests")
	s.draining.Store(true)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	s.mu.Lock()
	servers := append([]*served(nil), s.servers...)
	s.mu.Unlock()
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, sv := range servers {
		wg.Go(func() { errs[i] = sv.drain(shutdownCtx) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// closeOnce is a listener whose Close closes it the first time and reports
// that first result again after.
type closeOnce struct {
	net.Listener
	once sync.Once
	err  error
}

func (c *closeOnce) Close() error {
	c.once.Do(func() { c.err = c.Listener.Close() })
	return c.err
}
