package fleet

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/identityd/identityd/internal/etcdtest"
)

// testKeyLifetime is short so that expiry can be watched in a test.
const testKeyLifetime = 3 * time.Second

// newKey returns a fresh ES256 key pair as JWKs, with the thumbprint kid.
func newKey(t testing.TB) (pub, priv jose.JSONWebKey) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	priv = jose.JSONWebKey{Key: k, Algorithm: "ES256", Use: "sig"}
	tp, err := priv.Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	priv.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	return priv.Public(), priv
}

type testFleet struct {
	c         *etcdtest.Cluster // nil in a child node process
	endpoints []string
	prefix    string
}

func newTestFleet(t testing.TB) *testFleet {
	c := etcdtest.Start(t, 3)
	return &testFleet{c: c, endpoints: c.Endpoints(), prefix: "/t-" + uuid.NewString()[:8] + "/"}
}

func (f *testFleet) options(t testing.TB, node string) Options {
	return Options{
		Endpoints:   f.endpoints,
		Prefix:      f.prefix,
		Node:        node,
		Issuer:      "https://issuer.test",
		KeyLifetime: testKeyLifetime,
		Version:     "test",
		Logger:      slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry:    prometheus.NewRegistry(),
	}
}

func (f *testFleet) open(t testing.TB, node string) *Store {
	t.Helper()
	s, err := f.openErr(t, f.options(t, node))
	if err != nil {
		t.Fatalf("open %s: %v", node, err)
	}
	return s
}

func (f *testFleet) openErr(t testing.TB, o Options) (*Store, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Open(ctx, o)
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// eventually polls cond for up to 20 s: a bound for progress on a loaded
// machine, not a speed assertion.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hasKid(s *Store, kid string) bool {
	for _, k := range s.JWKS().Keys {
		if k.KeyID == kid {
			return true
		}
	}
	return false
}

func publish(t testing.TB, s *Store, pub jose.JSONWebKey) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.PublishKey(ctx, pub); err != nil {
		t.Fatalf("publish %s on %s: %v", pub.KeyID, s.Node(), err)
	}
}

func TestIssuerRecordedAndRefused(t *testing.T) {
	f := newTestFleet(t)
	f.open(t, "a")
	f.open(t, "b") // same issuer: accepted
	o := f.options(t, "c")
	o.Issuer = "https://other.test"
	_, err := f.openErr(t, o)
	if err == nil || !strings.Contains(err.Error(), `"https://issuer.test"`) || !strings.Contains(err.Error(), `"https://other.test"`) {
		t.Fatalf("open with another issuer: got %v, want an error naming both issuers", err)
	}
	// A failed Open leaves its registry free for the retry.
	o.Issuer = "https://issuer.test"
	if _, err := f.openErr(t, o); err != nil {
		t.Fatalf("retry with the fleet's issuer on the same registry: %v", err)
	}
	o = f.options(t, "e")
	o.RenewInterval = testKeyLifetime
	if _, err := f.openErr(t, o); err == nil {
		t.Fatal("open with a renew interval as long as the key lifetime succeeded")
	}
	o = f.options(t, "d")
	o.Issuer = ""
	if _, err := f.openErr(t, o); err == nil {
		t.Fatal("open without an issuer succeeded")
	}
	o = f.options(t, "a/b")
	if _, err := f.openErr(t, o); err == nil {
		t.Fatal("open with a node name holding a slash succeeded")
	}
}

