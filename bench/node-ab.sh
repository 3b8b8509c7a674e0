#!/usr/bin/env bash
# Two builds of the node side by side in one run: NODE_A and NODE_B (paths to binaries, e.g. an
# older commit's), each started fresh per round, loaded by cache-bench with 16 connections x 16
# streams, Sets then Gets (100k keys of 16 B, 100-byte values, prepopulated) for DURATION
# seconds after a 1 s warm-up, alternately for ROUNDS rounds. Prints req/s per round and the
# B / A ratio of the medians. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
A=${NODE_A:?path of build A}; B=${NODE_B:?path of build B}
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5}
BENCH=./target/release/cache-bench
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
pid=""
cleanup() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; }
trap cleanup EXIT
out=$(mktemp)
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    for which in A B; do
        bin=$A; [ "$which" = B ] && bin=$B
        port=$(free_port)
        ADDR="127.0.0.1:$port" TTL=0 "$bin" >/dev/null 2>&1 & pid=$!
        for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
        for op in set get; do
            ratio=0; [ "$op" = get ] && ratio=1
            rps=$(timeout 120 "$BENCH" run --target "127.0.0.1:$port" --connections 16 --concurrency 256 \
                --keys 100000 --key-bytes 16 --value-bytes 100 --read-ratio "$ratio" --prepopulate \
                --duration "$DURATION" --warmup 1 --client plain 2>&1 | awk '/req\/s/ { for (i = 1; i <= NF; i++) if ($i ~ /req\/s/) { print $(i-1); exit } }')
            echo "$which $op $r $rps" | tee -a "$out"
        done
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
    done
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
for op in set get; do
    a=$(awk -v op=$op '$1 == "A" && $2 == op { print $4 }' "$out" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    b=$(awk -v op=$op '$1 == "B" && $2 == op { print $4 }' "$out" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    echo "$op: A median $a, B median $b, B / A $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", b / a }')"
done
rm -f "$out"
