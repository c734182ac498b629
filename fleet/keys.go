package fleet

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/go-jose/go-jose/v4"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// pubKey is a key this node publishes and keeps renewing.
type pubKey struct {
	jwk   jose.JSONWebKey
	value []byte // the JWK's JSON, as published
	lease lease
}

// checkPublicKey accepts a JWK fit for the fleet's JWKS: valid, public, with
// its RFC 7638 SHA-256 thumbprint as kid (so two different keys can never
// share a kid, whichever node publishes them).
func checkPublicKey(jwk jose.JSONWebKey) error {
	if !jwk.Valid() {
		return errors.New("invalid JWK")
	}
	if !jwk.IsPublic() {
		return errors.New("JWK holds a private key: only public keys leave the node")
	}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return fmt.Errorf("thumbprint: %w", err)
	}
	if want := base64.RawURLEncoding.EncodeToString(tp); jwk.KeyID != want {
		return fmt.Errorf("kid %q is not the key's SHA-256 thumbprint %q", jwk.KeyID, want)
	}
	return nil
}

// PublishKey publishes a public key under its own lease and keeps renewing
// it until RetireKey. It returns once etcd has committed it (the key then
// reaches the other nodes' JWKS through their watches). Publishing a key
// already published is a no-op. It fails with ErrUnavailable if etcd cannot
// be reached within the request timeout, and with ErrEvicted once the node
// has been evicted.
func (s *Store) PublishKey(ctx context.Context, jwk jose.JSONWebKey) error {
	if err := checkPublicKey(jwk); err != nil {
		return fmt.Errorf("publish key %q: %w", jwk.KeyID, err)
	}
	value, err := json.Marshal(jwk)
	if err != nil {
		return fmt.Errorf("publish key %s: encode: %w", jwk.KeyID, err)
	}
	// One publication at a time: two concurrent ones of a key would each put
	// it under their own lease, and only the last put's lease holds it.
	s.publishMu.Lock()
	defer s.publishMu.Unlock()
	s.mu.Lock()
	evicted, have := s.evicted, s.keys[jwk.KeyID] != nil
	s.mu.Unlock()
	if evicted {
		return fmt.Errorf("publish key %s: node %q: %w", jwk.KeyID, s.node, ErrEvicted)
	}
	if have {
		return nil
	}
	l, err := s.grantAndPut(ctx, s.keyKey(s.node, jwk.KeyID), value)
	if err != nil {
		return fmt.Errorf("publish key %s: %w", jwk.KeyID, err)
	}
	s.mu.Lock()
	s.keys[jwk.KeyID] = &pubKey{jwk: jwk, value: value, lease: l}
	n := len(s.keys)
	s.mu.Unlock()
	s.m.keysPublished.Set(float64(n))
	s.log.Info("published key", "kid", jwk.KeyID, "alg", jwk.Algorithm, "published_until", l.until)
	return nil
}

// RetireKey stops renewing a key. It stays published until the returned time
// (its last renewal plus the key lifetime), which covers every token it
// signed, and then etcd removes it. The zero time means it was not published.
func (s *Store) RetireKey(kid string) time.Time {
	s.mu.Lock()
	k := s.keys[kid]
	delete(s.keys, kid)
	n := len(s.keys)
	s.mu.Unlock()
	if k == nil {
		return time.Time{}
	}
	s.m.keysPublished.Set(float64(n))
	s.log.Info("retired key: no longer renewed", "kid", kid, "published_until", k.lease.until)
	return k.lease.until
}

// PublishedUntil is the time until which key kid is guaranteed to stay in
// the fleet's JWKS: the token server must not sign a token with it whose exp
// is later. Zero if the key is not published (or retired) by this node, or
// the node was evicted. It keeps its value while etcd is unreachable, so
// issuing can go on within it.
func (s *Store) PublishedUntil(kid string) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := s.keys[kid]; k != nil && !s.evicted {
		return k.lease.until
	}
	return time.Time{}
}

// renewLoop renews the node's leases every interval until ctx ends.
func (s *Store) renewLoop(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.renewAll(ctx)
	}
}

// renewAll renews the node lease and every published key's lease once,
// re-granting (and re-publishing) any that etcd has lost.
func (s *Store) renewAll(ctx context.Context) {
	s.mu.Lock()
	if s.evicted {
		s.mu.Unlock()
		return
	}
	node := s.nodeLease
	keys := make(map[string]lease, len(s.keys))
	for kid, k := range s.keys {
		keys[kid] = k.lease
	}
	s.mu.Unlock()

	if l, ok := s.renew(ctx, node, s.nodeKey(s.node), s.record); ok {
		s.mu.Lock()
		if s.nodeLease.id == node.id {
			s.nodeLease = l
		}
		s.mu.Unlock()
	}
	for kid, old := range keys {
		s.mu.Lock()
		k, evicted := s.keys[kid], s.evicted
		s.mu.Unlock()
		if evicted {
			return
		}
		if k == nil {
			continue // retired meanwhile
		}
		if l, ok := s.renew(ctx, old, s.keyKey(s.node, kid), k.value); ok {
			s.mu.Lock()
			k := s.keys[kid]
			kept := k != nil && k.lease.id == old.id
			if kept {
				k.lease = l
			}
			s.mu.Unlock()
			if !kept && l.id != old.id {
				// Retired while re-granted: the new lease must not keep it.
				s.revoke(l.id)
			}
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// renew renews one lease; if etcd no longer knows it (it expired while etcd
// was unreachable, or Evict revoked it), it grants a new one and puts
// key=value under it again. It reports the lease to use from now on, and ok
// if that changed anything.
func (s *Store) renew(ctx context.Context, l lease, key string, value []byte) (lease, bool) {
	octx, cancel := s.opCtx(ctx)
	sent := time.Now()
	resp, err := s.cli.KeepAliveOnce(octx, l.id)
	cancel()
	switch {
	case err == nil:
		s.m.renewals.WithLabelValues(renewOK).Inc()
		s.setUp(true, nil)
		return lease{id: l.id, until: sent.Add(time.Duration(resp.TTL) * time.Second)}, true
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		s.m.renewals.WithLabelValues(renewLost).Inc()
		s.setUp(true, nil)
		s.log.Warn("lease lost (expired while etcd was unreachable, or revoked by an eviction): granting a new one and publishing again", "key", key, "lease", fmt.Sprintf("%x", int64(l.id)))
		nl, err := s.grantAndPut(ctx, key, value)
		if err != nil {
			if !errors.Is(err, ErrEvicted) {
				s.log.Warn("re-publish after lease loss failed; will retry", "key", key, "err", err)
			}
			return l, false
		}
		s.log.Info("re-published under a new lease", "key", key, "lease", fmt.Sprintf("%x", int64(nl.id)), "published_until", nl.until)
		return nl, true
	default:
		if ctx.Err() != nil {
			return l, false
		}
		s.m.renewals.WithLabelValues(renewFailed).Inc()
		s.setUp(false, err)
		return l, false
	}
}

func (s *Store) revoke(id clientv3.LeaseID) {
	ctx, cancel := s.opCtx(context.Background())
	defer cancel()
	if _, err := s.cli.Revoke(ctx, id); err != nil {
		s.log.Warn("revoke lease", "lease", fmt.Sprintf("%x", int64(id)), "err", err)
	}
}