func TestKeysUnionAcrossNodes(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, privA := newKey(t)
	pb, _ := newKey(t)
	publish(t, a, pa)
	publish(t, b, pb)
	for _, s := range []*Store{a, b} {
		eventually(t, s.Node()+" sees both keys", func() bool { return hasKid(s, pa.KeyID) && hasKid(s, pb.KeyID) })
	}
	// A third node opened later loads the union at once.
	c := f.open(t, "c")
	if !hasKid(c, pa.KeyID) || !hasKid(c, pb.KeyID) {
		t.Fatalf("new node's JWKS lacks published keys: %v", c.JWKS().Keys)
	}
	if until := a.PublishedUntil(pa.KeyID); time.Until(until) < testKeyLifetime/2 {
		t.Fatalf("PublishedUntil %v is not about a key lifetime ahead", until)
	}
	if !a.PublishedUntil(pb.KeyID).IsZero() {
		t.Fatal("PublishedUntil of another node's key is not zero")
	}
	ctx := context.Background()
	if err := a.PublishKey(ctx, privA); err == nil || !strings.Contains(err.Error(), "private") {
		t.Fatalf("publishing a private key: got %v", err)
	}
	bad := pa
	bad.KeyID = "not-the-thumbprint"
	if err := a.PublishKey(ctx, bad); err == nil {
		t.Fatal("publishing a key whose kid is not its thumbprint succeeded")
	}
	// A forged entry written straight to etcd (a private key, a kid that is
	// not the thumbprint) is kept out of every JWKS.
	cli := f.c.Client(t)
	if _, err := cli.Put(ctx, f.prefix+"keys/x/"+bad.KeyID, `{"kty":"EC"}`); err != nil {
		t.Fatal(err)
	}
	pc, _ := newKey(t)
	publish(t, c, pc)
	for _, s := range []*Store{a, b, c} {
		eventually(t, s.Node()+" sees c's key", func() bool { return hasKid(s, pc.KeyID) })
	}
	if hasKid(a, bad.KeyID) || len(a.JWKS().Keys) != 3 {
		t.Fatalf("JWKS holds a forged entry: %v", a.JWKS().Keys)
	}
	body, err := a.JWKSJSON()
	if err != nil {
		t.Fatal(err)
	}
	var served jose.JSONWebKeySet
	if err := json.Unmarshal(body, &served); err != nil || len(served.Keys) != 3 || served.Keys[0].IsPublic() != true {
		t.Fatalf("JWKSJSON: %s (%v)", body, err)
	}
	for _, s := range []*Store{a, b, c} {
		if got := testutil.ToFloat64(s.m.jwksKeys); got != 3 {
			t.Errorf("%s: identityd_fleet_jwks_keys = %v, want 3", s.Node(), got)
		}
		if got := testutil.ToFloat64(s.m.keysPublished); got != 1 {
			t.Errorf("%s: identityd_fleet_keys_published = %v, want 1", s.Node(), got)
		}
	}
}

// waitGone waits until kid leaves s's JWKS and fails if that happened before
// until, the time its publisher guaranteed.
func waitGone(t *testing.T, s *Store, kid string, until time.Time) {
	t.Helper()
	deadline := until.Add(15 * time.Second)
	for hasKid(s, kid) {
		if time.Now().After(deadline) {
			t.Fatalf("key %s still published %s after its guarantee", kid, time.Since(until))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if now := time.Now(); now.Before(until) {
		t.Fatalf("key %s left the JWKS %s before the time its node guaranteed", kid, until.Sub(now))
	}
	t.Logf("key %s left the JWKS %s after its guarantee", kid, time.Since(until).Round(time.Millisecond))
}

func TestDeadNodeKeysExpireAfterLifetime(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, _ := newKey(t)
	publish(t, a, pa)
	eventually(t, "b sees a's key", func() bool { return hasKid(b, pa.KeyID) })
	// Let a renew a few times, so the lease has really been kept alive.
	first := a.PublishedUntil(pa.KeyID)
	eventually(t, "a renews its key's lease", func() bool { return a.PublishedUntil(pa.KeyID).After(first.Add(500 * time.Millisecond)) })
	until := a.PublishedUntil(pa.KeyID)
	// Close revokes nothing: from etcd's side this is a node that died.
	a.Close()
	waitGone(t, b, pa.KeyID, until)
	nodes, err := b.Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.Node == "a" {
			t.Fatalf("dead node a still listed: %+v", n)
		}
	}
}

func TestRetiredKeyStaysUntilItsTokensExpire(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	oldKey, _ := newKey(t)
	newK, _ := newKey(t)
	publish(t, a, oldKey)
	publish(t, a, newK)
	eventually(t, "b sees both keys", func() bool { return hasKid(b, oldKey.KeyID) && hasKid(b, newK.KeyID) })
	until := a.RetireKey(oldKey.KeyID)
	if until.IsZero() || !a.PublishedUntil(oldKey.KeyID).IsZero() {
		t.Fatalf("RetireKey: until %v, PublishedUntil after %v", until, a.PublishedUntil(oldKey.KeyID))
	}
	waitGone(t, b, oldKey.KeyID, until)
	if !hasKid(b, newK.KeyID) || !hasKid(a, newK.KeyID) {
		t.Fatal("the current key left the JWKS with the retired one")
	}
	if a.RetireKey("unknown").IsZero() != true {
		t.Fatal("retiring an unknown key returned a time")
	}
}

func TestLostLeaseIsRegrantedAndKeyRepublished(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, _ := newKey(t)
	publish(t, a, pa)
	eventually(t, "b sees a's key", func() bool { return hasKid(b, pa.KeyID) })
	a.mu.Lock()
	id := a.keys[pa.KeyID].lease.id
	a.mu.Unlock()
	// As if the lease had expired during an outage.
	if _, err := f.c.Client(t).Revoke(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a re-grants its key's lease", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.keys[pa.KeyID].lease.id != id
	})
	eventually(t, "b sees a's key again", func() bool { return hasKid(b, pa.KeyID) })
	if got := testutil.ToFloat64(a.m.renewals.WithLabelValues(renewLost)); got < 1 {
		t.Fatalf("lease_renewals_total{result=lost} = %v", got)
	}
}

