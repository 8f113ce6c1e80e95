#!/usr/bin/env bash
# Failover benchmark in the production-shaped datacenter of halo_testkit::dc
# (3 Consul servers, a Consul client agent on every other host, two
# balancer hosts, a backend host and a client host, in network namespaces
# on 198.18.0.0/15): the gap a client on the client host sees, and samples
# in which two hosts held the VIP, when the active of a pair is killed
# (kill -9), its host is powered off, or its cable is pulled. For halo-lb's
# pair with its default [ha] settings, keepalived VRRP (advert_int 1) and
# `consul lock` with its defaults. One command, one table:
#
#   benches/failover.sh
#
# Needs root (network namespaces). Writes the table to
# benches/results/failover.md and stdout; raw output (every client attempt,
# each process's log and config, every agent's log, rounds.txt) to
# benches/results/failover-<timestamp>/, which git ignores. See
# benches/README.md ("Failover") for how each row is made.
#
# Knobs (environment): FAILOVER_ROUNDS (20, halo and keepalived),
# FAILOVER_CONSUL_ROUNDS (3; FAILOVER_CONSUL_KILL_ROUNDS is read too),
# FAILOVER_SYSTEMS ("halo,keepalived,consul-lock"), FAILOVER_EVENTS
# ("kill,power-off,cable"), FAILOVER_CABLE_FRESH=1 (halo: restart the old
# active after each cable round: no damping carried over), FAILOVER_FAULT_SECONDS (10: how long a host stays powered off or unplugged), FAILOVER_KEEPALIVED_ROUNDS (FAILOVER_ROUNDS), FAILOVER_MAX_SECONDS
# (3600: rounds left when it is used up are skipped), HALO_LB_BIN (use this
# halo-lb instead of building), CONSUL_BIN, KEEPALIVED_BIN,
# FAILOVER_NO_INSTALL=1 (never apt-get keepalived).
#
# Every process it starts runs inside the datacenter's namespaces and is
# killed by pid on exit; the namespaces (halo-<pid>-*) are deleted, also on
# failure or interruption.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[failover %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

OUT="$HERE/results/failover-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

# Namespaces of the bench binary (halo-<its pid>-*), should it be killed
# outright (on any other exit it removes its own).
bench_pid=
sweep_netns() {
  local ns pid
  [ -n "$bench_pid" ] || return 0
  command -v ip >/dev/null 2>&1 || return 0
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^halo-$bench_pid-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
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
log "building the bench binary (release)"
(cd "$ROOT" && cargo build --release --quiet -p halo-benches --bin failover-dc)
bench_bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/failover-dc"
[ -x "$halo_lb" ] || { log "no halo-lb at $halo_lb"; exit 1; }
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
if [ -n "$(git -C "$ROOT" status --porcelain -- lb consul health 2>/dev/null)" ]; then commit="$commit+changes"; fi
consul=$("$ROOT/scripts/consul.sh")

# keepalived: installed from the distribution if missing (a benchmark, not
# CI), with services kept from starting (policy-rc.d exit 101) unless the
# machine has its own policy.
keepalived=${KEEPALIVED_BIN:-$(command -v keepalived || true)}
keepalived_note=
case ",${FAILOVER_SYSTEMS:-halo,keepalived,consul-lock}," in
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

[ "$(id -u)" = 0 ] || { log "needs root (network namespaces)"; exit 1; }
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || log "note: nft (nftables) is missing; the datacenter's cuts need it (not used here)"
python=$("$PY" -c 'import sys; print(sys.executable)')

export HALO_NETNS_TESTS=1 CONSUL_BIN="$consul"
export FAILOVER_HALO_LB="$halo_lb" FAILOVER_HALO_COMMIT="$commit" FAILOVER_PYTHON="$python"
export FAILOVER_PY="$HERE/failover.py" FAILOVER_OUT="$OUT" FAILOVER_TABLE="$HERE/results/failover.md"
export FAILOVER_KEEPALIVED="$keepalived" FAILOVER_KEEPALIVED_NOTE="$keepalived_note"
export FAILOVER_CONSUL_ROUNDS="${FAILOVER_CONSUL_ROUNDS:-${FAILOVER_CONSUL_KILL_ROUNDS:-3}}"
export FAILOVER_SYSTEMS="${FAILOVER_SYSTEMS:-halo,keepalived,consul-lock}"

"$bench_bin" 2> >(tee "$OUT/harness.log" >&2) &
bench_pid=$!
rc=0
wait "$bench_pid" || rc=$?
exit "$rc"
