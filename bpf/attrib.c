//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// Kernel side of identityd's caller attribution.
//
// sockops at TCP_CONNECT_CB runs inside connect() after the source port is
// chosen and before the SYN leaves, so a record published there under the
// connection's 4-tuple exists before the token server can accept the
// connection. Only connections to a configured token endpoint are published;
// everything else returns after one array lookup.
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
// endpoints only, they note that task's pid and tgid in socket-local storage
// for sockops to copy into the record. They see the destination as the
// caller named it, before any other program rewrites it, so a record may
// lack a pid; the pid is only logged. Keeping that allocation off every other
// socket is what keeps the programs' cost on unrelated connections near that
// of programs that do nothing.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

// Record flags; mirrored by the Go package.
#define RECORD_UNATTESTED (1U << 0) // the socket's owner could not be read
#define RECORD_AMBIGUOUS (1U << 1)  // same 4-tuple published from two netns

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

struct endpoint {
	__u32 addr[4]; // all zero: any address with this port
	__u16 port;
	__u16 pad;
};

// The task that called connect() on a socket to a token endpoint.
struct connector {
	__u32 pid;
	__u32 tgid;
};

struct record {
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 socket_cookie;
	__u64 connect_boot_ns; // CLOCK_BOOTTIME at connect()
	__u32 pid;             // thread that called connect(); 0 if unknown
	__u32 tgid;            // its process
	__u32 flags;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct connector);
} connectors SEC(".maps");

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

// Twice the 65,536 live records promised: the LRU's per-CPU free lists can
// evict before the map is nominally full.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct conn_key);
	__type(value, struct record);
} conns SEC(".maps");

static __always_inline void map_v4(__u32 *dst, __u32 addr)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = bpf_htonl(0x0000ffff);
	dst[3] = addr;
}

// conn_key_of fills key from the socket's addresses. For an AF_INET6 socket
// connecting to an IPv4-mapped address the IPv6 source is only set after the
// IPv4 connect returns, so such sockets are read through their IPv4 fields,
// which also gives the same key at close time.
static __always_inline int conn_key_of(struct bpf_sock_ops *ops, struct conn_key *key)
{
	__u32 family = ops->family;

	if (family == AF_INET) {
		map_v4(key->saddr, ops->local_ip4);
		map_v4(key->daddr, ops->remote_ip4);
	} else if (family == AF_INET6) {
		key->daddr[0] = ops->remote_ip6[0];
		key->daddr[1] = ops->remote_ip6[1];
		key->daddr[2] = ops->remote_ip6[2];
		key->daddr[3] = ops->remote_ip6[3];
		if (key->daddr[0] == 0 && key->daddr[1] == 0 && key->daddr[2] == bpf_htonl(0x0000ffff)) {
			map_v4(key->saddr, ops->local_ip4);
			map_v4(key->daddr, ops->remote_ip4);
		} else {
			key->saddr[0] = ops->local_ip6[0];
			key->saddr[1] = ops->local_ip6[1];
			key->saddr[2] = ops->local_ip6[2];
			key->saddr[3] = ops->local_ip6[3];
		}
	} else {
		return 0;
	}
	key->sport = (__u16)ops->local_port;
	key->dport = (__u16)bpf_ntohl(ops->remote_port);
	return 1;
}

// is_endpoint reports whether addr (IPv6 or IPv4-mapped, network order) and
// port (host order) name a token endpoint.
static __always_inline int is_endpoint(const __u32 *addr, __u16 port)
{
	__u32 zero = 0;
	struct port_bitmap *ports = bpf_map_lookup_elem(&endpoint_ports, &zero);
	if (!ports)
		return 0;
	if (!(ports->bits[(port >> 6) & 1023] & (1ULL << (port & 63))))
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

// Just enough of the kernel's socket and cgroup types to reach a socket's
// cgroup id. preserve_access_index makes every access a CO-RE relocation, so
// the offsets come from the running kernel's BTF, not from these definitions.
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct sock {
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
static __always_inline __u64 owner_cgroup(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	struct cgroup *cg = tp->inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup;
	if (!cg)
		return 0;
	struct kernfs_node *kn = cg->kn;
	if (!kn)
		return 0;
	return kn->id;
}

static __always_inline void on_connect(struct bpf_sock_ops *ops)
{
	struct conn_key key = {};
	if (!conn_key_of(ops, &key) || !is_endpoint(key.daddr, key.dport))
		return;

	struct record rec = {};
	rec.netns_cookie = bpf_get_netns_cookie(ops);
	rec.socket_cookie = bpf_get_socket_cookie(ops);
	rec.connect_boot_ns = bpf_ktime_get_boot_ns();
	rec.cgroup_id = owner_cgroup(ops);
	if (rec.cgroup_id == 0)
		rec.flags |= RECORD_UNATTESTED;

	struct bpf_sock *sk = ops->sk;
	if (sk) {
		struct connector *c = bpf_sk_storage_get(&connectors, sk, 0, 0);
		if (c) {
			rec.pid = c->pid;
			rec.tgid = c->tgid;
		}
	}

	// One netns cannot hold two live connections with the same tuple, so a
	// record from the same netns belongs to a dead socket and is replaced.
	// One from another netns may be live: keep neither answer.
	if (bpf_map_update_elem(&conns, &key, &rec, BPF_NOEXIST) != 0) {
		struct record *old = bpf_map_lookup_elem(&conns, &key);
		if (old && old->netns_cookie != rec.netns_cookie)
			rec.flags |= RECORD_AMBIGUOUS;
		bpf_map_update_elem(&conns, &key, &rec, BPF_ANY);
	}

	// Ask for state changes on this socket only, to drop its record when it
	// closes without the server having consumed it.
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_close(struct bpf_sock_ops *ops)
{
	struct conn_key key = {};
	if (!conn_key_of(ops, &key))
		return;

	struct record *rec = bpf_map_lookup_elem(&conns, &key);
	if (rec && rec->socket_cookie == bpf_get_socket_cookie(ops))
		bpf_map_delete_elem(&conns, &key);
}

// note_connector remembers the calling task on a TCP socket about to connect
// to a token endpoint. Failing to allocate only leaves the record without a
// pid; connect() itself is never denied.
static __always_inline void note_connector(struct bpf_sock_addr *ctx, const __u32 *addr)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return;
	if (!is_endpoint(addr, bpf_ntohs((__u16)ctx->user_port)))
		return;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct connector *c = bpf_sk_storage_get(&connectors, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!c)
		return;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	c->pid = (__u32)pid_tgid;
	c->tgid = pid_tgid >> 32;
}

SEC("cgroup/connect4")
int record_connector4(struct bpf_sock_addr *ctx)
{
	__u32 addr[4];
	map_v4(addr, ctx->user_ip4);
	note_connector(ctx, addr);
	return 1;
}

SEC("cgroup/connect6")
int record_connector6(struct bpf_sock_addr *ctx)
{
	__u32 addr[4];
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	note_connector(ctx, addr);
	return 1;
}

SEC("sockops")
int record_connect(struct bpf_sock_ops *ops)
{
	switch (ops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect(ops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ops->args[1] == BPF_TCP_CLOSE)
			on_close(ops);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
