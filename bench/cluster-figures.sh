#!/usr/bin/env bash
# The cluster figures of bench/RESULTS.md: a single node and a 3-node cluster (RF=3, W=R=2),
# all sharing this machine's cores, loaded alternately with the same settings: Set and Get
# through one node and spread over all three, against the single node. NODE_B=path adds a
# second 3-node cluster of another build (an older commit) to the rotation, loaded through
# its node 1, for a before/after in one run; NODE_B_ENV="KEY=VALUE ..." starts that cluster
# with this environment (alone, it runs this build: NODE_B_ENV=SHARD_PORT=off is this build
# without core-to-core replica calls). ROUNDS (default 3). About 4 minutes (6 with NODE_B).
# Build first: cargo build --release --workspace
# NODE_ENV="KEY=VALUE ..." applies to every node (SHARD_PORT=off turns the shard-aware port
# off; it is on by default).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
ROUNDS=${ROUNDS:-3}
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() {
    # shellcheck disable=SC2086
    env ${NODE_ENV:-} ${4:-} ADDR="$1" PEERS="${2:-}" RUST_LOG=error NUM_SHARDS=2 CAPACITY=1000000 "${3:-$BIN/distributed-cache}" & pids+=($!)
}
single=127.0.0.1:$(free_port)
c1=127.0.0.1:$(free_port); c2=127.0.0.1:$(free_port); c3=127.0.0.1:$(free_port)
start "$single"; start "$c1"; start "$c2" "$c1"; start "$c3" "$c1"
converge "$c1"
declare -A target=([single]=$single [cluster-via-1]=$c1 [cluster-spread]="$c1,$c2,$c3")
labels=(single cluster-via-1 cluster-spread)
if [ -n "${NODE_B:-}${NODE_B_ENV:-}" ]; then
    NODE_B=${NODE_B:-$BIN/distributed-cache}
    b1=127.0.0.1:$(free_port); b2=127.0.0.1:$(free_port); b3=127.0.0.1:$(free_port)
    start "$b1" "" "$NODE_B" "${NODE_B_ENV:-}"; start "$b2" "$b1" "$NODE_B" "${NODE_B_ENV:-}"; start "$b3" "$b1" "$NODE_B" "${NODE_B_ENV:-}"
    converge "$b1"
    target[node-b-cluster-via-1]=$b1
    labels+=(node-b-cluster-via-1)
fi
"$BIN/distributed-cache" members --addr "$c1"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
LOAD=(--keys 100000 --duration 5 --warmup 1)
for l in "${labels[@]}"; do
    "$BIN/cache-bench" run --target "${target[$l]}" --connections 16 --concurrency 16 --keys 100000 --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
    for shape in "16x16 --connections 16 --concurrency 16" "1x1 --connections 1 --concurrency 1"; do
        read -r name conn_args <<<"$shape"
        for ratio in 0.0 1.0; do
            for l in "${labels[@]}"; do
                # shellcheck disable=SC2086
                out=$("$BIN/cache-bench" run --target "${target[$l]}" $conn_args "${LOAD[@]}" --read-ratio "$ratio")
                tput=$(echo "$out" | awk '/throughput/{print $2}')
                lat=$(echo "$out" | awk '/latency/{print $4, $8}')
                errs=$(echo "$out" | awk '/errors/{$1=""; print}')
                echo "round $round $name read=$ratio $l throughput $tput p50/p99 us $lat errors:${errs:- none}"
            done
        done
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
