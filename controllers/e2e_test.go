package controllers

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/bpf"
	"github.com/identityd/identityd/internal/sandboxtest"
	"github.com/identityd/identityd/tokenserver"
)

// TestRunningSandboxSurvivesRestarts is the original bug's repro with every
// part real except the daemon process: a sandbox gets a token, the
// controller and the token server are thrown away and rebuilt from disk and
// the kernel, and the same, never-restarted sandbox process gets a token
// again, naming the same sandbox.
func TestRunningSandboxSurvivesRestarts(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	ctx := context.Background()
	pins := bpf.Options{PinDir: filepath.Join(bpf.DefaultBPFFS, fmt.Sprintf("identityd-test-%d-%s", os.Getpid(), t.Name())), Logger: quiet}
	in, err := bpf.Install(ctx, pins)
	require.NoError(t, err)
	t.Cleanup(func() { in.Close(); bpf.Uninstall(ctx, pins) })

	c := start(t, cfg)
	id := "app-" + suffix()
	created, err := c.Create(ctx, CreateRequest{ID: id, App: "web", Org: "acme"})
	require.NoError(t, err)
	router := netip.AddrPortFrom(c.Router(), 7123)
	require.NoError(t, in.SetEndpoints([]netip.AddrPort{router}))
	env := created.Env
	client := sandboxtest.StartClient(t, created.Sandbox.CgroupPath, created.Sandbox.NetnsPath)

	keysDir := filepath.Join(cfg.StateDir, "keys")
	serve := func(c *Controller) func() {
		keys, err := tokenserver.OpenKeys(keysDir, tokenserver.RS256, nil)
		require.NoError(t, err)
		srv, err := tokenserver.New(tokenserver.Config{Issuer: env["MIREN_OIDC_ISSUER_URL"], Attester: in,
			Registry: c.reg, Secrets: c.secrets, Keys: keys, Logger: quiet})
		require.NoError(t, err)
		ln, err := w.Listen("tcp", router.String())
		require.NoError(t, err)
		hs := srv.HTTPServer()
		go hs.Serve(srv.Listener(ln))
		return func() { ln.Close(); hs.Close() }
	}
	fetch := func() map[string]any {
		resps, err := client.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: env["MIREN_IDENTITY_TOKEN_URL"],
			Header: map[string]string{"Authorization": "Bearer " + env["MIREN_IDENTITY_TOKEN_SECRET"]}})
		require.NoError(t, err)
		require.Equal(t, 200, resps[0].Status, resps[0].Body)
		var body struct{ Value string }
		require.NoError(t, json.Unmarshal([]byte(resps[0].Body), &body))
		payload, err := base64.RawURLEncoding.DecodeString(strings.Split(body.Value, ".")[1])
		require.NoError(t, err)
		var claims map[string]any
		require.NoError(t, json.Unmarshal(payload, &claims))
		return claims
	}

	stop := serve(c)
	first := fetch()
	assert.Equal(t, id, first["sandbox_id"])
	for i := range 5 {
		stop()
		require.NoError(t, c.Close())
		c = start(t, cfg) // rebuilt from the records and the live kernel
		stop = serve(c)
		got := fetch()
		assert.Equal(t, first["sub"], got["sub"], "restart %d", i+1)
		assert.Equal(t, id, got["sandbox_id"])
	}
	stop()
}
