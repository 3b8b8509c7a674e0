#!/usr/bin/env bash
# Memory per entry of the node, memcached and Redis, side by side and loaded the same way: for
# each value size (10, 100, 1000, 10000 B; keys of 16 B), a fresh server, its idle RSS, N
# distinct keys set once, its RSS once that has stopped growing, and the item count checked
# against N. N per size is N_10, N_100, N_1000, N_10000 (default 1,000,000, 1,000,000, 200,000,
# 20,000). Prints one markdown table (MB = 10^6 bytes) and writes the figures as JSON to OUT
# (default /tmp/memory.json). Takes a few minutes. Build first: cargo build --release --workspace
# Needs memcached 1.6 and redis-server 7 (Debian packages); installs pymemcache and redis-py.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=./target/release
OUT=${OUT:-/tmp/memory.json}
declare -A KEYS=([10]=${N_10:-1000000} [100]=${N_100:-1000000} [1000]=${N_1000:-200000} [10000]=${N_10000:-20000})
SETTLE_SECS=${SETTLE_SECS:-2}    # RSS counts as settled after this long without a new high
RSS_DEADLINE_SECS=60
LOAD_TIMEOUT_SECS=${LOAD_TIMEOUT_SECS:-900}
# shellcheck source=bench/cluster-lib.sh
. bench/cluster-lib.sh

for b in "$BIN/distributed-cache" "$BIN/cache-bench" /usr/bin/memcached /usr/bin/redis-server; do
    [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }
done
python3 -c 'import pymemcache, redis' 2>/dev/null || python3 -m pip install --quiet pymemcache redis

tmp=$(mktemp -d)
server_pid=""; server_log=""; helper_pid=""
cleanup() {
    local rc=$?
    for p in $helper_pid $server_pid; do kill "$p" 2>/dev/null || true; done
    for p in $helper_pid $server_pid; do wait "$p" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ] && [ -n "$server_log" ] && [ -s "$server_log" ]; then
        echo "--- last lines of $(basename "$server_log")" >&2; tail -n 20 "$server_log" >&2
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A dead server or a zombie both count as gone: kill -0 alone succeeds on a zombie.
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        alive "$server_pid" || { echo "$2 exited before listening on $1" >&2; exit 1; }
        sleep 0.1
    done
    echo "$2 not listening on $1 after 10 s" >&2; exit 1
}

# Starts server $1 on port $2 (value size $3 names its log) and waits until it listens.
start_server() {
    server_log="$tmp/$1-$3.log"
    local cmd
    case $1 in
        node) cmd=(env ADDR="127.0.0.1:$2" MAX_MEMORY=4gb TTL=0 CORES="$(nproc)" "$BIN/distributed-cache") ;;
        memcached) cmd=(/usr/bin/memcached -p "$2" -U 0 -l 127.0.0.1 -m 16384 -t 2 -u root) ;;
        # --dir keeps anything Redis might write out of the repository.
        redis) cmd=(/usr/bin/redis-server --port "$2" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$tmp") ;;
    esac
    # A simple command, not a compound one, so $! is the server itself (env execs the node)
    # and its VmRSS is the one read, not a subshell's.
    "${cmd[@]}" >"$server_log" 2>&1 &
    server_pid=$!
    wait_port "$2" "$1"
}

stop_server() {
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do alive "$server_pid" || break; sleep 0.1; done
    if alive "$server_pid"; then
        echo "server $server_pid still running 15 s after SIGTERM; SIGKILL" >&2
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=""; server_log=""
}

# Runs a loader in the background so a signal reaches the trap at once, bounded in time.
bounded() {
    timeout "$LOAD_TIMEOUT_SECS" "$@" & helper_pid=$!
    local rc=0
    wait "$helper_pid" || rc=$?
    helper_pid=""
    return "$rc"
}

rss() { python3 bench/memory.py rss "$server_pid" "$SETTLE_SECS" "$RSS_DEADLINE_SECS"; }

node_entries() {
    "$BIN/distributed-cache" stats --addr "127.0.0.1:$1" --timeout 10 |
        awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "entries") col = i; next }
             col && $1 ~ /^[0-9]+$/ { s += $col } END { if (!col) exit 1; print s + 0 }'
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== machine: $(nproc) cores, $(uname -r), load $load_before"
rows="$tmp/rows.tsv"; : >"$rows"
for value_bytes in 10 100 1000 10000; do
    n=${KEYS[$value_bytes]}
    for server in node memcached redis; do
        port=$(free_port)
        start_server "$server" "$port" "$value_bytes"
        idle=$(rss)
        echo "== $server: $n keys of 16 B + $value_bytes B (idle RSS $((idle / 1000000)) MB)"
        if [ "$server" = node ]; then
            bounded "$BIN/cache-bench" run --target "127.0.0.1:$port" --keys "$n" --key-bytes 16 \
                --value-bytes "$value_bytes" --prepopulate --requests 0 --duration 0.001 --warmup 0 \
                --client plain >"$tmp/load.log" 2>&1 || { cat "$tmp/load.log" >&2; echo "loading node failed" >&2; exit 1; }
        else
            bounded python3 bench/memory.py load "$server" "$port" "$n" "$value_bytes" ||
                { echo "loading $server failed" >&2; exit 1; }
        fi
        loaded=$(rss)
        if [ "$server" = node ]; then
            items=$(node_entries "$port") || { echo "no entry count from the node's stats" >&2; exit 1; }
        else
            items=$(python3 bench/memory.py count "$server" "$port")
        fi
        if [ "$items" != "$n" ]; then
            echo "$server holds $items items after loading $n keys of $value_bytes B" >&2; exit 1
        fi
        stop_server
        printf '%s\t%s\t%s\t%s\t%s\n' "$value_bytes" "$n" "$server" "$idle" "$loaded" >>"$rows"
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo
python3 bench/memory.py report "$rows" "$OUT" "$load_before" "$load_after" \
    "cores=$(nproc)" "key_bytes=16" "settle_secs=$SETTLE_SECS" \
    "node_commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "memcached=$(/usr/bin/memcached -V)" "redis=$(/usr/bin/redis-server --version | cut -d' ' -f3)"
echo
echo "load average before $load_before  after $load_after"
echo "figures in $OUT"
