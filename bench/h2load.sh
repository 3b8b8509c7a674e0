#!/usr/bin/env bash
# Node against the gRPC ceiling (plain tonic, no store) with h2load, an HTTP/2 load generator
# nobody here wrote (Debian's nghttp2-client): unary Gets of one present key (100-byte value),
# 16 connections x 16 streams, the servers alternately, ROUNDS rounds of DURATION seconds
# after a 1 s warm-up. NODE_B=path also runs another build of the node in the rotation (an
# older commit, for a before/after in one run). nghttpd (Debian's nghttp2-server, a C HTTP/2
# server) also runs when installed, serving a 100-byte file at the same path to the same
# POSTs: what HTTP/2 alone costs, with no gRPC and no cache. NGHTTPD_WORKERS (default 1).
# Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
command -v h2load >/dev/null || { echo "h2load.sh: needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
docroot=
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -f "$body"; [ -z "$docroot" ] || rm -rf "$docroot"; }
body=$(mktemp)
trap cleanup EXIT
# pb.GetRequest{key: "bench-key"}, gRPC-framed.
python3 -c 'import sys,struct; k=b"bench-key"; m=b"\x0a"+bytes([len(k)])+k; sys.stdout.buffer.write(b"\x00"+struct.pack(">I",len(m))+m)' > "$body"

declare -A addr
addr[ceiling]=127.0.0.1:$(free_port)
declare -A pid
"$BIN/cache-bench" baseline --addr "${addr[ceiling]}" --store none >/dev/null 2>&1 & pids+=($!); pid[ceiling]=$!
addr[node]=127.0.0.1:$(free_port)
ADDR=${addr[node]} RUST_LOG=error CAPACITY=100000 "$BIN/distributed-cache" & pids+=($!); pid[node]=$!
servers=(ceiling node)
if command -v nghttpd >/dev/null; then
    docroot=$(mktemp -d)
    mkdir -p "$docroot/pb.CacheService"
    head -c 100 /dev/zero | tr '\0' v > "$docroot/pb.CacheService/Get"
    addr[nghttpd]=127.0.0.1:$(free_port)
    nghttpd --no-tls -n "${NGHTTPD_WORKERS:-1}" -a 127.0.0.1 -d "$docroot" "${addr[nghttpd]#*:}" >/dev/null 2>&1 & pids+=($!); pid[nghttpd]=$!
    servers+=(nghttpd)
fi
if [ -n "${NODE_B:-}" ]; then
    addr[node-b]=127.0.0.1:$(free_port)
    ADDR=${addr[node-b]} RUST_LOG=error CAPACITY=100000 "$NODE_B" & pids+=($!); pid[node-b]=$!
    servers+=(node-b)
fi
value=$(head -c 100 /dev/zero | tr '\0' v)
for s in node node-b; do
    [ -n "${addr[$s]:-}" ] || continue
    for _ in $(seq 1 100); do
        "$BIN/distributed-cache" set bench-key "$value" --addr "${addr[$s]}" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
sleep 0.5
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
load() {
    h2load -c 16 -m 16 -t 1 --warm-up-time=1 -D "$DURATION" -d "$body" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://$1/pb.CacheService/Get" 2>&1
}
# CPU time of a process and its threads, user and system, in clock ticks.
cpu() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
    for s in "${servers[@]}"; do
        read -r u0 s0 < <(cpu "${pid[$s]}")
        out=$(load "${addr[$s]}")
        read -r u1 s1 < <(cpu "${pid[$s]}")
        rps=$(echo "$out" | awk '/^finished in/ { for (i=1;i<=NF;i++) if ($i ~ /req\/s/) { v=$(i-1); gsub(",","",v); print v } }')
        done_=$(echo "$out" | awk '/^requests:/ { print $8 }')
        fails=$(echo "$out" | awk '/^requests:/ { print $8, $9, $10, $11 }')
        # CPU per request over warm-up and measurement (h2load counts only the latter).
        per=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tick" -v n="$done_" -v r="$rps" -v d="$DURATION" \
            'BEGIN { n = r * (d + 1); printf "cpu us/req user %.2f sys %.2f", u / t * 1e6 / n, s / t * 1e6 / n }')
        echo "round $round $s req/s $rps ($fails) $per"
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
