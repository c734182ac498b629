package attacktest

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/netnsutil"
)

// FloodSpec asks for sockets bound to Source on every port from FirstPort
// to LastPort, each connect()ed without waiting to Endpoint and held open.
type FloodSpec struct {
	Source    netip.Addr     `json:"source"`
	FirstPort uint16         `json:"first_port"`
	LastPort  uint16         `json:"last_port"`
	Endpoint  netip.AddrPort `json:"endpoint"`
	// Transparent sets IP_TRANSPARENT (with IP_FREEBIND): binding an
	// address that is not ours, and routing its SYN out. IP_FREEBIND alone
	// binds but connect() then fails: the output route lookup insists on a
	// local source unless the socket is transparent.
	Transparent bool          `json:"transparent"`
	Duration    time.Duration `json:"duration"` // the sockets are closed after this at the latest
}

// FloodReport counts what a flood holds.
type FloodReport struct {
	Sockets   int `json:"sockets"`   // bound and connecting
	Connected int `json:"connected"` // whose handshake completed within a second
	Failed    int `json:"failed"`
	// FirstError is the first failure's cause.
	FirstError string        `json:"first_error,omitempty"`
	Held       time.Duration `json:"held"` // filled in at stop
}

// flood holds the sockets until stopped or its duration is over.
type flood struct {
	fds    []int
	report FloodReport
	start  time.Time
	once   sync.Once
}

func startFlood(spec FloodSpec) (*flood, error) {
	if spec.Duration <= 0 || spec.LastPort < spec.FirstPort || spec.FirstPort == 0 {
		return nil, fmt.Errorf("flood: want a duration and a port range")
	}
	f := &flood{start: time.Now()}
	fail := func(err error) {
		f.report.Failed++
		if f.report.FirstError == "" {
			f.report.FirstError = err.Error()
		}
	}
	for port := int(spec.FirstPort); port <= int(spec.LastPort); port++ {
		fd, err := floodSocket(spec, uint16(port))
		if err != nil {
			fail(err)
			continue
		}
		f.fds = append(f.fds, fd)
	}
	f.report.Sockets = len(f.fds)
	f.report.Connected = settle(f.fds, time.Second)
	// A later Stop finds nothing left to do.
	time.AfterFunc(spec.Duration, func() { f.Stop() })
	return f, nil
}

func floodSocket(spec FloodSpec, port uint16) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	err = func() error {
		if spec.Transparent {
			for _, opt := range []int{unix.IP_FREEBIND, unix.IP_TRANSPARENT} {
				if err := unix.SetsockoptInt(fd, unix.SOL_IP, opt, 1); err != nil {
					return fmt.Errorf("setsockopt %d: %w", opt, err)
				}
			}
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: spec.Source.As4(), Port: int(port)}); err != nil {
			return fmt.Errorf("bind %s:%d: %w", spec.Source, port, err)
		}
		err := unix.Connect(fd, &unix.SockaddrInet4{Addr: spec.Endpoint.Addr().As4(), Port: int(spec.Endpoint.Port())})
		if err != nil && !errors.Is(err, unix.EINPROGRESS) {
			return fmt.Errorf("connect %s:%d to %s: %w", spec.Source, port, spec.Endpoint, err)
		}
		return nil
	}()
	if err != nil {
		unix.Close(fd)
		return 0, err
	}
	return fd, nil
}

// settle waits up to wait for handshakes and counts the sockets connected.
func settle(fds []int, wait time.Duration) int {
	connected := make(map[int]bool)
	for end := time.Now().Add(wait); time.Now().Before(end) && len(connected) < len(fds); {
		pfds := make([]unix.PollFd, 0, len(fds))
		for _, fd := range fds {
			if !connected[fd] {
				pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: unix.POLLOUT})
			}
		}
		n, err := unix.Poll(pfds, int(time.Until(end).Milliseconds())+1)
		if err != nil && !errors.Is(err, unix.EINTR) {
			break
		}
		if n <= 0 {
			continue
		}
		progress := false
		for _, p := range pfds {
			if p.Revents&unix.POLLOUT != 0 {
				if e, err := unix.GetsockoptInt(int(p.Fd), unix.SOL_SOCKET, unix.SO_ERROR); err == nil && e == 0 {
					connected[int(p.Fd)] = true
					progress = true
				}
			}
		}
		if !progress {
			// Only failed sockets are ready; waiting more finds nothing.
			break
		}
	}
	return len(connected)
}

// Stop closes the sockets and reports.
func (f *flood) Stop() any {
	f.once.Do(func() {
		for _, fd := range f.fds {
			unix.Close(fd)
		}
		f.report.Held = time.Since(f.start)
	})
	return f.report
}

