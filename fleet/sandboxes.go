package fleet

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Sandbox id reservations have no lease: an id stays held until its node
// releases it, so an etcd outage longer than the key lifetime can never let
// two nodes run sandboxes under one id. A dead node's ids stay held until
// released on its behalf (ReleaseFor).

// Reserve makes this node the holder of sandbox id, in one transaction: it
// succeeds if the id is free or already held by this node, and fails with a
// *TakenError (errors.Is ErrTaken) naming the holder otherwise. If etcd
// cannot be reached with a quorum within the request timeout it fails with
// ErrUnavailable; an evicted node gets ErrEvicted.
func (s *Store) Reserve(ctx context.Context, id string) error {
	if err := ValidName(id); err != nil {
		return fmt.Errorf("reserve sandbox id: %w", err)
	}
	s.mu.Lock()
	evicted := s.evicted
	s.mu.Unlock()
	if evicted {
		return fmt.Errorf("reserve sandbox id %q: node %q: %w", id, s.node, ErrEvicted)
	}
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	key := s.sandboxKey(id)
	resp, err := s.cli.Txn(octx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(s.evictedKey(s.node)), "=", 0)).
		Then(clientv3.OpPut(key, s.node)).
		Else(clientv3.OpGet(key), clientv3.OpGet(s.evictedKey(s.node))).
		Commit()
	if err != nil {
		return s.unavailable(fmt.Sprintf("reserve sandbox id %q", id), err)
	}
	if resp.Succeeded {
		return nil
	}
	if len(resp.Responses[1].GetResponseRange().Kvs) > 0 {
		s.markEvicted()
		return fmt.Errorf("reserve sandbox id %q: node %q: %w", id, s.node, ErrEvicted)
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 1 && string(kvs[0].Value) == s.node {
		return nil
	}
	holder := "(released meanwhile)"
	if len(kvs) == 1 {
		holder = string(kvs[0].Value)
	}
	return &TakenError{ID: id, Holder: holder}
}

// Release frees sandbox id if this node holds it. Releasing a free id is a
// no-op; an id held by another node is left alone and reported as a
// *TakenError.
func (s *Store) Release(ctx context.Context, id string) error {
	return s.ReleaseFor(ctx, s.node, id)
}

// ReleaseFor frees sandbox id if node holds it: for an operator clearing the
// ids of a node that is gone for good.
func (s *Store) ReleaseFor(ctx context.Context, node, id string) error {
	if err := ValidName(id); err != nil {
		return fmt.Errorf("release sandbox id: %w", err)
	}
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	key := s.sandboxKey(id)
	resp, err := s.cli.Txn(octx).
		If(clientv3.Compare(clientv3.Value(key), "=", node)).
		Then(clientv3.OpDelete(key)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return s.unavailable(fmt.Sprintf("release sandbox id %q", id), err)
	}
	if resp.Succeeded {
		return nil
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
		return &TakenError{ID: id, Holder: string(kvs[0].Value)}
	}
	return nil
}
