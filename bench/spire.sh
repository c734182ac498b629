#!/usr/bin/env bash
# bench/spire.sh: identityd against SPIRE v1.13.3's Workload API, same
# machine, same client concurrency, interleaved (see BENCHMARKS.md).
#
# Usage (as root, from the repository root):
#   bench/spire.sh [--alg RS256|ES256] [--clients "1 4 16"] [--duration 3s] [--rounds 3] [--out DIR]
# Environment: SPIRE_BIN (where SPIRE's binaries are, or are built to),
# IDENTITY_BENCH_BIN (a directory with identityd and identity-bench to use
# instead of building them from the working tree).
#
# What it does:
#   1. Builds spire-server and spire-agent v1.13.3 from the Go module proxy
#      (in a throwaway module: `go install ...@v1.13.3` is refused because
#      the proxy answers 403 to the module's version list, which go install
#      reads for deprecations), bench/spire (a go-spiffe/v2 load client, a
#      module of its own so the main go.mod stays free of SPIRE), identityd
#      and identity-bench. SPIRE's binaries are cached in $SPIRE_BIN.
#   2. Runs spire-server (127.0.0.1, sqlite datastore, in-memory keys, JWT
#      key of the chosen algorithm: rsa-2048 for RS256, ec-p256 for ES256)
#      and spire-agent (join-token attestation, unix workload attestor) in a
#      temporary directory, Unix sockets there; registers uid 0 (the load
#      client) as spiffe://bench.test/load.
#   3. For each round and each concurrency K, interleaved: SPIRE with one
#      audience repeated (the agent may answer from its JWT-SVID cache),
#      identityd with one audience repeated, SPIRE with a fresh audience per
#      request (a new signature by the server), identityd with a fresh
#      audience per request. identityd runs in identity-bench's closed world
#      (1 sandbox, K keep-alive clients); SPIRE's clients each hold a
#      Workload API connection of their own.
#   4. Writes every result as a JSON line to $OUT/results.jsonl and prints a
#      table (median over rounds, min-max in brackets).
#
# Traffic stays on loopback, Unix sockets and identity-bench's own network
# namespaces. Everything is removed on exit, also on ^C.
set -euo pipefail

ALG=RS256
CLIENTS="1 4 16"
DURATION=3s
ROUNDS=3
OUT=""
while [ $# -gt 0 ]; do
	case "$1" in
	--alg) ALG=$2; shift 2 ;;
	--clients) CLIENTS=$2; shift 2 ;;
	--duration) DURATION=$2; shift 2 ;;
	--rounds) ROUNDS=$2; shift 2 ;;
	--out) OUT=$2; shift 2 ;;
	*) echo "usage: $0 [--alg RS256|ES256] [--clients \"1 4 16\"] [--duration 3s] [--rounds 3] [--out DIR]" >&2; exit 2 ;;
	esac
done
case "$ALG" in
RS256) JWT_KEY=rsa-2048 ;;
ES256) JWT_KEY=ec-p256 ;;
*) echo "spire.sh: --alg RS256 or ES256 (SPIRE signs JWT-SVIDs with RSA or ECDSA keys only)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "spire.sh: run as root (identity-bench builds network namespaces)" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
SPIRE_VERSION=v1.13.3
SPIRE_BIN=${SPIRE_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/identityd-bench/spire-$SPIRE_VERSION}
TMP=$(mktemp -d /tmp/spire-bench.XXXXXX)
OUT=${OUT:-$(mktemp -d /tmp/spire-bench-out.XXXXXX)}
mkdir -p "$OUT" "$SPIRE_BIN"
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[spire.sh $(date -u +%H:%M:%S)] $*" >&2; }

# 1. Binaries.
if [ ! -x "$SPIRE_BIN/spire-server" ] || [ ! -x "$SPIRE_BIN/spire-agent" ]; then
	log "building spire-server and spire-agent $SPIRE_VERSION (a few minutes)"
	mod=$TMP/spire-build
	mkdir -p "$mod"
	(cd "$mod" && go mod init spire-build >/dev/null 2>&1 &&
		go get "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION" "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION" &&
		go build -o "$SPIRE_BIN/" github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent)
fi
log "building spire-load"
(cd "$REPO/bench/spire" && go build -o "$TMP/bin/spire-load" .)
if [ -n "${IDENTITY_BENCH_BIN:-}" ]; then
	# identityd and identity-bench built elsewhere (from a given commit, say).
	cp "$IDENTITY_BENCH_BIN/identityd" "$IDENTITY_BENCH_BIN/identity-bench" "$TMP/bin/"
else
	log "building identityd and identity-bench from the working tree"
	(cd "$REPO" && go build -o "$TMP/bin/" ./cmd/identityd ./cmd/identity-bench)
fi

