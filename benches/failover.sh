#!/usr/bin/env bash
# Failover benchmark: the gap a client sees when the active of a pair dies
# (kill -9) or hands over (SIGTERM), for halo-lb's pair with its default
# settings, `consul lock` with its defaults, and keepalived VRRP with
# advert_int 1. One command, one table:
#
#   benches/failover.sh
#
# Writes the table to benches/results/failover.md and stdout; raw output
# (logs, configs, every client attempt, rounds.json) to
# benches/results/failover-<timestamp>/, which git ignores. See
# benches/README.md ("Failover") for how each row is made.
#
# Knobs (environment): FAILOVER_ROUNDS (20), FAILOVER_CONSUL_KILL_ROUNDS (3),
# FAILOVER_SYSTEMS ("halo,consul-lock,keepalived"), FAILOVER_MAX_SECONDS
# (2400: rounds left when it is used up are skipped), HALO_LB_BIN (use this
# halo-lb instead of building), CONSUL_BIN, KEEPALIVED_BIN,
# FAILOVER_NO_INSTALL=1 (never apt-get keepalived).
#
# Traffic goes to 127.0.0.1 and, for keepalived, to 198.19.77.0/24 inside
# network namespaces hfb-<pid>-* that it creates (root only) and deletes on
# exit, with every process in them. Every process it starts is stopped on
# exit, by pid.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[failover %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

RUN_ID=$$
OUT="$HERE/results/failover-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

# Namespaces left by a harness that was killed outright (the Python side
# removes its own on any other exit).
sweep_netns() {
  local ns pid
  command -v ip >/dev/null 2>&1 || return 0
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^hfb-$RUN_ID-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
py_pid=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$py_pid" ] && kill -0 "$py_pid" 2>/dev/null; then
    kill -TERM "$py_pid" 2>/dev/null || true
    wait "$py_pid" 2>/dev/null || true
  fi
  sweep_netns
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# --------------------------------------------------------------- binaries
if [ -n "${HALO_LB_BIN:-}" ]; then
  halo_lb=$HALO_LB_BIN
else
  log "building halo-lb (release)"
  (cd "$ROOT" && cargo build --release --quiet -p halo-lb --bin halo-lb)
  halo_lb="${CARGO_TARGET_DIR:-$ROOT/target}/release/halo-lb"
fi
[ -x "$halo_lb" ] || { log "no halo-lb at $halo_lb"; exit 1; }
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
if [ -n "$(git -C "$ROOT" status --porcelain -- lb consul health 2>/dev/null)" ]; then commit="$commit+changes"; fi
consul=$("$ROOT/scripts/consul.sh")

# keepalived: installed from the distribution if missing (a benchmark, not
# CI), with services kept from starting (policy-rc.d exit 101) unless the
# machine has its own policy.
keepalived=${KEEPALIVED_BIN:-$(command -v keepalived || true)}
keepalived_note=
case ",${FAILOVER_SYSTEMS:-halo,consul-lock,keepalived}," in
  *,keepalived,*)
    if [ -z "$keepalived" ]; then
      if [ "${FAILOVER_NO_INSTALL:-0}" = 1 ]; then
        keepalived_note="keepalived is not installed (FAILOVER_NO_INSTALL=1)"
      elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        keepalived_note="keepalived is not installed, and installing it needs root and apt-get"
      else
        log "installing keepalived with apt-get"
        prc=/usr/sbin/policy-rc.d ours=
        if [ ! -e "$prc" ]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; ours=1; fi
        if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq keepalived; } >"$OUT/apt.log" 2>&1; then
          keepalived=$(command -v keepalived || true)
        fi
        [ -z "$ours" ] || rm -f "$prc"
        [ -n "$keepalived" ] || keepalived_note="keepalived could not be installed (apt-get failed; see the raw output's apt.log)"
      fi
    fi
    ;;
esac

args=(run --run-id "$RUN_ID" --consul "$consul" --halo-lb "$halo_lb" --halo-commit "$commit"
  --out "$OUT" --table "$HERE/results/failover.md"
  --rounds "${FAILOVER_ROUNDS:-20}" --consul-kill-rounds "${FAILOVER_CONSUL_KILL_ROUNDS:-3}"
  --systems "${FAILOVER_SYSTEMS:-halo,consul-lock,keepalived}" --max-seconds "${FAILOVER_MAX_SECONDS:-2400}")
[ -z "$keepalived" ] || args+=(--keepalived "$keepalived")
[ -z "$keepalived_note" ] || args+=(--keepalived-note "$keepalived_note")

"$PY" "$HERE/failover.py" "${args[@]}" &
py_pid=$!
rc=0
wait "$py_pid" || rc=$?
py_pid=
exit "$rc"
