#!/usr/bin/env bash
# TLS against plaintext, one node each, same binary, with h2load (Debian's nghttp2-client;
# it speaks TLS with ALPN h2): 16 connections x 16 streams of unary Gets of one present key
# (100-byte value) and of Sets of it, the two nodes alternately, ROUNDS rounds of DURATION
# seconds after a 1 s warm-up; then the same with cache-bench (16 x 16, random keys). Then
# the handshake rate: HANDSHAKES new TLS connections, one request each, against a node of
# one core (CORES=1), ROUNDS times. Last, two 3-node clusters (RF=3, W=R=2), one plaintext,
# one with TLS between clients and nodes and between nodes and a CLUSTER_SECRET, loaded
# alternately through their node 1 with cache-bench Sets and Gets. Certificates are made by
# `cache-bench certs`. About 5 minutes. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
HANDSHAKES=${HANDSHAKES:-2000}
command -v h2load >/dev/null || { echo "tls.sh: needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
work=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$BIN/cache-bench" certs --out "$work" --names 127.0.0.1,localhost >/dev/null
value=$(head -c 100 /dev/zero | tr '\0' v)
# pb.GetRequest{key: "bench-key"} and pb.SetRequest{key: "bench-key", value}, gRPC-framed.
python3 - "$work" "$value" <<'PY'
import struct, sys
k = b"bench-key"; v = sys.argv[2].encode()
get = b"\x0a" + bytes([len(k)]) + k
set_ = get + b"\x12" + bytes([len(v)]) + v
for name, m in (("get", get), ("set", set_)):
    open(f"{sys.argv[1]}/{name}.body", "wb").write(b"\x00" + struct.pack(">I", len(m)) + m)
PY
tls_env=(TLS_CERT_FILE="$work/node.pem" TLS_KEY_FILE="$work/node-key.pem")
declare -A addr pid scheme
addr[plain]=127.0.0.1:$(free_port); scheme[plain]=http
env ADDR="${addr[plain]}" RUST_LOG=error "$BIN/distributed-cache" & pids+=($!); pid[plain]=$!
addr[tls]=127.0.0.1:$(free_port); scheme[tls]=https
env ADDR="${addr[tls]}" RUST_LOG=error "${tls_env[@]}" "$BIN/distributed-cache" & pids+=($!); pid[tls]=$!
addr[tls1]=127.0.0.1:$(free_port); scheme[tls1]=https
env ADDR="${addr[tls1]}" RUST_LOG=error CORES=1 "${tls_env[@]}" "$BIN/distributed-cache" & pids+=($!); pid[tls1]=$!
for s in plain tls tls1; do
    ca=(); [ "$s" = plain ] || ca=(--ca "$work/ca.pem")
    for _ in $(seq 1 100); do
        "$BIN/distributed-cache" set bench-key "$value" --addr "${addr[$s]}" "${ca[@]}" >/dev/null 2>&1 && break
        sleep 0.1
    done
done
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
load() { # server method h2load-args...
    local s=$1 m=$2; shift 2
    h2load -t 1 -d "$work/$m.body" -H 'content-type: application/grpc' -H 'te: trailers' "$@" \
        "${scheme[$s]}://${addr[$s]}/pb.CacheService/${m^}" 2>&1
}
rps() { awk '/^finished in/ { for (i=1;i<=NF;i++) if ($i ~ /req\/s/) { v=$(i-1); gsub(",","",v); print v } }'; }
fails() { awk '/^requests:/ { print $8, $9, $10, $11 }'; }
# CPU time of a process and its threads, user and system, in clock ticks.
cpu() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
for round in $(seq 1 "$ROUNDS"); do
    for m in get set; do
        for s in plain tls; do
            read -r u0 s0 < <(cpu "${pid[$s]}")
            out=$(load "$s" "$m" -c 16 -m 16 --warm-up-time=1 -D "$DURATION")
            read -r u1 s1 < <(cpu "${pid[$s]}")
            r=$(echo "$out" | rps)
            # The node's CPU per request over warm-up and measurement (h2load counts only the
            # latter): h2load's one thread, with its own TLS, may be what bounds the rate.
            per=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tick" -v r="$r" -v d="$DURATION" \
                'BEGIN { printf "node cpu us/req %.2f", (u + s) / t * 1e6 / (r * (d + 1)) }')
            echo "round $round $m $s req/s $r ($(echo "$out" | fails)) $per"
        done
    done
done
# One request per connection: the rate is the node's handshakes (plus one call) on one core.
for round in $(seq 1 "$ROUNDS"); do
    out=$(load tls1 get -c "$HANDSHAKES" -n "$HANDSHAKES" -m 1)
    secs=$(echo "$out" | awk '/^finished in/ { v=$3; sub(/s,$/, "", v); if (v ~ /ms/) { sub(/ms/, "", v); v = v / 1000 } print v }')
    echo "round $round handshakes $HANDSHAKES in ${secs}s: $(awk -v n="$HANDSHAKES" -v s="$secs" 'BEGIN { printf "%.0f", n / s }') new TLS connections/s on one core ($(echo "$out" | fails))"
done
bench() { # server read-ratio cache-bench-args...
    local s=$1 ratio=$2; shift 2
    local ca=(); [ "$s" = plain ] || [ "$s" = cplain ] || ca=(--ca "$work/ca.pem")
    "$BIN/cache-bench" run --target "${addr[$s]}" --connections 16 --concurrency 16 --threads 1 \
        --read-ratio "$ratio" --duration "$DURATION" --warmup 1 "${ca[@]}" "$@" 2>&1 |
        awk '/throughput/ { t = $2 } /errors/ { e = $0 } END { print t " req/s" (e ? " " e : "") }'
}
for round in $(seq 1 "$ROUNDS"); do
    for m in get set; do
        ratio=1; [ "$m" = get ] || ratio=0
        for s in plain tls; do
            pre=(); [ "$m" = set ] || pre=(--prepopulate)
            echo "round $round cache-bench $m $s $(bench "$s" "$ratio" --keys 1000 "${pre[@]}")"
        done
    done
done
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh
secret_env=(CLUSTER_SECRET=bench-cluster-secret-0123456789 TLS_CA_FILE="$work/ca.pem")
cluster() { # name env...
    local name=$1 first; shift
    local a; a=127.0.0.1:$(free_port); first=$a
    for i in 1 2 3; do
        [ "$i" = 1 ] || a=127.0.0.1:$(free_port)
        local peers=""; [ "$i" = 1 ] || peers=$first
        env ADDR="$a" PEERS="$peers" RUST_LOG=error NUM_SHARDS=2 "$@" "$BIN/distributed-cache" & pids+=($!)
    done
    addr[$name]=$first
}
cluster cplain
cluster ctls "${tls_env[@]}" "${secret_env[@]}"
converge "${addr[cplain]}"
CACHE_CA_FILE="$work/ca.pem" converge "${addr[ctls]}"
for round in $(seq 1 "$ROUNDS"); do
    for m in set get; do
        ratio=1; [ "$m" = get ] || ratio=0
        for s in cplain ctls; do
            echo "round $round cluster $m $s $(bench "$s" "$ratio" --keys 10000)"
        done
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
