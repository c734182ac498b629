package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/controllers"
	"github.com/identityd/identityd/internal/etcdtest"
	"github.com/identityd/identityd/internal/sandboxtest"
)

// fleetWorld is a world whose daemon is a node of a fleet on etcd.
func fleetWorld(t *testing.T, etcd *etcdtest.Cluster, prefix, issuer, node, disc string) *world {
	ow := newWorld(t)
	ow.args = append(ow.args, "--node-name", node, "--discovery-listen", disc,
		"--etcd-endpoints", strings.Join(etcd.Endpoints(), ","), "--etcd-prefix", prefix,
		"--max-ttl", "60s", "--key-publish-delay", "2s")
	if issuer != "" {
		ow.args = append(ow.args, "--issuer", issuer)
	}
	t.Cleanup(func() {
		if t.Failed() && ow.stderr != nil {
			t.Logf("%s's log:\n%s", node, ow.stderr.String())
		}
	})
	return ow
}

// refused runs the world's daemon, which must refuse to start, and returns
// what it said.
func (ow *world) refused() string {
	ow.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, filepath.Join(ow.bin, "identityd"), ow.args...).CombinedOutput()
	var ee *exec.ExitError
	require.True(ow.t, errors.As(err, &ee), "identityd should have refused to start: %v\n%s", err, out)
	return string(out)
}

// identityctl runs identityctl against the world's daemon.
func (ow *world) identityctl(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(ow.bin, "identityctl"),
		append([]string{"--admin-socket", ow.admin}, args...)...).CombinedOutput()
	return string(out), err
}

