//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// Kernel side of identityd's caller attribution.
//
// A record says which cgroup and network namespace own the client socket of a
// connection to a token endpoint. It is only handed to the server's accepted
// socket when both ends of the same TCP handshake vouch for it:
//
//  1. sockops at ACTIVE_ESTABLISHED_CB runs on the client socket when it
//     processes the server's SYN-ACK, before it sends the final ACK. It
//     publishes the record under the 4-tuple *and both initial sequence
//     numbers* (as the next sequence number each side expects).
//  2. sockops at PASSIVE_ESTABLISHED_CB runs on the server's new socket when
//     that ACK arrives, before accept() can return it (accept() takes the
//     socket's lock, which the softirq holds until the callback is done). It
//     looks up its own 4-tuple and sequence numbers; a match moves the record
//     into the accepted socket's local storage, where the server reads it by
//     descriptor.
//
// So a handshake that someone else completed with raw packets for a real
// socket's 4-tuple finds nothing (that socket never reached ESTABLISHED with
// this server), and records published for the same 4-tuple by sockets that
// talked to anything but this server cannot meet its connection (their
// sequence numbers differ), whichever namespace published them. Nothing is
// ever attributed by address.
//
// The owner is the cgroup the socket was created in, which the kernel keeps
// in the socket itself: sk->sk_cgrp_data, set when the socket is allocated
// (from the creating task's cgroup; the root cgroup for sockets the kernel
// makes for itself) and never changed afterwards. It is what every other
// cgroup program for this socket is chosen by. Debian 12's 6.1 kernel offers
// sockops neither bpf_sk_cgroup_id nor bpf_get_current_cgroup_id, so the
// field is read through BTF with CO-RE relocations, which the loader resolves
// against the running kernel's own type information.
//
// cgroup/connect4 and connect6 run in the task calling connect(); for token
// endpoints only, they note that task's pid and tgid in the client socket's
// local storage for sockops to copy into the record. They see the destination
// as the caller named it, before any other program rewrites it, so a record
// may lack a pid; the pid is only logged. Keeping allocations off every other
// socket is what keeps the programs' cost on unrelated connections near that
// of programs that do nothing.
//
// Link-local endpoints: the same connect programs send a sandbox's
// connection to a configured link-local address and port (say
// 169.254.169.254:80) to the token endpoint instead, by rewriting the
// destination before the kernel picks a route or a source address. Every
// later step, the record included, sees only the tuple the server really
// accepts. The socket remembers what its caller named, and the getpeername
// programs report that back, so the caller sees the address it connected
// to. Only sockets of sandboxes are redirected: those whose cgroup, or one
// of its ancestors, the daemon registered as a sandbox's (with the netns it
// must also be in, if any), or whose netns belongs to a sandbox registered
// by netns alone. The daemon keeps those sets in step with its registry, so
// a host process connecting to the same address reaches whatever really
// answers there.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

// Record flags; mirrored by the Go package.
#define RECORD_UNATTESTED (1U << 0) // the socket's owner could not be read

// Addresses are IPv6 or IPv4-mapped IPv6 (::ffff:a.b.c.d), network byte
// order; ports are host byte order. Both sides of the connection see the same
// tuple unless something rewrites it in between, in which case the server
// finds no record and refuses.
struct conn_key {
	__u32 saddr[4]; // the connecting (client) socket
	__u32 daddr[4]; // the token endpoint
	__u16 sport;
	__u16 dport;
};

// A handshake as both of its ends see it once it completed: the 4-tuple and
// the next sequence number each side expects from the other (its peer's
// initial sequence number plus one).
struct handshake_key {
	struct conn_key conn;
	__u32 client_next; // client's ISN + 1: the server's rcv_nxt
	__u32 server_next; // server's ISN + 1: the client's rcv_nxt
};

struct endpoint {
	__u32 addr[4]; // all zero: any address with this port
	__u16 port;
	__u16 pad;
};

// What a client socket to a token endpoint keeps about itself.
struct client {
	__u32 pid;  // the thread that called connect(); 0 if unknown
	__u32 tgid; // its process
	// Where its record waits for the server, to drop it if the socket
	// closes first; valid when published is set.
	__u32 client_next;
	__u32 server_next;
	__u32 published;
	__u32 pad;
};

struct record {
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 socket_cookie;
	__u64 established_boot_ns; // CLOCK_BOOTTIME when the client's handshake completed
	__u32 pid;                 // thread that called connect(); 0 if unknown
	__u32 tgid;                // its process
	__u32 flags;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct client);
} clients SEC(".maps");

