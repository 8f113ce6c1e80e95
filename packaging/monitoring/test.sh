#!/usr/bin/env bash
# Tests packaging/monitoring/ against a real Prometheus (Debian's
# `prometheus` package, installed with apt-get when missing):
#   - promtool check rules halo.rules.yml
#   - promtool test rules halo.rules.test.yml (a unit test for every alert)
#   - halo-dashboard.json is valid JSON with a query in every panel
#   - docs/monitoring.md's "Every metric" tables list exactly the metrics in
#     the code
#   - e2e.py: Consul, two sidecars, a halo-lb pair and Prometheus scraping
#     them; every dashboard query and alert expression evaluated, and the
#     "no active instance" alert seen pending once both balancers stop.
# Prints "N passed, N failed" and exits non-zero if anything failed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "== installing prometheus (Debian package: prometheus and promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi

passed=0
failed=0
step() { # step WHAT CMD...
  local what=$1
  shift
  if "$@"; then
    echo "ok   $what"
    passed=$((passed + 1))
  else
    echo "FAIL $what"
    failed=$((failed + 1))
  fi
}

step "promtool check rules halo.rules.yml" promtool check rules "$here/halo.rules.yml"
step "promtool test rules halo.rules.test.yml" bash -c "cd '$here' && promtool test rules halo.rules.test.yml"
step "halo-dashboard.json: valid JSON, a query in every panel" python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
panels = [p for p in d["panels"] if p["type"] != "row"]
assert panels and all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in panels)
bad = [p["title"] for p in panels if p["type"] not in ("timeseries", "stat", "table", "gauge", "bargauge", "state-timeline")]
assert not bad, f"panels of no Grafana type: {bad}"
' "$here/halo-dashboard.json"

step "docs/monitoring.md's Every metric tables list every metric the code exports" python3 -c '
import re, sys, pathlib
code = set()
for crate in ("lb/src", "sidecar/src", "health/src", "consul/src"):
    for p in pathlib.Path(crate).rglob("*.rs"):
        code |= set(re.findall(r"\"(halo_[a-z0-9_]+)\"", p.read_text()))
page = pathlib.Path("docs/monitoring.md").read_text()
section = page[page.index("## Every metric"):]
end = section.find("\n## ", 1)
section = section if end < 0 else section[:end]
listed = set(re.findall(r"^\| `(halo_[a-z0-9_]+)` \|", section, re.M))
missing, stale = sorted(code - listed), sorted(listed - code)
if missing or stale:
    sys.exit(f"not in docs/monitoring.md: {missing}; in docs/monitoring.md, not in the code: {stale}")
'

cargo build --quiet -p halo-lb --bin halo-lb --example demo-backend -p halo-sidecar --bin halo-sidecar
target=${CARGO_TARGET_DIR:-$root/target}
consul=$(scripts/consul.sh)
log="$target/monitoring-e2e.log"
set +e
python3 "$here/e2e.py" --lb "$target/debug/halo-lb" --sidecar "$target/debug/halo-sidecar" \
  --backend "$target/debug/examples/demo-backend" --consul "$consul" --prometheus "$(command -v prometheus)" |
  tee "$log"
e2e=${PIPESTATUS[0]}
set -e
read -r e2e_passed _ e2e_failed _ < <(tail -n 1 "$log") || true
passed=$((passed + ${e2e_passed:-0}))
failed=$((failed + ${e2e_failed:-0}))
if [ "$e2e" -ne 0 ] && [ "${e2e_failed:-0}" -eq 0 ]; then
  echo "FAIL e2e.py exited $e2e"
  failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
