// Package bpf attributes TCP connections to the token server to the cgroup
// and network namespace of the socket that opened them, as the kernel saw it.
//
// Three eBPF programs are attached to the root of the cgroup v2 hierarchy:
//
//   - sockops, at TCP_CONNECT_CB (inside connect(), after the source port is
//     chosen and before the SYN is sent), publishes a [Record] for connections
//     to a configured token endpoint under the connection's 4-tuple, and drops
//     it again if the socket closes before the server looked it up. The
//     cgroup in the record is the socket's own: the one the kernel stored in
//     it when it was created, read through BTF. It does not change when the
//     task later moves to another cgroup or hands the descriptor to another
//     process.
//   - cgroup/connect4 and cgroup/connect6 note, for connections to a token
//     endpoint only, which task called connect(), for the record's pid.
//
// Connections to anything else are dismissed by a port bitmap and cost no
// allocation.
//
// The server calls [Installation.Lookup] with the accepted connection's
// addresses. Nothing is inferred from the source address: a connection with no
// record, or one whose owner could not be read, is reported as such and must
// be refused.
//
// Programs, links and maps are pinned under a bpffs directory, so attribution
// continues while no daemon runs, and a restarted daemon adopts what is
// pinned instead of attaching a second copy ([Install] is idempotent and
// replaces changed programs in place through their links).
package bpf
