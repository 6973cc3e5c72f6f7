#!/usr/bin/env bash
# A RabbitMQ 4 node for the tests, beside the machine's RabbitMQ 3.10 node and without touching it.
#
#   scripts/rabbitmq4.sh             make sure the node is up and its app started (idempotent: a few
#                                    seconds when it is, about three minutes the first time)
#   scripts/rabbitmq4.sh ctl ARGS    rabbitmqctl ARGS against the node (run inside its root)
#   scripts/rabbitmq4.sh diagnostics ARGS, plugins ARGS: the same for rabbitmq-diagnostics and
#                                    rabbitmq-plugins
#
# The node runs Debian 13 (trixie)'s rabbitmq-server package (4.0.x) inside a minimal Debian root
# made by debootstrap in $RABBITMQ4_ROOT (default /var/lib/rabbit-sidecar/rabbitmq4, outside any
# checkout so every clone shares it): node rabbit4@localhost, AMQP on 127.0.0.1:5673, management
# on 127.0.0.1:15673, Erlang distribution on 25673. It registers with the epmd on port 4369 that
# the 3.10 node (rabbit@localhost) uses too. Needs root (debootstrap, chroot, mount) and Debian's
# package mirror ($RABBITMQ4_MIRROR, default http://deb.debian.org/debian).
#
# The root has /proc and /dev mounted in it while the node runs: never `rm -rf` it without
# unmounting $RABBITMQ4_ROOT/proc and $RABBITMQ4_ROOT/dev first (rm would empty the real /dev).
set -euo pipefail

root=${RABBITMQ4_ROOT:-/var/lib/rabbit-sidecar/rabbitmq4}
mirror=${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}
node=rabbit4@localhost
amqp_port=5673
management_port=15673
dist_port=25673

# Runs a command inside the root with a clean environment (the caller's RABBITMQ_* and HOME must
# not leak into the node or its tools).
in_root() {
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}

case "${1:-up}" in
  ctl)
    shift
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      rabbitmqctl -n "$node" "$@"
    ;;
  diagnostics)
    shift
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      rabbitmq-diagnostics -n "$node" "$@"
    ;;
  plugins)
    shift
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      rabbitmq-plugins -n "$node" "$@"
    ;;
  up) ;;
  *)
    echo "usage: $0 [up | ctl ARGS... | diagnostics ARGS... | plugins ARGS...]" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "$0: needs root (debootstrap, chroot, mount)" >&2
  exit 1
fi

mkdir -p "$(dirname "$root")"
# One caller at a time sets up or starts the node; the others wait for it (bounded: a first
# install takes a few minutes). The node itself is started with this descriptor closed, or it
# would hold the lock for as long as it runs.
exec {lock}>"$root.lock"
if ! flock -w 900 "$lock"; then
  echo "$0: another setup of $root has held $root.lock for 15 minutes" >&2
  exit 1
fi

started=$(date +%s)

# Unmounts what this script mounts into a root (for a half-made root that is thrown away).
unmount_in() {
  local dir=$1 m
  for m in "$dir/dev" "$dir/proc"; do
    if mountpoint -q "$m"; then umount "$m" || umount -l "$m"; fi
  done
}

mount_in() {
  local dir=$1
  mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
  mountpoint -q "$dir/dev" || mount --bind /dev "$dir/dev"
}

