#!/usr/bin/env bash
# The RustSec advisory database that `cargo deny check advisories` reads.
#
# CI has no route to GitHub, where the database lives, so a snapshot of it
# (its crates/ advisories and licence files) is kept in the repository under
# supply-chain/advisory-db/, with the commit and date it was taken at in
# supply-chain/advisory-db/SNAPSHOT. cargo-deny runs with --offline and reads
# that snapshot.
#
#   scripts/advisory-db.sh refresh SRC   replace the snapshot with the HEAD of
#                                        SRC, a git clone (or bare mirror) of
#                                        https://github.com/rustsec/advisory-db
#   scripts/advisory-db.sh prepare       lay the snapshot out where cargo-deny
#                                        looks for it (run by scripts/deny.sh)
#
# cargo-deny 0.20 opens <db-path>/advisory-db-<hash of the URL>/ and wants a
# crates/ directory of advisories there, plus a .git/FETCH_HEAD whose
# modification time it takes as the time of the last fetch (checked against
# maximum-db-staleness in deny.toml). `prepare` copies crates/ and stamps
# FETCH_HEAD with the snapshot's commit date, so staleness counts from the
# snapshot, not from the CI run.
set -euo pipefail

die() { echo "advisory-db.sh: $*" >&2; exit 1; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
snapshot="$root/supply-chain/advisory-db"
# Matches db-path and db-urls in deny.toml; the hash is cargo-deny's
# (0.20.2) XxHash64 of the lower-cased URL "https://github.com/rustsec/advisory-db".
db_root="${CARGO_TARGET_DIR:-$root/target}/advisory-db"
db_dir="$db_root/advisory-db-3157b0e258782691"

case "${1:-}" in
refresh)
    src="${2:-}"
    [ -n "$src" ] || die "usage: $0 refresh <git clone of rustsec/advisory-db>"
    git -C "$src" rev-parse --verify -q HEAD >/dev/null || die "$src is not a git repository"
    git -C "$src" cat-file -e HEAD:crates 2>/dev/null || die "$src has no crates/ at HEAD: not the advisory database?"
    commit=$(git -C "$src" rev-parse HEAD)
    date=$(git -C "$src" show -s --format=%cI HEAD)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    git -C "$src" archive --format=tar HEAD crates LICENSE.txt LICENSES | tar -x -C "$tmp"
    count=$(find "$tmp/crates" -name '*.md' | wc -l)
    [ "$count" -gt 0 ] || die "no advisories under crates/ in $src"
    printf 'commit=%s\ndate=%s\nadvisories=%s\n' "$commit" "$date" "$count" >"$tmp/SNAPSHOT"
    rm -rf "$snapshot"
    mkdir -p "$(dirname "$snapshot")"
    mv "$tmp" "$snapshot"
    trap - EXIT
    chmod 755 "$snapshot"
    echo "advisory-db.sh: snapshot of $commit ($date), $count advisories, in ${snapshot#"$root"/}"
    ;;
prepare)
    [ -f "$snapshot/SNAPSHOT" ] || die "no snapshot at $snapshot (see: $0 refresh)"
    commit=$(sed -n 's/^commit=//p' "$snapshot/SNAPSHOT")
    date=$(sed -n 's/^date=//p' "$snapshot/SNAPSHOT")
    [ -n "$commit" ] && [ -n "$date" ] || die "$snapshot/SNAPSHOT lacks commit= or date="
    rm -rf "$db_dir"
    mkdir -p "$db_dir/.git"
    cp -R "$snapshot/crates" "$db_dir/crates"
    echo "$commit		branch 'main' of https://github.com/rustsec/advisory-db (vendored snapshot)" >"$db_dir/.git/FETCH_HEAD"
    touch -d "$date" "$db_dir/.git/FETCH_HEAD"
    echo "$date"
    ;;
*)
    die "usage: $0 refresh <git clone of rustsec/advisory-db> | prepare"
    ;;
esac
