package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/client"
)

// TestClientPackageInSandbox: `identityctl token`, which fetches through
// package client, gets tokens from a real daemon from inside a sandbox:
// audiences and ttl in the request, the secret file preferred to the
// environment's secret, a refusal that says why, and the token file read
// whole.
func TestClientPackageInSandbox(t *testing.T) {
	ow := newWorld(t)
	ow.start()
	id := "e2e-client-" + suffix()
	c := ow.create(id, "web")
	ctl := filepath.Join(ow.bin, "identityctl")

	// token runs identityctl token in the sandbox's cgroup and netns with
	// the sandbox's environment changed by env ("" removes a variable).
	token := func(env map[string]string, args ...string) (string, error) {
		cg, err := os.Open(c.Sandbox.CgroupPath)
		require.NoError(t, err)
		defer cg.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, ctl, append([]string{"__exec", "--netns", c.Sandbox.NetnsPath, "--", ctl, "token"}, args...)...)
		cmd.Env = os.Environ()
		merged := map[string]string{}
		for k, v := range c.Env {
			merged[k] = v
		}
		for k, v := range env {
			merged[k] = v
		}
		for k, v := range merged {
			if v != "" {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	claims := func(out string) map[string]any {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(out), &m), out)
		return m
	}
	secret := c.Env[client.EnvSecret]
	require.NotEmpty(t, secret)

	out, err := token(nil, "--decode", "--audience", "a", "--audience", "b", "--ttl", "120", "--max-attempts", "3", "--max-backoff", "500ms")
	require.NoError(t, err, "%s\ndaemon log:\n%s", out, ow.stderr)
	m := claims(out)
	assert.Equal(t, id, m["sandbox_id"])
	assert.Equal(t, []any{"a", "b"}, m["aud"])
	assert.Equal(t, 120.0, m["exp"].(float64)-m["iat"].(float64))

	// The secret file is preferred to a wrong secret in the environment.
	secretFile := filepath.Join(t.TempDir(), "secret")
	require.NoError(t, os.WriteFile(secretFile, []byte(secret+"\n"), 0o600))
	wrong := strings.Repeat("0", 64)
	out, err = token(map[string]string{client.EnvSecret: wrong, client.EnvSecretFile: secretFile}, "--decode", "--max-attempts", "3", "--max-backoff", "500ms")
	require.NoError(t, err, out)
	assert.Equal(t, id, claims(out)["sandbox_id"])

	// A refusal says why, with the status.
	out, err = token(map[string]string{client.EnvSecret: wrong, client.EnvSecretFile: ""}, "--max-attempts", "1")
	require.Error(t, err)
	assert.Contains(t, out, "token server refused: 403 Forbidden: invalid token")

	// --file reads the token file and checks its exp.
	raw, err := token(nil, "--max-attempts", "3", "--max-backoff", "500ms")
	require.NoError(t, err, raw)
	tokenFile := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(tokenFile, []byte(raw), 0o600))
	out, err = token(map[string]string{client.EnvTokenPath: tokenFile}, "--file", "--decode")
	require.NoError(t, err, out)
	assert.Equal(t, id, claims(out)["sandbox_id"])
	assert.Equal(t, []any{"miren"}, claims(out)["aud"], "the default audience")
}
