//go:build ignore

// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
//
// Kernel side of identityd's caller attribution.
//
// cgroup/sock_create remembers, in socket-local storage, which cgroup and
// which task created each TCP socket. sockops at TCP_CONNECT_CB runs inside
// connect() after the source port is chosen and before the SYN leaves, so a
// record published there under the connection's 4-tuple exists before the
// token server can accept the connection. Only connections to a configured
// token endpoint are published; everything else returns after one hash
// lookup.
//
// Debian 12's 6.1 kernel is the oldest target: sockops cannot call
// bpf_get_current_cgroup_id there (and it would name the connecting task, not
// the socket's owner anyway), which is why the cgroup comes from sock_create.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

// Record flags; mirrored by the Go package.
#define RECORD_UNATTESTED (1U << 0) // socket predates the programs: no owner known
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

struct sock_owner {
	__u64 cgroup_id;
	__u32 pid;
	__u32 tgid;
};

struct record {
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 socket_cookie;
	__u64 connect_boot_ns; // CLOCK_BOOTTIME at connect()
	__u32 pid;             // creator thread
	__u32 tgid;            // creator process
	__u32 flags;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_owner);
} sock_owners SEC(".maps");

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

SEC("cgroup/sock_create")
int record_owner(struct bpf_sock *sk)
{
	if (sk->type != SOCK_STREAM || sk->protocol != IPPROTO_TCP)
		return 1;

	// On allocation failure the socket stays unattested and its token
	// requests are refused; socket creation itself is never denied.
	struct sock_owner *o = bpf_sk_storage_get(&sock_owners, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 1;

	__u64 pid_tgid = bpf_get_current_pid_tgid();
	o->cgroup_id = bpf_get_current_cgroup_id();
	o->pid = (__u32)pid_tgid;
	o->tgid = pid_tgid >> 32;
	return 1;
}

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

static __always_inline int is_endpoint(const struct conn_key *key)
{
	__u32 zero = 0;
	struct port_bitmap *ports = bpf_map_lookup_elem(&endpoint_ports, &zero);
	if (!ports)
		return 0;
	__u16 port = key->dport;
	if (!(ports->bits[(port >> 6) & 1023] & (1ULL << (port & 63))))
		return 0;

	struct endpoint ep = {};

	ep.addr[0] = key->daddr[0];
	ep.addr[1] = key->daddr[1];
	ep.addr[2] = key->daddr[2];
	ep.addr[3] = key->daddr[3];
	ep.port = key->dport;
	if (bpf_map_lookup_elem(&endpoints, &ep))
		return 1;

	ep.addr[0] = 0;
	ep.addr[1] = 0;
	ep.addr[2] = 0;
	ep.addr[3] = 0;
	return bpf_map_lookup_elem(&endpoints, &ep) != NULL;
}

static __always_inline void on_connect(struct bpf_sock_ops *ops)
{
	struct conn_key key = {};
	if (!conn_key_of(ops, &key) || !is_endpoint(&key))
		return;

	struct record rec = {};
	rec.netns_cookie = bpf_get_netns_cookie(ops);
	rec.socket_cookie = bpf_get_socket_cookie(ops);
	rec.connect_boot_ns = bpf_ktime_get_boot_ns();

	struct bpf_sock *sk = ops->sk;
	struct sock_owner *o = NULL;
	if (sk)
		o = bpf_sk_storage_get(&sock_owners, sk, 0, 0);
	if (o) {
		rec.cgroup_id = o->cgroup_id;
		rec.pid = o->pid;
		rec.tgid = o->tgid;
	} else {
		rec.flags |= RECORD_UNATTESTED;
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
