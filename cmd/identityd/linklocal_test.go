package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// Test-only link-local endpoints (never a real metadata address), given to
// the world's own host netns before the daemon starts, so that whatever is
// not redirected stays inside the world; and one more that only a DNAT rule
// of the world's sends to the token endpoint.
var (
	llTest4  = netip.MustParseAddrPort("169.254.77.77:80")
	llTest6  = netip.MustParseAddrPort("[fd00:77::77]:80")
	llDNATed = netip.MustParseAddrPort("169.254.77.79:80")
)

// giveAddrs puts addresses on lo in the world's host netns.
func giveAddrs(t *testing.T, ow *world, addrs ...netip.Addr) {
	t.Helper()
	h, err := netnsutil.Handle(ow.w.HostNetns)
	require.NoError(t, err)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	for _, a := range addrs {
		require.NoError(t, netnsutil.AddAddr(h, lo, netip.PrefixFrom(a, a.BitLen())))
	}
}

// fetchFrom asks url for a token from inside the sandbox with the secret in
// env, and returns the status and body.
func fetchFrom(t *testing.T, c *sandboxtest.Client, url string, env map[string]string) (int, string) {
	t.Helper()
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: url,
		Header: map[string]string{"Authorization": "Bearer " + env["MIREN_IDENTITY_TOKEN_SECRET"]}})
	require.NoError(t, err)
	return resps[0].Status, resps[0].Body
}

