package bpf

// The object is compiled for little-endian BPF only (amd64 and arm64 hosts).
// -mcpu=v1 and the debug prefix map come from bpf2go; the include paths find
// Debian's libbpf-dev and linux-libc-dev headers on either architecture.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu" -target bpfel -type conn_key -type handshake_key -type client -type endpoint -type record -type port_bitmap -type redirect -type redirected attrib attrib.c