// freeLoopbackAside is a free address on a loopback address other than
// 127.0.0.1: a port picked there cannot be taken meanwhile as the local
// port of an outgoing connection to 127.0.0.1 (to etcd, say), which would
// keep the daemon from listening on it.
func freeLoopbackAside(t *testing.T) string {
	t.Helper()
	var b [1]byte
	rand.Read(b[:])
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:0", 2+int(b[0])%250))
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// jwksKids is the kids of the JWKS a discovery listener serves.
func jwksKids(t *testing.T, disc string) []string {
	t.Helper()
	var set jwks
	status, _ := getJSON(t, "http://"+disc+"/.well-known/jwks.json", &set)
	require.Equal(t, http.StatusOK, status)
	return set.kids()
}

// TestFleetTwoNodes: two daemons on one etcd cluster serve one issuer. A
// node refuses to start without --issuer or with another issuer than the
// fleet's; a token from node 1 verifies with node 2's JWKS; an id node 1
// holds cannot be created on node 2; identityctl nodes lists both; and
// identityctl evict-node takes node 1's keys out of node 2's JWKS at once,
// after which node 1 signs nothing.
func TestFleetTwoNodes(t *testing.T) {
	etcd := etcdtest.Start(t, 1)
	prefix := "/identityd-fleet-" + suffix() + "/"
	disc1, disc2 := freeLoopbackAside(t), freeLoopbackAside(t)
	issuer := "http://" + disc1
	n1 := "node1-" + suffix()
	n2 := "node2-" + suffix()

	out := fleetWorld(t, etcd, prefix, "", n1, disc1).refused()
	assert.Contains(t, out, "--issuer is required with --etcd-endpoints")

	w1 := fleetWorld(t, etcd, prefix, issuer, n1, disc1)
	w1.start()
	w1.waitReady()

	out = fleetWorld(t, etcd, prefix, "http://elsewhere.test", n2, disc2).refused()
	assert.Contains(t, out, `records issuer "`+issuer+`"`)
	assert.Contains(t, out, `started with issuer "http://elsewhere.test"`)

	w2 := fleetWorld(t, etcd, prefix, issuer, n2, disc2)
	w2.start()
	w2.waitReady()

	// Each node serves both nodes' keys.
	var kids1, kids2 []string
	require.Eventually(t, func() bool {
		kids1, kids2 = jwksKids(t, disc1), jwksKids(t, disc2)
		return len(kids1) == 2 && slices.Equal(kids1, kids2)
	}, 10*time.Second, 20*time.Millisecond, "node 1 serves %v, node 2 %v", kids1, kids2)

	// A token of node 1 verifies with node 2's JWKS.
	id := "fleet-" + suffix()
	sb := w1.create(id, "web")
	require.Equal(t, issuer, sb.Env["MIREN_OIDC_ISSUER_URL"])
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	token := tokenFrom(t, client, sb.Env, "?ttl=3600")
	_, kid := header(t, token)
	ctx := context.Background()
	keys2 := oidc.NewRemoteKeySet(ctx, "http://"+disc2+"/.well-known/jwks.json")
	verifier := oidc.NewVerifier(issuer, keys2, &oidc.Config{ClientID: "miren", SupportedSigningAlgs: []string{"EdDSA"}})
	idt, err := verifier.Verify(ctx, token)
	require.NoError(t, err, "node 1's token through node 2's JWKS")
	assert.WithinDuration(t, time.Now().Add(time.Minute), idt.Expiry, 10*time.Second, "ttl clamped to --max-ttl")

	// The id is node 1's: node 2 refuses it, naming node 1.
	err = controllers.NewAdminClient(w2.admin).Do(ctx, "POST", "/v1/sandboxes", controllers.CreateRequest{ID: id, App: "web"}, nil)
	var apiErr *controllers.APIError
	require.ErrorAs(t, err, &apiErr)
	assert.Equal(t, http.StatusConflict, apiErr.Status)
	assert.Contains(t, apiErr.Message, `held by node "`+n1+`"`)

	// identityctl nodes lists both, with their keys.
	out, err = w2.identityctl("nodes", "-o", "json")
	require.NoError(t, err, out)
	var nodes []struct {
		Node     string    `json:"node"`
		Kids     []string  `json:"kids"`
		LastSeen time.Time `json:"last_seen"`
		Evicted  bool      `json:"evicted"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &nodes), out)
	byName := map[string][]string{}
	for _, n := range nodes {
		byName[n.Node] = n.Kids
		assert.False(t, n.LastSeen.IsZero(), n.Node)
		assert.False(t, n.Evicted, n.Node)
	}
	require.Contains(t, byName, n1)
	require.Contains(t, byName, n2)
	assert.Equal(t, []string{kid}, byName[n1])
	out, err = w2.identityctl("nodes")
	require.NoError(t, err, out)
	assert.Contains(t, out, n1)
	assert.Contains(t, out, n2)

	// Evicting node 1 takes its key out of node 2's JWKS at once, and node
	// 1 signs no more.
	out, err = w2.identityctl("evict-node", n1)
	require.NoError(t, err, out)
	assert.Contains(t, out, kid)
	require.Eventually(t, func() bool { return !slices.Contains(jwksKids(t, disc2), kid) }, 5*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool {
		resps, err := client.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: sb.Env["MIREN_IDENTITY_TOKEN_URL"],
			Header: map[string]string{"Authorization": "Bearer " + sb.Env["MIREN_IDENTITY_TOKEN_SECRET"]}})
		return err == nil && resps[0].Status == http.StatusInternalServerError
	}, 10*time.Second, 50*time.Millisecond, "node 1 still signs after its eviction")
	out, err = w2.identityctl("nodes", "-o", "json")
	require.NoError(t, err, out)
	assert.Contains(t, out, `"evicted": true`)
}

// waitReady waits for /readyz to say ready: a new fleet node's first key is
// published for the publish delay before it signs.
func (ow *world) waitReady() {
	ow.t.Helper()
	require.Eventually(ow.t, func() bool {
		return strings.Contains(operatorGet(ow.t, ow, "/readyz"), `"status":"ready"`)
	}, 60*time.Second, 50*time.Millisecond, "not ready:\n%s", operatorGet(ow.t, ow, "/readyz"))
}
