#!/usr/bin/env bash
# Replica bytes on the wire per Set, from the coordinator's metrics: three nodes (RF=3, W=2),
# REQUESTS Sets (default 100,000, 16 x 16, 100k keys of 16 B with 100 B values) through node 1,
# and cache_peer_bytes_total on node 1 before and after: bytes its cores sent to and received
# from the replicas, HTTP/2 framing included, divided by the Sets; and the replica requests per
# batch call (cache_replica_calls_total / cache_replica_batches_total). NODE_ENV="KEY=VALUE ..."
# starts the nodes with more environment. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
REQUESTS=${REQUESTS:-100000}
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
metrics=127.0.0.1:$(free_port)
c1=127.0.0.1:$(free_port); c2=127.0.0.1:$(free_port); c3=127.0.0.1:$(free_port)
start() {
    # shellcheck disable=SC2086
    env ${NODE_ENV:-} ${3:-} ADDR="$1" PEERS="${2:-}" RUST_LOG=error CAPACITY=1000000 "$BIN/distributed-cache" & pids+=($!)
}
start "$c1" "" "METRICS_ADDR=$metrics"; start "$c2" "$c1"; start "$c3" "$c1"
converge "$c1"
bytes() {
    curl -s "http://$metrics/metrics" 2>/dev/null || python3 -c "import urllib.request; print(urllib.request.urlopen('http://$metrics/metrics').read().decode())"
}
sum() { awk -v m="$1" '$1 ~ "^"m { s += $2 } END { printf "%d", s }'; }
way() { awk -v w="$1" '$1 ~ /^cache_peer_bytes_total/ && $1 ~ "direction=\""w"\"" { s += $2 } END { printf "%d", s }'; }
# Warm-up: connections, layouts, the replicas' HPACK tables.
"$BIN/cache-bench" run --target "$c1" --connections 16 --concurrency 16 --keys 100000 --read-ratio 0 --duration 1 --warmup 0 >/dev/null
before=$(bytes); sent0=$(echo "$before" | way sent); recv0=$(echo "$before" | way received)
calls0=$(echo "$before" | sum cache_replica_calls_total); batches0=$(echo "$before" | sum cache_replica_batches_total)
"$BIN/cache-bench" run --target "$c1" --connections 16 --concurrency 16 --keys 100000 --read-ratio 0 --requests "$REQUESTS" --duration 600 --warmup 0 | grep -E 'throughput|errors'
after=$(bytes); sent1=$(echo "$after" | way sent); recv1=$(echo "$after" | way received)
calls1=$(echo "$after" | sum cache_replica_calls_total); batches1=$(echo "$after" | sum cache_replica_batches_total)
echo "replica bytes per Set (node 1, ${REQUESTS} Sets): sent $(( (sent1 - sent0) / REQUESTS )), received $(( (recv1 - recv0) / REQUESTS ))"
if [ "$batches1" -gt "$batches0" ]; then
    echo "replica requests per batch call: $(( (calls1 - calls0) / (batches1 - batches0) )) ($(( calls1 - calls0 )) requests, $(( batches1 - batches0 )) batches)"
fi
