#!/usr/bin/env bash
# bench/identityd.sh: the identity-bench runs behind BENCHMARKS.md's
# identityd tables and storms. Run as root from the repository root; each
# run builds its own closed network world and removes it.
#
#   bench/identityd.sh [OUT]      (default OUT: a new /tmp/identityd-bench.XXXXXX)
#
# Environment: IDENTITY_BENCH_BIN, a directory with identityd and
# identity-bench to use instead of building them from the working tree.
# Each run writes OUT/<name>.txt (the table) and OUT/<name>.json.
# About 35 minutes on 2 vCPUs.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "identityd.sh: run as root" >&2; exit 1; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$(mktemp -d /tmp/identityd-bench.XXXXXX)}
mkdir -p "$OUT"
BIN=${IDENTITY_BENCH_BIN:-}
if [ -z "$BIN" ]; then
	BIN=$OUT/bin
	(cd "$REPO" && go build -o "$BIN/" ./cmd/identityd ./cmd/identity-bench)
fi
bench() { # name args...
	local name=$1
	shift
	echo "[identityd.sh $(date -u +%H:%M:%S)] $name: identity-bench $*" >&2
	"$BIN/identity-bench" "$@" --json-out "$OUT/$name.json" >"$OUT/$name.txt" 2>/dev/null
}
# 1. Sandboxes multiply: 1, 10, 100, 1,000 sandboxes, one client each, one
#    audience repeated (what a workload refreshing its token does; the token
#    cache answers): identityd, baseline, bare HTTP, sign-only.
for alg in ES256 RS256; do
	for n in 1 10 100 1000; do
		bench "n$n-k1-$alg" --sandboxes "$n" --clients 1 --duration 2s --rounds 3 --alg "$alg"
	done
done
# 1b. The same load while the sandboxes the server knows multiply: N = 10,
#     100, 1,000 sandboxes, the load from 10 of them (1,000 client processes
#     on 2 CPUs load the machine, not only the server).
for alg in ES256 RS256; do
	for n in 10 100 1000; do
		bench "n$n-active10-$alg" --sandboxes "$n" --active 10 --clients 1 --duration 2s --rounds 3 --alg "$alg"
	done
done
# 1c. The same, 10 against 1,000 sandboxes in the same rounds: the world
#     grows to 1,000 and shrinks back to 10 between measurements.
for alg in ES256 RS256; do
	bench "grow-n10-to1000-$alg" --sandboxes 10 --grow-to 1000 --clients 1 --duration 2s --rounds 5 --alg "$alg"
done
# 2. One sandbox, 4 clients, a fresh audience per request (every token signed).
for alg in EdDSA ES256 RS256; do
	bench "n1-k4-fresh-$alg" --sandboxes 1 --clients 4 --duration 2s --rounds 3 --alg "$alg" --audience fresh
done
# 3. Start storms, 3 rounds each against identityd, the baseline and the
#    bare handler: with each sandbox's own client process, then with the
#    clients in one process on sockets the sandboxes made.
for alg in ES256 RS256; do
	for n in 100 1000; do
		bench "start-n$n-$alg" --sandboxes "$n" --storm start --rounds 3 --alg "$alg"
		bench "start-shared-n$n-$alg" --sandboxes "$n" --storm start --storm-clients shared --rounds 3 --alg "$alg"
	done
done
# 4. Restart storms, 3 runs each, with and without the token socket held
#    across the restart (systemd socket activation).
for alg in ES256 RS256; do
	for n in 100 1000; do
		for run in 1 2 3; do
			bench "restart-n$n-$alg-$run" --sandboxes "$n" --storm restart --alg "$alg"
			bench "restart-held-n$n-$alg-$run" --sandboxes "$n" --storm restart --alg "$alg" --hold-socket
		done
	done
done
"$BIN/identity-bench" chart --out "$OUT/charts" "$OUT"
echo "results in $OUT" >&2
