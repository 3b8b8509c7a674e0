#!/usr/bin/env bash
# Instructions per request of one server under 16 x 16 load, counted by callgrind: unlike a
# wall-clock figure, the count repeats whatever else the shared cores are doing. Usage:
#   bench/callgrind.sh node|none|mutex [READ_RATIO]     (about 2 minutes each)
# Build first: cargo build --release --workspace. Needs valgrind. NODE=path/to/distributed-cache
# profiles another build of the node (an earlier commit's, for a before/after). The profile of the measured
# requests only (start-up and pre-population are zeroed out) is left in $OUT/<server>-<ratio>.*,
# for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
server=${1:?node, none or mutex}
ratio=${2:-1.0}
REQUESTS=${REQUESTS:-20000}
OUT=${OUT:-/tmp/cache-bench/callgrind}
BIN=./target/release
mkdir -p "$OUT"
rm -f "$OUT/$server-$ratio".*
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Threads that spin while waiting (glommio's executors do) crawl under valgrind's default
# scheduler; --fair-sched hands the lock round. valgrind 3.19 keeps its thread lock through
# io_uring_enter, so while one core sleeps there waiting for completions every other thread
# stands still (seen with vgdb: core-0 "Runnable" inside io_uring_enter, core-1 back from a
# non-blocking send and waiting for the lock), and with two cores requests wait up to a minute
# (never natively). So the node runs on one core here: the count is that of the HTTP/2 path,
# the request handling and the shard, without the cross-core hop.
VG=(valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$OUT/$server-$ratio.%p")
if [ "$server" = node ]; then
    ADDR=127.0.0.1:$port CORES=1 NUM_SHARDS=1 CAPACITY=2000 RUST_LOG=error \
        "${VG[@]}" "${NODE:-$BIN/distributed-cache}" > "$OUT/$server-$ratio.log" 2>&1 &
else
    "${VG[@]}" "$BIN/cache-bench" baseline --addr "127.0.0.1:$port" --store "$server" \
        > "$OUT/$server-$ratio.log" 2>&1 &
fi
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
run() { "$BIN/cache-bench" run --target "127.0.0.1:$port" --rpc-timeout 60 --read-ratio "$ratio" "$@"; }
up=0
for _ in $(seq 1 120); do
    if run --connections 1 --concurrency 1 --requests 1 --warmup 0 --keys 1 > /dev/null 2>&1; then
        up=1
        break
    fi
    sleep 1
done
[ "$up" = 1 ] || { echo "$server did not come up under valgrind; see $OUT/$server-$ratio.log"; exit 1; }
run --connections 16 --concurrency 16 --keys 1000 --prepopulate --warmup 2 --duration 3 > /dev/null
callgrind_control -z "$pid" > /dev/null
run --connections 16 --concurrency 16 --keys 1000 --warmup 0 --requests "$REQUESTS" --duration 300 | tee "$OUT/$server-$ratio.bench"
callgrind_control -d "$pid" > /dev/null
served=$(grep -oP 'requests \K[0-9]+' "$OUT/$server-$ratio.bench" | head -1)
total=$(callgrind_annotate --threshold=100 "$OUT/$server-$ratio".*.1 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$server read-ratio $ratio: $total instructions for $served requests, $((total / served)) per request"
