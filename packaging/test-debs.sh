#!/usr/bin/env bash
# Checks the Debian packages packaging/build.sh made in target/debian/:
# lintian (Debian's own checker) with no error and no warning but those
# overridden in packaging/debian/lintian-overrides with a reason, and the
# contents and control data every install relies on (dpkg-deb --info and
# --contents, the unpacked files). Prints "N passed, N failed".
#
#   packaging/test-debs.sh            (after packaging/build.sh debs)
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
debs="${CARGO_TARGET_DIR:-$root/target}/debian"
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

if ! command -v lintian >/dev/null 2>&1; then
    echo "== installing lintian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian
fi

version=$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "halo-lb"))')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for p in halo-lb halo-sidecar; do
    deb=$(ls "$debs/${p}_${version}"-*_amd64.deb 2>/dev/null | head -n 1)
    if [ -z "$deb" ]; then
        bad "$p: no package in $debs (run packaging/build.sh debs)"
        continue
    fi
    echo "== $deb"
    dbgsym=$(ls "$debs/${p}-dbgsym_${version}"-*_amd64.ddeb 2>/dev/null | head -n 1)
    check "$p: a separate -dbgsym package holds the debug symbols" test -n "$dbgsym"

    # lintian: tags at warning level or above fail, unless overridden.
    lintian --fail-on error,warning --suppress-tags-from-file packaging/debian/lintian-overrides \
        --tag-display-limit 0 "$deb" >"$tmp/$p.lintian" 2>&1
    status=$?
    sed 's/^/   /' "$tmp/$p.lintian"
    check "$p: lintian reports no error or warning" test "$status" -eq 0

    dpkg-deb --info "$deb" >"$tmp/$p.info"
    dpkg-deb --contents "$deb" >"$tmp/$p.contents"
    dpkg-deb -x "$deb" "$tmp/$p"
    dpkg-deb -e "$deb" "$tmp/$p.control"
    check "$p: binary in /usr/bin" grep -q " ./usr/bin/$p$" "$tmp/$p.contents"
    check "$p: the binary is stripped (symbols in -dbgsym)" \
        sh -c "! readelf -S '$tmp/$p/usr/bin/$p' | grep -q '\.debug_info'"
    check "$p: the binary runs" "$tmp/$p/usr/bin/$p" --version
    case $p in
        halo-lb) units="halo-lb.service" config=etc/halo/halo-lb.toml ;;
        halo-sidecar) units="halo-sidecar.service halo-sidecar@.service" config=etc/halo/sidecar.toml ;;
    esac
    for unit in $units; do
        check "$p: unit $unit installed" test -f "$tmp/$p/usr/lib/systemd/system/$unit"
        check "$p: unit $unit is the one in packaging/systemd" cmp -s "$tmp/$p/usr/lib/systemd/system/$unit" "packaging/systemd/$unit"
    done
    check "$p: default config /$config" test -f "$tmp/$p/$config"
    check "$p: its default config passes \`$p check\`" \
        sh -c "'$tmp/$p/usr/bin/$p' --config '$tmp/$p/$config' check >/dev/null"
    check "$p: /$config and /etc/default/$p are conffiles" \
        sh -c "grep -qx '/$config' '$tmp/$p.control/conffiles' && grep -qx '/etc/default/$p' '$tmp/$p.control/conffiles'"
    check "$p: /etc/default/$p is mode 600 (it may hold the Consul token)" \
        sh -c "grep -E '^-rw------- (root/root|0/0) .* ./etc/default/$p$' '$tmp/$p.contents' >/dev/null"
    check "$p: postinst has the systemd snippets (#DEBHELPER# filled in)" \
        sh -c "grep -q deb-systemd-helper '$tmp/$p.control/postinst' && ! grep -q '#DEBHELPER#' '$tmp/$p.control/postinst'"
    # deb-systemd-helper re-enables a unit on upgrade only if the admin
    # had enabled it (was-enabled); try-restart restarts only a running one.
    check "$p: the unit is neither enabled nor started on install" \
        sh -c "! grep -Eq 'deb-systemd-invoke (start|restart) ' '$tmp/$p.control/postinst' &&
               grep -B2 'deb-systemd-helper enable' '$tmp/$p.control/postinst' | grep -q was-enabled"
    check "$p: section net" \
        sh -c "grep -q '^ Section: net' '$tmp/$p.info'"
    # One page per command and subcommand, written from the CLI definitions
    # (`<binary> generate-man`), compressed, and readable by man(1).
    case $p in
        halo-lb) pages="halo-lb halo-lb-check halo-lb-healthcheck halo-lb-release-vip" ;;
        halo-sidecar) pages="halo-sidecar halo-sidecar-check halo-sidecar-healthcheck halo-sidecar-drain" ;;
    esac
    for page in $pages; do
        check "$p: man page $page(1) installed" test -f "$tmp/$p/usr/share/man/man1/$page.1.gz"
    done
    check "$p: $p(1) renders, with its FILES and SIGNALS" \
        sh -c "zcat '$tmp/$p/usr/share/man/man1/$p.1.gz' | MANWIDTH=80 man -l - 2>/dev/null | grep -q '^SIGNALS' &&
               zcat '$tmp/$p/usr/share/man/man1/$p.1.gz' | MANWIDTH=80 man -l - 2>/dev/null | grep -q '^FILES'"
done

# Install and purge on this host, as root: the maintainer scripts run for
# real (deb-systemd-helper records the units, enables nothing). Skipped
# when not root or when halo is installed here already (not ours to purge).
if [ "$(id -u)" -ne 0 ]; then
    echo "skip install test: not root"
elif dpkg-query -W -f '${Status}' halo-lb halo-sidecar 2>/dev/null | grep -q 'install ok installed'; then
    echo "skip install test: halo is installed on this host already"
else
    lb_deb=$(ls "$debs/halo-lb_${version}"-*_amd64.deb | head -n 1)
    sidecar_deb=$(ls "$debs/halo-sidecar_${version}"-*_amd64.deb | head -n 1)
    trap 'dpkg --purge halo-lb halo-sidecar >/dev/null 2>&1; rm -rf "$tmp"' EXIT
    check "dpkg -i installs both packages" dpkg -i "$lb_deb" "$sidecar_deb"
    check "/usr/bin/halo-lb check accepts the installed /etc/halo/halo-lb.toml" /usr/bin/halo-lb --config /etc/halo/halo-lb.toml check
    check "the installed units are known to systemctl, and disabled" \
        sh -c "[ \"\$(systemctl is-enabled halo-lb.service 2>/dev/null)\" = disabled ] &&
               [ \"\$(systemctl is-enabled halo-sidecar.service 2>/dev/null)\" = disabled ]"
    check "dpkg --purge removes binaries, units and conffiles" \
        sh -c "dpkg --purge halo-lb halo-sidecar >/dev/null &&
               [ ! -e /usr/bin/halo-lb ] && [ ! -e /usr/lib/systemd/system/halo-lb.service ] &&
               [ ! -e /etc/halo/halo-lb.toml ] && [ ! -e /etc/default/halo-sidecar ]"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
