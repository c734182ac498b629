package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

const (
	watchBackoffMin = 200 * time.Millisecond
	watchBackoffMax = 5 * time.Second
)

// jwksState is the fleet's JWKS as the watch keeps it. Applying a change
// costs O(1); the sorted set is built on the first read after a change, so
// a burst of publications costs one build, not one per event.
type jwksState struct {
	mu      sync.Mutex
	byKey   map[string]jose.JSONWebKey // etcd key -> public key
	kids    map[string]int             // kid -> how many etcd keys hold it
	set     *jose.JSONWebKeySet        // built from byKey; nil until read after a change
	json    []byte                     // set's JSON; nil until read after a change
	rev     int64                      // etcd revision byKey reflects
	changed chan struct{}              // closed at the next change
}

// JWKS is the union of every node's published public keys, as of Revision.
// It is maintained by a watch, never read from etcd per call; while etcd is
// unreachable it is the last state seen. The caller must not modify it.
func (s *Store) JWKS() jose.JSONWebKeySet {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	if s.jwks.set == nil {
		s.jwks.set = s.buildLocked()
	}
	return *s.jwks.set
}

// JWKSJSON is JWKS encoded as served at the jwks_uri, cached until the next
// change (encoding a few hundred keys takes about a millisecond). The caller
// must not modify it.
func (s *Store) JWKSJSON() ([]byte, error) {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	if s.jwks.json == nil {
		if s.jwks.set == nil {
			s.jwks.set = s.buildLocked()
		}
		b, err := json.Marshal(s.jwks.set)
		if err != nil {
			return nil, fmt.Errorf("encode the fleet's JWKS: %w", err)
		}
		s.jwks.json = b
	}
	return s.jwks.json, nil
}

// HasKey reports whether kid is in the JWKS.
func (s *Store) HasKey(kid string) bool {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	return s.jwks.kids[kid] > 0
}

// Revision is the etcd revision up to which JWKS reflects the fleet's keys.
// A key published at revision r is in JWKS once Revision() >= r.
func (s *Store) Revision() int64 {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	return s.jwks.rev
}

// Changed returns a channel closed at the next change of JWKS or Revision.
func (s *Store) Changed() <-chan struct{} {
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	if s.jwks.changed == nil {
		s.jwks.changed = make(chan struct{})
	}
	return s.jwks.changed
}

// loadJWKS replaces the JWKS with a fresh read of every published key.
func (s *Store) loadJWKS(ctx context.Context) error {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(octx, s.keysPrefix(), clientv3.WithPrefix())
	if err != nil {
		return s.unavailable("read the fleet's keys", err)
	}
	s.jwks.mu.Lock()
	defer s.jwks.mu.Unlock()
	s.jwks.byKey = make(map[string]jose.JSONWebKey, len(resp.Kvs))
	s.jwks.kids = make(map[string]int, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		s.putLocked(string(kv.Key), kv.Value)
	}
	s.changedLocked(resp.Header.Revision)
	return nil
}

// putLocked sets (value non-nil) or deletes an etcd key's entry.
func (s *Store) putLocked(key string, value []byte) {
	if old, ok := s.jwks.byKey[key]; ok {
		delete(s.jwks.byKey, key)
		if s.jwks.kids[old.KeyID]--; s.jwks.kids[old.KeyID] <= 0 {
			delete(s.jwks.kids, old.KeyID)
		}
	}
	if value == nil {
		return
	}
	if jwk, ok := s.parseKey(key, value); ok {
		s.jwks.byKey[key] = jwk
		s.jwks.kids[jwk.KeyID]++
	}
}