// Records of client sockets whose handshake completed, waiting for the
// server's side of the same handshake. The server's side takes them within
// the time one ACK needs to cross the host; what stays belongs to
// connections to some other server on a token endpoint's address, which
// their close removes, or the LRU. Twice the 65,536 live records promised:
// the LRU's per-CPU free lists can evict before the map is nominally full.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct handshake_key);
	__type(value, struct record);
} handshakes SEC(".maps");

// The record of an accepted connection, on the server's socket itself: it
// lives and dies with the connection, and the server reads it by descriptor.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct record);
} attested SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct endpoint);
	__type(value, __u32);
} endpoints SEC(".maps");

// One bit per destination port that some endpoint uses, so that connections
// to other ports are dismissed with an array access the verifier inlines
// instead of two hash lookups.
struct port_bitmap {
	__u64 bits[1024];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_bitmap);
} endpoint_ports SEC(".maps");

// Where a link-local endpoint's connections go instead: a token endpoint
// (IPv6, or IPv4-mapped for an IPv4 one).
struct redirect {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

// What a redirected socket remembers: the destination its caller named
// and the one it was sent to instead, both as the connect program saw them.
struct redirected {
	__u32 orig_addr[4];
	__u32 to_addr[4];
	__u16 orig_port;
	__u16 to_port;
	__u32 pad;
};

// Link-local endpoints (by struct endpoint, no wildcards) and their token
// endpoint.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct endpoint);
	__type(value, struct redirect);
} link_local SEC(".maps");

// The ports of link_local, as endpoint_ports is for endpoints.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_bitmap);
} link_local_ports SEC(".maps");

// The registry's sandboxes, for link-local redirects only (attribution
// never reads them). sandbox_cgroups: a sandbox's cgroup id -> the netns
// cookie its callers must also have, 0 for any. sandbox_netns: netns
// cookies of sandboxes registered by netns alone.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sandbox_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sandbox_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct redirected);
} redirects SEC(".maps");

static __always_inline void map_v4(__u32 *dst, __u32 addr)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = bpf_htonl(0x0000ffff);
	dst[3] = addr;
}

// conn_key_of fills key from the socket's addresses: the local side is the
// client for a client socket, the server for an accepted one. For an AF_INET6
// socket talking to an IPv4-mapped address the IPv6 fields may be unset
// early on, so such sockets are read through their IPv4 fields, which both
// ends and every callback then agree on.
static __always_inline int conn_key_of(struct bpf_sock_ops *ops, struct conn_key *key, int server)
{
	// Every field is loaded once, up front, into a register the compiler
	// must keep: left to itself, clang merges the branches below into
	// arithmetic on the context pointer, which the verifier refuses.
	__u32 family = ops->family;
	__u32 lip4 = ops->local_ip4, rip4 = ops->remote_ip4;
	__u32 lip6[4], rip6[4];
	lip6[0] = ops->local_ip6[0];
	lip6[1] = ops->local_ip6[1];
	lip6[2] = ops->local_ip6[2];
	lip6[3] = ops->local_ip6[3];
	rip6[0] = ops->remote_ip6[0];
	rip6[1] = ops->remote_ip6[1];
	rip6[2] = ops->remote_ip6[2];
	rip6[3] = ops->remote_ip6[3];
	__u16 lport = (__u16)ops->local_port;
	__u16 rport = (__u16)bpf_ntohl(ops->remote_port);
	barrier_var(lip4);
	barrier_var(rip4);
	__u32 local[4], remote[4];

	if (family == AF_INET || (family == AF_INET6 && rip6[0] == 0 && rip6[1] == 0 && rip6[2] == bpf_htonl(0x0000ffff))) {
		map_v4(local, lip4);
		map_v4(remote, rip4);
	} else if (family == AF_INET6) {
		for (int i = 0; i < 4; i++) {
			local[i] = lip6[i];
			remote[i] = rip6[i];
		}
	} else {
		return 0;
	}
	__u32 *c = server ? remote : local;
	__u32 *s = server ? local : remote;
	for (int i = 0; i < 4; i++) {
		key->saddr[i] = c[i];
		key->daddr[i] = s[i];
	}
	key->sport = server ? rport : lport;
	key->dport = server ? lport : rport;
	return 1;
}

