#!/usr/bin/env bash
# Prints the paths of the DNS tools the UDP tests and benchmark drive, one
# per line as name=path: dnsmasq (the backends), dig and dnsperf (the
# clients). Installs Debian's packages (dnsmasq-base, bind9-dnsutils,
# dnsperf) with apt-get when one is missing and this runs as root; otherwise
# it fails naming the packages to install.
#
# Progress goes to stderr; on failure one line starting with "dns-tools.sh:".
set -euo pipefail

die() { echo "dns-tools.sh: $*" >&2; exit 1; }

find_tool() { # NAME: its path, or nothing
  command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || true
}

missing() {
  local pkgs=()
  [ -n "$(find_tool dnsmasq)" ] || pkgs+=(dnsmasq-base)
  [ -n "$(find_tool dig)" ] || pkgs+=(bind9-dnsutils)
  [ -n "$(find_tool dnsperf)" ] || pkgs+=(dnsperf)
  echo "${pkgs[@]:-}"
}

need=$(missing)
if [ -n "$need" ]; then
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: $need (install them, or run the tests as root)"
  command -v apt-get >/dev/null || die "missing $need and no apt-get"
  # Several test processes may race: serialise, and look again once we hold
  # the lock.
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tools="${CARGO_TARGET_DIR:-$root/target}/tools"
  mkdir -p "$tools"
  exec 9>"$tools/.dns-tools.lock"
  if command -v flock >/dev/null; then flock 9; fi
  need=$(missing)
  if [ -n "$need" ]; then
    echo "dns-tools.sh: installing $need" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq $need >&2 || { apt-get update -qq >&2 && apt-get install -y -qq $need >&2; } \
      || die "apt-get install $need failed"
  fi
fi
for t in dnsmasq dig dnsperf; do
  p=$(find_tool "$t")
  [ -n "$p" ] || die "$t still missing after install"
  echo "$t=$p"
done
