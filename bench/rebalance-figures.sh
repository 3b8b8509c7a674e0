#!/usr/bin/env bash
# The data-movement figures of bench/RESULTS.md, on this machine's shared cores:
#  1. anti-entropy bytes exchanged to repair 1 differing key in 1,000,000 (3 nodes, RF=3);
#  2. client throughput (Get 90% / Set 10%) in steady state, then while a 4th node joins and
#     takes over its share, same settings;
#  3. the time for the 4th node to hold its share of the 1,000,000 keys.
# About 3 minutes. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
KEYS=1000000
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
declare -A metrics
start() {
    local m=127.0.0.1:$(free_port)
    metrics[$1]=$m
    ADDR=$1 PEERS=${2:-} METRICS_ADDR=$m RUST_LOG=error CAPACITY=2000000 ANTI_ENTROPY_INTERVAL=5 \
        "$BIN/distributed-cache" & pids+=($!)
}
scrape_sum() { # metric name, nodes...
    local name=$1; shift
    for n in "$@"; do curl -sf "http://${metrics[$n]}/metrics"; done |
        awk -v n="$name" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
entries() { scrape_sum cache_entries "$1"; }
# Polls a condition every 0.2 s for at most $1 seconds; gives up the whole run if it never holds.
within() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out: $*" >&2; exit 1; }
        sleep 0.2
    done
}
rounds() { scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3"; }
rounds_past() { [ "$(rounds)" -ge "$1" ]; }
alive() { "$BIN/distributed-cache" members --addr "$1" 2>/dev/null | grep -c ALIVE || true; }

c1=127.0.0.1:$(free_port); c2=127.0.0.1:$(free_port); c3=127.0.0.1:$(free_port)
start "$c1"; start "$c2" "$c1"; start "$c3" "$c1"
for i in $(seq 1 100); do [ "$(alive "$c1")" = 3 ] && break; sleep 0.1; done
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$BIN/cache-bench" run --target "$c1,$c2,$c3" --keys $KEYS --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null
for i in $(seq 1 600); do
    total=$(( $(entries "$c1") + $(entries "$c2") + $(entries "$c3") ))
    [ "$total" = $((3 * KEYS)) ] && break; sleep 0.1
done
echo "loaded: $total copies of $KEYS keys"

echo "== 1. one differing key in $KEYS"
# Let a full round pass on every node after the load, then diverge one key on node 3.
r0=$(scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3")
within 60 rounds_past $((r0 + 6))
b0=$(scrape_sum cache_anti_entropy_bytes_total "$c1" "$c2" "$c3")
r0=$(scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3")
hlc=$(( ($(date +%s%3N) + 60000) << 16 ))
grpcurl -plaintext -d "{\"key\":\"$(printf k%015d 4242 | base64)\",\"value\":\"$(printf diverged | base64)\",\"hlc\":\"$hlc\",\"node\":1}" \
    "$c3" pb.PeerService/Write >/dev/null
t0=$(date +%s%3N)
# ONE through node 1 reads only node 1's replica, so the read repairs nothing itself.
one_on_1() { grpcurl -plaintext -d "{\"key\":\"$(printf k%015d 4242)\",\"consistency\":\"ONE\"}" "$c1" pb.CacheService/Get 2>/dev/null; }
repaired() { one_on_1 | grep -q '"diverged"'; }
within 60 repaired
t1=$(date +%s%3N)
b1=$(scrape_sum cache_anti_entropy_bytes_total "$c1" "$c2" "$c3")
r1=$(scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3")
held=$(scrape_sum cache_entry_bytes "$c1")
echo "repaired on node 1 after $((t1 - t0)) ms: $((b1 - b0)) bytes exchanged in $((r1 - r0)) rounds (3 nodes);" \
     "one replica holds $held bytes of entries ($(python3 -c "print(f'{100*($b1-$b0)/$held:.4f}')")%)"
# What a round costs when nothing differs, for reference.
b2=$(scrape_sum cache_anti_entropy_bytes_total "$c1" "$c2" "$c3"); r2=$(scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3")
within 60 rounds_past $((r2 + 3))
b3=$(scrape_sum cache_anti_entropy_bytes_total "$c1" "$c2" "$c3"); r3=$(scrape_sum cache_anti_entropy_rounds_total "$c1" "$c2" "$c3")
echo "idle: $((b3 - b2)) bytes in $((r3 - r2)) rounds"

echo "== 2. throughput, steady then during a join (16x16, read ratio 0.9, spread over nodes 1-3)"
LOAD=(--target "$c1,$c2,$c3" --connections 16 --concurrency 16 --keys $KEYS --read-ratio 0.9 --warmup 1)
"$BIN/cache-bench" run "${LOAD[@]}" --duration 10 | grep -E "throughput|latency|errors" | sed 's/^/steady: /'
c4=127.0.0.1:$(free_port)
"$BIN/cache-bench" run "${LOAD[@]}" --duration 10 > /tmp/rebalance-load.$$ &
bench=$!
sleep 1
t0=$(date +%s%3N)
start "$c4" "$c1"
echo "== 3. the 4th node takes over its share"
prev=-1; stable_since=0
for i in $(seq 1 1200); do
    n=$(entries "$c4" 2>/dev/null || echo 0)
    if [ "$n" = "$prev" ] && [ "$n" -gt 0 ]; then
        [ "$stable_since" = 0 ] && stable_since=$(date +%s%3N)
        [ $(( $(date +%s%3N) - stable_since )) -ge 2000 ] && break
    else
        stable_since=0; last_change=$(date +%s%3N)
    fi
    prev=$n; sleep 0.1
done
wait $bench
grep -E "throughput|latency|errors" /tmp/rebalance-load.$$ | sed 's/^/during join: /'; rm -f /tmp/rebalance-load.$$
share=$("$BIN/distributed-cache" members --addr "$c4" | awk -v a="$c4" '$1 == a {print}')
echo "4th node holds $prev entries $((last_change - t0)) ms after it started (stable for 2 s after); members line: $share"
dropped() { [ $(( $(entries "$c1") + $(entries "$c2") + $(entries "$c3") + $(entries "$c4") )) = $((3 * KEYS)) ]; }
within 180 dropped
echo "former replicas dropped theirs $(( $(date +%s%3N) - t0 )) ms after the start (transition window 20 s)"
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
