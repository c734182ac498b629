// Package bpf attributes TCP connections to the token server to the cgroup
// and network namespace of the socket that opened them, as the kernel saw it.
//
// Five eBPF programs are attached to the root of the cgroup v2 hierarchy:
//
//   - sockops, on the client socket of a connection to a configured token
//     endpoint when its handshake completes (ACTIVE_ESTABLISHED_CB, before
//     its final ACK leaves), publishes a [Record] under the 4-tuple and both
//     sides' initial sequence numbers; and on the server's new socket when
//     that ACK arrives (PASSIVE_ESTABLISHED_CB, before accept() can return
//     it), moves the record of that very handshake into the accepted
//     socket's local storage. A record whose socket closes before a server
//     took it is dropped. The cgroup in the record is the client socket's
//     own: the one the kernel stored in it when it was created, read through
//     BTF. It does not change when the task later moves to another cgroup or
//     hands the descriptor to another process.
//   - cgroup/connect4 and cgroup/connect6 note, for connections to a token
//     endpoint only, which task called connect(), for the record's pid.
//     They also send a sandbox's connection to a configured link-local
//     endpoint ([Installation.SetLinkLocal]) to the token endpoint, before
//     anything is routed or recorded; which sockets are a sandbox's the
//     daemon tells them ([Installation.AddSandbox]), by the registry's rule.
//   - cgroup/getpeername4 and getpeername6 report to a redirected socket
//     the link-local address it connected to.
//
// So the record proves that the socket it names is the one the server is
// talking to: a handshake that someone else completed for its 4-tuple (with
// raw packets, after poisoning a neighbour cache) carries no record, and
// records published for the same 4-tuple from other network namespaces can
// never be taken for it. Connections to anything else are dismissed by a
// port bitmap and cost no allocation.
//
// The server calls [Installation.Lookup] with the accepted connection, and
// the record is read from the socket by descriptor. Nothing is inferred from
// the source address: a connection with no record, or one whose owner could
// not be read, is reported as such and must be refused. One that conntrack
// says NAT rewrote on its way is reported as a [NATError], which names the
// likely cause.
//
// Programs, links and maps are pinned under a bpffs directory, so attribution
// continues while no daemon runs, and a restarted daemon adopts what is
// pinned instead of attaching a second copy ([Install] is idempotent and
// replaces changed programs in place through their links).
package bpf
