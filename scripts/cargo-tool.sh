#!/usr/bin/env bash
# Prints the path of a cargo-installed tool of a pinned version, building it
# from crates.io (`cargo install --locked`) into target/tools when neither
# PATH nor target/tools has that version. Progress goes to stderr, the path
# alone to stdout.
#
#   scripts/cargo-tool.sh cargo-deny 0.20.2
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 CRATE VERSION" >&2; exit 2; }
name=$1 version=$2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="${CARGO_TARGET_DIR:-$root/target}/tools"
for candidate in "$(command -v "$name" 2>/dev/null || true)" "$tools/bin/$name"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
        [ "$("$candidate" --version 2>/dev/null)" = "$name $version" ]; then
        echo "$candidate"
        exit 0
    fi
done
echo "== installing $name $version into ${tools#"$root"/}" >&2
start=$SECONDS
cargo install --locked --quiet "$name" --version "$version" --root "$tools" >&2
echo "   built in $((SECONDS - start)) s" >&2
echo "$tools/bin/$name"
