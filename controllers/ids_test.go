package controllers

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/internal/sandboxtest"
)

// memIDs is the fleet's id reservation reduced to its contract, for the
// controller's side of it; the real one (fleet, on etcd) is exercised by
// cmd/identityd's fleet tests.
type memIDs struct {
	mu      sync.Mutex
	node    string
	held    map[string]string // id -> node
	down    bool
	reserve int
}

func (m *memIDs) Reserve(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reserve++
	if m.down {
		return fmt.Errorf("%w: etcd has no quorum", ErrIDsUnavailable)
	}
	if h, ok := m.held[id]; ok && h != m.node {
		return fmt.Errorf("%w: sandbox id %q is held by node %q", ErrHeld, id, h)
	}
	m.held[id] = m.node
	return nil
}

func (m *memIDs) Release(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.down {
		return fmt.Errorf("%w: etcd has no quorum", ErrIDsUnavailable)
	}
	if m.held[id] == m.node {
		delete(m.held, id)
	}
	return nil
}

func (m *memIDs) holder(id string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.held[id]
}

func TestFleetIDsReservedAndReleased(t *testing.T) {
	w := sandboxtest.New(t)
	cfg := testConfig(t, w)
	ids := &memIDs{node: "n1", held: map[string]string{"taken-" + suffix(): "n2"}}
	cfg.IDs = ids
	c := start(t, cfg)
	api := serveAdmin(t, c)
	ctx := context.Background()

	// Held by another node: 409 naming it, and nothing made.
	var taken string
	for id := range ids.held {
		taken = id
	}
	err := api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: taken, App: "web"}, nil)
	assert.Equal(t, http.StatusConflict, apiStatus(err), "%v", err)
	assert.ErrorContains(t, err, `held by node "n2"`)
	_, statErr := os.Stat(cfg.CgroupParent + "/" + taken)
	assert.ErrorIs(t, statErr, os.ErrNotExist)
	assert.False(t, hasSecret(t, cfg, taken))

	// The store unreachable: 503 saying so, and nothing made.
	ids.down = true
	id := "web-" + suffix()
	err = api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id, App: "web"}, nil)
	assert.Equal(t, http.StatusServiceUnavailable, apiStatus(err), "%v", err)
	assert.ErrorContains(t, err, "fleet store unreachable: create refused")
	assert.False(t, hasSecret(t, cfg, id))
	ids.down = false

	// A create reserves, a delete releases.
	require.NoError(t, api.Do(ctx, "POST", "/v1/sandboxes", CreateRequest{ID: id, App: "web"}, nil))
	assert.Equal(t, "n1", ids.holder(id))

	// A restart re-reserves what it rebuilt.
	ids.mu.Lock()
	delete(ids.held, id)
	ids.mu.Unlock()
	c.Close()
	c2 := start(t, cfg)
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan struct{})
	go func() { defer close(ran); c2.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-ran })
	require.Eventually(t, func() bool { return ids.holder(id) == "n1" }, 5*time.Second, 10*time.Millisecond)

	require.NoError(t, c2.Delete(ctx, id, true))
	assert.Empty(t, ids.holder(id))

	// A release that fails (the store unreachable) is retried.
	id2 := "web-" + suffix()
	_, err = c2.Create(ctx, CreateRequest{ID: id2, App: "web"})
	require.NoError(t, err)
	ids.mu.Lock()
	ids.down = true
	ids.mu.Unlock()
	require.NoError(t, c2.Delete(ctx, id2, true), "a delete goes through without the store")
	assert.Equal(t, "n1", ids.holder(id2))
	ids.mu.Lock()
	ids.down = false
	ids.mu.Unlock()
	require.Eventually(t, func() bool { return ids.holder(id2) == "" }, 5*time.Second, 10*time.Millisecond)
}
