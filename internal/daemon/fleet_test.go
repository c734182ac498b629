package daemon

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/identityd/identityd/fleet"
	"github.com/identityd/identityd/internal/etcdtest"
	"github.com/identityd/identityd/tokenserver"
)

// kids are the kids of the JWKS ks serves.
func kids(ks tokenserver.KeySet) []string {
	var out []string
	for _, key := range ks.JWKS().Keys {
		out = append(out, key.KeyID)
	}
	return out
}

// signing is the kid of the key that signs now.
func signing(t *testing.T, keys *tokenserver.Keys) string {
	t.Helper()
	for _, k := range keys.Published() {
		if k.State == tokenserver.KeySigning {
			return k.KeyID
		}
	}
	t.Fatal("no signing key")
	return ""
}

// TestFleetKeys: in a fleet the token server's keys are published before
// they sign (loaded ones at start, new ones through the hook), the JWKS is
// the fleet's union, a key that stops signing is retired but stays
// published, exp is bounded by the signing key's guaranteed publication
// (nothing signable once evicted, and /readyz says so), and a rotation
// without etcd is refused with 503.
func TestFleetKeys(t *testing.T) {
	etcd := etcdtest.Start(t, 1)
	log := slog.New(slog.DiscardHandler)
	ctx := context.Background()
	cfg := Config{StateDir: t.TempDir(), SigningAlg: tokenserver.EdDSA, MaxTTL: time.Minute, Node: "n1", Logger: log,
		Issuer: "https://issuer.test", EtcdEndpoints: etcd.Endpoints(), EtcdPrefix: "/fleet-keys-test/"}
	require.NoError(t, checkFleet(cfg))
	st, err := openFleet(ctx, cfg, cfg.Issuer, nil)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })

	// A key on disk from an earlier run is published at start.
	earlier, err := tokenserver.OpenKeys(cfg.StateDir+"/keys", tokenserver.EdDSA, nil)
	require.NoError(t, err)
	first := signing(t, earlier)
	keys, err := openKeys(ctx, cfg, st)
	require.NoError(t, err)
	ks := signingKeys(keys, st)
	assert.Equal(t, []string{first}, kids(ks))
	assert.Equal(t, []string{tokenserver.EdDSA}, ks.Algorithms())
	until := time.Until(ks.SignableUntil())
	assert.True(t, until >= time.Minute-time.Second && until <= keyLifetime(cfg), "signable for %s", until)

	// Another node's key is in the JWKS as soon as it is published.
	other, err := fleet.Open(ctx, fleet.Options{Endpoints: etcd.Endpoints(), Prefix: cfg.EtcdPrefix, Node: "n2",
		Issuer: cfg.Issuer, KeyLifetime: keyLifetime(cfg), Logger: log})
	require.NoError(t, err)
	t.Cleanup(func() { other.Close() })
	otherKeys, err := tokenserver.LoadKeys(ctx, tokenserver.KeysConfig{Dir: t.TempDir() + "/keys", Alg: tokenserver.EdDSA, Publish: other.PublishKey})
	require.NoError(t, err)
	otherKid := signing(t, otherKeys)
	require.Eventually(t, func() bool { return slices.Contains(kids(ks), otherKid) }, 5*time.Second, 10*time.Millisecond)

	// An emergency rotation: the new key signs, the old one is retired
	// (no longer renewed) but stays published.
	require.NoError(t, keys.RotateNow(ctx))
	second := signing(t, keys)
	require.NotEqual(t, first, second)
	retireStopped(keys, st)
	assert.True(t, st.PublishedUntil(first).IsZero(), "the old key is no longer renewed")
	assert.Contains(t, kids(ks), first)
	assert.Contains(t, kids(ks), second)
	until = time.Until(ks.SignableUntil())
	assert.True(t, until >= time.Minute-time.Second, "signable for %s", until)
	notReady, degraded := fleetReadiness(ks, st)
	assert.NoError(t, notReady)
	assert.NoError(t, degraded)

	// Evicted: the node's keys leave the JWKS at once and nothing is
	// signable; /readyz says why.
	_, err = other.Evict(ctx, "n1")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return ks.SignableUntil().Before(time.Now()) }, 5*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool { return !slices.Contains(kids(ks), second) }, 5*time.Second, 10*time.Millisecond)
	notReady, _ = fleetReadiness(ks, st)
	assert.ErrorContains(t, notReady, "cannot sign")
	assert.ErrorIs(t, notReady, fleet.ErrEvicted)

	// A rotation the fleet refuses is a 503 saying why.
	h := adminHandler(nil, keys, st, log)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/keys/rotate", nil))
	assert.Equal(t, http.StatusServiceUnavailable, rec.Code, rec.Body.String())
	assert.Contains(t, rec.Body.String(), "rotation refused, the current key keeps signing")
	// The nodes list shows the eviction.
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/nodes", nil))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	var nodes []fleet.NodeInfo
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &nodes))
	require.Len(t, nodes, 2)
	assert.True(t, nodes[0].Node == "n1" && nodes[0].Evicted)
	// Readmitted, it may join again (once restarted).
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/nodes/n1/readmit", nil))
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	again, err := fleet.Open(ctx, fleet.Options{Endpoints: etcd.Endpoints(), Prefix: cfg.EtcdPrefix, Node: "n1",
		Issuer: cfg.Issuer, KeyLifetime: keyLifetime(cfg), Logger: log})
	require.NoError(t, err, "a readmitted node joins again")
	again.Close()
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/nodes/no%2Fsuch/evict", nil))
	assert.Equal(t, http.StatusBadRequest, rec.Code, rec.Body.String())

	// Without etcd, the fleet's routes answer 503.
	etcd.Kill(0)
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/v1/nodes/n2/evict", nil))
	assert.Equal(t, http.StatusServiceUnavailable, rec.Code, rec.Body.String())
}

