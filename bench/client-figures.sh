#!/usr/bin/env bash
# The shard-aware client (cache-client, `cache-bench --client smart`) against the plain one
# (connections to the targets, requests served where they land), alternately in one run: a
# single node, and a 3-node cluster (RF=3, W=R=2) with the plain client through node 1 and the
# smart one seeded with node 1; 16 x 16, Sets then Gets, 100k keys, ROUNDS rounds (default 3)
# of 5 s after 1 s. Then what keeping the topology current costs: a smart client at 1
# request/s for 10 s, and the topology messages it received meanwhile. About 4 minutes.
# Build first: cargo build --release --workspace
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
    env ${NODE_ENV:-} ADDR="$1" PEERS="${2:-}" RUST_LOG=error CAPACITY=1000000 "$BIN/distributed-cache" & pids+=($!)
}
single=127.0.0.1:$(free_port)
c1=127.0.0.1:$(free_port)
start "$single"; start "$c1"; start "127.0.0.1:$(free_port)" "$c1"; start "127.0.0.1:$(free_port)" "$c1"
converge "$c1"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for t in "$single" "$c1"; do
    "$BIN/cache-bench" run --target "$t" --connections 16 --concurrency 16 --keys 100000 --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
    for ratio in 0.0 1.0; do
        for run in "single plain $single" "single smart $single" "cluster plain $c1" "cluster smart $c1"; do
            read -r what client t <<<"$run"
            out=$("$BIN/cache-bench" run --target "$t" --client "$client" --connections 16 --concurrency 16 \
                --keys 100000 --duration 5 --warmup 1 --read-ratio "$ratio")
            tput=$(echo "$out" | awk '/throughput/{print $2}')
            lat=$(echo "$out" | awk '/latency/{print $4, $8}')
            errs=$(echo "$out" | awk '/errors/{$1=""; print}')
            echo "round $round read=$ratio $what $client throughput $tput p50/p99 us $lat errors:${errs:- none}"
        done
    done
done
echo "== at rest: a smart client at 1 request/s for 10 s"
"$BIN/cache-bench" run --target "$c1" --client smart --connections 1 --concurrency 1 --threads 1 \
    --rate 1 --keys 100 --duration 10 --warmup 0 | grep -E 'topology|throughput'
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
