package tokenserver

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestConnTableShares(t *testing.T) {
	tab := &connTable{limits: ConnLimits{Total: 5, PerSandbox: 2, Others: 2}, sandbox: map[string]int{}}
	take := func(who string) string {
		reason, ok := tab.acquire(who)
		if ok {
			return "ok"
		}
		return reason
	}
	assert.Equal(t, "ok", take("a"))
	assert.Equal(t, "ok", take("a"))
	assert.Equal(t, connSandboxCap, take("a"), "a's share is full")
	assert.Equal(t, "ok", take("b"), "b is not held to a's share")
	assert.Equal(t, "ok", take(""))
	assert.Equal(t, "ok", take(""))
	assert.Equal(t, connTotalCap, take("c"), "five in all")
	assert.Equal(t, connTotalCap, take(""))
	tab.release("a")
	assert.Equal(t, connOthersCap, take(""), "callers that are no sandbox share a pool of two")
	assert.Equal(t, "ok", take("a"), "a's slot came back")
	for range 2 {
		tab.release("a")
	}
	tab.release("b")
	tab.release("")
	tab.release("")
	assert.Zero(t, tab.total)
	assert.Empty(t, tab.sandbox, "no entry stays for a sandbox with no connection")
}
