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
# About 20 minutes on 2 vCPUs.
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
# One sandbox, 1, 4 and 16 clients: identityd, baseline, bare HTTP, sign-only.
for alg in RS256 ES256; do
	for k in 1 4 16; do
		bench "n1-k$k-$alg" --sandboxes 1 --clients "$k" --duration 2s --rounds 3 --alg "$alg"
	done
done
bench n1-k4-EdDSA --sandboxes 1 --clients 4 --duration 2s --rounds 3 --alg EdDSA
# Sandboxes multiply: 10, 100, 1,000 sandboxes, one client each.
for alg in ES256 RS256; do
	for n in 10 100 1000; do
		bench "n$n-k1-$alg" --sandboxes "$n" --clients 1 --duration 2s --rounds 3 --alg "$alg"
	done
done
# Storms.
for alg in ES256 RS256; do
	for n in 100 1000; do
		bench "start-n$n-$alg" --sandboxes "$n" --storm start --alg "$alg"
		bench "restart-n$n-$alg" --sandboxes "$n" --storm restart --alg "$alg"
	done
done
echo "results in $OUT" >&2
