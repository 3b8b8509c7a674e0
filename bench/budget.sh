#!/usr/bin/env bash
# Does MAX_MEMORY hold? A node with MAX_MEMORY (default 256mb) takes Sets only, values of random
# sizes from 10 B to 100 KB (log-uniform, so slab cells and malloc'd entries both churn), over
# 1M keys, for DURATION seconds (default 60). RSS is read every second; the figure is the
# highest RSS against MAX_MEMORY plus the idle node's RSS (target: within 5%), with the shares
# and usage the node reports. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
MAX_MEMORY=${MAX_MEMORY:-256mb}
DURATION=${DURATION:-60}
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh

tmp=$(mktemp -d)
node_pid=""
cleanup() {
    [ -n "$node_pid" ] && { kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; }
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$1/status"; }
port=$(free_port)
env ADDR="127.0.0.1:$port" MAX_MEMORY="$MAX_MEMORY" TTL=0 MAX_RECV_MSG_SIZE=1048576 \
    "$BIN/distributed-cache" >"$tmp/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
budget=$(python3 -c "
import re
m = re.fullmatch(r'(\d+)(k|kb|m|mb|g|gb)?', '$MAX_MEMORY'.lower())
print(int(m.group(1)) * {'': 1, 'k': 1000, 'kb': 1024, 'm': 10**6, 'mb': 1 << 20, 'g': 10**9, 'gb': 1 << 30}[m.group(2) or ''])")
idle=$(rss "$node_pid")
echo "== MAX_MEMORY=$MAX_MEMORY ($budget B), idle RSS $((idle / 1000000)) MB, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN/cache-bench" run --target "127.0.0.1:$port" --read-ratio 0 --keys 1000000 \
    --value-bytes 10 --value-bytes-max 100000 --connections 4 --concurrency 4 \
    --duration "$DURATION" --warmup 0 --client plain >"$tmp/bench.txt" 2>&1 &
bench_pid=$!
max=0
samples=0
while kill -0 "$bench_pid" 2>/dev/null && [ "$samples" -lt $((DURATION + 60)) ]; do
    r=$(rss "$node_pid")
    [ "$r" -gt "$max" ] && max=$r
    samples=$((samples + 1))
    sleep 1
done
wait "$bench_pid" || { cat "$tmp/bench.txt"; exit 1; }
final=$(rss "$node_pid")
grep -E "throughput|req/s|errors" "$tmp/bench.txt" | head -5
"$BIN/distributed-cache" stats --addr "127.0.0.1:$port" | head -20
python3 - "$budget" "$idle" "$max" "$final" <<'PY'
import sys
budget, idle, peak, final = map(int, sys.argv[1:])
allowed = budget + idle
print(f"RSS peak {peak/1e6:.1f} MB, final {final/1e6:.1f} MB; MAX_MEMORY + idle = {allowed/1e6:.1f} MB;"
      f" peak / (MAX_MEMORY + idle) = {peak/allowed:.3f} (target <= 1.05)")
PY
echo "load after $(cut -d' ' -f1-3 /proc/loadavg)"
