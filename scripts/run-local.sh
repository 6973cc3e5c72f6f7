#!/usr/bin/env bash
# Runs rabbit-sidecar against the local broker with the demo app behind it, and a demo producer
# feeding the queue. Ctrl-C stops all three. Extra arguments go to the sidecar.
#
#   scripts/run-local.sh                    # queue "demo", app on 127.0.0.1:8080, admin on :9102
#   DEMO_RATE=0 scripts/run-local.sh        # no producer
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-broker.sh
cargo build --release --bin rabbit-sidecar --example demo_app --example demo_producer
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
DEMO_LISTEN=127.0.0.1:8080 target/release/examples/demo_app &
pids+=($!)
if [ "${DEMO_RATE:-5}" != "0" ]; then
  AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f DEMO_QUEUE=demo DEMO_RATE="${DEMO_RATE:-5}" target/release/examples/demo_producer &
  pids+=($!)
fi
echo "admin server: http://127.0.0.1:9102/metrics /healthz /readyz /status"
target/release/rabbit-sidecar --queue demo --declare --target-url http://127.0.0.1:8080/ --listen 127.0.0.1:9102 "$@" &
pids+=($!)
wait "${pids[-1]}"
