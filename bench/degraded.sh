#!/usr/bin/env bash
# Degraded mode figures of bench/RESULTS.md: three nodes on loopback (RF=3, W=R=2), load through
# node 1 with cache-bench (2 connections x 2 streams, 1,000 keys, as the issue measured), and
# node 2 either cut off from nodes 1 and 3 (iptables OUTPUT rules matched by each node's user:
# every packet between them dropped, TCP and gossip; clients still reach all three) or paused
# (SIGSTOP). Gets and Sets are measured separately: 3 s before the fault, the first 3 s after
# it, and 3 s once node 1's failure detector holds node 2 DOWN; each period's ratio is taken
# against the "before" run just ahead of it. Needs root and iptables. About 2 minutes.
# Build first: cargo build --release --workspace. NODE_BIN=path runs another build of the node
# (an older commit, say) under the same load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
NODE_BIN=${NODE_BIN:-$BIN/distributed-cache}
ROUNDS=${ROUNDS:-2}
[ "$(id -u)" = 0 ] || { echo "degraded.sh: needs root (iptables, setpriv)" >&2; exit 1; }
command -v iptables >/dev/null || { echo "degraded.sh: needs iptables" >&2; exit 1; }

free_port() {
    python3 -c 'import socket
while True:
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]
    u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1",p)); print(p); break
    except OSError: pass'
}
ports=($(free_port) $(free_port) $(free_port))
mports=($(free_port) $(free_port) $(free_port))
addrs=("127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}")
uid0=$((300000 + $$ % 10000 * 3))
uids=($uid0 $((uid0 + 1)) $((uid0 + 2)))
chain="DC_BENCH_$$"
pids=()
out=$(mktemp -d)

heal() {
    iptables -w -D OUTPUT -j "$chain" 2>/dev/null || true
    iptables -w -F "$chain" 2>/dev/null || true
    iptables -w -X "$chain" 2>/dev/null || true
}
cleanup() {
    heal
    [ ${#pids[@]} -gt 1 ] && kill -CONT "${pids[1]}" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT

cut_off() {
    iptables -w -N "$chain"
    iptables -w -I OUTPUT -j "$chain"
    for other in 0 2; do
        for pair in "${uids[1]} ${ports[$other]}" "${uids[$other]} ${ports[1]}"; do
            set -- $pair
            for proto in tcp udp; do
                iptables -w -A "$chain" -m owner --uid-owner "$1" -p "$proto" --dport "$2" -j DROP
            done
        done
    done
}

for i in 0 1 2; do
    ADDR=${addrs[$i]} PEERS=${addrs[0]} RUST_LOG=error NUM_SHARDS=2 CAPACITY=1000000 \
        METRICS_ADDR=127.0.0.1:${mports[$i]} \
        setpriv --reuid="${uids[$i]}" --regid="${uids[$i]}" --clear-groups \
        "$NODE_BIN" &
    pids+=($!)
done

# state_of NODE ADDR: ADDR's state as NODE sees it.
state_of() {
    "$BIN/distributed-cache" members --addr "$1" 2>/dev/null | awk -v a="$2" '$0 ~ a {for (i=1;i<=NF;i++) if ($i ~ /^(ALIVE|SUSPECT|DOWN)$/) print $i}' | head -1
}
# wait_for NODE ADDR STATE: polls every 100 ms, at most 30 s.
wait_for() {
    for _ in $(seq 1 300); do
        [ "$(state_of "$1" "$2")" = "$3" ] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $2 to be $3 on $1" >&2
    exit 1
}
# hints_queued: hints the three nodes still hold for replicas that were away.
hints_queued() {
    for m in "${mports[@]}"; do
        python3 -c 'import sys, urllib.request
body = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode()
print(int(sum(float(l.split()[-1]) for l in body.splitlines() if l.startswith("cache_hints_queued"))))' "$m"
    done | awk '{ s += $1 } END { print s }'
}
# converged: every node sees every other ALIVE, and the hints of the last fault are delivered,
# so that the next "before" run does not pay for the catch-up.
converged() {
    for n in 0 1 2; do for a in 0 1 2; do
        [ "$n" = "$a" ] || wait_for "${addrs[$n]}" "${addrs[$a]}" ALIVE
    done; done
    for _ in $(seq 1 300); do
        [ "$(hints_queued)" = 0 ] && return 0
        sleep 0.1
    done
    echo "hints not delivered within 30 s" >&2
    exit 1
}
converged
"$BIN/distributed-cache" members --addr "${addrs[0]}"

LOAD=(--target "${addrs[0]}" --connections 2 --concurrency 2 --keys 1000 --rpc-timeout 5)
"$BIN/cache-bench" run "${LOAD[@]}" --prepopulate --requests 0 --duration 0.01 --warmup 0 >/dev/null

# measure LABEL RATIO WARMUP: one 3 s run; prints "ok/s p50 p99 errors".
measure() {
    local r
    r=$("$BIN/cache-bench" run "${LOAD[@]}" --read-ratio "$2" --duration 3 --warmup "$3")
    echo "$r" > "$out/$1"
    echo "$r" | awk '
        /throughput/ { for (i=1;i<=NF;i++) { if ($i=="ok") ok=$(i+1); if ($i=="in") s=$(i+1) } }
        /latency/ { for (i=1;i<=NF;i++) { if ($i=="p50") p50=$(i+1); if ($i=="p99") p99=$(i+1) } }
        /errors/ { $1=""; err=$0 }
        END { sub("s","",s); printf "%.0f %d %d %s\n", ok/s, p50, p99, (err=="" ? "none" : err) }'
}

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-6s %-4s %-14s %9s %7s %7s %7s %7s  %s\n" fault op period "ok/s" "x" "p50us" "p99us" "p99 x" errors
row() { # fault op period base_rps base_p99 "rps p50 p99 errs"
    local fault=$1 op=$2 period=$3 base=$4 base_p99=$5
    set -- $6
    local rps=$1 p50=$2 p99=$3; shift 3
    awk -v f="$fault" -v o="$op" -v p="$period" -v b="$base" -v bp="$base_p99" -v r="$rps" -v p50="$p50" -v p99="$p99" -v e="$*" \
        'BEGIN { printf "%-6s %-4s %-14s %9d %7.2f %7d %7d %7.2f  %s\n", f, o, p, r, r/b, p50, p99, p99/bp, e }'
}
for round in $(seq 1 "$ROUNDS"); do
    for fault in cut pause; do
        for op in get set; do
            ratio=$([ $op = get ] && echo 1.0 || echo 0.0)
            read -r b_rps b_p50 b_p99 b_err <<<"$(measure "$round-$fault-$op-before" "$ratio" 1)"
            row "$fault" "$op" "before" "$b_rps" "$b_p99" "$b_rps $b_p50 $b_p99 $b_err"
            if [ $fault = cut ]; then cut_off; else kill -STOP "${pids[1]}"; fi
            first=$(measure "$round-$fault-$op-first" "$ratio" 0)
            row "$fault" "$op" "first 3 s" "$b_rps" "$b_p99" "$first"
            t=$(date +%s.%N)
            wait_for "${addrs[0]}" "${addrs[1]}" DOWN
            verdict=$(measure "$round-$fault-$op-verdict" "$ratio" 0)
            row "$fault" "$op" "after verdict" "$b_rps" "$b_p99" "$verdict"
            if [ $fault = cut ]; then heal; else kill -CONT "${pids[1]}"; fi
            converged
        done
    done
done
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
