// Package fleet is the state that several identityd hosts share through etcd
// so that they act as one issuer: the issuer URL, every node's public signing
// keys (whose union each node serves as its JWKS), the node list, evictions,
// and which node holds each sandbox id. It is a top-level package, a peer of
// tokenserver and controllers, because the daemon wires it between the two
// and its key model is part of the security model the README states; it has
// no dependency on either.
//
// Layout under the prefix (default /identityd/):
//
//	issuer               the issuer URL, written once by the first node
//	nodes/<node>         JSON node record, under the node's lease
//	keys/<node>/<kid>    a public JWK, under that key's own lease
//	evicted/<node>       JSON eviction record; no lease (lasts until readmitted)
//	sandboxes/<id>       the name of the node holding the sandbox id; no lease
//
// Leases. Every published key has its own lease whose TTL is KeyLifetime (the
// longest token lifetime plus clock skew). The node renews the leases of the
// keys it may sign with every RenewInterval. A key is therefore guaranteed to
// stay published until (time the last successful renewal was sent) + TTL:
// PublishedUntil reports that bound, and the token server must never sign a
// token whose exp is later. When a node dies, or etcd is unreachable for
// longer than that, the leases expire and etcd deletes the keys, which is
// exactly when the last token they signed has expired. No cleanup job exists.
//
// Retiring. RetireKey stops renewing a key's lease and nothing else: the key
// stays published until its last renewal plus the TTL, which covers every
// token it signed (their exp was bounded by PublishedUntil), and then etcd
// drops it, even if the node has died since.
//
// Eviction. Evict atomically deletes a node's keys and node record, writes
// evicted/<node>, and revokes the leases that held them. Every publication
// (and node registration) is a transaction conditional on evicted/<node> being
// absent, so an evicted node that is still running cannot put its keys back:
// its lease renewals fail, its re-publication is refused with ErrEvicted, it
// logs so at error level, PublishedUntil becomes zero (nothing may be signed)
// and it stays so until restarted after Readmit.
//
// The private halves of keys never reach this package: PublishKey refuses a
// JWK that is not public.
package fleet
