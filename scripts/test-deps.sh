#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain: promtool (Debian's prometheus package),
# amtool and alertmanager (prometheus-alertmanager), and cargo-nextest.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
{ command -v amtool >/dev/null 2>&1 && [ -x /usr/bin/prometheus-alertmanager ]; } || need+=(prometheus-alertmanager)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts the services it installs; the tests run their own instances on free ports.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
