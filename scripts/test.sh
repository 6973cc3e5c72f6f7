#!/usr/bin/env bash
# The test command: sets up what the tests need, then runs every test against the machine's
# RabbitMQ 3.10 node, then the broker tests (tests/broker) again against a RabbitMQ 4 node that
# scripts/rabbitmq4.sh sets up in a Debian root (the unit and offline tests touch no broker and run
# once). For each broker the tests that stop it run in a second pass, alone, so they never pull the
# broker from under the others.
#
# RABBIT_SIDECAR_TEST_BROKER=rabbitmq3 or =rabbitmq4 runs against that broker only (the same
# setting picks the broker in tests/common); with rabbitmq4 only the broker tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
profile=default
[ "${CI:-}" = "true" ] && profile=ci

case "${RABBIT_SIDECAR_TEST_BROKER:-}" in
  "") brokers="rabbitmq3 rabbitmq4" ;;
  rabbitmq3 | rabbitmq4) brokers=$RABBIT_SIDECAR_TEST_BROKER ;;
  *)
    echo "RABBIT_SIDECAR_TEST_BROKER=$RABBIT_SIDECAR_TEST_BROKER: expected rabbitmq3 or rabbitmq4" >&2
    exit 2
    ;;
esac

# The RabbitMQ 4 node is set up while the first pass runs (minutes the first time, mostly
# downloads); its output is shown before the RabbitMQ 4 pass.
rabbitmq4_setup=
if [[ " $brokers " == *" rabbitmq4 "* ]]; then
  rabbitmq4_log=$(mktemp)
  scripts/rabbitmq4.sh >"$rabbitmq4_log" 2>&1 &
  rabbitmq4_setup=$!
fi
rabbitmq4_up() {
  local ok=0
  if [ -n "$rabbitmq4_setup" ]; then
    wait "$rabbitmq4_setup" || ok=$?
    cat "$rabbitmq4_log"
    rm -f "$rabbitmq4_log"
    rabbitmq4_setup=
  else
    scripts/rabbitmq4.sh || ok=$?
  fi
  return "$ok"
}

# A broker's failures do not stop the other's run; the script fails at the end.
failed=()
for broker in $brokers; do
  export RABBIT_SIDECAR_TEST_BROKER=$broker
  if [ "$broker" = rabbitmq3 ]; then
    scripts/ensure-broker.sh
    only='all()'
  else
    if ! rabbitmq4_up; then
      failed+=("rabbitmq4 (scripts/rabbitmq4.sh failed)")
      continue
    fi
    only='binary_id(rabbit-sidecar::broker)'
  fi
  echo "== tests against $broker"
  cargo nextest run --profile "$profile" -E "($only) & not test(/^disruptive/)" ||
    failed+=("$broker")
  cargo nextest run --profile "$profile" -E "($only) & test(/^disruptive/)" ||
    failed+=("$broker (disruptive)")
  if [ "$broker" = rabbitmq3 ]; then scripts/ensure-broker.sh; else scripts/rabbitmq4.sh; fi
done

if [[ " $brokers " == *" rabbitmq3 "* ]]; then
  # The benchmark's quick mode proves the benchmark works (its figures come from
  # scripts/bench.sh in release mode); the dev profile reuses the test build.
  unset RABBIT_SIDECAR_TEST_BROKER
  cargo bench --profile dev --bench sidecar -- --quick
  scripts/ensure-broker.sh
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "tests failed against: ${failed[*]}" >&2
  exit 1
fi
