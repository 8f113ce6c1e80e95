#!/usr/bin/env bash
# ha.mode = "ecmp": aggregate requests per second through the VIP with 1, 2
# and 3 balancers, and the load generator's own limit, in the ECMP testbed
# (halo_testkit::ecmp: three Consul servers, an agent per host, a router
# and three balancer hosts running BIRD 2 with packaging/bird/, halo-lb with
# packaging/examples/lb-ecmp.toml, three backends, clients behind the
# router; network namespaces on 198.18.0.0/15).
#
#   benches/ecmp.sh
#
# Needs root. Knobs: ECMP_SECONDS (5 per row), ECMP_THREADS (8 client
# threads), HALO_LB_BIN (use this halo-lb instead of building). Writes
# the table to benches/results/ecmp.md and stdout. Every process runs in the
# testbed's namespaces, which are removed on exit.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
export HALO_NETNS_TESTS=1
cargo build --quiet --release -p halo-benches --bin ecmp-dc
if [ -z "${HALO_LB_BIN:-}" ]; then
  cargo build --quiet --release -p halo-lb --bin halo-lb
  HALO_LB_BIN="$ROOT/target/release/halo-lb"
fi
out="$HERE/results/ecmp.md"
{
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') by \`benches/ecmp.sh\`; halo-lb $(git rev-parse --short HEAD)."
  echo
  "$ROOT/target/release/ecmp-dc" "$HALO_LB_BIN" "${ECMP_SECONDS:-5}" "${ECMP_THREADS:-8}"
} | tee "$out.tmp"
mv "$out.tmp" "$out"
