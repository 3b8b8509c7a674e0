#!/usr/bin/env bash
# h2load (nghttp2, a load generator nobody here wrote) against a single node and a 3-node
# cluster (RF=3, W=R=2, QUORUM) through its node 1, alternately: Sets and Gets of one key
# (100-byte value), 16 connections x 16 streams, ROUNDS rounds of DURATION seconds after a
# 1 s warm-up. NODE_B_ENV="KEY=VALUE ..." adds a second cluster started with that environment
# (SHARD_PORT=off: replica calls without the shard-aware port), NODE_B=path one of another
# build (an older commit), or both. All processes share this
# machine's cores. Build first: cargo build --release --workspace
# NODE_ENV="KEY=VALUE ..." applies to every node (SHARD_PORT=off turns the shard-aware port
# off; it is on by default).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
command -v h2load >/dev/null || { echo "h2load-cluster.sh: needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
pids=()
get_body=$(mktemp); set_body=$(mktemp)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -f "$get_body" "$set_body"; }
trap cleanup EXIT
# pb.GetRequest{key} and pb.SetRequest{key, value (field 2, a string)}, gRPC-framed.
python3 - "$get_body" "$set_body" <<'PY'
import struct, sys
k = b"bench-key"
def framed(m): return b"\x00" + struct.pack(">I", len(m)) + m
get = b"\x0a" + bytes([len(k)]) + k
v = b"v" * 100
put = get + b"\x12" + bytes([len(v)]) + v
open(sys.argv[1], "wb").write(framed(get)); open(sys.argv[2], "wb").write(framed(put))
PY
start() {
    # shellcheck disable=SC2086
    env ${NODE_ENV:-} ${3:-} ADDR="$1" PEERS="${2:-}" RUST_LOG=error CAPACITY=100000 "${4:-$BIN/distributed-cache}" & pids+=($!)
}
declare -A addr procs
addr[single]=127.0.0.1:$(free_port); start "${addr[single]}"; procs[single]=${pids[-1]}
c1=127.0.0.1:$(free_port); start "$c1"; start "127.0.0.1:$(free_port)" "$c1"; start "127.0.0.1:$(free_port)" "$c1"
addr[cluster]=$c1; procs[cluster]="${pids[*]: -3}"
targets=(single cluster)
if [ -n "${NODE_B_ENV:-}${NODE_B:-}" ]; then
    bin_b=${NODE_B:-$BIN/distributed-cache}
    b1=127.0.0.1:$(free_port); start "$b1" "" "${NODE_B_ENV:-}" "$bin_b"
    start "127.0.0.1:$(free_port)" "$b1" "${NODE_B_ENV:-}" "$bin_b"; start "127.0.0.1:$(free_port)" "$b1" "${NODE_B_ENV:-}" "$bin_b"
    addr[cluster-b]=$b1; procs[cluster-b]="${pids[*]: -3}"
    targets+=(cluster-b)
fi
converge "$c1"; [ -z "${b1:-}" ] || converge "$b1"
for t in "${targets[@]}"; do
    for _ in $(seq 1 100); do
        "$BIN/distributed-cache" set bench-key "$(head -c 100 /dev/zero | tr '\0' v)" --addr "${addr[$t]}" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
# CPU time of processes and their threads, user + system, in clock ticks.
cpu() { local t=0; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }
tick=$(getconf CLK_TCK)
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)${NODE_B:+, cluster-b: $NODE_B}${NODE_B_ENV:+, cluster-b env: $NODE_B_ENV}"
for round in $(seq 1 "$ROUNDS"); do
    for op in Set Get; do
        body=$get_body; [ "$op" = Set ] && body=$set_body
        for t in "${targets[@]}"; do
            # shellcheck disable=SC2086
            c0=$(cpu ${procs[$t]})
            out=$(h2load -c 16 -m 16 -t 1 --warm-up-time=1 -D "$DURATION" -d "$body" \
                -H 'content-type: application/grpc' -H 'te: trailers' \
                "http://${addr[$t]}/pb.CacheService/$op" 2>&1)
            rps=$(echo "$out" | awk '/^finished in/ { for (i=1;i<=NF;i++) if ($i ~ /req\/s/) { v=$(i-1); gsub(",","",v); print v } }')
            status=$(echo "$out" | awk '/^status codes:/ { print $3, $4 }')
            # shellcheck disable=SC2086
            c1_=$(cpu ${procs[$t]})
            # CPU per request of every node of the target, over warm-up and measurement.
            per=$(awk -v c=$((c1_ - c0)) -v t="$tick" -v r="$rps" -v d="$DURATION" 'BEGIN { printf "%.2f", c / t * 1e6 / (r * (d + 1)) }')
            echo "round $round $op $t req/s $rps (HTTP $status) cpu us/req $per"
        done
    done
done
# h2load sees HTTP statuses only; the gRPC status is in the trailers: count what each target
# answered other than OK, from its own Stats.
for t in "${targets[@]}"; do
    grpcurl -plaintext "${addr[$t]}" pb.NodeService/Stats | python3 -c '
import json, sys
d = json.load(sys.stdin)
bad = {}
for c in d.get("cores", []):
    for r in c.get("requests", []):
        if r.get("code") != "OK":
            bad[r["command"] + " " + r["code"]] = bad.get(r["command"] + " " + r["code"], 0) + int(r.get("count", 0))
print("'"$t"' gRPC answers other than OK:", bad or "none")'
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
