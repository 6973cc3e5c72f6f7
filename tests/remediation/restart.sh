#!/bin/sh
# restart.sh PIDFILE LOGFILE STOP_TIMEOUT_SECONDS PROGRAM [ARG...]
#
# Restarts PROGRAM the way `docker restart -t STOP_TIMEOUT` restarts a container: SIGTERM to the
# process named by PIDFILE, SIGKILL if it is still there after STOP_TIMEOUT seconds (a stopped or
# wedged process never acts on SIGTERM), then PROGRAM is started again, detached, with its output
# appended to LOGFILE, and its pid written to PIDFILE. With no running process it only starts.
# The remediation loop test (tests/remediation_loop.rs) gives it to `rabbit-sidecar remediate` as
# a `command` target, and uses it to start the app and the sidecar in the first place.
set -eu
pidfile=$1 log=$2 grace=$3
shift 3

# A killed process whose parent has not reaped it yet is a zombie: it is gone for our purposes.
alive() {
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

if [ -s "$pidfile" ]; then
  pid=$(cat "$pidfile")
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    tenths=0
    while alive "$pid" && [ "$tenths" -lt $((grace * 10)) ]; do
      sleep 0.1
      tenths=$((tenths + 1))
    done
    if alive "$pid"; then
      echo "restart.sh: $pid ignored SIGTERM for ${grace}s; SIGKILL" >>"$log"
      kill -KILL "$pid" 2>/dev/null || true
      tenths=0
      while alive "$pid" && [ "$tenths" -lt 100 ]; do
        sleep 0.1
        tenths=$((tenths + 1))
      done
      if alive "$pid"; then
        echo "restart.sh: $pid survived SIGKILL" >&2
        exit 1
      fi
    fi
  fi
fi

setsid "$@" >>"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
echo "restart.sh: started $* as $!" >>"$log"
