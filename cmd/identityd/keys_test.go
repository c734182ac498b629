package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// freeLoopback is a loopback address no one listens on, for a daemon's
// listener.
func freeLoopback(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// tokenFrom fetches a raw token from inside the sandbox.
func tokenFrom(t *testing.T, c *sandboxtest.Client, env map[string]string, query string) string {
	t.Helper()
	resps, err := c.HTTP(sandboxtest.HTTPRequest{Method: "GET", URL: env["MIREN_IDENTITY_TOKEN_URL"] + query,
		Header: map[string]string{"Authorization": "Bearer " + env["MIREN_IDENTITY_TOKEN_SECRET"]}})
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resps[0].Status, resps[0].Body)
	return claimsOfToken(t, resps[0].Body)
}

// header is a token's JOSE header.
func header(t *testing.T, token string) (alg, kid string) {
	t.Helper()
	head, _, _ := strings.Cut(token, ".")
	b, err := base64.RawURLEncoding.DecodeString(head)
	require.NoError(t, err)
	var h struct{ Alg, Kid string }
	require.NoError(t, json.Unmarshal(b, &h))
	return h.Alg, h.Kid
}

func getJSON(t *testing.T, url string, v any) (int, http.Header) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, v), "%s", b)
	return resp.StatusCode, resp.Header
}

type jwks struct {
	Keys []struct {
		Kid string `json:"kid"`
	} `json:"keys"`
}

func (j jwks) kids() []string {
	var out []string
	for _, k := range j.Keys {
		out = append(out, k.Kid)
	}
	return out
}

// TestDiscoveryListener: --discovery-listen serves discovery and the JWKS
// and never the token endpoint; with --issuer naming it, a relying party
// that knows only the issuer URL verifies a sandbox's token through it.
// --node-name names the node in the audit line.
func TestDiscoveryListener(t *testing.T) {
	ow := newWorld(t)
	disc := freeLoopback(t)
	issuer := "http://" + disc
	node := "node-" + suffix()
	ow.args = append(ow.args, "--discovery-listen", disc, "--issuer", issuer+"/", "--node-name", node)
	ow.start()

	var doc map[string]any
	status, _ := getJSON(t, issuer+"/.well-known/openid-configuration", &doc)
	require.Equal(t, http.StatusOK, status)
	assert.Equal(t, issuer, doc["issuer"])
	assert.Equal(t, issuer+"/.well-known/jwks.json", doc["jwks_uri"])
	for _, p := range []string{"/.well-known/jwks.json", "/.well-known/miren/jwks"} {
		var set jwks
		status, h := getJSON(t, issuer+p, &set)
		require.Equal(t, http.StatusOK, status, p)
		assert.Equal(t, "max-age=60", h.Get("Cache-Control"))
		assert.Len(t, set.Keys, 1)
	}

	sb := ow.create("e2e-"+suffix(), "web")
	require.Equal(t, issuer, sb.Env["MIREN_OIDC_ISSUER_URL"])
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)

	// The token endpoint is not there, whatever the request carries.
	for _, p := range []string{"/v1/token", "/v1/token?ttl=60", "/metrics", "/"} {
		req, err := http.NewRequest("GET", issuer+p, nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+sb.Env["MIREN_IDENTITY_TOKEN_SECRET"])
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, http.StatusNotFound, resp.StatusCode, p)
		assert.JSONEq(t, `{"error":"not found"}`, string(b), p)
	}

	token := tokenFrom(t, client, sb.Env, "?audience=relying-party")
	ctx := context.Background()
	provider, err := oidc.NewProvider(ctx, sb.Env["MIREN_OIDC_ISSUER_URL"])
	require.NoError(t, err, "discovery through the discovery listener")
	idt, err := provider.Verifier(&oidc.Config{ClientID: "relying-party", SupportedSigningAlgs: []string{"EdDSA"}}).Verify(ctx, token)
	require.NoError(t, err)
	var c struct {
		JTI string `json:"jti"`
	}
	require.NoError(t, idt.Claims(&c))
	require.Eventually(t, func() bool { return len(ow.issued(c.JTI)) == 1 }, 10*time.Second, 20*time.Millisecond)
	assert.Equal(t, node, ow.issued(c.JTI)[0].Node)
}

// rotateKey runs identityctl rotate-key against the world's daemon.
func (ow *world) rotateKey(args ...string) string {
	ow.t.Helper()
	out, err := exec.Command(filepath.Join(ow.bin, "identityctl"),
		append([]string{"--admin-socket", ow.admin, "rotate-key"}, args...)...).CombinedOutput()
	require.NoError(ow.t, err, "%s", out)
	return string(out)
}

