#!/usr/bin/env bash
# Instructions per request, counted by callgrind, of the node (one core) and of nghttpd (one
# worker, Debian's nghttp2-server: C, serving a 100-byte file) under the same h2load load:
# 16 connections x 16 streams of gRPC-framed Get POSTs to /pb.CacheService/Get. Where the
# node's count exceeds nghttpd's is what gRPC, the cache and our HTTP/2 cost beyond HTTP/2 in
# C. Usage: bench/h2-instructions.sh node|nghttpd (about a minute each); the profiles stay in
# $OUT for callgrind_annotate. NODE=path counts another build of the node. Build first:
# cargo build --release --workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
server=${1:?node or nghttpd}
REQUESTS=${REQUESTS:-50000}
OUT=${OUT:-/tmp/cache-bench/callgrind}
BIN=./target/release
mkdir -p "$OUT"
rm -f "$OUT/h2-$server".*
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
body=$(mktemp); docroot=$(mktemp -d)
python3 -c 'import sys,struct; k=b"bench-key"; m=b"\x0a"+bytes([len(k)])+k; sys.stdout.buffer.write(b"\x00"+struct.pack(">I",len(m))+m)' > "$body"
mkdir -p "$docroot/pb.CacheService"; head -c 100 /dev/zero | tr '\0' v > "$docroot/pb.CacheService/Get"
VG=(valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$OUT/h2-$server.%p")
if [ "$server" = node ]; then
    # One core: see callgrind.sh for why valgrind cannot run two of glommio's.
    ADDR=127.0.0.1:$port CORES=1 NUM_SHARDS=1 RUST_LOG=error "${VG[@]}" "${NODE:-$BIN/distributed-cache}" > "$OUT/h2-$server.log" 2>&1 &
else
    "${VG[@]}" nghttpd --no-tls -n 1 -a 127.0.0.1 -d "$docroot" "$port" > "$OUT/h2-$server.log" 2>&1 &
fi
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$body" "$docroot"' EXIT
load() {
    h2load -c 16 -m 16 -t 1 -d "$body" -H 'content-type: application/grpc' -H 'te: trailers' "$@" \
        "http://127.0.0.1:$port/pb.CacheService/Get" 2>&1
}
for _ in $(seq 1 120); do
    if [ "$server" = node ]; then
        "$BIN/distributed-cache" set bench-key "$(head -c 100 /dev/zero | tr '\0' v)" --addr "127.0.0.1:$port" >/dev/null 2>&1 && break
    else
        load -c 1 -m 1 -n 1 | grep -q '1 succeeded' && break
    fi
    sleep 1
done
load -n 5000 > /dev/null
callgrind_control -z "$pid" > /dev/null 2>&1
out=$(load -n "$REQUESTS")
callgrind_control -d "$pid" > /dev/null 2>&1
echo "$out" | grep -E '^requests:'
total=$(callgrind_annotate --threshold=100 "$OUT/h2-$server".*.1 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "$server: $total instructions for $REQUESTS requests, $((total / REQUESTS)) per request"
callgrind_annotate --threshold=90 "$OUT/h2-$server".*.1 2>/dev/null | sed -n '/file:function/,$p' | head -40
