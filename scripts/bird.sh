#!/usr/bin/env bash
# Prints the paths of BIRD 2's daemon and client, one per line as
# name=path, for the ECMP testbed (testkit/src/ecmp.rs). Installs Debian's
# bird2 with apt-get when missing and this runs as root; otherwise it fails
# naming the package.
#
# Progress goes to stderr; on failure one line starting with "bird.sh:".
set -euo pipefail

die() { echo "bird.sh: $*" >&2; exit 1; }

find_tool() { # NAME: its path, or nothing
  command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true
}

if [ -z "$(find_tool bird)" ] || [ -z "$(find_tool birdc)" ]; then
  [ "$(id -u)" -eq 0 ] || die "BIRD 2 is missing: apt-get install bird2 (or run the tests as root)"
  command -v apt-get >/dev/null || die "BIRD 2 is missing and there is no apt-get"
  # Several test processes may race: serialise, and look again once we hold
  # the lock.
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tools="${CARGO_TARGET_DIR:-$root/target}/tools"
  mkdir -p "$tools"
  exec 9>"$tools/.bird.lock"
  if command -v flock >/dev/null; then flock 9; fi
  if [ -z "$(find_tool bird)" ]; then
    echo "bird.sh: installing bird2" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The package's own service must not start a daemon in the host's
    # namespace: the testbed runs its own in network namespaces.
    policy=/usr/sbin/policy-rc.d
    created=
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
    apt-get install -y -qq bird2 >&2 || { apt-get update -qq >&2 && apt-get install -y -qq bird2 >&2; } \
      || { [ -n "$created" ] && rm -f "$policy"; die "apt-get install bird2 failed"; }
    if [ -n "$created" ]; then rm -f "$policy"; fi
  fi
fi
version=$("$(find_tool bird)" --version 2>&1 || true)
case "$version" in
  *"version 2."*) ;;
  *) die "the installed bird is not BIRD 2: $version" ;;
esac
for t in bird birdc; do
  echo "$t=$(find_tool "$t")"
done