// TestNoFleet: on a single host the fleet's admin routes say there is no
// fleet, and a fleet flag without --etcd-endpoints, or a fleet without
// --issuer, is refused before anything starts.
func TestNoFleet(t *testing.T) {
	keys, err := tokenserver.OpenKeys(t.TempDir()+"/keys", tokenserver.EdDSA, nil)
	require.NoError(t, err)
	h := adminHandler(nil, keys, nil, slog.New(slog.DiscardHandler))
	for _, r := range []struct{ method, path string }{{"GET", "/v1/nodes"}, {"POST", "/v1/nodes/n1/evict"}, {"POST", "/v1/nodes/n1/readmit"}} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(r.method, r.path, nil))
		assert.Equal(t, http.StatusBadRequest, rec.Code, r.path)
		assert.Contains(t, rec.Body.String(), "no fleet: this daemon runs without --etcd-endpoints", r.path)
	}
	assert.Equal(t, keys, signingKeys(keys, nil))
	notReady, degraded := fleetReadiness(keys, nil)
	assert.NoError(t, notReady)
	assert.NoError(t, degraded)

	assert.NoError(t, checkFleet(Config{}))
	assert.ErrorContains(t, checkFleet(Config{EtcdCA: "/ca.pem"}), "need --etcd-endpoints")
	err = checkFleet(Config{EtcdEndpoints: []string{"http://127.0.0.1:2379"}, Node: "n1"})
	assert.ErrorContains(t, err, "--issuer is required")
	assert.ErrorContains(t, checkFleet(Config{MaxTTL: 30 * time.Second}), "max TTL 30s")
	assert.True(t, strings.HasPrefix(errNoFleet.Error(), "no fleet"))
	assert.Empty(t, endpoints([]string{""}))
	assert.Equal(t, []string{"http://a:2379", "http://b:2379"}, endpoints([]string{"http://a:2379", " http://b:2379 ", ""}))
}
