#!/usr/bin/env bash
# CPU time per request, natively, of one server and of the load generator under 16 x 16 load
# (the server's from /proc/PID/stat, the generator's from its own rusage), for when a
# throughput ratio moves and the question is who spent the cores. Usage:
#   bench/cpu.sh node|none|mutex [READ_RATIO] [ROUNDS]      (about 15 s a round)
# Build first: cargo build --release --workspace. NODE_ENV="A=1 B=2" adds node environment.
set -euo pipefail
cd "$(dirname "$0")/.."
server=${1:?node, none or mutex}
ratio=${2:-1.0}
rounds=${3:-1}
BIN=./target/release
OUT=${OUT:-/tmp/cache-bench/cpu}
mkdir -p "$OUT"
tick=$(getconf CLK_TCK)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$server" = node ]; then
    # shellcheck disable=SC2086 # NODE_ENV is a list of words on purpose
    env ADDR=127.0.0.1:$port RUST_LOG=error ${NODE_ENV:-} "${NODE:-$BIN/distributed-cache}" \
        > "$OUT/$server.log" 2>&1 &
else
    "$BIN/cache-bench" baseline --addr "127.0.0.1:$port" --store "$server" > "$OUT/$server.log" 2>&1 &
fi
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
run() { "$BIN/cache-bench" run --target "127.0.0.1:$port" --read-ratio "$ratio" "$@"; }
for _ in $(seq 1 100); do
    run --connections 1 --concurrency 1 --requests 1 --warmup 0 --keys 1 > /dev/null 2>&1 && break
    sleep 0.1
done
run --connections 16 --concurrency 16 --keys 100000 --prepopulate --requests 1 --warmup 0 > /dev/null
# Fields 14 and 15 of /proc/PID/stat (utime, stime) in clock ticks; the name field has no spaces.
cpu() { awk '{ print $14, $15 }' "/proc/$pid/stat"; }
for r in $(seq 1 "$rounds"); do
    read -r u0 s0 < <(cpu)
    # TIMEFORMAT gives the generator's own user and system seconds.
    { time -p run --connections 16 --concurrency 16 --keys 100000 --warmup 0 --duration 5 \
        --json "$OUT/$server-$ratio.json" > /dev/null; } 2> "$OUT/$server-$ratio.time"
    read -r u1 s1 < <(cpu)
    python3 - "$OUT/$server-$ratio.json" "$OUT/$server-$ratio.time" "$u0" "$s0" "$u1" "$s1" "$tick" "$server" "$r" <<'EOF'
import json, sys
doc, timef, u0, s0, u1, s1, tick, server, r = sys.argv[1:]
rep = json.load(open(doc))["report"]
n = rep["requests"]
t = dict(l.split() for l in open(timef) if l.split() and l.split()[0] in ("user", "sys"))
us = lambda ticks: int(ticks) / int(tick) * 1e6 / n
print(f"{server} round {r}: {rep['throughput_rps']:,.0f} req/s; server user {us(int(u1)-int(u0)):.1f} + sys "
      f"{us(int(s1)-int(s0)):.1f} us/request; generator user {float(t['user'])*1e6/n:.1f} + sys "
      f"{float(t['sys'])*1e6/n:.1f} us/request")
EOF
done
