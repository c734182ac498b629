// Package handover passes a running daemon's listening sockets to the daemon
// that replaces it, over a Unix socket, so that a restart or an upgrade
// refuses and resets no connection: the sockets never close, and
// connections waiting in their accept queues are accepted by whichever
// process accepts next.
//
// The exchange, one JSON line per message on one connection, the
// successor speaking first:
//
//	successor -> running:   {"op":"hello","pid":P,"version":V}
//	running   -> successor: {"op":"listeners","names":[...]} + the sockets (SCM_RIGHTS)
//	successor -> running:   {"op":"ready"} | {"op":"failed","error":E}
//	running   -> successor: {"op":"released"}   (it no longer accepts)
//
// Until "ready" the running daemon serves on: a successor that fails, or
// whose connection ends, changes nothing but a log line. The running daemon
// stops what writes shared state (its lifecycle API, its background loops)
// before it sends the sockets, so that the successor rebuilds from a state
// nobody changes under it.
package handover

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNoPredecessor means no daemon listens for a successor at the path.
var ErrNoPredecessor = errors.New("no running daemon to take over from")

// helloTimeout bounds how long a connection may take to say hello.
const helloTimeout = 5 * time.Second

// maxFiles bounds the sockets one handover passes.
const maxFiles = 16

type message struct {
	Op      string   `json:"op"`
	PID     int      `json:"pid,omitempty"`
	Version string   `json:"version,omitempty"`
	Names   []string `json:"names,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// conn is one end of the exchange.
type conn struct {
	c *net.UnixConn
	r *bufio.Reader
}

func (c *conn) send(m message, files ...*os.File) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fd, err := rawFD(f)
			if err != nil {
				return fmt.Errorf("handover: send %s: %w", m.Op, err)
			}
			fds[i] = fd
		}
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("handover: send %s: %w", m.Op, err)
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("handover: send %s: short write", m.Op)
	}
	return nil
}

func (c *conn) receive(want string) (message, error) {
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return message{}, fmt.Errorf("handover: waiting for %s: %w", want, err)
	}
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return message{}, fmt.Errorf("handover: waiting for %s: %w", want, err)
	}
	return m, nil
}

// Predecessor is the running daemon, as its successor sees it.
type Predecessor struct {
	conn
	PID int // the predecessor's, from its socket's credentials
}

// Dial asks the daemon listening at path to hand over. It fails with
// ErrNoPredecessor if nobody listens there, and refuses a predecessor
// running as another user than this process.
func Dial(ctx context.Context, path, version string) (*Predecessor, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return nil, ErrNoPredecessor
	}
	if err != nil {
		return nil, fmt.Errorf("handover: dial %s: %w", path, err)
	}
	uc := c.(*net.UnixConn)
	cred, err := peerCred(uc)
	if err != nil {
		uc.Close()
		return nil, err
	}
	if int(cred.Uid) != os.Geteuid() {
		uc.Close()
		return nil, fmt.Errorf("handover: the process at %s runs as uid %d, not %d", path, cred.Uid, os.Geteuid())
	}
	p := &Predecessor{conn: conn{c: uc, r: bufio.NewReader(uc)}, PID: int(cred.Pid)}
	if err := p.send(message{Op: "hello", PID: os.Getpid(), Version: version}); err != nil {
		uc.Close()
		return nil, err
	}
	return p, nil
}

// Receive reads the predecessor's listening sockets, by name.
func (p *Predecessor) Receive() (map[string]*os.File, error) {
	// The sockets come with the message's first byte; one read of the
	// socket returns them (the line is far shorter than the buffer).
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(maxFiles*4))
	n, oobn, _, _, err := p.c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("handover: receive the listeners: %w", err)
	}
	files, err := parseRights(oob[:oobn])
	if err != nil {
		return nil, err
	}
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	line := buf[:n]
	if len(line) == 0 || line[len(line)-1] != '\n' {
		closeAll()
		return nil, errors.New("handover: the listeners message was cut")
	}
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		closeAll()
		return nil, fmt.Errorf("handover: receive the listeners: %w", err)
	}
	if m.Op != "listeners" {
		closeAll()
		return nil, fmt.Errorf("handover: the running daemon refused: %s", m.Error)
	}
	if len(m.Names) != len(files) {
		closeAll()
		return nil, fmt.Errorf("handover: %d names for %d sockets", len(m.Names), len(files))
	}
	out := make(map[string]*os.File, len(files))
	for i, name := range m.Names {
		out[name] = files[i]
	}
	return out, nil
}

// Ready tells the predecessor to stop accepting and waits until it has:
// from then on this process is the only one accepting. The predecessor
// finishes its in-flight requests and exits on its own.
func (p *Predecessor) Ready(ctx context.Context) error {
	if err := p.send(message{Op: "ready"}); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { p.c.Close() })
	defer stop()
	m, err := p.receive("released")
	if err != nil {
		return err
	}
	if m.Op != "released" {
		return fmt.Errorf("handover: expected released, got %q", m.Op)
	}
	return nil
}

// Fail tells the predecessor this process will not take over, and why; it
// keeps serving.
func (p *Predecessor) Fail(why error) {
	p.send(message{Op: "failed", Error: why.Error()})
	p.c.Close()
}

// Close ends the exchange.
func (p *Predecessor) Close() error { return p.c.Close() }

// Listener waits for successors at a path.
type Listener struct {
	ln *net.UnixListener
}

// Listen makes the socket at path (0600), replacing a stale one. The
// socket file is not removed when the listener closes: by then it may be a
// successor's.
func Listen(path string) (*Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("handover: remove stale socket: %w", err)
	}
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("handover: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	return &Listener{ln: ln}, nil
}

// Accept waits for the next successor. Only processes of this process's
// user are accepted; others are dropped.
func (l *Listener) Accept() (*Successor, error) {
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := peerCred(c)
		if err != nil || int(cred.Uid) != os.Geteuid() {
			c.Close()
			continue
		}
		s := &Successor{conn: conn{c: c, r: bufio.NewReader(c)}, PID: int(cred.Pid)}
		c.SetReadDeadline(time.Now().Add(helloTimeout))
		m, err := s.receive("hello")
		if err != nil || m.Op != "hello" {
			c.Close()
			continue
		}
		c.SetReadDeadline(time.Time{})
		s.Version = m.Version
		return s, nil
	}
}

// Close stops waiting for successors.
func (l *Listener) Close() error { return l.ln.Close() }

// Successor is a daemon asking to take over, as the running one sees it.
type Successor struct {
	conn
	PID     int
	Version string
}

// Send passes the listening sockets, by name.
func (s *Successor) Send(files map[string]*os.File) error {
	names := make([]string, 0, len(files))
	list := make([]*os.File, 0, len(files))
	for name, f := range files {
		names = append(names, name)
		list = append(list, f)
	}
	return s.send(message{Op: "listeners", Names: names}, list...)
}

// Refuse tells a successor that no handover happens now, and why.
func (s *Successor) Refuse(why string) {
	s.send(message{Op: "refused", Error: why})
	s.c.Close()
}

// WaitReady waits for the successor to be ready to take over. Its failure,
// its exit and ctx's end are errors: the running daemon keeps serving.
func (s *Successor) WaitReady(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.c.Close() })
	defer stop()
	m, err := s.receive("ready")
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("handover: successor %d not ready: %w", s.PID, ctx.Err())
		}
		return fmt.Errorf("handover: successor %d went away before it was ready: %w", s.PID, err)
	}
	switch m.Op {
	case "ready":
		return nil
	case "failed":
		return fmt.Errorf("handover: successor %d failed: %s", s.PID, m.Error)
	}
	return fmt.Errorf("handover: successor %d said %q", s.PID, m.Op)
}

// Released tells the successor this daemon no longer accepts.
func (s *Successor) Released() error {
	err := s.send(message{Op: "released"})
	s.c.Close()
	return err
}

// Close ends the exchange.
func (s *Successor) Close() error { return s.c.Close() }

// rawFD is f's descriptor, read without (*os.File).Fd, which would put a
// socket from (*net.TCPListener).File into blocking mode: a mode shared by
// every copy of the socket, the running daemon's listener included, whose
// accept would then block a thread, and after its close take one more
// connection only to drop it.
func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var fd int
	if err := rc.Control(func(d uintptr) { fd = int(d) }); err != nil {
		return 0, err
	}
	return fd, nil
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	if cerr != nil {
		return nil, fmt.Errorf("handover: peer credentials: %w", cerr)
	}
	return cred, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("handover: parse the sockets: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), "handed-over"))
		}
	}
	return files, nil
}
