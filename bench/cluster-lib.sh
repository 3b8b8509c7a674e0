# Sourced by the cluster bench scripts: free ports and waiting for a cluster to form.
# Needs BIN (the directory of the built binaries).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (at most 10 s) until the node at $1 sees ${2:-3} members ALIVE.
converge() {
    for _ in $(seq 1 100); do
        n=$("$BIN/distributed-cache" members --addr "$1" 2>/dev/null | grep -c ALIVE || true)
        [ "$n" = "${2:-3}" ] && return; sleep 0.1
    done
    echo "cluster of $1 did not converge" >&2; exit 1
}