# 2. SPIRE server and agent.
PORT=$((20000 + RANDOM % 20000))
mkdir -p "$TMP/server" "$TMP/agent"
cat >"$TMP/server.conf" <<EOF
server {
    bind_address = "127.0.0.1"
    bind_port = "$PORT"
    socket_path = "$TMP/server.sock"
    trust_domain = "bench.test"
    data_dir = "$TMP/server"
    log_level = "WARN"
    ca_key_type = "ec-p256"
    jwt_key_type = "$JWT_KEY"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "$TMP/server/datastore.sqlite3"
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
EOF
cat >"$TMP/agent.conf" <<EOF
agent {
    data_dir = "$TMP/agent"
    log_level = "WARN"
    server_address = "127.0.0.1"
    server_port = "$PORT"
    socket_path = "$TMP/agent.sock"
    trust_domain = "bench.test"
    insecure_bootstrap = true
}
plugins {
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
EOF
log "starting spire-server on 127.0.0.1:$PORT"
"$SPIRE_BIN/spire-server" run -config "$TMP/server.conf" >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for _ in $(seq 100); do
	"$SPIRE_BIN/spire-server" healthcheck -socketPath "$TMP/server.sock" >/dev/null 2>&1 && break
	sleep 0.2
done
"$SPIRE_BIN/spire-server" healthcheck -socketPath "$TMP/server.sock" >/dev/null || { cat "$TMP/server.log" >&2; exit 1; }
TOKEN=$("$SPIRE_BIN/spire-server" token generate -spiffeID spiffe://bench.test/agent -socketPath "$TMP/server.sock" | awk '{print $2}')
log "starting spire-agent (join token)"
"$SPIRE_BIN/spire-agent" run -config "$TMP/agent.conf" -joinToken "$TOKEN" >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
for _ in $(seq 100); do
	"$SPIRE_BIN/spire-agent" healthcheck -socketPath "$TMP/agent.sock" >/dev/null 2>&1 && break
	sleep 0.2
done
"$SPIRE_BIN/spire-agent" healthcheck -socketPath "$TMP/agent.sock" >/dev/null || { cat "$TMP/agent.log" >&2; exit 1; }
"$SPIRE_BIN/spire-server" entry create -parentID spiffe://bench.test/spire/agent/join_token/"$TOKEN" \
	-spiffeID spiffe://bench.test/load -selector unix:uid:0 -socketPath "$TMP/server.sock" >/dev/null
log "waiting for the entry to reach the agent"
for _ in $(seq 150); do
	"$SPIRE_BIN/spire-agent" api fetch jwt -audience bench -socketPath "$TMP/agent.sock" >/dev/null 2>&1 && break
	sleep 0.2
done
"$SPIRE_BIN/spire-agent" api fetch jwt -audience bench -socketPath "$TMP/agent.sock" >/dev/null

# 3. Interleaved runs.
spire() { # K mode
	"$TMP/bin/spire-load" -socket "$TMP/agent.sock" -clients "$1" -mode "$2" -duration "$DURATION" \
		-agent-pid "$AGENT_PID" -server-pid "$SERVER_PID" | jq -c --arg alg "$ALG" --argjson round "$ROUND" '. + {alg: $alg, round: $round}'
}
identityd() { # K mode
	"$TMP/bin/identity-bench" --sandboxes 1 --clients "$1" --duration "$DURATION" --mode keepalive --targets identityd \
		--audience "$2" --alg "$ALG" --sign-only 0 --json 2>/dev/null |
		jq -c --arg alg "$ALG" --argjson round "$ROUND" --arg mode "$2" '.measurements[0] as $m | {system: "identityd", mode: $mode,
			clients: .config.clients_per_sandbox, requests: $m.requests, failures: $m.failures, elapsed_s: $m.elapsed_s,
			throughput: $m.throughput, p50_ms: $m.p50_ms, p90_ms: $m.p90_ms, p99_ms: $m.p99_ms, max_ms: $m.max_ms,
			cpu_us_per_request: $m.cpu_us_per_request, peak_rss_mb: .identityd_peak_rss_mb, alg: $alg, round: $round}'
}
for ROUND in $(seq "$ROUNDS"); do
	for K in $CLIENTS; do
		for MODE in same fresh; do
			log "round $ROUND/$ROUNDS, $K clients, $MODE audience: spire, identityd"
			spire "$K" "$MODE" >>"$OUT/results.jsonl"
			identityd "$K" "$MODE" >>"$OUT/results.jsonl"
		done
	done
done

# 4. The table: medians over rounds, [min-max] of throughput.
echo "identityd vs SPIRE $SPIRE_VERSION, $ALG, $DURATION per run, $ROUNDS round(s); load average $(cut -d' ' -f1-3 /proc/loadavg)"
jq -rs '
	def r2: (. * 100 | floor) / 100;
	def med: sort | .[(length / 2) | floor];
	def row($x): "\($x.tm | floor)/s [\($x.t[0] | floor)-\($x.t[-1] | floor)] p50 \($x.p50 | med | r2)ms p99 \($x.p99 | med | r2)ms \($x.cpu | med | floor)us-CPU/req \($x.rss | floor)MB";
	group_by([.mode, .clients, .system]) | map({
		mode: .[0].mode, clients: .[0].clients, system: .[0].system,
		t: (map(.throughput) | sort), p50: map(.p50_ms), p99: map(.p99_ms), cpu: map(.cpu_us_per_request),
		rss: (map(.peak_rss_mb // ((.agent_peak_rss_mb // 0) + (.server_peak_rss_mb // 0))) | max)
	}) | map(. + {tm: (.t | med)}) |
	group_by([.mode, .clients]) | .[] |
	(map(select(.system == "identityd"))[0]) as $i | (map(select(.system == "spire"))[0]) as $s |
	"\($i.mode)\tK=\($i.clients)\tidentityd \(row($i))\tspire \(row($s))\tidentityd/spire \($i.tm / $s.tm | r2)"
' "$OUT/results.jsonl" | column -t -s $'\t'
echo "raw results: $OUT/results.jsonl"