// is_endpoint reports whether addr (IPv6 or IPv4-mapped, network order) and
// port (host order) name a token endpoint.
static __always_inline int port_in(void *bitmap, __u16 port)
{
	__u32 zero = 0;
	struct port_bitmap *ports = bpf_map_lookup_elem(bitmap, &zero);
	return ports && (ports->bits[(port >> 6) & 1023] & (1ULL << (port & 63)));
}

static __always_inline int is_endpoint(const __u32 *addr, __u16 port)
{
	if (!port_in(&endpoint_ports, port))
		return 0;

	struct endpoint ep = {};

	ep.addr[0] = addr[0];
	ep.addr[1] = addr[1];
	ep.addr[2] = addr[2];
	ep.addr[3] = addr[3];
	ep.port = port;
	if (bpf_map_lookup_elem(&endpoints, &ep))
		return 1;

	ep.addr[0] = 0;
	ep.addr[1] = 0;
	ep.addr[2] = 0;
	ep.addr[3] = 0;
	return bpf_map_lookup_elem(&endpoints, &ep) != NULL;
}

// Set by the loader before the programs are loaded: whether this kernel lets
// sockops call bpf_get_netns_cookie (Linux 5.15). Where it does not, the
// branches that call it are never taken, and the verifier, which knows the
// value of a read-only global, does not look at them.
volatile const __u32 sockops_has_netns_cookie = 1;

// Just enough of the kernel's socket, cgroup and namespace types to reach a
// socket's cgroup id and netns cookie. preserve_access_index makes every
// access a CO-RE relocation, so the offsets come from the running kernel's
// BTF, not from these definitions. Types with a "___flavour" suffix are
// matched against the kernel type without it; the loader resolves
// bpf_core_field_exists to whether the running kernel has that layout, and
// the branch the kernel's layout does not take is never run.
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup;

struct cgroup_subsys_state {
	struct cgroup *cgroup;
	struct cgroup_subsys_state *parent;
} __attribute__((preserve_access_index));

struct cgroup {
	struct cgroup_subsys_state self;
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

// The socket's own cgroup pointer arrived in 5.15 and was backported to the
// 5.10 stable series (Debian 11's 5.10.262 has it); before, it shared a word
// with net_prio and net_cls data, which took its place once those were in
// use. The loader refuses kernels without it (diagnose.go).
struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

// A namespace's cookie: a plain number since 5.12, assigned when the
// namespace is made; before, an atomic64_t assigned on first use (by
// bpf_get_netns_cookie, which the connect programs call for that reason).
struct net___u64 {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

struct net___atomic {
	struct {
		__s64 counter;
	} net_cookie;
} __attribute__((preserve_access_index));

struct net;

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	possible_net_t skc_net;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
} __attribute__((preserve_access_index));

struct inet_connection_sock {
	struct inet_sock icsk_inet;
} __attribute__((preserve_access_index));

struct tcp_sock {
	struct inet_connection_sock inet_conn;
} __attribute__((preserve_access_index));

// owner_cgroup returns the id of the cgroup the socket was created in, as
// bpf_sk_cgroup_id would (cgroup_id(sock_cgroup_ptr(&sk->sk_cgrp_data))), or 0
// if it cannot be read.
static __always_inline __u64 owner_cgroup(struct tcp_sock *tp)
{
	struct cgroup *cg = tp->inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup;
	if (!cg)
		return 0;
	struct kernfs_node *kn = cg->kn;
	if (!kn)
		return 0;
	return kn->id;
}

// netns_cookie returns the cookie of the socket's network namespace, or 0
// if it cannot be read. Kernels before 5.15 do not offer sockops the helper;
// there the socket's namespace is read through BTF.
static __always_inline __u64 netns_cookie(struct bpf_sock_ops *ops, struct tcp_sock *tp)
{
	if (sockops_has_netns_cookie)
		return bpf_get_netns_cookie(ops);
	struct net *net = tp->inet_conn.icsk_inet.sk.__sk_common.skc_net.net;
	if (!net)
		return 0;
	if (bpf_core_field_exists(((struct net___atomic *)net)->net_cookie.counter))
		return ((struct net___atomic *)net)->net_cookie.counter;
	return ((struct net___u64 *)net)->net_cookie;
}

// on_client_established publishes the record of a client socket whose
// handshake with a token endpoint just completed, before its final ACK leaves.
static __always_inline void on_client_established(struct bpf_sock_ops *ops)
{
	struct handshake_key key = {};
	if (!conn_key_of(ops, &key.conn, 0) || !is_endpoint(key.conn.daddr, key.conn.dport))
		return;
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return;
	key.client_next = ops->snd_una;
	key.server_next = ops->rcv_nxt;

	struct record rec = {};
	rec.socket_cookie = bpf_get_socket_cookie(ops);
	rec.established_boot_ns = bpf_ktime_get_boot_ns();
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		rec.cgroup_id = owner_cgroup(tp);
		rec.netns_cookie = netns_cookie(ops, tp);
	}
	if (rec.cgroup_id == 0 || rec.netns_cookie == 0)
		rec.flags |= RECORD_UNATTESTED;

