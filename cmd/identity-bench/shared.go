package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/client"
)

// A start storm with shared clients (--storm-clients shared) asks from
// this one process instead of from a process per sandbox, so that what
// the storm measures is the server and not 1,000 Go processes waking up
// on the same two cores. The sandboxes' identity is untouched: each
// sandbox's client process makes the sockets, and the kernel stamps each
// with the cgroup and netns it was made in, which is all that attribution
// reads (bpf.Record); this process only takes copies of them
// (pidfd_getfd) and connects them.

// socketsPerSandbox: one for the first attempt, one for a retry.
const socketsPerSandbox = 2

// sandboxSockets are sockets made in one sandbox, not yet connected.
type sandboxSockets struct {
	mu  sync.Mutex
	fds []int
}

// next hands out a socket, which is the caller's to close.
func (s *sandboxSockets) next() (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.fds) == 0 {
		return -1, false
	}
	fd := s.fds[0]
	s.fds = s.fds[1:]
	return fd, true
}

func (s *sandboxSockets) close() {
	for fd, ok := s.next(); ok; fd, ok = s.next() {
		unix.Close(fd)
	}
}

// takeSockets has the client make n sockets for target in its sandbox,
// copies them into this process and lets the client close its own, so
// that closing the copy ends the connection.
func (c *loadClient) takeSockets(n int, target string) (*sandboxSockets, error) {
	if err := c.send(job{Kind: "sockets", URL: target, Sockets: n}); err != nil {
		return nil, fmt.Errorf("ask for sockets: %w", err)
	}
	rep, err := c.wait(func(report) {})
	if err != nil {
		return nil, fmt.Errorf("make sockets in the sandbox: %w", err)
	}
	s := &sandboxSockets{}
	err = s.copyFrom(c.cmd.Process.Pid, rep.FDs)
	if rerr := c.send(job{Kind: "release"}); rerr != nil {
		err = errors.Join(err, fmt.Errorf("release sockets: %w", rerr))
	} else if _, rerr := c.wait(func(report) {}); rerr != nil {
		err = errors.Join(err, fmt.Errorf("release sockets: %w", rerr))
	}
	if err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

func (s *sandboxSockets) copyFrom(pid int, fds []int) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	for _, fd := range fds {
		mine, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			return fmt.Errorf("pidfd_getfd %d of %d: %w", fd, pid, err)
		}
		s.fds = append(s.fds, mine)
	}
	return nil
}

// connectSocket connects fd (non-blocking, made in a sandbox) to ap and
// returns it as a net.Conn; fd is closed either way.
func connectSocket(ctx context.Context, fd int, ap netip.AddrPort) (net.Conn, error) {
	var sa unix.Sockaddr = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	if ap.Addr().Is6() {
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		unix.Close(fd)
		return nil, fmt.Errorf("connect to %s: %w", ap, err)
	}
	f := os.NewFile(uintptr(fd), "sandbox socket")
	defer f.Close()
	if d, ok := ctx.Deadline(); ok {
		f.SetWriteDeadline(d)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cerr error
	// Writable and with a peer: connected; SO_ERROR: refused or lost.
	// (A socket's first poll event can come before either, hence the
	// check rather than the event.)
	if err := rc.Write(func(fd uintptr) bool {
		if _, err := unix.Getpeername(int(fd)); err == nil {
			return true
		}
		if n, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR); err != nil || n != 0 {
			cerr = errors.Join(err, unix.Errno(n))
			return true
		}
		return false
	}); err != nil {
		return nil, fmt.Errorf("connect to %s: %w", ap, err)
	}
	if cerr != nil {
		return nil, fmt.Errorf("connect to %s: %w", ap, cerr)
	}
	return net.FileConn(f)
}

// sharedClient is the client package's client for one sandbox, dialing
// only through the sandbox's own sockets.
func sharedClient(target, secret string, socks *sandboxSockets) (*client.Client, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	ap, err := netip.ParseAddrPort(u.Host)
	if err != nil {
		return nil, fmt.Errorf("target %q is not an address and port: %w", u.Host, err)
	}
	tr := &http.Transport{
		DisableKeepAlives:  true,
		DisableCompression: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			fd, ok := socks.next()
			if !ok {
				return nil, errors.New("no socket of the sandbox left")
			}
			return connectSocket(ctx, fd, ap)
		},
	}
	return client.New(client.WithURL(target), client.WithSecret(secret),
		client.WithHTTPClient(&http.Client{Transport: tr, Timeout: 30 * time.Second}),
		client.WithMaxAttempts(socketsPerSandbox)), nil
}

// sharedFirstTokens takes each sandbox's sockets, then at start has every
// sandbox ask for its first token at once from this process; it returns
// each sandbox's time from start to its token.
func sharedFirstTokens(ctx context.Context, h *harness, target, aud string, parallelism int, start func() time.Time, progress func(served int64)) ([]float64, []error, error) {
	n := len(h.sandboxes)
	clients := make([]*client.Client, n)
	socks := make([]*sandboxSockets, n)
	defer func() {
		for _, s := range socks {
			if s != nil {
				s.close()
			}
		}
	}()
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(parallelism, 1))
	setup := make([]error, n)
	for i, sb := range h.sandboxes {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			u := targetURL(target, h.router, sb)
			s, err := sb.client.takeSockets(socketsPerSandbox, u)
			if err == nil {
				socks[i] = s
				clients[i], err = sharedClient(u, sb.secret, s)
			}
			setup[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(setup...); err != nil {
		return nil, nil, fmt.Errorf("sockets for the shared clients: %w", err)
	}
	at := start()
	fire := make(chan struct{})
	var served atomic.Int64
	times := make([]float64, n)
	errs := make([]error, n)
	for i := range clients {
		wg.Go(func() {
			<-fire
			ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			if _, err := clients[i].Fetch(ctx, aud); err != nil {
				errs[i] = err
				return
			}
			times[i] = time.Since(at).Seconds()
			progress(served.Add(1))
		})
	}
	if err := sleepUntil(ctx, at); err != nil {
		close(fire)
		wg.Wait()
		return nil, nil, err
	}
	close(fire)
	wg.Wait()
	return times, errs, nil
}