# 1. The root with rabbitmq-server installed. It is made under another name and renamed when
# complete, so a run that was interrupted starts over instead of using half a root.
if [ ! -e "$root/.rabbit-sidecar-installed" ]; then
  partial="$root.partial"
  if [ -e "$partial" ]; then
    unmount_in "$partial"
    if mountpoint -q "$partial/dev" || mountpoint -q "$partial/proc"; then
      echo "$0: cannot unmount $partial/dev or $partial/proc; remove $partial by hand" >&2
      exit 1
    fi
    rm -rf --one-file-system "$partial"
  fi
  if [ -e "$root" ]; then
    echo "$0: $root exists but is not a complete install; remove it (unmount $root/dev and $root/proc first)" >&2
    exit 1
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  fi
  echo "creating a Debian trixie root in $partial (a few minutes)"
  timeout 900 debootstrap --variant=minbase trixie "$partial" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { echo "$0: debootstrap failed, see $root.debootstrap.log" >&2; exit 1; }
  # Packages must not start services while they are installed: the node is started below.
  printf '#!/bin/sh\nexit 101\n' >"$partial/usr/sbin/policy-rc.d"
  chmod 755 "$partial/usr/sbin/policy-rc.d"
  mount_in "$partial"
  echo "installing rabbitmq-server into $partial"
  if ! timeout 900 chroot "$partial" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends rabbitmq-server >"$root.install.log" 2>&1; then
    unmount_in "$partial"
    echo "$0: installing rabbitmq-server failed, see $root.install.log" >&2
    exit 1
  fi
  unmount_in "$partial"
  touch "$partial/.rabbit-sidecar-installed"
  mv "$partial" "$root"
fi

# 2. The node's configuration (rewritten every time; a changed file takes effect at the node's next
# start). Busy-waiting schedulers are turned off: the node shares two cores with builds.
write_if_changed() {
  local file=$1 content=$2
  if [ "$(cat "$file" 2>/dev/null)" != "$content" ]; then
    printf '%s\n' "$content" >"$file"
  fi
}
write_if_changed "$root/etc/rabbitmq/rabbitmq-env.conf" "NODENAME=$node
NODE_PORT=$amqp_port
DIST_PORT=$dist_port
SERVER_ADDITIONAL_ERL_ARGS=\"+sbwt none +sbwtdcpu none +sbwtdio none\""
write_if_changed "$root/etc/rabbitmq/rabbitmq.conf" "listeners.tcp.default = 127.0.0.1:$amqp_port
loopback_users = none
management.tcp.ip = 127.0.0.1
management.tcp.port = $management_port"
write_if_changed "$root/etc/rabbitmq/enabled_plugins" "[rabbitmq_management]."

mount_in "$root"

# 3. The node. One CLI call tells the three cases apart: the app running (prints the version), the
# node up with its app stopped (a test that stopped it and failed), or no node at all.
state() {
  timeout 60 chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 rabbitmqctl -n "$node" -q eval \
    'case rabbit:is_running() of true -> rabbit_misc:version(); false -> stopped end.' 2>/dev/null ||
    echo down
}
status=$(state)
case "$status" in
  down)
    echo "starting RabbitMQ 4 node $node"
    log="$root/var/log/rabbitmq/rabbit-sidecar-start.log"
    # In its own session and with none of this script's descriptors (the lock, whatever the
    # caller passed down): a node holding the lock would block every later caller, one holding the
    # caller's pipe would keep it from ever seeing the end of our output.
    (
      for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}
        if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
      done
      exec setsid chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 rabbitmq-server </dev/null >>"$log" 2>&1
    ) &
    ;;
  stopped)
    echo "starting the stopped RabbitMQ 4 app on $node"
    in_root rabbitmqctl -n "$node" -q start_app >/dev/null || true
    ;;
esac
if [ "$status" = down ] || [ "$status" = stopped ]; then
  # A node that is still booting cannot be reached for a moment; await_startup covers the rest.
  ok=
  for _ in $(seq 1 60); do
    if timeout 150 chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
      LANG=C.UTF-8 rabbitmqctl -n "$node" -q await_startup --timeout 120 >/dev/null 2>&1; then
      ok=1
      break
    fi
    sleep 2
  done
  if [ -z "$ok" ]; then
    echo "$0: $node did not start; see $root/var/log/rabbitmq/" >&2
    exit 1
  fi
  status=$(state)
fi
# The listeners, checked the way clients reach them.
for port in $amqp_port $management_port; do
  ok=
  for _ in $(seq 1 60); do
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
      ok=1
      break
    fi
    sleep 1
  done
  if [ -z "$ok" ]; then
    echo "$0: nothing listens on 127.0.0.1:$port; see $root/var/log/rabbitmq/" >&2
    exit 1
  fi
done
echo "RabbitMQ ${status//\"/} is up at 127.0.0.1:$amqp_port (node $node, management 127.0.0.1:$management_port; $(($(date +%s) - started))s)"