	// Without this storage the record could not be dropped when the socket
	// closes before the server took it; leave it to the LRU rather than
	// publish nothing.
	struct client *c = bpf_sk_storage_get(&clients, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (c) {
		rec.pid = c->pid;
		rec.tgid = c->tgid;
		c->client_next = key.client_next;
		c->server_next = key.server_next;
		c->published = 1;
	}
	// The sequence numbers make the key unique to this handshake: an entry
	// already there is a replay of the same packets, and the newest wins.
	bpf_map_update_elem(&handshakes, &key, &rec, BPF_ANY);

	// Ask for state changes on this socket only, to drop its record when it
	// closes without the server having taken it.
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

// on_server_established hands the record of the client's side of this very
// handshake to the server's new socket, if the client published one. On the
// server side snd_una and rcv_nxt still hold each side's ISN + 1: nothing has
// been sent or acknowledged past the handshake yet.
static __always_inline void on_server_established(struct bpf_sock_ops *ops)
{
	struct handshake_key key = {};
	if (!conn_key_of(ops, &key.conn, 1) || !is_endpoint(key.conn.daddr, key.conn.dport))
		return;
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return;
	key.client_next = ops->rcv_nxt;
	key.server_next = ops->snd_una;

	struct record *rec = bpf_map_lookup_elem(&handshakes, &key);
	if (!rec)
		return;
	// Copied before the delete: the entry's memory may be reused after it.
	struct record copy = *rec;
	bpf_map_delete_elem(&handshakes, &key);
	bpf_sk_storage_get(&attested, sk, &copy, BPF_SK_STORAGE_GET_F_CREATE);
}

// on_client_close drops the record of a client socket the server never took.
static __always_inline void on_client_close(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return;
	struct client *c = bpf_sk_storage_get(&clients, sk, 0, 0);
	if (!c || !c->published)
		return;
	struct handshake_key key = {};
	if (!conn_key_of(ops, &key.conn, 0))
		return;
	key.client_next = c->client_next;
	key.server_next = c->server_next;
	c->published = 0;
	bpf_map_delete_elem(&handshakes, &key);
}

// note_connector remembers the calling task on a TCP socket about to connect
// to a token endpoint at addr and port (host order). Failing to allocate only
// leaves the record without a pid; connect() itself is never denied.
static __always_inline void note_connector(struct bpf_sock_addr *ctx, const __u32 *addr, __u16 port)
{
	if (!is_endpoint(addr, port))
		return;
	// Gives the namespace its cookie if it has none yet (before 5.12), for
	// sockops to read; there the value itself is not needed.
	if (!sockops_has_netns_cookie)
		bpf_get_netns_cookie(ctx);
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct client *c = bpf_sk_storage_get(&clients, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!c)
		return;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	c->pid = (__u32)pid_tgid;
	c->tgid = pid_tgid >> 32;
}

// Cgroups deeper than this below a sandbox's own are not recognised as the
// sandbox's for redirects (attribution is not affected).
#define MAX_CGROUP_HOPS 32

// is_sandbox reports whether the connecting socket belongs to a registered
// sandbox, by the registry's rule: its cgroup or the nearest registered
// ancestor is a sandbox's, and the socket is in that sandbox's netns if it
// has one; failing a registered cgroup, its netns is that of a sandbox
// registered by netns alone. The cgroup is the socket's own, as in records.
static __always_inline int is_sandbox(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		struct cgroup *cg = tp->inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup;
		for (int i = 0; i < MAX_CGROUP_HOPS && cg; i++) {
			struct kernfs_node *kn = cg->kn;
			if (!kn)
				break;
			__u64 id = kn->id;
			__u64 *netns = bpf_map_lookup_elem(&sandbox_cgroups, &id);
			if (netns)
				return *netns == 0 || *netns == cookie;
			struct cgroup_subsys_state *parent = cg->self.parent;
			if (!parent)
				break;
			cg = parent->cgroup;
		}
	}
	return bpf_map_lookup_elem(&sandbox_netns, &cookie) != NULL;
}

// link_local_target returns where a sandbox's connection to addr and port
// (host order) goes instead, or NULL to leave it alone, and remembers both
// on the socket for getpeername.
static __always_inline struct redirect *link_local_target(struct bpf_sock_addr *ctx, const __u32 *addr, __u16 port)
{
	if (!port_in(&link_local_ports, port))
		return NULL;
	struct endpoint ep = {};
	ep.addr[0] = addr[0];
	ep.addr[1] = addr[1];
	ep.addr[2] = addr[2];
	ep.addr[3] = addr[3];
	ep.port = port;
	struct redirect *r = bpf_map_lookup_elem(&link_local, &ep);
	if (!r || !is_sandbox(ctx))
		return NULL;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return NULL;
	// Without the note getpeername would name the token endpoint; the
	// connection itself is still attributed, so it goes ahead.
	struct redirected *note = bpf_sk_storage_get(&redirects, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (note) {
		for (int i = 0; i < 4; i++) {
			note->orig_addr[i] = addr[i];
			note->to_addr[i] = r->addr[i];
		}
		note->orig_port = port;
		note->to_port = r->port;
	}
	return r;
}

static __always_inline int is_v4mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

SEC("cgroup/connect4")
int record_connector4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 addr[4];
	map_v4(addr, ctx->user_ip4);
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct redirect *r = link_local_target(ctx, addr, port);
	// The loader only pairs IPv4 link-local addresses with IPv4 endpoints.
	if (r && is_v4mapped(r->addr)) {
		ctx->user_ip4 = r->addr[3];
		ctx->user_port = bpf_htons(r->port);
		addr[3] = r->addr[3];
		port = r->port;
	}
	note_connector(ctx, addr, port);
	return 1;
}

SEC("cgroup/connect6")
int record_connector6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 addr[4];
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	struct redirect *r = link_local_target(ctx, addr, port);
	if (r) {
		// An IPv4 endpoint as an IPv4-mapped address: the kernel then
		// connects over IPv4 (unless the socket is IPv6-only, which fails).
		ctx->user_ip6[0] = r->addr[0];
		ctx->user_ip6[1] = r->addr[1];
		ctx->user_ip6[2] = r->addr[2];
		ctx->user_ip6[3] = r->addr[3];
		ctx->user_port = bpf_htons(r->port);
		for (int i = 0; i < 4; i++)
			addr[i] = r->addr[i];
		port = r->port;
	}
	note_connector(ctx, addr, port);
	return 1;
}

