#!/usr/bin/env bash
# Re-measures every figure in bench/RESULTS.md (about 9 minutes on 2 cores). Build first:
#   cargo build --release --workspace
# Output goes to stdout and JSON files under ${OUT:-/tmp/cache-bench}.
set -euo pipefail
cd "$(dirname "$0")/.."
B=./target/release/cache-bench
OUT=${OUT:-/tmp/cache-bench}
mkdir -p "$OUT"
COMMON=(--connections 16 --concurrency 16 --keys 100000 --key-bytes 16 --value-bytes 100 --duration 5 --warmup 1 --rounds 3)
cores=$(nproc)
echo "== machine: $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
for shards in "$cores" 64; do
    echo "== Get, NUM_SHARDS=$shards"
    $B compare "${COMMON[@]}" --read-ratio 1.0 --node-env NUM_SHARDS=$shards --node-env RUST_LOG=error --json "$OUT/get-$shards.json"
    echo "== Set, NUM_SHARDS=$shards"
    $B compare "${COMMON[@]}" --read-ratio 0.0 --node-env NUM_SHARDS=$shards --node-env RUST_LOG=error --json "$OUT/set-$shards.json"
done
# 1x1 latency on one key (key 0 is on core 1 and key 2 on core 0 with 2 shards); the
# connection lands on either core, and each node round says which: local or one hop away.
for first in 0 2; do
    echo "== 1 connection x 1 stream, Get of key index $first"
    $B compare --connections 1 --concurrency 1 --keys 1 --first-key $first --read-ratio 1.0 --duration 5 --warmup 1 --rounds 5 \
        --node-env RUST_LOG=error --json "$OUT/latency-key$first.json"
done
echo "== memory: 1,000,000 keys of 16 B + 100 B"
$B compare --connections 4 --concurrency 16 --keys 1000 --read-ratio 1.0 --duration 1 --warmup 0 --rounds 1 \
    --memory-keys 1000000 --node-env RUST_LOG=error --json "$OUT/memory.json"
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
