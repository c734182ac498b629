package main

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// TestTokenCacheFlag: by default a repeated request of a sandbox gets the
// same token back (same jti); with --no-token-cache every request is signed
// anew.
func TestTokenCacheFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		same bool
	}{{nil, true}, {[]string{"--no-token-cache"}, false}} {
		ow := newWorld(t)
		ow.args = append(ow.args, tc.args...)
		ow.start()
		sb := ow.create("cache-"+suffix(), "web")
		c := sandboxtest.StartClient(t, sb.Sandbox.CgroupPath, sb.Sandbox.NetnsPath)
		first, second := fetch(t, c, sb.Env), fetch(t, c, sb.Env)
		assert.Equal(t, tc.same, first["jti"] == second["jti"], "args %v: jti %v then %v", tc.args, first["jti"], second["jti"])
		ow.kill(9)
	}
}
