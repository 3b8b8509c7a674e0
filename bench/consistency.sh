#!/usr/bin/env bash
# Long consistency schedules: each fault alone, CONSISTENCY_ROUNDS times in a row (default 3),
# on a fresh three-node cluster per schedule, with clients at QUORUM, LINEARIZABLE and ONE;
# prints the table of bench/RESULTS.md (faults, level, operations, unknown outcomes, stale
# reads, linearizability verdict) and fails if a level broke its promise. Needs root,
# iptables and libfaketime, as the test suite does. About 4 minutes at 3 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), rounds ${CONSISTENCY_ROUNDS:-3}"
cargo test --release --test it histories::long_schedules -- --ignored --nocapture 2>&1 |
    grep -E '^\||panicked|test result'
echo "== done, load $(cut -d' ' -f1-3 /proc/loadavg)"