// TestLinkLocalEndpoint runs a daemon with an IPv4 and an IPv6 link-local
// endpoint: sandboxes it created or adopted get tokens naming themselves
// through either, see the link-local address as their peer, and keep doing
// so across a restart; a host process connecting to the same address
// reaches what really answers there; a sandbox that a DNAT rule sends to
// the token endpoint is refused, and the log names NAT as the cause.
func TestLinkLocalEndpoint(t *testing.T) {
	ow := newWorld(t)
	giveAddrs(t, ow, llTest4.Addr(), llTest6.Addr(), llDNATed.Addr())
	router := ow.router()
	ow.args = append(ow.args, "--link-local-endpoint", llTest4.String(), "--link-local-endpoint", llTest6.String(),
		"--inject-link-local-url")
	// The service really at the link-local address, for host processes.
	var real net.Listener
	require.NoError(t, ow.w.Do(func() (err error) {
		real, err = net.Listen("tcp", fmt.Sprintf(":%d", llTest4.Port()))
		return err
	}))
	t.Cleanup(func() { real.Close() })
	ow.start()

	a := ow.create("ll-a-"+suffix(), "web")
	b := ow.create("ll-b-"+suffix(), "batch")
	assert.Equal(t, "http://169.254.77.77/v1/token", a.Env["MIREN_IDENTITY_TOKEN_URL"], "--inject-link-local-url")
	ca := sandboxtest.StartClient(t, a.Sandbox.CgroupPath, a.Sandbox.NetnsPath)
	cb := sandboxtest.StartClient(t, b.Sandbox.CgroupPath, b.Sandbox.NetnsPath)
	// With the port: the test client's HTTP helper wants one.
	urls := map[string]string{"ipv4": "http://" + llTest4.String() + "/v1/token", "ipv6": "http://" + llTest6.String() + "/v1/token"}

	tokensName := func(t *testing.T, c *sandboxtest.Client, sb controllers.Created) {
		t.Helper()
		for family, url := range urls {
			status, body := fetchFrom(t, c, url, sb.Env)
			require.Equal(t, http.StatusOK, status, "%s: %s", family, body)
			assert.Equal(t, sb.Sandbox.ID, claimsOf(t, body)["sandbox_id"], family)
		}
	}
	t.Run("tokens name the right sandbox", func(t *testing.T) {
		tokensName(t, ca, a)
		tokensName(t, cb, b)
		// The router's URL still works too.
		status, body := fetchFrom(t, ca, "http://"+netip.AddrPortFrom(router, 7123).String()+"/v1/token", a.Env)
		require.Equal(t, http.StatusOK, status, body)
	})

	t.Run("getpeername", func(t *testing.T) {
		for _, tc := range []struct {
			family int
			dest   netip.AddrPort
		}{{4, llTest4}, {6, llTest6}} {
			fd, err := ca.Socket(tc.family)
			require.NoError(t, err)
			_, err = ca.Connect(fd, tc.dest)
			require.NoError(t, err)
			peer, err := ca.Peer(fd)
			require.NoError(t, err)
			assert.Equal(t, tc.dest, peer)
		}
	})

	t.Run("adopted sandbox", func(t *testing.T) {
		sb := ow.w.AddSandbox("adopted")
		id := "ll-adopted-" + suffix()
		out, err := exec.Command(filepath.Join(ow.bin, "identityctl"), "--admin-socket", ow.admin, "adopt",
			"--app", "web", "--id", id, "--cgroup", sb.CgroupDir, "--netns", sb.Netns).CombinedOutput()
		require.NoError(t, err, "%s", out)
		env := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			k, v, _ := strings.Cut(line, "=")
			env[k] = v
		}
		tokensName(t, sb.Start(t), controllers.Created{Sandbox: controllers.Record{ID: id}, Env: env})
	})

	t.Run("host process is not redirected", func(t *testing.T) {
		var peer netip.AddrPort
		require.NoError(t, ow.w.Do(func() error {
			c, err := net.Dial("tcp4", llTest4.String())
			if err != nil {
				return err
			}
			defer c.Close()
			peer = c.RemoteAddr().(*net.TCPAddr).AddrPort()
			s, err := real.Accept()
			if err != nil {
				return err
			}
			return s.Close()
		}))
		assert.Equal(t, llTest4, peer)
	})

	t.Run("survives a restart", func(t *testing.T) {
		ow.kill(syscall.SIGKILL)
		ow.start()
		tokensName(t, ca, a)
	})

	t.Run("deleted sandbox leaves the kernel's set", func(t *testing.T) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(ow.pins, "maps", "sandbox_cgroups"), nil)
		require.NoError(t, err)
		defer m.Close()
		var netns uint64
		require.NoError(t, m.Lookup(b.Sandbox.CgroupID, &netns), "a live sandbox is in the kernel's set")
		assert.Equal(t, b.Sandbox.NetnsCookie, netns)
		require.NoError(t, controllers.NewAdminClient(ow.admin).Do(context.Background(), "DELETE", "/v1/sandboxes/"+b.Sandbox.ID+"?kill=true", nil, nil))
		assert.ErrorIs(t, m.Lookup(b.Sandbox.CgroupID, &netns), ebpf.ErrKeyNotExist)
	})

	t.Run("DNAT is refused with its cause", func(t *testing.T) {
		if _, err := exec.LookPath("iptables"); err != nil {
			t.Skip("iptables is not installed")
		}
		to := netip.AddrPortFrom(router, 7123)
		out, err := exec.Command("nsenter", "--net="+ow.w.HostNetns, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
			"-d", llDNATed.Addr().String(), "--dport", fmt.Sprint(llDNATed.Port()), "-j", "DNAT", "--to-destination", to.String()).CombinedOutput()
		require.NoError(t, err, "%s", out)

		status, body := fetchFrom(t, ca, "http://"+llDNATed.String()+"/v1/token", a.Env)
		assert.Equal(t, http.StatusForbidden, status, body)
		type refusalLine struct {
			Msg    string `json:"msg"`
			Reason string `json:"reason"`
			Error  string `json:"error"`
		}
		// The daemon's stderr arrives through a pipe: its line may come
		// after the answer.
		var found *refusalLine
		require.Eventually(t, func() bool {
			for _, line := range strings.Split(ow.stderr.String(), "\n") {
				var r refusalLine
				if json.Unmarshal([]byte(line), &r) == nil && r.Msg == "token request refused" && strings.Contains(r.Error, "NAT") {
					found = &r
					return true
				}
			}
			return false
		}, 5*time.Second, 10*time.Millisecond, "no refusal names NAT:\n%s", ow.stderr)
		assert.Equal(t, "no_record", found.Reason)
		assert.Contains(t, found.Error, llDNATed.String(), "the log names where the client sent it")
		assert.Contains(t, found.Error, "--link-local-endpoint")
		t.Log(found.Error)
	})
}
