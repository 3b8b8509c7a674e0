#!/usr/bin/env python3
"""The Python half of bench/memory.sh: loads memcached and Redis, reads their item counts, waits
for a process's RSS to settle, and prints the table and writes the JSON at the end.

Subcommands (the shell script owns every process; nothing here starts a server):
  load  memcached|redis PORT N VALUE_BYTES   set N distinct keys of 16 B
  count memcached|redis PORT                 print the server's item count
  rss   PID SETTLE_SECS DEADLINE_SECS        print VmRSS (bytes) once it has stopped growing
  report ROWS_TSV OUT_JSON LOAD_BEFORE LOAD_AFTER [SETTING=VALUE ...]
"""

import json
import sys
import time

KEY_BYTES = 16
BATCH = 1000
# Generous per-call bound: one batch of 1000 values of 10 kB is 10 MB on loopback.
SOCKET_TIMEOUT_SECS = 60
CONNECT_TIMEOUT_SECS = 5


def key_for(index: int) -> bytes:
    # The same keys cache-bench writes (workload::key_for), so every server stores equal bytes.
    key = f"k{index:0>{KEY_BYTES - 1}}".encode()
    if len(key) != KEY_BYTES:
        raise SystemExit(f"key {index} is {len(key)} bytes, not {KEY_BYTES}: N is too large")
    return key


def memcached_client(port: int):
    from pymemcache.client.base import Client

    return Client(
        ("127.0.0.1", port),
        connect_timeout=CONNECT_TIMEOUT_SECS,
        timeout=SOCKET_TIMEOUT_SECS,
        no_delay=True,
    )


def redis_client(port: int):
    import redis

    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=SOCKET_TIMEOUT_SECS,
        socket_connect_timeout=CONNECT_TIMEOUT_SECS,
    )


def memcached_items(client) -> int:
    return int(client.stats()[b"curr_items"])


def load(server: str, port: int, n: int, value_bytes: int) -> None:
    value = b"v" * value_bytes
    if server == "memcached":
        client = memcached_client(port)
        for start in range(0, n, BATCH):
            batch = {key_for(i): value for i in range(start, min(start + BATCH, n))}
            client.set_many(batch, noreply=True)
        # noreply Sets get no answer; a request on the same connection is answered only after
        # the server has processed every Set before it, so the load is complete when this returns.
        items = memcached_items(client)
        client.close()
    elif server == "redis":
        client = redis_client(port)
        pipe = client.pipeline(transaction=False)
        for start in range(0, n, BATCH):
            for i in range(start, min(start + BATCH, n)):
                pipe.set(key_for(i), value)
            # execute() raises on the first error reply, so a rejected Set fails the run.
            pipe.execute()
        items = client.dbsize()
        client.close()
    else:
        raise SystemExit(f"unknown server {server}")
    if items != n:
        raise SystemExit(f"{server}: {items} items after loading {n} keys")


def count(server: str, port: int) -> None:
    if server == "memcached":
        client = memcached_client(port)
        print(memcached_items(client))
    elif server == "redis":
        client = redis_client(port)
        print(client.dbsize())
    else:
        raise SystemExit(f"unknown server {server}")
    client.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"process {pid} has no VmRSS (exited?)")


def settled_rss(pid: int, settle_secs: float, deadline_secs: float) -> None:
    # Settled = no new high for settle_secs. memcached grows its hash table on a background
    # thread after the Sets are answered, so the RSS right after the load can be short.
    poll_secs = 0.1
    deadline = time.monotonic() + deadline_secs
    high = rss_bytes(pid)
    high_at = time.monotonic()
    while True:
        time.sleep(poll_secs)
        now = time.monotonic()
        rss = rss_bytes(pid)
        if rss > high:
            high, high_at = rss, now
        elif now - high_at >= settle_secs:
            print(rss)
            return
        if now > deadline:
            raise SystemExit(
                f"RSS of {pid} still growing after {deadline_secs:.0f} s (now {rss} bytes)"
            )


def report(
    rows_tsv: str, out_json: str, load_before: str, load_after: str, settings: list[str]
) -> None:
    rows = []
    with open(rows_tsv) as f:
        for line in f:
            value_bytes, n, server, idle, rss = line.split()
            value_bytes, n, idle, rss = int(value_bytes), int(n), int(idle), int(rss)
            payload = n * (KEY_BYTES + value_bytes)
            rows.append(
                {
                    "server": server,
                    "value_bytes": value_bytes,
                    "key_bytes": KEY_BYTES,
                    "keys": n,
                    "payload_bytes": payload,
                    "idle_rss_bytes": idle,
                    "rss_bytes": rss,
                    "rss_over_payload": rss / payload,
                    "bytes_per_entry": (rss - idle) / n,
                }
            )
    print("| value B | N | server | idle RSS MB | RSS MB | RSS / payload | (RSS - idle) / N bytes per entry |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['value_bytes']} | {r['keys']:,} | {r['server']} | {r['idle_rss_bytes'] / 1e6:.1f} "
            f"| {r['rss_bytes'] / 1e6:.1f} | {r['rss_over_payload']:.2f} | {r['bytes_per_entry']:.1f} |"
        )
    doc = {
        "units": "bytes; MB in the table = 10^6 bytes",
        "settings": dict(s.split("=", 1) for s in settings),
        "rows": rows,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    with open(out_json, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "load" and len(args) == 4:
        load(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "count" and len(args) == 2:
        count(args[0], int(args[1]))
    elif cmd == "rss" and len(args) == 3:
        settled_rss(int(args[0]), float(args[1]), float(args[2]))
    elif cmd == "report" and len(args) >= 4:
        report(args[0], args[1], args[2], args[3], args[4:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