func TestQuorumLoss(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, _ := newKey(t)
	publish(t, a, pa)
	ctx := context.Background()

	f.c.Kill(0)
	// Losing one member may cost an election; then everything works.
	eventually(t, "a reservation with one member down", func() bool { return a.Reserve(ctx, "one-down") == nil })
	pa2, _ := newKey(t)
	publish(t, a, pa2)
	eventually(t, "b sees the key published with one member down", func() bool { return hasKid(b, pa2.KeyID) })

	f.c.Kill(1)
	start := time.Now()
	err := a.Reserve(ctx, "two-down")
	took := time.Since(start)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("reserve without quorum: got %v, want ErrUnavailable", err)
	}
	t.Logf("reserve without quorum failed after %s: %v", took.Round(time.Millisecond), err)
	if took > 3*DefaultOpTimeout {
		t.Fatalf("reserve without quorum took %s", took)
	}
	pa3, _ := newKey(t)
	if err := a.PublishKey(ctx, pa3); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("publish without quorum: got %v, want ErrUnavailable", err)
	}
	// The guarantee stands and stops advancing; the node reports etcd down.
	eventually(t, "a notices etcd is down", func() bool { return a.Healthy() != nil })
	frozen := a.PublishedUntil(pa.KeyID)
	if frozen.IsZero() {
		t.Fatal("PublishedUntil went to zero while etcd is down")
	}
	time.Sleep(a.interval * 2)
	if got := a.PublishedUntil(pa.KeyID); !got.Equal(frozen) {
		t.Fatalf("PublishedUntil moved from %v to %v without etcd", frozen, got)
	}
	if testutil.ToFloat64(a.m.etcdUp) != 0 {
		t.Fatal("identityd_fleet_etcd_up is not 0 without quorum")
	}
	if !hasKid(a, pa.KeyID) || !hasKid(a, pa2.KeyID) {
		t.Fatal("the JWKS lost keys while etcd is down")
	}

	// Past the guarantee the node has nothing to sign with (the token
	// server clamps exp to PublishedUntil and refuses below the minimum).
	eventually(t, "a's guarantee runs out", func() bool { return time.Now().After(frozen) })
	if got := a.PublishedUntil(pa.KeyID); got.After(time.Now()) {
		t.Fatalf("PublishedUntil %v is in the future with etcd down for a key lifetime", got)
	}

	f.c.Restart(0)
	f.c.Restart(1)
	eventually(t, "a healthy again", func() bool { return a.Healthy() == nil })
	eventually(t, "a's guarantee advances", func() bool { return a.PublishedUntil(pa.KeyID).After(frozen) })
	eventually(t, "a reserves again", func() bool { return a.Reserve(ctx, "two-down") == nil })
	pb, _ := newKey(t)
	publish(t, b, pb)
	eventually(t, "a's watch resumed and sees b's new key", func() bool { return hasKid(a, pb.KeyID) })
	if testutil.ToFloat64(a.m.etcdUp) != 1 {
		t.Fatal("identityd_fleet_etcd_up is not 1 after recovery")
	}
}

func TestReserveRace(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	ctx := context.Background()
	for round := 0; round < 5; round++ {
		id := "sb-" + uuid.NewString()[:8]
		var mu sync.Mutex
		won := map[string]int{}
		var taken []error
		var wg sync.WaitGroup
		for i := 0; i < 16; i++ {
			s := a
			if i%2 == 1 {
				s = b
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := s.Reserve(ctx, id)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					won[s.Node()]++
				case errors.Is(err, ErrTaken):
					taken = append(taken, err)
				default:
					t.Errorf("reserve %s: %v", id, err)
				}
			}()
		}
		wg.Wait()
		if len(won) != 1 || len(taken) != 8 {
			t.Fatalf("round %d: winners %v, %d taken: want one node holding the id", round, won, len(taken))
		}
		var te *TakenError
		if !errors.As(taken[0], &te) || won[te.Holder] != 8 {
			t.Fatalf("taken error %v does not name the winner %v", taken[0], won)
		}
		loser := a
		if te.Holder == "a" {
			loser = b
		}
		if err := loser.Release(ctx, id); !errors.Is(err, ErrTaken) {
			t.Fatalf("release by the non-holder: got %v", err)
		}
		winner := map[string]*Store{"a": a, "b": b}[te.Holder]
		if err := winner.Release(ctx, id); err != nil {
			t.Fatalf("release by the holder: %v", err)
		}
		if err := loser.Reserve(ctx, id); err != nil {
			t.Fatalf("reserve after release: %v", err)
		}
	}
	if err := a.Reserve(ctx, "../x"); err == nil {
		t.Fatal("reserving an invalid id succeeded")
	}
}

