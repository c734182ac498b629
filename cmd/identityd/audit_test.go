package main

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// issuedLine is the daemon's "token issued" line, as an operator reads it.
type issuedLine struct {
	Msg     string   `json:"msg"`
	Level   string   `json:"level"`
	Node    string   `json:"node"`
	Sandbox string   `json:"sandbox"`
	JTI     string   `json:"jti"`
	Sub     string   `json:"sub"`
	Aud     []string `json:"aud"`
	Exp     int64    `json:"exp"`
	Alg     string   `json:"alg"`
	Remote  string   `json:"remote"`
	Caller  struct {
		CgroupID     uint64 `json:"cgroup_id"`
		NetnsCookie  uint64 `json:"netns_cookie"`
		PID          uint64 `json:"pid"`
		SocketCookie uint64 `json:"socket_cookie"`
	} `json:"caller"`
}

// issued returns the daemon's "token issued" lines for jti.
func (ow *world) issued(jti string) []issuedLine {
	var out []issuedLine
	for _, l := range ow.logLines() {
		var il issuedLine
		if l.Msg == "token issued" && json.Unmarshal([]byte(l.raw), &il) == nil && il.JTI == jti {
			out = append(out, il)
		}
	}
	return out
}

// TestAuditTrail: from the JSON log of a real daemon alone, an operator
// finds which process on which host obtained a token: one "token issued"
// line with the token's jti, the sandbox's cgroup and netns, the client's
// pid and the host name. Neither the secret nor the token is in the log,
// not even for a refused request with a wrong secret.
func TestAuditTrail(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	sb := ow.create("e2e-"+suffix(), "web")
	client := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
	secret := sb.Env["MIREN_IDENTITY_TOKEN_SECRET"]

	status, body := get(t, client, sb.Env, secret, "")
	require.Equal(t, http.StatusOK, status, body)
	var resp struct{ Value string }
	require.NoError(t, json.Unmarshal([]byte(body), &resp))
	token, claims := resp.Value, claimsOf(t, body)
	jti, _ := claims["jti"].(string)
	require.NotEmpty(t, jti)

	wrong := strings.Repeat("5a", 32)
	status, _ = get(t, client, sb.Env, wrong, "")
	require.Equal(t, http.StatusForbidden, status)
	ow.lastRefusal(t, 1)

	var lines []issuedLine
	require.Eventually(t, func() bool { lines = ow.issued(jti); return len(lines) > 0 }, 5*time.Second, 10*time.Millisecond,
		"no audit line for jti %s:\n%s", jti, ow.stderr)
	require.Len(t, lines, 1)
	l := lines[0]
	host, err := os.Hostname()
	require.NoError(t, err)
	assert.Equal(t, "INFO", l.Level)
	assert.Equal(t, host, l.Node)
	assert.Equal(t, sb.Sandbox.ID, l.Sandbox)
	assert.Equal(t, claims["sub"], l.Sub)
	assert.Equal(t, []string{"miren"}, l.Aud)
	assert.EqualValues(t, claims["exp"], l.Exp)
	assert.Equal(t, "EdDSA", l.Alg)
	assert.Equal(t, sb.Sandbox.CgroupID, l.Caller.CgroupID)
	assert.Equal(t, sb.Sandbox.NetnsCookie, l.Caller.NetnsCookie)
	assert.Equal(t, uint64(client.Pid), l.Caller.PID)
	assert.NotZero(t, l.Caller.SocketCookie)
	assert.NotEmpty(t, l.Remote)

	log := ow.stderr.String()
	assert.NotContains(t, log, secret)
	assert.NotContains(t, log, wrong)
	assert.NotContains(t, log, token)
	assert.NotContains(t, log, strings.Split(token, ".")[2], "the token's signature is logged")

	r, err := http.Get("http://" + ow.operator + "/metrics")
	require.NoError(t, err)
	metrics, _ := io.ReadAll(r.Body)
	r.Body.Close()
	// The token asked for, and the token file's.
	assert.Contains(t, string(metrics), `identityd_tokens_issued_total{alg="EdDSA"} 2`)
}
