#!/usr/bin/env bash
# Makes sure the local RabbitMQ node is running and its application started (a test that stops the
# broker app and then fails could leave it stopped). Safe to run any number of times.
set -euo pipefail
if ! command -v rabbitmqctl >/dev/null 2>&1; then
  echo "rabbitmqctl not found: install RabbitMQ (Debian package rabbitmq-server)" >&2
  exit 1
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  # A node that is already booting makes this fail; the wait below covers both cases.
  rabbitmq-server -detached || true
  # The node needs a moment before rabbitmqctl can reach it at all.
  for _ in $(seq 1 60); do
    rabbitmqctl -q status >/dev/null 2>&1 && break
    sleep 1
  done
fi
rabbitmqctl -q start_app >/dev/null 2>&1 || true
rabbitmqctl await_startup --timeout 120 >/dev/null
# RabbitMQ 3.10 can lose the supervisor of quorum queues' at-least-once dead-lettering when such
# queues are deleted around a stop_app/start_app (seen after the benchmark's broker-restart
# scenario): from then on every declaration of a quorum queue with a dead-letter target fails
# with INTERNAL_ERROR. Restarting the broker app brings the supervisor back.
if [ "$(rabbitmqctl eval 'is_pid(whereis(rabbit_fifo_dlx_sup)).' 2>/dev/null)" = "false" ]; then
  echo "RabbitMQ lost its quorum dead-letter supervisor: restarting the broker app"
  rabbitmqctl -q stop_app >/dev/null
  rabbitmqctl -q start_app >/dev/null
  rabbitmqctl await_startup --timeout 120 >/dev/null
fi
# The management API is how the sidecar tells active from standby (--management-url); a test
# covers it. Enabling an enabled plugin is a no-op.
rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
echo "RabbitMQ is up at 127.0.0.1:5672"
