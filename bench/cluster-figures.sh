#!/usr/bin/env bash
# The cluster figures of bench/RESULTS.md: a single node and a 3-node cluster (RF=3, W=R=2),
# all sharing this machine's cores, loaded alternately with the same settings: Set and Get
# through one node and spread over all three, against the single node. About 4 minutes.
# Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { ADDR=$1 PEERS=${2:-} RUST_LOG=error NUM_SHARDS=2 CAPACITY=1000000 "$BIN/distributed-cache" & pids+=($!); }
single=127.0.0.1:$(free_port)
c1=127.0.0.1:$(free_port); c2=127.0.0.1:$(free_port); c3=127.0.0.1:$(free_port)
start "$single"; start "$c1"; start "$c2" "$c1"; start "$c3" "$c1"
for i in $(seq 1 100); do
    n=$("$BIN/distributed-cache" members --addr "$c1" 2>/dev/null | grep -c ALIVE || true)
    [ "$n" = 3 ] && break; sleep 0.1
done
"$BIN/distributed-cache" members --addr "$c1"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
LOAD=(--connections 16 --concurrency 16 --keys 100000 --duration 5 --warmup 1)
for t in "$single" "$c1" "$c1,$c2,$c3"; do
    "$BIN/cache-bench" run --target "$t" --connections 16 --concurrency 16 --keys 100000 --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null
done
for round in 1 2 3; do
    for ratio in 0.0 1.0; do
        for t in "$single" "$c1" "$c1,$c2,$c3"; do
            label=$([ "$t" = "$single" ] && echo single || ([ "$t" = "$c1" ] && echo "cluster-via-1" || echo "cluster-spread"))
            out=$("$BIN/cache-bench" run --target "$t" "${LOAD[@]}" --read-ratio "$ratio")
            tput=$(echo "$out" | awk '/throughput/{print $2}')
            lat=$(echo "$out" | awk '/latency/{print $4, $8}')
            errs=$(echo "$out" | awk '/errors/{$1=""; print}')
            echo "round $round read=$ratio $label throughput $tput p50/p99 us $lat errors:${errs:- none}"
        done
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
