#!/usr/bin/env bash
# Prints the path of a usable Consul binary, provisioning one if needed.
#
# Order of preference:
#   1. $CONSUL_BIN, if set (must be executable);
#   2. `consul` on PATH;
#   3. a cached copy under target/tools/ (from an earlier run of this script);
#   4. Debian bullseye's `consul` package (1.8.7), downloaded with
#      `apt-get download` against the Debian mirror already configured on this
#      machine and unpacked with `dpkg -x` into target/tools/. The package is not
#      installed and the system's apt state is not touched: a temporary sources
#      list and list directory are used.
#
# Only the path is printed on stdout; progress goes to stderr. On failure it
# prints one line starting with "consul.sh:" and exits 1.
set -euo pipefail

die() { echo "consul.sh: $*" >&2; exit 1; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="${CARGO_TARGET_DIR:-$root/target}/tools"
cached="$tools/consul/usr/bin/consul"

if [ -n "${CONSUL_BIN:-}" ]; then
  [ -x "$CONSUL_BIN" ] || die "CONSUL_BIN=$CONSUL_BIN is not an executable file"
  echo "$CONSUL_BIN"; exit 0
fi
if path=$(command -v consul 2>/dev/null); then echo "$path"; exit 0; fi
if [ -x "$cached" ]; then echo "$cached"; exit 0; fi

command -v apt-get >/dev/null || die "no consul on PATH and no apt-get to fetch Debian's package; set CONSUL_BIN"
command -v dpkg >/dev/null || die "no consul on PATH and no dpkg to unpack Debian's package; set CONSUL_BIN"

# The first Debian mirror URI configured on this machine (deb822 or one-line
# format). Security and update mirrors are skipped: bullseye's consul is in main.
mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f" | grep -v -- '-security' | grep '/debian/\?$' | head -n 1 || true)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }' "$f" | grep -v -- '-security' | grep '/debian/\?$' | head -n 1 || true)
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
}

uri=$(mirror_uri)
[ -n "$uri" ] || die "no consul on PATH and no Debian mirror found in /etc/apt/sources.list*; set CONSUL_BIN"

# Several test processes may race to provision: serialise on a lock file and
# re-check the cache once we hold it.
mkdir -p "$tools"
exec 9>"$tools/.consul.lock"
if command -v flock >/dev/null; then flock 9; fi
if [ -x "$cached" ]; then echo "$cached"; exit 0; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/pkg"
# Verify the archive's signature with Debian's keyring when the machine has it.
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -f "$keyring" ]; then opts="signed-by=$keyring"; else opts="trusted=yes"; fi
echo "deb [$opts] $uri bullseye main" > "$work/sources.list"

apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "APT::Get::List-Cleanup=false"
  -o "Debug::NoLocking=true"
  -o "APT::Sandbox::User=root"
)
echo "consul.sh: fetching consul from Debian bullseye ($uri)" >&2
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update against $uri bullseye failed"
(cd "$work/pkg" && apt-get "${apt_opts[@]}" -qq download consul >&2) || die "apt-get download consul (bullseye) failed"
deb=$(ls "$work/pkg"/consul_*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || die "apt-get download produced no consul .deb"
rm -rf "$tools/consul.tmp"
dpkg -x "$deb" "$tools/consul.tmp" || die "dpkg -x $deb failed"
[ -x "$tools/consul.tmp/usr/bin/consul" ] || die "$deb holds no usr/bin/consul"
rm -rf "$tools/consul"
mv "$tools/consul.tmp" "$tools/consul"
echo "$cached"
