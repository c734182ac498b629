package sandboxtest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/identityd/identityd/internal/attacktest"
	"github.com/identityd/identityd/internal/cgroup2"
)

// childEnv names the netns a re-executed test binary joins to serve as a
// sandbox client.
const childEnv = "IDENTITYD_SANDBOXTEST_CHILD_NETNS"

// replyTimeout bounds every command sent to a child, so that a wedged child
// fails the test instead of hanging it.
const replyTimeout = 30 * time.Second

// RunChildIfRequested turns the process into a sandbox client when it was
// started by Sandbox.Start, and never returns in that case. Call it first
// thing in TestMain.
func RunChildIfRequested() {
	path := os.Getenv(childEnv)
	if path == "" {
		return
	}
	os.Exit(runChild(path))
}

// Client is a process running inside a sandbox's cgroup and netns that makes
// sockets and connections on request. Sockets are made with plain system
// calls on the one thread that joined the netns.
type Client struct {
	t     testing.TB
	mu    sync.Mutex // one command at a time
	cmd   *exec.Cmd
	stdin *os.File
	out   *os.File
	lines *bufio.Reader
	Pid   int
}

// Start runs a client process in the sandbox. It is killed in t.Cleanup.
func (s *Sandbox) Start(t testing.TB) *Client {
	t.Helper()
	return StartClient(t, s.CgroupDir, s.Netns)
}

// StartClient runs a client process in the cgroup at cgroupDir and the
// netns at netnsPath, for sandboxes made by something other than a World.
func StartClient(t testing.TB, cgroupDir, netnsPath string) *Client {
	t.Helper()
	cg, err := os.Open(cgroupDir)
	if err != nil {
		t.Fatalf("sandboxtest: open cgroup: %v", err)
	}
	defer cg.Close()

	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatalf("sandboxtest: %v", err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+netnsPath)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, os.Stderr
	// CLONE_INTO_CGROUP: the child is in the sandbox's cgroup from its
	// first instruction. No Pdeathsig: it fires when the forking OS thread
	// exits, and Go ends threads that InNetns locked, so children would die
	// at random. Cleanup kills them, and a dead test's leftovers are killed
	// with its cgroups by the next New.
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatalf("sandboxtest: start client in %s: %v", cgroupDir, err)
	}
	inR.Close()
	outW.Close()
	c := &Client{t: t, cmd: cmd, stdin: inW, out: outR, lines: bufio.NewReader(outR), Pid: cmd.Process.Pid}
	t.Cleanup(c.Close)
	if _, err := c.do("hello"); err != nil {
		t.Fatalf("sandboxtest: client in %s did not start: %v", cgroupDir, err)
	}
	return c
}

// do sends one command line and returns the fields of the "ok" reply.
func (c *Client) do(format string, args ...any) ([]string, error) {
	rest, err := c.doRaw(format, args...)
	if err != nil {
		return nil, err
	}
	return strings.Fields(rest), nil
}

// doRaw sends one command line and returns the "ok" reply's text.
func (c *Client) doRaw(format string, args ...any) (string, error) {
	return c.doRawWithin(replyTimeout, format, args...)
}

// doRawWithin is doRaw for a command that may take up to wait.
func (c *Client) doRawWithin(wait time.Duration, format string, args ...any) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := fmt.Fprintf(c.stdin, format+"\n", args...); err != nil {
		return "", fmt.Errorf("send to client: %w", err)
	}
	c.out.SetReadDeadline(time.Now().Add(wait))
	line, err := c.lines.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read client reply: %w", err)
	}
	line = strings.TrimSuffix(line, "\n")
	if rest, ok := strings.CutPrefix(line, "ok"); ok {
		return strings.TrimPrefix(rest, " "), nil
	}
	if rest, ok := strings.CutPrefix(line, "err "); ok {
		return "", errors.New(rest)
	}
	return "", fmt.Errorf("unexpected client reply %q", line)
}

// HTTPRequest is a request a client makes from inside its sandbox.
type HTTPRequest struct {
	Method string            `json:"method"`
	URL    string            `json:"url"`
	Header map[string]string `json:"header,omitempty"`
	// Repeat sends the request this many times on one connection
	// (keep-alive); 1 if zero.
	Repeat int `json:"repeat,omitempty"`
	// Source, if set, is the local address to bind before connecting.
	Source string `json:"source,omitempty"`
	// FD, if set, is a socket made earlier with Socket, to connect and use
	// instead of a new one.
	FD int `json:"fd,omitempty"`
	// Timeout bounds the whole exchange; replyTimeout if zero.
	Timeout time.Duration `json:"timeout,omitempty"`
}

// HTTPResponse is what came back.
type HTTPResponse struct {
	Status int         `json:"status"`
	Header http.Header `json:"header"`
	Body   string      `json:"body"`
}

