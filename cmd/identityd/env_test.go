package main

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/netnsutil"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestSandboxEnvironmentIsWhatTheDaemonServes: in each configuration, the
// environment a sandbox is given names the listener the daemon opened, and
// an issuer equal to the iss of the tokens fetched through it, which an
// OIDC verifier accepts through discovery from that issuer. The same for
// the environment `identityctl adopt` prints.
func TestSandboxEnvironmentIsWhatTheDaemonServes(t *testing.T) {
	for _, tc := range []struct {
		name string
		// args returns extra flags, given the world's router address.
		args       func(router netip.Addr) []string
		wantURL    func(router netip.Addr) string
		wantIssuer func(router netip.Addr) string
	}{
		{
			name:       "default flags",
			args:       func(netip.Addr) []string { return nil },
			wantURL:    func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7123).String() + "/v1/token" },
			wantIssuer: func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7123).String() },
		},
		{
			name:       "listen on another port",
			args:       func(r netip.Addr) []string { return []string{"--listen", netip.AddrPortFrom(r, 7124).String()} },
			wantURL:    func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7124).String() + "/v1/token" },
			wantIssuer: func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7124).String() },
		},
		{
			name:       "listen on every address",
			args:       func(netip.Addr) []string { return []string{"--listen", "0.0.0.0:7125"} },
			wantURL:    func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7125).String() + "/v1/token" },
			wantIssuer: func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7125).String() },
		},
		{
			name:       "explicit issuer",
			args:       func(netip.Addr) []string { return []string{"--issuer", "http://issuer.test:7123/"} },
			wantURL:    func(r netip.Addr) string { return "http://" + netip.AddrPortFrom(r, 7123).String() + "/v1/token" },
			wantIssuer: func(netip.Addr) string { return "http://issuer.test:7123" },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ow := newWorld(t)
			router := ow.router()
			ow.args = append(ow.args, tc.args(router)...)
			ow.start()
			tag := suffix()

			created := ow.create("e2e-env-"+tag, "web")
			env := created.Env
			assert.Equal(t, tc.wantURL(router), env["MIREN_IDENTITY_TOKEN_URL"])
			assert.Equal(t, tc.wantIssuer(router), env["MIREN_OIDC_ISSUER_URL"])
			client := sandboxtest.StartClient(t, created.Sandbox.CgroupPath, created.Sandbox.NetnsPath)
			ow.assertVerifies(t, client, env, router)

			// An adopted sandbox is told the same.
			sb := ow.w.AddSandbox("adopted")
			out, err := exec.Command(filepath.Join(ow.bin, "identityctl"), "--admin-socket", ow.admin, "adopt",
				"--app", "web", "--id", "e2e-adopted-"+tag, "--cgroup", sb.CgroupDir, "--netns", sb.Netns).CombinedOutput()
			require.NoError(t, err, "%s", out)
			adopted := map[string]string{}
			for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				k, v, _ := strings.Cut(line, "=")
				adopted[k] = v
			}
			assert.Equal(t, env["MIREN_IDENTITY_TOKEN_URL"], adopted["MIREN_IDENTITY_TOKEN_URL"])
			assert.Equal(t, env["MIREN_OIDC_ISSUER_URL"], adopted["MIREN_OIDC_ISSUER_URL"])
			ow.assertVerifies(t, sb.Start(t), adopted, router)
		})
	}
}

// router is the router address the world's daemon is configured with.
func (ow *world) router() netip.Addr {
	for i, a := range ow.args {
		if a == "--subnet" {
			return controllers.Router(netip.MustParsePrefix(ow.args[i+1]))
		}
	}
	ow.t.Fatal("no --subnet in the daemon's arguments")
	return netip.Addr{}
}

// assertVerifies fetches a token the way the sandbox's workload would, from
// MIREN_IDENTITY_TOKEN_URL, and verifies it the way a relying party would:
// OIDC discovery from MIREN_OIDC_ISSUER_URL. The verifier runs in the
// world's host netns; names that are not addresses there resolve to the
// router.
func (ow *world) assertVerifies(t *testing.T, c *sandboxtest.Client, env map[string]string, router netip.Addr) {
	t.Helper()
	claims := fetch(t, c, env)
	require.Equal(t, env["MIREN_OIDC_ISSUER_URL"], claims["iss"], "the issuer a sandbox is told is the tokens' iss")
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: env["MIREN_IDENTITY_TOKEN_URL"] + "?audience=relying-party",
		Header: map[string]string{"Authorization": "Bearer " + env["MIREN_IDENTITY_TOKEN_SECRET"]}})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resps[0].Status, resps[0].Body)
	token := claimsOfToken(t, resps[0].Body)

	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		if _, err := netip.ParseAddr(host); err != nil {
			addr = net.JoinHostPort(router.String(), port)
		}
		var conn net.Conn
		err = netnsutil.Do(ow.w.HostNetns, func() (err error) {
			conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
			return err
		})
		return conn, err
	}
	httpc := &http.Client{Transport: &http.Transport{DialContext: dial}}
	ctx := oidc.ClientContext(context.Background(), httpc)
	provider, err := oidc.NewProvider(ctx, env["MIREN_OIDC_ISSUER_URL"])
	require.NoError(t, err, "discovery from the issuer a sandbox is told")
	_, err = provider.Verifier(&oidc.Config{ClientID: "relying-party"}).Verify(ctx, token)
	require.NoError(t, err)
}

// claimsOfToken takes the JWT out of a token response body.
func claimsOfToken(t *testing.T, body string) string {
	t.Helper()
	v, ok := strings.CutPrefix(strings.TrimSpace(body), `{"value":"`)
	require.True(t, ok, body)
	return strings.TrimSuffix(v, `"}`)
}
