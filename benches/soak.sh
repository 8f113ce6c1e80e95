#!/usr/bin/env bash
# A bounded soak with chaos in the production-shaped datacenter of
# halo_testkit::dc (3 Consul servers, a client agent on every other host,
# halo-lb on lb1 and lb2 as a pair with a floating VIP, two backend hosts
# with an echo server and halo-sidecar, a client host; network namespaces
# on 198.18.0.0/15): for SOAK_SECONDS, faults one at a time in seeded random
# order (kill -9, SIGSTOP, power-off and cable pull of the active; the two
# balancers cut apart; the Consul leader killed; the probes between the
# balancers dropped; forged ICMP at the standby's probe socket), with
# recovery between, while clients on the client host open new connections
# and keep long-lived streams through the VIP. Checks: no overlap of active
# terms, never two VIP holders, every client gap within its fault's bound,
# no byte corrupted, descriptors and RSS of every halo-lb process flat.
# Prints one table; exits non-zero on any violation. See benches/README.md
# ("Soak").
#
#   benches/soak.sh                      # 30 minutes
#   SOAK_SECONDS=180 benches/soak.sh     # the short form CI runs
#
# Needs root (network namespaces), iproute2 (ip, ss), nftables. Writes the
# table to stdout and benches/results/soak-<timestamp>/summary.md, with each
# process's log and config and every agent's log beside it (git ignores
# benches/results/soak-*).
#
# Knobs (environment): SOAK_SECONDS (1800), SOAK_SEED (random, printed),
# SOAK_FAULTS (all: kill,sigstop,power-off,cable,cut-apart,leader-kill,
# probe-drop,forged-icmp), SOAK_RATE (100 new connections/s), SOAK_STREAMS
# (4), SOAK_QUIET_MS (2000: steady time before each fault), SOAK_PROFILE
# (dev: debug builds, debug assertions on; or release), HALO_LB_BIN and
# HALO_SIDECAR_BIN (use these binaries instead of building), RUST_LOG (info,
# for halo-lb).
#
# Every process it starts runs inside the datacenter's namespaces and is
# killed by pid on exit; the namespaces (halo-<pid>-*) are deleted, also on
# failure or interruption.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "needs root (network namespaces)"; exit 1; }
for tool in ip ss nft; do
  command -v "$tool" >/dev/null || { log "needs $tool (iproute2, nftables)"; exit 1; }
done

OUT="$HERE/results/soak-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"

# Namespaces of the bench binary (halo-<its pid>-*), should it be killed
# outright (on any other exit it removes its own).
bench_pid=
sweep_netns() {
  local ns pid
  [ -n "$bench_pid" ] || return 0
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
    # It prints its table and removes the datacenter; SIGKILL after 30 s.
    for _ in $(seq 300); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  sweep_netns
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# --------------------------------------------------------------- binaries
profile=${SOAK_PROFILE:-dev}
case "$profile" in
  dev) dir=debug ;;
  release) dir=release ;;
  *) log "SOAK_PROFILE=$profile: dev or release"; exit 1 ;;
esac
target="${CARGO_TARGET_DIR:-$ROOT/target}/$dir"
build=(-p halo-benches --bin soak)
[ -n "${HALO_LB_BIN:-}" ] || build+=(-p halo-lb --bin halo-lb)
[ -n "${HALO_SIDECAR_BIN:-}" ] || build+=(-p halo-sidecar --bin halo-sidecar)
log "building ${build[*]} ($profile)"
(cd "$ROOT" && cargo build --quiet --profile "$profile" "${build[@]}")
halo_lb=${HALO_LB_BIN:-$target/halo-lb}
halo_sidecar=${HALO_SIDECAR_BIN:-$target/halo-sidecar}
for bin in "$halo_lb" "$halo_sidecar" "$target/soak"; do
  [ -x "$bin" ] || { log "no $bin"; exit 1; }
done
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
if [ -n "$(git -C "$ROOT" status --porcelain -- lb consul health sidecar 2>/dev/null)" ]; then commit="$commit+changes"; fi
# Consul: provisioned now, so a missing one fails before the datacenter.
"$ROOT/scripts/consul.sh" >/dev/null

export HALO_NETNS_TESTS=1
export SOAK_HALO_LB="$halo_lb" SOAK_HALO_SIDECAR="$halo_sidecar" SOAK_HALO_COMMIT="$commit ($profile)" SOAK_OUT="$OUT"

"$target/soak" 2> >(tee "$OUT/harness.log" >&2) &
bench_pid=$!
rc=0
wait "$bench_pid" || rc=$?
exit "$rc"