// LoadResult is what Load measured.
type LoadResult struct {
	// Latencies holds each request's time from socket() to the end of the
	// response body.
	Latencies []time.Duration `json:"latencies"`
	Failures  int             `json:"failures"`
	Elapsed   time.Duration   `json:"elapsed"`
}

// Load makes req n times from inside the sandbox, each time on a new
// connection, one after the other, and reports how long each took.
// Responses other than 200 count as failures.
func (c *Client) Load(req HTTPRequest, n int) (LoadResult, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return LoadResult{}, err
	}
	rest, err := c.doRaw("load %d %s", n, b)
	if err != nil {
		return LoadResult{}, err
	}
	var res LoadResult
	if err := json.Unmarshal([]byte(rest), &res); err != nil {
		return res, fmt.Errorf("decode client reply: %w", err)
	}
	return res, nil
}

// Attempt is one request of Poll: when it started and ended (Unix
// nanoseconds) and its status (0 when no response came).
type Attempt struct {
	Start  int64 `json:"start"`
	End    int64 `json:"end"`
	Status int   `json:"status"`
	// Error is why there was no HTTP answer (Status 0).
	Error string `json:"error,omitempty"`
}

// Poll makes req every interval, each time on a new connection, for
// duration, and reports every attempt.
func (c *Client) Poll(req HTTPRequest, interval, duration time.Duration) ([]Attempt, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	// The reply comes after duration: allow for it.
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := fmt.Fprintf(c.stdin, "poll %d %d %s\n", interval, duration, b); err != nil {
		return nil, fmt.Errorf("send to client: %w", err)
	}
	c.out.SetReadDeadline(time.Now().Add(duration + replyTimeout))
	line, err := c.lines.ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("read client reply: %w", err)
	}
	rest, ok := strings.CutPrefix(strings.TrimSpace(line), "ok ")
	if !ok {
		return nil, fmt.Errorf("client: %s", line)
	}
	var out []Attempt
	return out, json.Unmarshal([]byte(rest), &out)
}

// HTTP makes req from inside the sandbox, on one new connection, and returns
// every response.
func (c *Client) HTTP(req HTTPRequest) ([]HTTPResponse, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	rest, err := c.doRaw("http %s", b)
	if err != nil {
		return nil, err
	}
	var out []HTTPResponse
	if err := json.Unmarshal([]byte(rest), &out); err != nil {
		return nil, fmt.Errorf("decode client reply: %w", err)
	}
	return out, nil
}

// Socket makes a TCP socket (family 4 or 6) without connecting it.
func (c *Client) Socket(family int) (int, error) {
	f, err := c.do("socket %d", family)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(f[0])
}

