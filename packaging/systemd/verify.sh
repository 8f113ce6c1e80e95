#!/usr/bin/env bash
# Checks halo's systemd units without installing anything system-wide.
#
#   packaging/systemd/verify.sh
#
# Needs: bash, coreutils, diffutils, and systemd-analyze from systemd >= 250
# (for `verify --root=`); Debian package `systemd` (Debian 12 has 252).
# The halo binaries come from HALO_LB_BIN and HALO_SIDECAR_BIN, by default
# the newer of target/release/<name> and target/debug/<name>; nothing is
# built here.
#
# What it does, for halo-lb.service, halo-sidecar.service and
# halo-sidecar@.service (as the instance halo-sidecar@web.service):
#   1. Builds a throw-away root directory holding the systemd units of this
#      host (for sysinit.target and the other default dependencies), halo's
#      units where the Debian package puts them (/lib/systemd/system) and
#      the binaries where it puts them (/usr/bin/halo-lb,
#      /usr/bin/halo-sidecar), then runs `systemd-analyze verify --root=DIR`
#      on each unit: syntax, unknown or misspelt keys, bad values,
#      dependencies, and whether the first command of each Exec*= setting
#      exists and is executable inside DIR. Any output at all fails the
#      check, warnings included, except the lines matched by HARMLESS below
#      (none today).
#   2. Checks what verify does not: every command of every Exec*= line
#      (verify looks only at the first of a list, e.g. not the second
#      ExecReload=) is /usr/bin/halo-lb or /usr/bin/halo-sidecar, or an
#      executable that exists on this Debian host (/bin/kill); every
#      capability name is one systemd knows (it skips unknown ones
#      silently); every [Install] WantedBy= target is a unit of this host.
#   3. Parses every halo command line of the units with the real binary:
#      the same arguments plus --help, so clap rejects an unknown subcommand
#      or flag (exit 2) without running anything.
#   4. Checks that halo-sidecar.service and halo-sidecar@.service have the
#      same [Service] section, but for the instance's file names.
#   5. Prints `systemd-analyze security --offline=yes` exposure scores and
#      fails if one is above MAX_EXPOSURE (a guard against hardening lost
#      by accident; the scores are systemd's heuristic, not a proof).
# Exit status: 0 if everything passed, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

# Lines of systemd-analyze output accepted as harmless (extended regexes,
# one per line, each with its reason). None are needed with systemd 252.
HARMLESS=()
# Highest acceptable `systemd-analyze security` exposure (0 = locked down,
# 10 = unprotected; systemd calls < 2 "OK"). Today: see the printed scores.
MAX_EXPOSURE=2.5

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }

command -v systemd-analyze >/dev/null 2>&1 || {
    echo "FAIL: systemd-analyze not found (apt-get install -y systemd)" >&2
    exit 1
}
sd_version=$(systemd-analyze --version | awk 'NR == 1 { print $2 }')
if [ "${sd_version%%[!0-9]*}" -lt 250 ]; then
    echo "FAIL: systemd $sd_version: verify --root= needs systemd >= 250" >&2
    exit 1
fi
echo "== systemd-analyze from systemd $sd_version"

pick_bin() { # pick_bin NAME ENV_VALUE
    local r="$repo/target/release/$1" d="$repo/target/debug/$1"
    if [ -n "$2" ]; then
        echo "$2"
    elif [ -x "$r" ] && { [ ! -x "$d" ] || [ "$r" -nt "$d" ]; }; then
        echo "$r"
    else
        echo "$d"
    fi
}
lb_bin=$(pick_bin halo-lb "${HALO_LB_BIN:-}")
sidecar_bin=$(pick_bin halo-sidecar "${HALO_SIDECAR_BIN:-}")
for b in "$lb_bin" "$sidecar_bin"; do
    [ -x "$b" ] || {
        echo "FAIL: no executable $b (cargo build --release, or set HALO_LB_BIN / HALO_SIDECAR_BIN)" >&2
        exit 1
    }
done
echo "== binaries: $lb_bin, $sidecar_bin"

# unit file name -> the unit name verified (a template needs an instance)
units=(halo-lb.service halo-sidecar.service halo-sidecar@.service)
unit_name() { case $1 in *@.service) echo "${1%@.service}@web.service" ;; *) echo "$1" ;; esac; }

