#!/usr/bin/env bash
# The Docker image and the 3-node compose cluster, tested on a real engine. No registry is
# reachable here, so the runtime base image is made locally (debootstrap a minimal Debian,
# docker import) and the image is built with `--target runtime-prebuilt` from the binary that
# `cargo build --release` made (the compiling stage needs a Rust base image, which cannot be
# pulled here). The cluster runs with TLS for clients and between nodes and a cluster secret
# (docker-compose.tls.yml; certificates made by `cache-bench certs`). Cleans up every
# container, network and image it made, even on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! docker info >/dev/null 2>&1; then
    echo "skipped: no Docker engine"
    exit 0
fi
COMPOSE=(docker-compose)
command -v docker-compose >/dev/null 2>&1 || COMPOSE=(docker compose)
COMPOSE+=(-f docker-compose.yml -f docker-compose.tls.yml)

RUN_ID="dc$$"
BASE_IMAGE="distributed-cache-test-base:$RUN_ID"
IMAGE="distributed-cache-test:$RUN_ID"
PROMETHEUS_IMAGE="distributed-cache-test-prometheus:$RUN_ID"
PROJECT="dctest$$"
ROOTFS=$(mktemp -d)
CERTS_DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PROMETHEUS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The CLI on the host and in the containers reads the CA from CACHE_CA_FILE.
export IMAGE PUBLISH_PORT=$PORT PROMETHEUS_IMAGE PROMETHEUS_PORT CERTS_DIR CACHE_CA_FILE="$CERTS_DIR/ca.pem"
CLI=./target/release/distributed-cache

cleanup() {
    set +e
    "${COMPOSE[@]}" -p "$PROJECT" --profile monitoring down -v --remove-orphans >/dev/null 2>&1
    docker rmi -f "$IMAGE" "$PROMETHEUS_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
    rm -rf "$ROOTFS" "$CERTS_DIR"
}
trap cleanup EXIT

step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; "${COMPOSE[@]}" -p "$PROJECT" logs --tail 30 >&2 || true; exit 1; }
# Polls a command for up to $1 seconds.
poll() {
    local secs=$1; shift
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}
in_node() { docker exec "${PROJECT}_$1_1" /usr/local/bin/distributed-cache "${@:2}"; }
alive_count() { in_node "$1" members --addr 127.0.0.1:8080 | grep -c " ALIVE " || true; }
all_alive() { [ "$(alive_count "$1")" = 3 ]; }

step "base image: debootstrap a minimal Debian bookworm"
command -v debootstrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
debootstrap --variant=minbase bookworm "$ROOTFS" >/dev/null
tar -C "$ROOTFS" -c . | docker import - "$BASE_IMAGE" >/dev/null

step "image: build the Dockerfile (runtime-prebuilt) on it"
[ -x target/release/distributed-cache ] || cargo build --release --bin distributed-cache
docker build -q --target runtime-prebuilt --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$IMAGE" . >/dev/null
[ "$(docker inspect -f '{{.Config.User}}' "$IMAGE")" = cache ] || fail "image does not run as the non-root user"

step "without the io_uring profile the node exits with one line naming the cause"
NO_URING=$(mktemp)
python3 - "$NO_URING" <<'PY'
import json, sys
d = json.load(open("deploy/seccomp-io-uring.json"))
d["syscalls"] = [s for s in d["syscalls"] if not any("io_uring" in n for n in s["names"])]
json.dump(d, open(sys.argv[1], "w"))
PY
set +e
out=$(docker run --rm --security-opt seccomp="$NO_URING" "$IMAGE" 2>&1)
code=$?
set -e
rm -f "$NO_URING"
[ $code -ne 0 ] || fail "node started without io_uring"
[ "$(echo "$out" | wc -l)" = 1 ] || fail "expected one line, got: $out"
echo "$out" | grep -q "io_uring" && echo "$out" | grep -q "seccomp" || fail "line does not name io_uring and seccomp: $out"
echo "   $out"

