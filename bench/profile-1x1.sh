#!/usr/bin/env bash
# Where a 1 x 1 Set through a 3-node cluster (RF=3, W=2) spends its time: cache-bench 1 x 1
# Sets through node 1 while `perf stat` counts, for DURATION seconds, the CPU time, context
# switches and system calls of node 1 (the coordinator) and node 2 (a replica); printed per
# request. NODE_ENV="KEY=VALUE ..." starts the nodes with more environment (SPIN_BEFORE_PARK_US=0,
# say). Needs perf (Debian's linux-perf). Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
DURATION=${DURATION:-3}
command -v perf >/dev/null || { echo "profile-1x1.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
pids=()
out=$(mktemp)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -f "$out"; }
trap cleanup EXIT
start() {
    # shellcheck disable=SC2086
    env ${NODE_ENV:-} ADDR="$1" PEERS="${2:-}" RUST_LOG=error CAPACITY=1000000 "$BIN/distributed-cache" & pids+=($!)
}
c1=127.0.0.1:$(free_port)
start "$c1"; start "127.0.0.1:$(free_port)" "$c1"; start "127.0.0.1:$(free_port)" "$c1"
converge "$c1"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)${NODE_ENV:+, nodes: $NODE_ENV}"
"$BIN/cache-bench" run --target "$c1" --connections 1 --concurrency 1 --threads 1 --read-ratio 0 \
    --duration $((2 * DURATION + 2)) --warmup 1 --json "$out.json" > "$out" 2>&1 &
bench=$!
sleep 1
events='task-clock,context-switches,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_write,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom'
for i in 0 1; do
    role=coordinator; [ "$i" = 1 ] && role=replica
    perf stat -x, -p "${pids[$i]}" -e "$events" -- sleep "$DURATION" 2> "$out.$i" >/dev/null
done
wait "$bench"
rps=$(awk '/throughput/ { print $2 }' "$out")
grep -E 'throughput|p50' "$out"
for i in 0 1; do
    role=coordinator; [ "$i" = 1 ] && role=replica
    awk -F, -v r="$rps" -v d="$DURATION" -v role="$role" '
        $3 == "task-clock" { printf "%s: CPU %.1f us per request", role, $1 * 1000 / (r * d) }
        $3 != "task-clock" && $3 != "" { n = $3; sub("syscalls:sys_enter_", "", n); printf ", %s %.2f", n, $1 / (r * d) }
        END { print "" }' "$out.$i"
done
rm -f "$out".0 "$out".1 "$out.json"
