#!/usr/bin/env bash
# Installs, from Debian's archive, the packages the build and tests need, if
# any is missing. Safe to run repeatedly; does nothing when all are present.
set -euo pipefail

need=()
command -v clang >/dev/null || need+=(clang)
command -v llvm-strip >/dev/null || need+=(llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v ip >/dev/null || need+=(iproute2)
# The NAT tests write DNAT rules in their own network namespaces.
command -v iptables >/dev/null || need+=(iptables)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
# Newer kernels of the vmtest matrix ship their modules as .ko.xz.
command -v xz >/dev/null || need+=(xz-utils)
# The tests start real etcd clusters (internal/etcdtest) from this binary;
# the package's own systemd service is never used.
[ -x /usr/bin/etcd ] || need+=(etcd-server)

if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "missing packages: ${need[*]} (run as root to install them)" >&2
		exit 1
	fi
	echo "installing: ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
