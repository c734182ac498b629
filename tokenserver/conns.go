package tokenserver

import (
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"
)

// Defaults for ConnLimits. A connection costs the daemon one descriptor and
// some 20 KiB of memory (buffers and a goroutine), so the total bounds both;
// the daemon also keeps it well under its descriptor limit.
const (
	DefaultMaxConns           = 4096
	DefaultMaxConnsPerSandbox = 64
	DefaultMaxOtherConns      = 256
	// DefaultIdleTimeout closes keep-alive connections a client left idle.
	DefaultIdleTimeout = 5 * time.Second
)

// ConnLimits bound the token endpoint's open connections. The caller of a
// connection is known when it is accepted (the kernel's record), so each
// sandbox is held to its own share, and callers that are not a live sandbox
// (host processes, anything unattested) share one small pool: neither can
// take the connections the other sandboxes need.
type ConnLimits struct {
	// Total bounds all connections; DefaultMaxConns if zero.
	Total int
	// PerSandbox bounds one sandbox's connections; DefaultMaxConnsPerSandbox
	// if zero.
	PerSandbox int
	// Others bounds the connections of all callers that are not a live
	// sandbox together; DefaultMaxOtherConns if zero.
	Others int
}

func (l ConnLimits) withDefaults() ConnLimits {
	if l.Total <= 0 {
		l.Total = DefaultMaxConns
	}
	if l.PerSandbox <= 0 {
		l.PerSandbox = DefaultMaxConnsPerSandbox
	}
	if l.Others <= 0 {
		l.Others = DefaultMaxOtherConns
	}
	return l
}

// Reasons a connection is closed at accept, as counted in metrics.
const (
	connTotalCap   = "total_cap"
	connSandboxCap = "sandbox_cap"
	connOthersCap  = "others_cap"
)

// connTable counts open connections per caller.
type connTable struct {
	limits ConnLimits

	mu      sync.Mutex
	total   int
	others  int
	sandbox map[string]int
	// Refusals are logged at most once a second, with how many were not.
	lastLog    time.Time
	suppressed int
}

// acquire takes a slot for a connection from sandbox (empty: not a live
// sandbox) or says which limit refused it.
func (t *connTable) acquire(sandbox string) (string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.total >= t.limits.Total:
		return connTotalCap, false
	case sandbox == "" && t.others >= t.limits.Others:
		return connOthersCap, false
	case sandbox != "" && t.sandbox[sandbox] >= t.limits.PerSandbox:
		return connSandboxCap, false
	}
	t.total++
	if sandbox == "" {
		t.others++
	} else {
		t.sandbox[sandbox]++
	}
	return "", true
}

func (t *connTable) release(sandbox string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.total--
	if sandbox == "" {
		t.others--
		return
	}
	if t.sandbox[sandbox]--; t.sandbox[sandbox] <= 0 {
		delete(t.sandbox, sandbox)
	}
}

// shouldLog says whether to log a refusal now, and how many went unlogged
// since the last line.
func (t *connTable) shouldLog(now time.Time) (int, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if now.Sub(t.lastLog) < time.Second {
		t.suppressed++
		return 0, false
	}
	n := t.suppressed
	t.lastLog, t.suppressed = now, 0
	return n, true
}

// Listener wraps the token endpoint's listener: each accepted connection is
// attributed once, here, and counted against its caller's share; past a
// limit it is closed at once, before any byte is read or a goroutine
// started for it. Serve the server's HTTPServer on the returned listener.
func (s *Server) Listener(ln net.Listener) net.Listener {
	return &limitListener{Listener: ln, s: s}
}

type limitListener struct {
	net.Listener
	s *Server
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		att := l.s.attest(c)
		if l.s.cfg.Probe != nil {
			if remote, ok := c.RemoteAddr().(*net.TCPAddr); ok && l.s.cfg.Probe(remote.AddrPort(), att.rec, att.err) {
				c.Close()
				continue
			}
		}
		var sandbox string
		if att.err == nil {
			// A caller that is no live sandbox yet is counted with the
			// others; its requests are refused anyway.
			if sb, err := l.s.cfg.Registry.Resolve(att.rec.CgroupID, att.rec.NetnsCookie); err == nil {
				sandbox = sb.ID
			}
		}
		if reason, ok := l.s.conns.acquire(sandbox); !ok {
			l.s.refuseConn(c, att, sandbox, reason)
			continue
		}
		return &countedConn{Conn: c, att: att, release: func() { l.s.conns.release(sandbox) }}, nil
	}
}

func (s *Server) refuseConn(c net.Conn, att *attestation, sandbox, reason string) {
	s.cfg.Metrics.connRefused(reason)
	if tc, ok := c.(*net.TCPConn); ok {
		// A reset frees the descriptor and the kernel's state at once,
		// instead of a FIN and a wait for the peer.
		tc.SetLinger(0)
	}
	c.Close()
	if n, ok := s.conns.shouldLog(time.Now()); ok {
		attrs := []any{"reason", reason, "remote", c.RemoteAddr().String(), "caller", att.rec,
			"limits", slog.GroupValue(
				slog.Int("total", s.conns.limits.Total),
				slog.Int("per_sandbox", s.conns.limits.PerSandbox),
				slog.Int("others", s.conns.limits.Others)),
			"unlogged_since_last", strconv.Itoa(n)}
		if sandbox != "" {
			attrs = append(attrs, "sandbox", sandbox)
		}
		if att.err != nil {
			attrs = append(attrs, "attestation", att.err.Error())
		}
		s.log.Warn("token connection refused: connection limit reached", attrs...)
	}
}

// countedConn is an accepted connection holding its caller's slot, and the
// kernel's answer for it, until it is closed.
type countedConn struct {
	net.Conn
	att     *attestation
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