step "certificates for node1..3 and the host, and a cluster secret"
[ -x target/release/cache-bench ] || cargo build --release -p bench --bin cache-bench
./target/release/cache-bench certs --out "$CERTS_DIR" --names node1,node2,node3,localhost,127.0.0.1 >/dev/null
head -c 32 /dev/urandom | base64 > "$CERTS_DIR/cluster-secret"
# The image runs as uid 10001: the mounted files must be readable by it (a test directory).
chmod 755 "$CERTS_DIR" && chmod 644 "$CERTS_DIR"/*

step "compose: start 3 pinned nodes (TLS, cluster secret)"
"${COMPOSE[@]}" -p "$PROJECT" up -d >/dev/null 2>&1
for n in node1 node2 node3; do
    poll 60 all_alive "$n" || fail "$n does not see 3 ALIVE members"
done
poll 60 sh -c "[ \"\$(docker inspect -f '{{.State.Health.Status}}' ${PROJECT}_node1_1)\" = healthy ]" \
    || fail "HEALTHCHECK never healthy"

step "monitoring profile: Prometheus from Debian's package scrapes all three nodes"
docker build -q --build-arg RUNTIME_IMAGE="$BASE_IMAGE" -t "$PROMETHEUS_IMAGE" deploy/prometheus >/dev/null
"${COMPOSE[@]}" -p "$PROJECT" --profile monitoring up -d prometheus >/dev/null 2>&1
prom_up() {
    curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=count(up%3D%3D1)" | grep -q '"value":\[[0-9.]*,"3"\]'
}
poll 90 prom_up || fail "Prometheus does not see 3 nodes up"
curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=cache_members" | grep -q '"state":"ALIVE"' \
    || fail "Prometheus has no cache_members series"

step "Set through node 1 (published port $PORT), Get through node 3"
$CLI set greeting hello --addr "127.0.0.1:$PORT" >/dev/null || fail "set through node1"
[ "$(in_node node3 get greeting --addr 127.0.0.1:8080)" = hello ] || fail "get through node3"
grpcurl -cacert "$CACHE_CA_FILE" -d '{"key":"foo", "value":"bar"}' "localhost:$PORT" pb.CacheService/Set >/dev/null || fail "grpcurl Set"
grpcurl -cacert "$CACHE_CA_FILE" -d '{"key":"foo"}' "localhost:$PORT" pb.CacheService/Get | grep -q '"bar"' || fail "grpcurl Get"
if grpcurl -plaintext -max-time 5 "localhost:$PORT" list >/dev/null 2>&1; then fail "plaintext served on the TLS port"; fi

step "every node's threads stay inside its cpuset"
for n in node1 node2 node3; do
    c="${PROJECT}_${n}_1"
    want=$(docker inspect -f '{{.HostConfig.CpusetCpus}}' "$c")
    pid=$(docker inspect -f '{{.State.Pid}}' "$c")
    for status in /proc/"$pid"/task/*/status; do
        got=$(awk '/Cpus_allowed_list/{print $2}' "$status")
        [ "$got" = "$want" ] || fail "$n thread $(dirname "$status") allowed on $got, cpuset $want"
    done
done

step "stop node 2: Sets and Gets still succeed (RF=3, W=R=2)"
"${COMPOSE[@]}" -p "$PROJECT" stop node2 >/dev/null 2>&1
for i in $(seq 1 20); do
    $CLI set "k$i" "v$i" --addr "127.0.0.1:$PORT" >/dev/null || fail "set k$i with node2 stopped"
    [ "$(in_node node3 get "k$i" --addr 127.0.0.1:8080)" = "v$i" ] || fail "get k$i with node2 stopped"
done

step "start node 2 again: it rejoins"
"${COMPOSE[@]}" -p "$PROJECT" start node2 >/dev/null 2>&1
poll 60 all_alive node1 || fail "node2 not ALIVE again"

step "pause node 3: the others keep serving; unpause: it is ALIVE again"
docker pause "${PROJECT}_node3_1" >/dev/null
for i in $(seq 1 10); do
    $CLI set "p$i" "v$i" --addr "127.0.0.1:$PORT" >/dev/null || fail "set p$i with node3 paused"
    [ "$($CLI get "p$i" --addr "127.0.0.1:$PORT")" = "v$i" ] || fail "get p$i with node3 paused"
done
docker unpause "${PROJECT}_node3_1" >/dev/null
poll 60 all_alive node1 || fail "node3 not ALIVE after unpause"

step "disconnect node 2 from the network: the others keep serving; reconnect: it converges"
NET="${PROJECT}_cache"
docker network disconnect "$NET" "${PROJECT}_node2_1"
for i in $(seq 1 10); do
    $CLI set "d$i" "v$i" --addr "127.0.0.1:$PORT" >/dev/null || fail "set d$i with node2 cut off"
    [ "$(in_node node3 get "d$i" --addr 127.0.0.1:8080)" = "v$i" ] || fail "get d$i with node2 cut off"
done
docker network connect --alias node2 "$NET" "${PROJECT}_node2_1"
poll 60 all_alive node1 || fail "node2 not ALIVE after reconnect"
poll 60 all_alive node2 || fail "node2 does not see the others after reconnect"
# With no client reading them, node 2 gets the writes it missed (hinted handoff from the
# coordinator, anti-entropy otherwise): a ONE read on node 2 answers from its own replica.
missed_all_there() {
    for i in $(seq 1 10); do
        [ "$(in_node node2 get "d$i" --consistency one --addr 127.0.0.1:8080)" = "v$i" ] || return 1
    done
}
poll 60 missed_all_there || fail "node2 does not hold the writes it missed after reconnect"

step "ok: image, compose cluster, failures and pinning"