// Connect connects socket fd to addr and returns the local address.
func (c *Client) Connect(fd int, addr netip.AddrPort) (netip.AddrPort, error) {
	f, err := c.do("connect %d %s", fd, addr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.ParseAddrPort(f[0])
}

// Dial makes n connections to addr, keeps them open, and returns their local
// addresses.
func (c *Client) Dial(addr netip.AddrPort, n int) ([]netip.AddrPort, error) {
	f, err := c.do("dial %s %d", addr, n)
	if err != nil {
		return nil, err
	}
	out := make([]netip.AddrPort, len(f))
	for i, s := range f {
		if out[i], err = netip.ParseAddrPort(s); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Peer returns what getpeername reports for the connected socket fd.
func (c *Client) Peer(fd int) (netip.AddrPort, error) {
	f, err := c.do("peer %d", fd)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.ParseAddrPort(f[0])
}

// Bind binds socket fd to addr.
func (c *Client) Bind(fd int, addr netip.AddrPort) error {
	_, err := c.do("bind %d %s", fd, addr)
	return err
}

// ConnectNonblock starts connecting socket fd to addr and returns without
// waiting for the handshake.
func (c *Client) ConnectNonblock(fd int, addr netip.AddrPort) error {
	_, err := c.do("connectnb %d %s", fd, addr)
	return err
}

// MoveTo moves the client process into the cgroup at dir.
func (c *Client) MoveTo(dir string) error { return cgroup2.Enter(dir, c.Pid) }

// Close kills the client and waits for it.
func (c *Client) Close() {
	c.stdin.Close()
	c.cmd.Process.Kill()
	c.cmd.Wait()
	c.out.Close()
}

// runChild is the client side: it joins the netns on its locked main thread
// and serves commands from stdin until stdin closes.
func runChild(path string) int {
	runtime.LockOSThread()
	ns, err := netns.GetFromPath(path)
	if err == nil {
		err = netns.Set(ns)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandboxtest client: enter netns %s: %v\n", path, err)
		return 2
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 1<<20)
	// Commands whose argument is one JSON document; the rest are words.
	atk := attacktest.NewSession()
	jsonCommands := map[string]func(string) (string, error){
		"poll": servePoll, "load": serveLoad, "http": serveHTTP,
		"poison": atk.Poison, "hijack": atk.Hijack, "flood": atk.Flood,
		"fakeendpoint": atk.FakeEndpoint, "stop": atk.Stop,
	}
	for in.Scan() {
		var reply string
		var err error
		name, arg, _ := strings.Cut(in.Text(), " ")
		if f, ok := jsonCommands[name]; ok {
			reply, err = f(arg)
		} else {
			reply, err = serve(strings.Fields(in.Text()))
		}
		if err != nil {
			fmt.Printf("err %v\n", err)
		} else {
			fmt.Printf("ok %s\n", reply)
		}
	}
	return 0
}

// serve runs one command. Sockets stay open until the client exits, so that
// their 4-tuples stay taken while the test looks at them.
func serve(cmd []string) (string, error) {
	if len(cmd) == 0 {
		return "", errors.New("empty command")
	}
	switch {
	case cmd[0] == "hello":
		return "", nil
	case cmd[0] == "socket" && len(cmd) == 2:
		fd, err := socket(cmd[1] == "6")
		if err != nil {
			return "", err
		}
		return strconv.Itoa(fd), nil
	case cmd[0] == "connect" && len(cmd) == 3:
		fd, err := strconv.Atoi(cmd[1])
		if err != nil {
			return "", err
		}
		ap, err := netip.ParseAddrPort(cmd[2])
		if err != nil {
			return "", err
		}
		local, err := connect(fd, ap)
		return local.String(), err
	case cmd[0] == "peer" && len(cmd) == 2:
		fd, err := strconv.Atoi(cmd[1])
		if err != nil {
			return "", err
		}
		peer, err := unix.Getpeername(fd)
		if err != nil {
			return "", fmt.Errorf("getpeername: %w", err)
		}
		ap, err := addrPortOf(peer)
		return ap.String(), err
	case (cmd[0] == "bind" || cmd[0] == "connectnb") && len(cmd) == 3:
		fd, err := strconv.Atoi(cmd[1])
		if err != nil {
			return "", err
		}
		ap, err := netip.ParseAddrPort(cmd[2])
		if err != nil {
			return "", err
		}
		sa, err := sockaddr(fd, ap)
		if err != nil {
			return "", err
		}
		if cmd[0] == "bind" {
			return "", unix.Bind(fd, sa)
		}
		if err := unix.SetNonblock(fd, true); err != nil {
			return "", err
		}
		if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
			return "", fmt.Errorf("connect to %s: %w", ap, err)
		}
		return "", nil
	case cmd[0] == "dial" && len(cmd) == 3:
		ap, err := netip.ParseAddrPort(cmd[1])
		if err != nil {
			return "", err
		}
		n, err := strconv.Atoi(cmd[2])
		if err != nil {
			return "", err
		}
		var locals []string
		for range n {
			fd, err := socket(ap.Addr().Is6())
			if err != nil {
				return "", err
			}
			local, err := connect(fd, ap)
			if err != nil {
				return "", err
			}
			locals = append(locals, local.String())
		}
		return strings.Join(locals, " "), nil
	}
	return "", fmt.Errorf("unknown command %q", strings.Join(cmd, " "))
}

func servePoll(arg string) (string, error) {
	var interval, duration time.Duration
	var js string
	if _, err := fmt.Sscanf(arg, "%d %d", &interval, &duration); err != nil {
		return "", err
	}
	fields := strings.SplitN(arg, " ", 3)
	if len(fields) != 3 {
		return "", errors.New("poll: want interval, duration and a request")
	}
	js = fields[2]
	var req HTTPRequest
	if err := json.Unmarshal([]byte(js), &req); err != nil {
		return "", err
	}
	var out []Attempt
	end := time.Now().Add(duration)
	for next := time.Now(); next.Before(end); next = next.Add(interval) {
		time.Sleep(time.Until(next))
		a := Attempt{Start: time.Now().UnixNano()}
		resps, err := doHTTP(req)
		a.End = time.Now().UnixNano()
		if err == nil {
			a.Status = resps[0].Status
		} else {
			a.Error = err.Error()
		}
		out = append(out, a)
	}
	b, err := json.Marshal(out)
	return string(b), err
}

func serveLoad(arg string) (string, error) {
	nStr, js, ok := strings.Cut(arg, " ")
	if !ok {
		return "", errors.New("load: want n and a request")
	}
	n, err := strconv.Atoi(nStr)
	if err != nil {
		return "", err
	}
	var req HTTPRequest
	if err := json.Unmarshal([]byte(js), &req); err != nil {
		return "", err
	}
	res := LoadResult{Latencies: make([]time.Duration, 0, n)}
	start := time.Now()
	for range n {
		t := time.Now()
		resps, err := doHTTP(req)
		res.Latencies = append(res.Latencies, time.Since(t))
		if err != nil || resps[0].Status != http.StatusOK {
			res.Failures++
		}
	}
	res.Elapsed = time.Since(start)
	b, err := json.Marshal(res)
	return string(b), err
}

// serveHTTP makes the socket and connection on this thread, which is in
// the sandbox's netns, then speaks HTTP over it.
func serveHTTP(arg string) (string, error) {
	var req HTTPRequest
	if err := json.Unmarshal([]byte(arg), &req); err != nil {
		return "", err
	}
	out, err := doHTTP(req)
	if err != nil {
		return "", err
	}
	b, err := json.Marshal(out)
	return string(b), err
}

func doHTTP(req HTTPRequest) ([]HTTPResponse, error) {
	u, err := url.Parse(req.URL)
	if err != nil {
		return nil, err
	}
	dest, err := netip.ParseAddrPort(u.Host)
	if err != nil {
		return nil, fmt.Errorf("URL host must be address:port: %w", err)
	}
	fd := req.FD
	if fd == 0 {
		if fd, err = socket(dest.Addr().Is6() && !dest.Addr().Is4In6()); err != nil {
			return nil, err
		}
	}
	if req.Source != "" {
		src, err := netip.ParseAddrPort(req.Source)
		if err != nil {
			unix.Close(fd)
			return nil, err
		}
		sa, err := sockaddr(fd, src)
		if err == nil {
			err = unix.Bind(fd, sa)
		}
		if err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("bind %s: %w", src, err)
		}
	}
	timeout := req.Timeout
	if timeout == 0 {
		timeout = replyTimeout
	}
	deadline := time.Now().Add(timeout)
	if err := connectBy(fd, dest, deadline); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "http")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(deadline)
	br := bufio.NewReader(conn)
	var out []HTTPResponse
	for range max(req.Repeat, 1) {
		hr, err := http.NewRequest(req.Method, req.URL, nil)
		if err != nil {
			return nil, err
		}
		for k, v := range req.Header {
			hr.Header.Set(k, v)
		}
		if err := hr.Write(conn); err != nil {
			return nil, fmt.Errorf("send request: %w", err)
		}
		resp, err := http.ReadResponse(br, hr)
		if err != nil {
			return nil, fmt.Errorf("read response: %w", err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("read body: %w", err)
		}
		out = append(out, HTTPResponse{Status: resp.StatusCode, Header: resp.Header, Body: string(body)})
	}
	return out, nil
}

func socket(v6 bool) (int, error) {
	family := unix.AF_INET
	if v6 {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	return fd, nil
}

// sockaddr converts ap for a socket of fd's family: an IPv4 address given
// to an AF_INET6 socket becomes IPv4-mapped.
func sockaddr(fd int, ap netip.AddrPort) (unix.Sockaddr, error) {
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("socket domain: %w", err)
	}
	if domain == unix.AF_INET6 {
		return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}, nil
	}
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}, nil
}