// parseKey decodes keys/<node>/<kid>, refusing (with a warning) anything
// that is not a public key whose kid is its thumbprint and its key name.
func (s *Store) parseKey(key string, value []byte) (jose.JSONWebKey, bool) {
	var jwk jose.JSONWebKey
	node, kid, ok := strings.Cut(strings.TrimPrefix(key, s.keysPrefix()), "/")
	err := ValidName(node)
	if !ok || err != nil || kid == "" || strings.Contains(kid, "/") {
		err = errors.New("key name is not keys/<node>/<kid>")
	} else if err = json.Unmarshal(value, &jwk); err != nil {
		err = fmt.Errorf("decode JWK: %w", err)
	} else if err = checkPublicKey(jwk); err == nil && jwk.KeyID != kid {
		err = fmt.Errorf("kid %q does not match the key name", jwk.KeyID)
	}
	if err != nil {
		s.log.Warn("ignoring a published key that is not a valid public key", "key", key, "err", err)
		return jose.JSONWebKey{}, false
	}
	return jwk, true
}

// changedLocked records that byKey reflects revision rev, drops the built
// set and wakes Changed's waiters. Called with jwks.mu held.
func (s *Store) changedLocked(rev int64) {
	s.jwks.set, s.jwks.json = nil, nil
	s.jwks.rev = rev
	if s.jwks.changed != nil {
		close(s.jwks.changed)
		s.jwks.changed = nil
	}
	s.m.jwksKeys.Set(float64(len(s.jwks.kids)))
}

// buildLocked builds the set from byKey, in etcd key order, one key per kid.
// Called with jwks.mu held.
func (s *Store) buildLocked() *jose.JSONWebKeySet {
	names := make([]string, 0, len(s.jwks.byKey))
	for k := range s.jwks.byKey {
		names = append(names, k)
	}
	slices.Sort(names)
	set := jose.JSONWebKeySet{Keys: make([]jose.JSONWebKey, 0, len(names))}
	seen := make(map[string]bool, len(names))
	for _, n := range names {
		jwk := s.jwks.byKey[n]
		// The kid is the key's thumbprint, so a repeat is the same key
		// published by two nodes: serve it once.
		if !seen[jwk.KeyID] {
			seen[jwk.KeyID] = true
			set.Keys = append(set.Keys, jwk)
		}
	}
	return &set
}

// watchLoop keeps the JWKS current until ctx ends: it watches keys/ from the
// revision of the last read, and after any interruption (no quorum,
// compaction, a closed stream) reads everything again and resumes.
func (s *Store) watchLoop(ctx context.Context) {
	backoff := watchBackoffMin
	for {
		err := s.watchFrom(ctx)
		// The first failure is a warning; retries during a long outage are
		// debug lines (the renewals already report etcd as down).
		level := slog.LevelWarn
		for {
			if ctx.Err() != nil {
				return
			}
			s.log.Log(ctx, level, "JWKS watch interrupted: reading the fleet's keys again", "err", err, "retry_in", backoff)
			level = slog.LevelDebug
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, watchBackoffMax)
			if err = s.loadJWKS(ctx); err == nil {
				s.log.Info("JWKS watch resumed", "revision", s.Revision(), "keys", len(s.JWKS().Keys))
				backoff = watchBackoffMin
				break
			}
		}
	}
}

// watchFrom applies changes after the current revision until the watch
// fails or ctx ends.
func (s *Store) watchFrom(ctx context.Context) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := s.cli.Watch(wctx, s.keysPrefix(), clientv3.WithPrefix(), clientv3.WithRev(s.Revision()+1))
	for wr := range wch {
		if wr.CompactRevision != 0 {
			return fmt.Errorf("watch fell behind a compaction (revision %d)", wr.CompactRevision)
		}
		if err := wr.Err(); err != nil {
			return err
		}
		if wr.IsProgressNotify() || len(wr.Events) == 0 {
			continue
		}
		s.jwks.mu.Lock()
		for _, ev := range wr.Events {
			var value []byte
			if ev.Type == mvccpb.PUT {
				value = ev.Kv.Value
				if value == nil {
					value = []byte{} // an empty value is a bad key, not a delete
				}
			}
			s.putLocked(string(ev.Kv.Key), value)
		}
		s.changedLocked(wr.Header.Revision)
		s.jwks.mu.Unlock()
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.New("watch channel closed")
}