// TestRotateKeyPublishesBeforeSigning: identityctl rotate-key publishes the
// new key at once, and the daemon keeps signing with the old one for
// --key-publish-delay, also across a restart within the delay; a go-oidc
// verifier that cached the JWKS before the rotation verifies the first
// token of the new key. rotate-key --now signs at once.
func TestRotateKeyPublishesBeforeSigning(t *testing.T) {
	ow := newWorld(t)
	disc := freeLoopback(t)
	issuer := "http://" + disc
	const delay = 4 * time.Second
	ow.args = append(ow.args, "--discovery-listen", disc, "--issuer", issuer, "--key-publish-delay", delay.String())
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	ctx := context.Background()
	provider, err := oidc.NewProvider(ctx, issuer)
	require.NoError(t, err)
	verifier := provider.Verifier(&oidc.Config{ClientID: "miren", SupportedSigningAlgs: []string{"EdDSA"}})
	first := tokenFrom(t, client, sb.Env, "")
	_, err = verifier.Verify(ctx, first)
	require.NoError(t, err, "fills the verifier's JWKS cache")
	_, oldKid := header(t, first)

	out := ow.rotateKey()
	assert.Contains(t, out, "signing EdDSA "+oldKid)
	assert.Contains(t, out, "next")
	var set jwks
	getJSON(t, issuer+"/.well-known/jwks.json", &set)
	require.Len(t, set.Keys, 2, "the new key is published at once")
	newKid := set.kids()[1]
	_, kid := header(t, tokenFrom(t, client, sb.Env, ""))
	assert.Equal(t, oldKid, kid, "the old key signs during the publish delay")

	// A restart within the delay keeps the schedule.
	ow.kill(syscall.SIGTERM)
	ow.start()
	_, kid = header(t, tokenFrom(t, client, sb.Env, ""))
	assert.Equal(t, oldKid, kid, "the old key still signs after a restart within the delay")

	var next string
	require.Eventually(t, func() bool {
		next = tokenFrom(t, client, sb.Env, "")
		_, kid := header(t, next)
		return kid == newKid
	}, 30*time.Second, 200*time.Millisecond, "the new key signs after the delay")
	_, err = verifier.Verify(ctx, next)
	require.NoError(t, err, "a verifier whose JWKS cache predates the rotation finds the new key")
	_, err = verifier.Verify(ctx, first)
	require.NoError(t, err, "the old key stays published")

	ow.rotateKey("--now")
	getJSON(t, issuer+"/.well-known/jwks.json", &set)
	require.Len(t, set.Keys, 3)
	_, kid = header(t, tokenFrom(t, client, sb.Env, ""))
	assert.Equal(t, set.kids()[2], kid, "an emergency rotation signs at once")
}

// TestKeyRotationPeriod: the daemon replaces its key on schedule, each new
// key published before it signs, and the replaced keys stay published. A
// period no longer than the publish delay is refused at start.
func TestKeyRotationPeriod(t *testing.T) {
	ow := newWorld(t)
	disc := freeLoopback(t)
	issuer := "http://" + disc
	ow.args = append(ow.args, "--discovery-listen", disc, "--issuer", issuer)

	bad := exec.Command(filepath.Join(ow.bin, "identityd"), append(append([]string{}, ow.args...),
		"--key-rotation-period", "30s", "--key-publish-delay", "1m")...)
	out, err := bad.CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "key rotation period 30s: want 0 (off) or longer than the key publish delay (1m0s)")

	ow.args = append(ow.args, "--key-rotation-period", "3s", "--key-publish-delay", "1s")
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	_, first := header(t, tokenFrom(t, client, sb.Env, ""))
	var set jwks
	require.Eventually(t, func() bool {
		getJSON(t, issuer+"/.well-known/jwks.json", &set)
		return len(set.Keys) >= 3
	}, 60*time.Second, 200*time.Millisecond, "keys rotated on schedule")
	assert.Equal(t, first, set.kids()[0], "the replaced key stays published")
	_, kid := header(t, tokenFrom(t, client, sb.Env, ""))
	assert.NotEqual(t, first, kid)
	assert.Contains(t, ow.stderr.String(), "signing key rotated on schedule")
}

// ageKey sets the creation (and signing start) of the world's only key
// file back by age, as if the key had been made that long ago.
func (ow *world) ageKey(age time.Duration) {
	ow.t.Helper()
	files, err := filepath.Glob(filepath.Join(ow.state, "keys", "*.jwk.json"))
	require.NoError(ow.t, err)
	require.Len(ow.t, files, 1)
	b, err := os.ReadFile(files[0])
	require.NoError(ow.t, err)
	var k map[string]any
	require.NoError(ow.t, json.Unmarshal(b, &k))
	then := time.Now().Add(-age).UTC().Format(time.RFC3339Nano)
	k["created"], k["signs_from"] = then, then
	b, err = json.Marshal(k)
	require.NoError(ow.t, err)
	require.NoError(ow.t, os.WriteFile(files[0], b, 0o600))
}

// TestKeyRotationDueAtStart: the rotation period counts from the key's
// creation on disk: a restart before it is due does not rotate nor reset
// it, and a daemon that was down past the due time rotates as it starts
// (publishing the new key first, the old one signing meanwhile).
func TestKeyRotationDueAtStart(t *testing.T) {
	ow := newWorld(t)
	disc := freeLoopback(t)
	issuer := "http://" + disc
	ow.args = append(ow.args, "--discovery-listen", disc, "--issuer", issuer, "--key-rotation-period", "720h")
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	_, first := header(t, tokenFrom(t, client, sb.Env, ""))

	require.Equal(t, 0, ow.kill(syscall.SIGTERM))
	ow.ageKey(29 * 24 * time.Hour)
	ow.start()
	require.Eventually(t, func() bool { return strings.Contains(ow.stderr.String(), "signing key rotation scheduled") },
		10*time.Second, 20*time.Millisecond, "the rotation loop ran")
	var set jwks
	getJSON(t, issuer+"/.well-known/jwks.json", &set)
	assert.Equal(t, []string{first}, set.kids(), "29 days old: not due")

	require.Equal(t, 0, ow.kill(syscall.SIGTERM))
	ow.ageKey(31 * 24 * time.Hour)
	ow.start()
	require.Eventually(t, func() bool {
		getJSON(t, issuer+"/.well-known/jwks.json", &set)
		return len(set.Keys) == 2
	}, 30*time.Second, 50*time.Millisecond, "31 days old: rotated at start")
	assert.Equal(t, first, set.kids()[0])
	_, kid := header(t, tokenFrom(t, client, sb.Env, ""))
	assert.Equal(t, first, kid, "the old key signs while the new one is published")
	assert.Contains(t, ow.stderr.String(), "signing key rotated on schedule")
}
