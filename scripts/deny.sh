#!/usr/bin/env bash
# Supply-chain check: `cargo deny check` (advisories, bans, licenses,
# sources; policy in deny.toml) against the vendored RustSec snapshot, with
# no network but crates.io.
#
# cargo-deny is pinned below. If target/tools/bin/cargo-deny is missing or
# another version, scripts/cargo-tool.sh builds it from crates.io into
# target/tools (about 3 minutes of CPU once; reruns reuse it). A cargo-deny
# of the pinned version on PATH is used as is.
set -euo pipefail

CARGO_DENY_VERSION=0.20.2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

deny=$(scripts/cargo-tool.sh cargo-deny "$CARGO_DENY_VERSION")

# cargo-deny runs `cargo metadata`, which wants every package in Cargo.lock,
# those of other platforms too; with --offline they must already be here.
cargo fetch --locked --quiet

snapshot_date=$(scripts/advisory-db.sh prepare)
age_days=$(( ($(date +%s) - $(date -d "$snapshot_date" +%s)) / 86400 ))
echo "   advisory database: vendored snapshot of $snapshot_date ($age_days days old; refresh: scripts/advisory-db.sh refresh)"
if [ "$age_days" -gt 90 ]; then
    echo "   WARNING: the advisory snapshot is $age_days days old: advisories published since $snapshot_date are not checked"
fi

# --offline: no fetch of the advisory database (it is the snapshot above);
# --locked: Cargo.lock as committed.
"$deny" --offline --locked --color never check