root=$(mktemp -d "${TMPDIR:-/tmp}/halo-units.XXXXXX")
trap 'rm -rf "$root"' EXIT
# A merged-/usr layout like Debian 12's.
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib/systemd/system" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
# The host's units: the targets and slices every service depends on.
for d in /usr/lib/systemd/system /lib/systemd/system; do
    [ -d "$d" ] && cp -a "$d/." "$root/usr/lib/systemd/system/" && break
done
[ -e "$root/usr/lib/systemd/system/sysinit.target" ] || {
    echo "FAIL: no sysinit.target in this host's /usr/lib/systemd/system" >&2
    exit 1
}
# Binaries: hard links where possible (the debug ones are large); verify
# resolves symlinks inside the root, so a link to the tree would not do.
ln -f "$lb_bin" "$root/usr/bin/halo-lb" 2>/dev/null || cp "$lb_bin" "$root/usr/bin/halo-lb"
ln -f "$sidecar_bin" "$root/usr/bin/halo-sidecar" 2>/dev/null || cp "$sidecar_bin" "$root/usr/bin/halo-sidecar"
for u in "${units[@]}"; do
    cp "$here/$u" "$root/usr/lib/systemd/system/$u"
done

# ---- 1. systemd-analyze verify
echo "== 1. systemd-analyze verify --root=$root"
for u in "${units[@]}"; do
    name=$(unit_name "$u")
    set +e
    out=$(cd "$root" && systemd-analyze verify --root="$root" "$name" 2>&1)
    rc=$?
    set -e
    bad=()
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        harmless=no
        for re in "${HARMLESS[@]+"${HARMLESS[@]}"}"; do
            if [[ $line =~ $re ]]; then harmless=yes; fi
        done
        if [ $harmless = yes ]; then
            echo "   (harmless) $line"
        else
            bad+=("$line")
        fi
    done <<<"$out"
    if [ $rc -ne 0 ] || [ ${#bad[@]} -gt 0 ]; then
        fail "systemd-analyze verify $name (exit $rc):"
        printf '   %s\n' "${bad[@]+"${bad[@]}"}" >&2
    else
        ok "systemd-analyze verify $name: no error, no warning"
    fi
done

# halo-lb.service once more with the ECMP drop-in, where systemd reads
# drop-ins of a packaged unit: /etc/systemd/system/<unit>.d/.
dropin="$here/halo-lb.service.d/ecmp.conf"
mkdir -p "$root/etc/systemd/system/halo-lb.service.d"
cp "$dropin" "$root/etc/systemd/system/halo-lb.service.d/ecmp.conf"
set +e
out=$(cd "$root" && systemd-analyze verify --root="$root" halo-lb.service 2>&1)
rc=$?
set -e
if [ $rc -ne 0 ] || [ -n "$out" ]; then
    fail "systemd-analyze verify halo-lb.service with halo-lb.service.d/ecmp.conf (exit $rc):"
    printf '   %s\n' "$out" >&2
else
    ok "systemd-analyze verify halo-lb.service with halo-lb.service.d/ecmp.conf: no error, no warning"
fi
rm -r "$root/etc/systemd/system/halo-lb.service.d"

# The Exec*= lines of a unit file, as "KEY<TAB>command line", with
# systemd's prefixes (-, @, :, +, !) removed from the command.
exec_lines() {
    sed -n -E 's/^(Exec[A-Za-z]+)=[-@:+!]*(.*)$/\1\t\2/p' "$1"
}

# ---- 2. every command exists
echo "== 2. every Exec*= command"
for u in "${units[@]}"; do
    while IFS=$'\t' read -r key cmd; do
        prog=${cmd%% *}
        case $prog in
        /usr/bin/halo-lb | /usr/bin/halo-sidecar) ok "$u $key: $prog (packaged)" ;;
        /*)
            if [ -x "$prog" ]; then
                ok "$u $key: $prog (on this host)"
            else
                fail "$u $key: $prog is not an executable on this host"
            fi
            ;;
        *) fail "$u $key: $prog is not an absolute path" ;;
        esac
    done < <(exec_lines "$here/$u")
done

while IFS=$'\t' read -r key cmd; do
    prog=${cmd%% *}
    if [ -x "$prog" ]; then
        ok "halo-lb.service.d/ecmp.conf $key: $prog (on this host)"
    else
        fail "halo-lb.service.d/ecmp.conf $key: $prog is not an executable on this host"
    fi
done < <(exec_lines "$dropin")

# ---- 2b. what verify accepts silently
echo "== 2b. capability names and [Install] targets"
known_caps=$(systemd-analyze capability | awk 'NR > 1 { print toupper($1) }')
for u in "${units[@]}"; do
    caps=$(sed -n -E 's/^(AmbientCapabilities|CapabilityBoundingSet)=~?(.*)$/\2/p' "$here/$u" | tr ' ' '\n' | sed '/^$/d' | sort -u)
    for c in $caps; do
        if grep -q -x -F "$c" <<<"$known_caps"; then
            ok "$u: $c"
        else
            fail "$u: unknown capability $c (systemd ignores it without a word)"
        fi
    done
    targets=$(sed -n -E 's/^(WantedBy|RequiredBy|UpheldBy)=(.*)$/\2/p' "$here/$u" | tr ' ' '\n' | sed '/^$/d')
    for t in $targets; do
        if [ -e "$root/usr/lib/systemd/system/$t" ]; then
            ok "$u: [Install] $t exists"
        else
            fail "$u: [Install] target $t is not a unit of this host"
        fi
    done
done

# ---- 3. halo command lines parse
echo "== 3. halo command lines, parsed by the binaries (arguments + --help)"
for u in "${units[@]}"; do
    while IFS=$'\t' read -r key cmd; do
        prog=${cmd%% *}
        case $prog in
        /usr/bin/halo-lb) bin=$lb_bin ;;
        /usr/bin/halo-sidecar) bin=$sidecar_bin ;;
        *) continue ;;
        esac
        # %i as for the instance verified; the units use no other specifier.
        args=${cmd#"$prog"}
        args=${args//%i/web}
        # shellcheck disable=SC2086 # word splitting is the point
        if out=$("$bin" $args --help 2>&1); then
            ok "$u $key:${args}"
        else
            fail "$u $key: \`${prog}${args}\` is not accepted by $bin: $(echo "$out" | head -3)"
        fi
    done < <(exec_lines "$here/$u")
done

# ---- 4. the two sidecar units agree
echo "== 4. halo-sidecar.service and halo-sidecar@.service, [Service] sections"
service_section() { # settings of [Service], comments and blank lines dropped
    awk '/^\[/ { s = ($0 == "[Service]"); next } s && !/^[[:space:]]*(#|$)/' "$1"
}
single=$(service_section "$here/halo-sidecar.service")
template=$(service_section "$here/halo-sidecar@.service" |
    grep -v -x -F 'EnvironmentFile=-/etc/default/halo-sidecar-%i' |
    sed 's#/etc/halo/sidecar-%i\.toml#/etc/halo/sidecar.toml#g')
if d=$(diff <(echo "$single") <(echo "$template")); then
    ok "same settings (but the instance's config and env file)"
else
    fail "[Service] sections differ (< halo-sidecar.service, > halo-sidecar@.service):"
    echo "$d" | sed 's/^/   /' >&2
fi

# ---- 5. exposure
echo "== 5. systemd-analyze security --offline=yes (max $MAX_EXPOSURE)"
for u in "${units[@]}"; do
    name=$(unit_name "$u")
    set +e
    out=$(cd "$root" && systemd-analyze security --offline=yes --root="$root" --no-pager "$name" 2>&1)
    rc=$?
    set -e
    level=$(echo "$out" | sed -n -E 's/.*Overall exposure level for [^:]*: ([0-9.]+).*/\1/p' | tail -1)
    if [ $rc -ne 0 ] || [ -z "$level" ]; then
        fail "systemd-analyze security $name (exit $rc): $(echo "$out" | tail -3)"
    elif awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l > m) }'; then
        fail "$name: exposure $level > $MAX_EXPOSURE:"
        echo "$out" | grep -E '^✗' | sed 's/^/   /' >&2
    else
        ok "$name: exposure $level"
    fi
done

echo
if [ $failures -gt 0 ]; then
    echo "verify.sh: $failures problem(s)" >&2
    exit 1
fi
echo "verify.sh: all units good"
