#!/usr/bin/env bash
# What LINEARIZABLE costs against QUORUM: three nodes on this machine (RF=3, W=R=2), load
# through node 1, the two levels alternately with the same settings, several rounds: Sets,
# Gets, and a 90/10 mix on a skewed key space (where reads meet writes in flight and write
# back), at 16 x 16 for throughput and at 1 x 1 for latency. About 4 minutes.
# Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
ROUNDS=${ROUNDS:-3}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { ADDR=$1 PEERS=${2:-} RUST_LOG=error NUM_SHARDS=2 CAPACITY=1000000 "$BIN/distributed-cache" & pids+=($!); }
c1=127.0.0.1:$(free_port); c2=127.0.0.1:$(free_port); c3=127.0.0.1:$(free_port)
start "$c1"; start "$c2" "$c1"; start "$c3" "$c1"
for _ in $(seq 1 100); do
    n=$("$BIN/distributed-cache" members --addr "$c1" 2>/dev/null | grep -c ALIVE || true)
    [ "$n" = 3 ] && break; sleep 0.1
done
"$BIN/distributed-cache" members --addr "$c1"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN/cache-bench" run --target "$c1" --keys 100000 --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null
for round in $(seq 1 "$ROUNDS"); do
    for shape in "16x16 --connections 16 --concurrency 16" "1x1 --connections 1 --concurrency 1"; do
        read -r name conn_args <<<"$shape"
        for work in "set --read-ratio 0.0" "get --read-ratio 1.0" "mix90/10-zipf --read-ratio 0.9 --dist zipf:0.99"; do
            read -r wname wargs <<<"$work"
            # Which level goes first alternates by round, so a trend in the machine's load
            # does not favour one.
            levels="quorum linearizable"; [ $((round % 2)) = 0 ] && levels="linearizable quorum"
            for level in $levels; do
                # shellcheck disable=SC2086
                out=$("$BIN/cache-bench" run --target "$c1" $conn_args --keys 100000 --duration 4 --warmup 1 $wargs --consistency "$level")
                tput=$(echo "$out" | awk '/throughput/{print $2}')
                lat=$(echo "$out" | awk '/latency/{print $4, $8}')
                errs=$(echo "$out" | awk '/errors/{$1=""; print}')
                echo "round $round $name $wname $level throughput $tput p50/p99 us $lat errors:${errs:- none}"
            done
        done
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
