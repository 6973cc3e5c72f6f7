#!/usr/bin/env bash
# The performance benchmark against the local broker (see docs/performance.md).
#
#   scripts/bench.sh --quick   # a few thousand messages, concurrency 16, one failover: < 2 minutes (CI)
#   scripts/bench.sh           # the full table (12 rounds) and every failover scenario: 30-40 minutes
#   scripts/bench.sh --soak    # 1M messages at 2000/s: RSS and fds over time (about 9 minutes)
#   scripts/bench.sh --growth  # cost as subscriptions, body size and prefetch grow (a few minutes;
#                              # add --quick for a short proof that it works)
#
# Further options go to the bench: --json FILE, --queue-type classic, --messages N,
# --repeat ROUNDS, --concurrency C and --size BYTES (quick mode),
# --broker-restart auto|always|never (auto: only when no other client uses the broker),
# --soak-messages N, --soak-rate R.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-broker.sh
mode=--full
case "${1:-}" in
  --quick|--full|--soak|--growth) mode=$1; shift ;;
esac
cargo bench --bench sidecar -- "$mode" "$@"
# The broker-restart scenario stops and starts the broker app; make sure it is up again.
scripts/ensure-broker.sh >/dev/null
