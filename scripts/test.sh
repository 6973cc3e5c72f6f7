#!/usr/bin/env bash
# The test command: sets up what the tests need, then runs every test against the local broker.
# Tests that stop the broker run in a second pass, alone, so they never pull the broker from
# under the others.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
scripts/ensure-broker.sh
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --profile "$profile" -E 'not test(/^disruptive/)'
cargo nextest run --profile "$profile" -E 'test(/^disruptive/)'
scripts/ensure-broker.sh
# The benchmark's quick mode proves the benchmark works (its figures come from
# scripts/bench.sh in release mode); the dev profile reuses the test build.
cargo bench --profile dev --bench sidecar -- --quick
scripts/ensure-broker.sh
