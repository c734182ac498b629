package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// NodeInfo describes one node of the fleet as etcd knows it.
type NodeInfo struct {
	Node string `json:"node"`
	// Kids are the ids of the node's published keys, retired ones included
	// until their leases run out.
	Kids []string `json:"kids"`
	// LastSeen is when the node last renewed its lease (to a second); zero
	// if its record is gone (its keys may outlive it briefly).
	LastSeen time.Time `json:"last_seen,omitzero"`
	Started  time.Time `json:"started,omitzero"`
	Version  string    `json:"version,omitempty"`
	// Evicted is set for a node evicted and not readmitted; EvictedBy names
	// the node whose Store evicted it.
	Evicted   bool      `json:"evicted,omitempty"`
	EvictedAt time.Time `json:"evicted_at,omitzero"`
	EvictedBy string    `json:"evicted_by,omitempty"`
}

// Nodes lists the fleet's nodes: every node with a record, published keys or
// an eviction, sorted by name.
func (s *Store) Nodes(ctx context.Context) ([]NodeInfo, error) {
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	// One transaction, so the three reads are of one revision.
	resp, err := s.cli.Txn(octx).Then(
		clientv3.OpGet(s.nodesPrefix(), clientv3.WithPrefix()),
		clientv3.OpGet(s.keysPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
		clientv3.OpGet(s.evictedPrefix(), clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, s.unavailable("list the fleet's nodes", err)
	}
	byName := map[string]*NodeInfo{}
	get := func(name string) *NodeInfo {
		if byName[name] == nil {
			byName[name] = &NodeInfo{Node: name, Kids: []string{}}
		}
		return byName[name]
	}
	leases := map[string]clientv3.LeaseID{}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		n := get(strings.TrimPrefix(string(kv.Key), s.nodesPrefix()))
		var rec nodeRecord
		if json.Unmarshal(kv.Value, &rec) == nil {
			n.Started, n.Version = rec.Started, rec.Version
		}
		leases[n.Node] = clientv3.LeaseID(kv.Lease)
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		node, kid, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), s.keysPrefix()), "/")
		if ok {
			n := get(node)
			n.Kids = append(n.Kids, kid)
		}
	}
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		n := get(strings.TrimPrefix(string(kv.Key), s.evictedPrefix()))
		n.Evicted = true
		var ev evictionRecord
		if json.Unmarshal(kv.Value, &ev) == nil {
			n.EvictedAt, n.EvictedBy = ev.At, ev.By
		}
	}
	// Last seen is derived from the node lease's remaining TTL rather than
	// written by every node on every renewal, which would cost a raft write
	// per node per period.
	for name, id := range leases {
		lctx, lcancel := s.opCtx(ctx)
		ttl, err := s.cli.TimeToLive(lctx, id)
		lcancel()
		if err != nil {
			return nil, s.unavailable("read the lease of node "+name, err)
		}
		if ttl.TTL > 0 {
			byName[name].LastSeen = time.Now().Add(-time.Duration(ttl.GrantedTTL-ttl.TTL) * time.Second).UTC().Truncate(time.Second)
		}
	}
	out := make([]NodeInfo, 0, len(byName))
	for _, n := range byName {
		slices.Sort(n.Kids)
		out = append(out, *n)
	}
	slices.SortFunc(out, func(a, b NodeInfo) int { return strings.Compare(a.Node, b.Node) })
	return out, nil
}

// Evict removes a node from the fleet at once: in one transaction it deletes
// the node's published keys and record and records the eviction, which every
// later publication by that node is conditional on; then it revokes the
// leases that held them, so the node's next renewal finds them gone, tries
// to publish again, is refused and says so. It returns the kids removed.
// Evicting a node with nothing published still records the eviction.
func (s *Store) Evict(ctx context.Context, node string) ([]string, error) {
	if err := ValidName(node); err != nil {
		return nil, fmt.Errorf("evict node: %w", err)
	}
	rec, err := json.Marshal(evictionRecord{At: time.Now().UTC(), By: s.node})
	if err != nil {
		return nil, fmt.Errorf("evict node %q: encode: %w", node, err)
	}
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	// Reads first: operations in a transaction see the earlier ones' effects.
	resp, err := s.cli.Txn(octx).Then(
		clientv3.OpGet(s.nodeKeysPrefix(node), clientv3.WithPrefix()),
		clientv3.OpGet(s.nodeKey(node)),
		clientv3.OpPut(s.evictedKey(node), string(rec)),
		clientv3.OpDelete(s.nodeKeysPrefix(node), clientv3.WithPrefix()),
		clientv3.OpDelete(s.nodeKey(node)),
	).Commit()
	if err != nil {
		return nil, s.unavailable(fmt.Sprintf("evict node %q", node), err)
	}
	var kids []string
	leases := map[clientv3.LeaseID]bool{}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		kids = append(kids, strings.TrimPrefix(string(kv.Key), s.nodeKeysPrefix(node)))
		leases[clientv3.LeaseID(kv.Lease)] = true
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		leases[clientv3.LeaseID(kv.Lease)] = true
	}
	delete(leases, clientv3.NoLease)
	for id := range leases {
		s.revoke(id)
	}
	s.log.Warn("evicted node: its keys are out of the fleet's JWKS and it may not publish again until readmitted", "evicted", node, "kids", kids)
	return kids, nil
}

// Readmit lifts a node's eviction; the node publishes again once restarted.
func (s *Store) Readmit(ctx context.Context, node string) error {
	if err := ValidName(node); err != nil {
		return fmt.Errorf("readmit node: %w", err)
	}
	octx, cancel := s.opCtx(ctx)
	defer cancel()
	if _, err := s.cli.Delete(octx, s.evictedKey(node)); err != nil {
		return s.unavailable(fmt.Sprintf("readmit node %q", node), err)
	}
	s.log.Info("readmitted node", "readmitted", node)
	return nil
}

// evictionWatch marks this node evicted as soon as evicted/<node> appears,
// whether or not Evict managed to revoke the node's leases. Watch errors
// (no quorum, compaction) are followed by a fresh read and a new watch.
func (s *Store) evictionWatch(ctx context.Context) {
	backoff := watchBackoffMin
	for ctx.Err() == nil {
		octx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Get(octx, s.evictedKey(s.node))
		cancel()
		if err == nil {
			if len(resp.Kvs) > 0 {
				s.markEvicted()
				return
			}
			backoff = watchBackoffMin
			err = s.watchEviction(ctx, resp.Header.Revision+1)
			if err == nil {
				return
			}
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("eviction watch interrupted", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, watchBackoffMax)
	}
}

// watchEviction watches evicted/<node> from rev; it returns nil once the
// node is marked evicted, else the error that ended the watch.
func (s *Store) watchEviction(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range s.cli.Watch(wctx, s.evictedKey(s.node), clientv3.WithRev(rev)) {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypePut {
				s.markEvicted()
				return nil
			}
		}
	}
	return fmt.Errorf("eviction watch closed: %w", ctx.Err())
}