// The getpeername programs give a redirected socket back the address its
// caller connected to, as long as its peer is still the endpoint it was
// sent to (a socket may connect again after a failed attempt).
SEC("cgroup/getpeername4")
int link_local_peer4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct redirected *note = bpf_sk_storage_get(&redirects, sk, 0, 0);
	if (!note || !is_v4mapped(note->orig_addr))
		return 1;
	if (ctx->user_ip4 != note->to_addr[3] || bpf_ntohs((__u16)ctx->user_port) != note->to_port)
		return 1;
	ctx->user_ip4 = note->orig_addr[3];
	ctx->user_port = bpf_htons(note->orig_port);
	return 1;
}

SEC("cgroup/getpeername6")
int link_local_peer6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct redirected *note = bpf_sk_storage_get(&redirects, sk, 0, 0);
	if (!note)
		return 1;
	__u32 peer[4];
	peer[0] = ctx->user_ip6[0];
	peer[1] = ctx->user_ip6[1];
	peer[2] = ctx->user_ip6[2];
	peer[3] = ctx->user_ip6[3];
	if (peer[0] != note->to_addr[0] || peer[1] != note->to_addr[1] || peer[2] != note->to_addr[2] ||
	    peer[3] != note->to_addr[3] || bpf_ntohs((__u16)ctx->user_port) != note->to_port)
		return 1;
	ctx->user_ip6[0] = note->orig_addr[0];
	ctx->user_ip6[1] = note->orig_addr[1];
	ctx->user_ip6[2] = note->orig_addr[2];
	ctx->user_ip6[3] = note->orig_addr[3];
	ctx->user_port = bpf_htons(note->orig_port);
	return 1;
}

SEC("sockops")
int record_connect(struct bpf_sock_ops *ops)
{
	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_client_established(ops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_server_established(ops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == BPF_TCP_CLOSE)
			on_client_close(ops);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