// connectBy connects fd to ap, giving up at deadline: a SYN that nobody
// answers (swallowed by an attacker, say) would otherwise block connect()
// for the kernel's two minutes of retries.
func connectBy(fd int, ap netip.AddrPort, deadline time.Time) error {
	sa, err := sockaddr(fd, ap)
	if err != nil {
		return err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return err
	}
	err = unix.Connect(fd, sa)
	for errors.Is(err, unix.EINPROGRESS) || errors.Is(err, unix.EINTR) {
		wait := time.Until(deadline)
		if wait <= 0 {
			return fmt.Errorf("connect to %s: %w", ap, os.ErrDeadlineExceeded)
		}
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		var n int
		if n, err = unix.Poll(pfd, int(wait.Milliseconds())+1); err == nil && n == 1 {
			var soErr int
			if soErr, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err == nil && soErr != 0 {
				err = unix.Errno(soErr)
			}
		} else if err == nil {
			err = unix.EINPROGRESS
		}
	}
	if err != nil {
		return fmt.Errorf("connect to %s: %w", ap, err)
	}
	return nil
}

func connect(fd int, ap netip.AddrPort) (netip.AddrPort, error) {
	sa, err := sockaddr(fd, ap)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if err := unix.Connect(fd, sa); err != nil {
		return netip.AddrPort{}, fmt.Errorf("connect to %s: %w", ap, err)
	}
	local, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockname: %w", err)
	}
	return addrPortOf(local)
}

func addrPortOf(sa unix.Sockaddr) (netip.AddrPort, error) {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unexpected socket address %T", sa)
}