func TestEvict(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, _ := newKey(t)
	pb, _ := newKey(t)
	publish(t, a, pa)
	publish(t, b, pb)
	eventually(t, "b sees a's key", func() bool { return hasKid(b, pa.KeyID) })
	ctx := context.Background()

	kids, err := b.Evict(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if len(kids) != 1 || kids[0] != pa.KeyID {
		t.Fatalf("evict returned kids %v, want [%s]", kids, pa.KeyID)
	}
	// At once: gone from etcd when Evict returns; the watches follow.
	resp, err := f.c.Client(t).Get(ctx, f.prefix+"keys/a/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("a's keys in etcd after eviction: %v %v", resp, err)
	}
	eventually(t, "a's key leaves b's JWKS", func() bool { return !hasKid(b, pa.KeyID) })
	eventually(t, "a notices its eviction", func() bool { return a.PublishedUntil(pa.KeyID).IsZero() })
	if err := a.Healthy(); !errors.Is(err, ErrEvicted) {
		t.Fatalf("evicted node healthy: %v", err)
	}
	pa2, _ := newKey(t)
	if err := a.PublishKey(ctx, pa2); !errors.Is(err, ErrEvicted) {
		t.Fatalf("publish by an evicted node: got %v", err)
	}
	if err := a.Reserve(ctx, "x"); !errors.Is(err, ErrEvicted) {
		t.Fatalf("reserve by an evicted node: got %v", err)
	}
	// Its keys stay out, renewals or not.
	time.Sleep(2 * a.interval)
	if hasKid(b, pa.KeyID) || hasKid(a, pa.KeyID) {
		t.Fatal("an evicted node's key came back")
	}
	nodes, err := b.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 || !nodes[0].Evicted || nodes[0].EvictedBy != "b" || len(nodes[0].Kids) != 0 {
		t.Fatalf("nodes after eviction: %+v", nodes)
	}
	a.Close()
	if _, err := f.openErr(t, f.options(t, "a")); !errors.Is(err, ErrEvicted) {
		t.Fatalf("reopening an evicted node: got %v", err)
	}
	if err := b.Readmit(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	a2 := f.open(t, "a")
	publish(t, a2, pa2)
	eventually(t, "b sees the readmitted node's key", func() bool { return hasKid(b, pa2.KeyID) })
}

func TestNodes(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pa, _ := newKey(t)
	pa2, _ := newKey(t)
	publish(t, a, pa)
	publish(t, a, pa2)
	nodes, err := b.Nodes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2 || nodes[0].Node != "a" || nodes[1].Node != "b" {
		t.Fatalf("nodes: %+v", nodes)
	}
	if len(nodes[0].Kids) != 2 || len(nodes[1].Kids) != 0 {
		t.Fatalf("kids: %+v", nodes)
	}
	for _, n := range nodes {
		if time.Since(n.LastSeen) > 10*time.Second || n.Version != "test" || n.Started.IsZero() || n.Evicted {
			t.Fatalf("node %+v", n)
		}
	}
}

// An eviction recorded without the node's leases being revoked (Evict's
// revocations are best effort) still stops the node at once.
func TestEvictionMarkerAloneStopsTheNode(t *testing.T) {
	f := newTestFleet(t)
	a := f.open(t, "a")
	pa, _ := newKey(t)
	publish(t, a, pa)
	if _, err := f.c.Client(t).Put(context.Background(), f.prefix+"evicted/a", `{"by":"test"}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a notices its eviction", func() bool { return a.PublishedUntil(pa.KeyID).IsZero() })
	if err := a.Healthy(); !errors.Is(err, ErrEvicted) {
		t.Fatalf("healthy after eviction: %v", err)
	}
}

func TestOpenFailsFastWithoutEtcd(t *testing.T) {
	f := &testFleet{prefix: "/t/"}
	o := Options{
		Endpoints:   []string{"http://127.0.0.1:1"},
		Node:        "a",
		Issuer:      "https://issuer.test",
		KeyLifetime: testKeyLifetime,
	}
	start := time.Now()
	_, err := f.openErr(t, o)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("open without etcd: got %v, want ErrUnavailable", err)
	}
	t.Logf("open without etcd failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
}

// childEnv carries the child node's settings in TestSIGKILLedNodeKeysExpire.
const childEnv = "FLEET_TEST_CHILD_NODE"

// TestChildNode is the body of the node process TestSIGKILLedNodeKeysExpire
// kills; it does nothing in a normal run.
func TestChildNode(t *testing.T) {
	spec := os.Getenv(childEnv)
	if spec == "" {
		t.Skip("helper process for TestSIGKILLedNodeKeysExpire")
	}
	endpoints, prefix, _ := strings.Cut(spec, " ")
	f := &testFleet{endpoints: strings.Split(endpoints, ","), prefix: prefix}
	o := f.options(t, "child")
	s, err := f.openErr(t, o)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := newKey(t)
	publish(t, s, pub)
	fmt.Printf("KID %s\n", pub.KeyID)
	time.Sleep(time.Minute) // until SIGKILLed
}

// A node process killed with SIGKILL: its key stays published until the
// guarantee it gave and leaves within the key lifetime after that.
func TestSIGKILLedNodeKeysExpire(t *testing.T) {
	f := newTestFleet(t)
	b := f.open(t, "b")
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildNode$", "-test.v")
	// The child reaches etcd over the members' unix sockets, as daemons in
	// their own network namespaces do.
	eps := f.c.UnixEndpoints()
	if eps == nil {
		t.Fatal("the cluster has no unix socket endpoints")
	}
	cmd.Env = append(os.Environ(), childEnv+"="+strings.Join(eps, ",")+" "+f.prefix)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = t.Output()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	kid := ""
	sc := bufio.NewScanner(out)
	for kid == "" && sc.Scan() {
		if k, ok := strings.CutPrefix(sc.Text(), "KID "); ok {
			kid = k
		}
	}
	if kid == "" {
		t.Fatal("child node printed no kid")
	}
	go io.Copy(io.Discard, out)
	eventually(t, "b sees the child's key", func() bool { return hasKid(b, kid) })
	// The child renews every RenewInterval; its guarantee is at most the key
	// lifetime from the kill.
	killed := time.Now()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	waitGone(t, b, kid, killed.Add(testKeyLifetime-time.Second))
}

// The --etcd-ca/--etcd-cert/--etcd-key path against members that require
// client certificates.
func TestTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 3)
	f := &testFleet{c: c, endpoints: c.Endpoints(), prefix: "/tls/"}
	tc, err := TLSConfig(c.TLS.CA, c.TLS.ClientCert, c.TLS.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	o := f.options(t, "a")
	o.TLS = tc
	s, err := f.openErr(t, o)
	if err != nil {
		t.Fatalf("open over TLS: %v", err)
	}
	pub, _ := newKey(t)
	publish(t, s, pub)
	eventually(t, "own key in the JWKS over TLS", func() bool { return hasKid(s, pub.KeyID) })

	// Without a client certificate the members refuse the node.
	tc, err = TLSConfig(c.TLS.CA, "", "")
	if err != nil {
		t.Fatal(err)
	}
	o = f.options(t, "b")
	o.TLS = tc
	if _, err := f.openErr(t, o); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("open without a client certificate: got %v", err)
	}
	if _, err := TLSConfig("", c.TLS.ClientCert, ""); err == nil {
		t.Fatal("a certificate without its key was accepted")
	}
	if tc, err := TLSConfig("", "", ""); tc != nil || err != nil {
		t.Fatalf("no TLS files: got %v, %v", tc, err)
	}
}

// A watch that fell behind a compaction says so, and the loop's fresh read
// brings the JWKS back.
func TestWatchBehindCompaction(t *testing.T) {
	f := newTestFleet(t)
	a, b := f.open(t, "a"), f.open(t, "b")
	pb, _ := newKey(t)
	publish(t, b, pb)
	eventually(t, "a sees b's key", func() bool { return hasKid(a, pb.KeyID) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cli := f.c.Client(t)
	if _, err := cli.Compact(ctx, a.Revision()); err != nil {
		t.Fatal(err)
	}
	a.jwks.mu.Lock()
	a.jwks.rev = 1
	a.jwks.mu.Unlock()
	if err := a.watchFrom(ctx); err == nil || !strings.Contains(err.Error(), "compaction") {
		t.Fatalf("watch from a compacted revision: got %v", err)
	}
	if err := a.loadJWKS(ctx); err != nil || !hasKid(a, pb.KeyID) || a.Revision() < 2 {
		t.Fatalf("reload after compaction: %v, revision %d", err, a.Revision())
	}
}