// FakeEndpointSpec asks for the endpoint's address and the victim's address
// on a veth pair inside our own netns, with a listener on Endpoint, so that
// sockets bound to the victim's address complete their handshakes with us.
type FakeEndpointSpec struct {
	Victim   netip.Addr     `json:"victim"`
	Endpoint netip.AddrPort `json:"endpoint"`
	Duration time.Duration  `json:"duration"` // removed after this at the latest
}

// FakeEndpointReport counts the connections the fake endpoint accepted.
type FakeEndpointReport struct {
	Accepted int           `json:"accepted"`
	Held     time.Duration `json:"held"`
}

type fakeEndpoint struct {
	h      *netlink.Handle
	veth   netlink.Link
	ln     int
	start  time.Time
	once   sync.Once
	mu     sync.Mutex
	conns  []int
	done   chan struct{}
	report FakeEndpointReport
}

// fakeVeth names the pair; the netns is the sandbox's own, so the names
// cannot collide with anything outside it.
const fakeVeth = "atk0"

func startFakeEndpoint(spec FakeEndpointSpec) (*fakeEndpoint, error) {
	if spec.Duration <= 0 || !spec.Victim.Is4() || !spec.Endpoint.Addr().Is4() {
		return nil, fmt.Errorf("fake endpoint: want IPv4 addresses and a duration")
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	e := &fakeEndpoint{h: h, ln: -1, start: time.Now(), done: make(chan struct{})}
	if err := e.setup(spec); err != nil {
		e.teardown()
		return nil, err
	}
	go e.acceptLoop()
	time.AfterFunc(spec.Duration, func() { e.Stop() })
	return e, nil
}

func (e *fakeEndpoint) setup(spec FakeEndpointSpec) error {
	if err := e.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fakeVeth}, PeerName: fakeVeth + "p"}); err != nil {
		return fmt.Errorf("add veth %s: %w", fakeVeth, err)
	}
	var err error
	if e.veth, err = e.h.LinkByName(fakeVeth); err != nil {
		return fmt.Errorf("find %s: %w", fakeVeth, err)
	}
	peer, err := e.h.LinkByName(fakeVeth + "p")
	if err != nil {
		return fmt.Errorf("find %sp: %w", fakeVeth, err)
	}
	for l, a := range map[netlink.Link]netip.Addr{e.veth: spec.Victim, peer: spec.Endpoint.Addr()} {
		if err := netnsutil.AddAddr(e.h, l, netip.PrefixFrom(a, 32)); err != nil {
			return err
		}
		if err := e.h.LinkSetUp(l); err != nil {
			return fmt.Errorf("bring %s up: %w", l.Attrs().Name, err)
		}
	}
	if e.ln, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	unix.SetsockoptInt(e.ln, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.Bind(e.ln, &unix.SockaddrInet4{Addr: spec.Endpoint.Addr().As4(), Port: int(spec.Endpoint.Port())}); err != nil {
		return fmt.Errorf("bind %s: %w", spec.Endpoint, err)
	}
	if err := unix.Listen(e.ln, 4096); err != nil {
		return fmt.Errorf("listen on %s: %w", spec.Endpoint, err)
	}
	return nil
}

// acceptLoop holds every accepted connection until Stop. Accepted sockets
// belong to the listener's netns whatever thread accepts them.
func (e *fakeEndpoint) acceptLoop() {
	defer close(e.done)
	for {
		fd, _, err := unix.Accept4(e.ln, unix.SOCK_CLOEXEC)
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.ECONNABORTED) {
			continue
		}
		if err != nil {
			return
		}
		e.mu.Lock()
		e.conns = append(e.conns, fd)
		e.mu.Unlock()
	}
}

// Stop removes the fake endpoint and reports.
func (e *fakeEndpoint) Stop() any {
	e.once.Do(func() {
		// shutdown wakes the blocked accept; close alone would not.
		unix.Shutdown(e.ln, unix.SHUT_RDWR)
		<-e.done
		e.teardown()
		e.report.Held = time.Since(e.start)
	})
	return e.report
}

// teardown closes and removes everything; the accept loop is not running.
func (e *fakeEndpoint) teardown() {
	if e.ln >= 0 {
		unix.Close(e.ln)
	}
	e.mu.Lock()
	e.report.Accepted = len(e.conns)
	for _, fd := range e.conns {
		unix.Close(fd)
	}
	e.conns = nil
	e.mu.Unlock()
	if e.veth != nil {
		e.h.LinkDel(e.veth) // the peer goes with it
	}
	e.h.Close()
}
