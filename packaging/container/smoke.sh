#!/usr/bin/env bash
# Smoke test of the container images packaging/build.sh made, run with
# podman on the host network beside a real Consul agent (a dev agent on
# 127.0.0.1) and a real app (python3's http.server):
#
#   - halo-sidecar's image registers the app, its health check reaches
#     Consul as passing, `podman healthcheck run` passes, and `podman stop`
#     drains it: the instance goes into maintenance, is deregistered, and
#     the container exits 0;
#   - halo-lb's image serves a VIP in front of the app, its health check
#     passes, and `podman stop` ends it with exit 0.
#
# Everything binds 127.0.0.1 only. Everything started is removed on exit,
# failure included: containers by name, processes by pid. Prints
# "N passed, N failed".
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/packaging/container/containers.conf}
version=$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "halo-lb"))')
tag=$$
tmp=$(mktemp -d)
pids=()
containers=()
cleanup() {
    for c in "${containers[@]}"; do podman rm -f -t 0 "$c" >/dev/null 2>&1; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
# until SECONDS DESCRIPTION COMMAND...: polls the command every 0.2 s.
until_ok() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            bad "$what (not within ${limit}s)"
            return 1
        fi
        sleep 0.2
    done
    ok "$what"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

consul_bin=$(scripts/consul.sh) || exit 1
http=$(free_port)
"$consul_bin" agent -dev -node=smoke -bind=127.0.0.1 -client=127.0.0.1 -http-port="$http" \
    -dns-port=-1 -grpc-port=-1 -serf-lan-port="$(free_port)" -serf-wan-port="$(free_port)" \
    -server-port="$(free_port)" -hcl='disable_update_check = true' >"$tmp/consul.log" 2>&1 &
pids+=($!)
consul="http://127.0.0.1:$http"
until_ok 30 "consul dev agent up" curl -fsS "$consul/v1/status/leader" || exit 1

app=$(free_port)
mkdir -p "$tmp/www" && echo ok >"$tmp/www/healthz"
python3 -m http.server "$app" --bind 127.0.0.1 --directory "$tmp/www" >"$tmp/app.log" 2>&1 &
pids+=($!)
until_ok 10 "app up" curl -fsS "http://127.0.0.1:$app/healthz" || exit 1

# --- halo-sidecar -----------------------------------------------------------
admin=$(free_port)
cat >"$tmp/sidecar.toml" <<EOF
[consul]
address = "$consul"
[service]
name = "smoke"
id = "smoke-1"
address = "127.0.0.1"
port = $app
check_ttl = "10s"
[[check]]
name = "http"
type = "http"
url = "http://127.0.0.1:$app/healthz"
interval = "500ms"
timeout = "400ms"
rise = 1
[admin]
listen = "127.0.0.1:$admin"
[drain]
grace = "2s"
EOF
chmod 644 "$tmp/sidecar.toml"
sidecar="halo-smoke-sidecar-$tag"
containers+=("$sidecar")
if podman run -d --name "$sidecar" --network host \
    -v "$tmp/sidecar.toml:/etc/halo/sidecar.toml:ro" \
    "localhost/halo-sidecar:$version" >/dev/null; then
    ok "halo-sidecar container started"
else
    bad "halo-sidecar container started"
fi
passing() {
    curl -fsS "$consul/v1/health/service/smoke?passing" |
        python3 -c 'import json,sys; sys.exit(0 if any(e["Service"]["ID"] == "smoke-1" for e in json.load(sys.stdin)) else 1)'
}
until_ok 30 "the sidecar registered the app and Consul has it passing" passing ||
    { podman logs "$sidecar" 2>&1 | tail -n 20; curl -sS "$consul/v1/health/checks/smoke"; echo; }
until_ok 15 "podman healthcheck run passes (halo-sidecar healthcheck in the image)" \
    podman healthcheck run "$sidecar"
user=$(podman inspect --format '{{.Config.User}}' "$sidecar")
[ "$user" = "65532:65532" ] && ok "runs as 65532:65532" || bad "runs as $user"

# podman stop: SIGTERM, then the drain. Watch Consul while it drains.
podman stop -t 30 "$sidecar" >/dev/null 2>&1 &
stopper=$!
maintenance() {
    curl -fsS "$consul/v1/health/checks/smoke" | grep -q '_service_maintenance:smoke-1'
}
until_ok 10 "on podman stop the instance goes into maintenance in Consul" maintenance
gone() { ! curl -fsS "$consul/v1/agent/services" | grep -q '"smoke-1"'; }
until_ok 20 "then it is deregistered" gone
wait "$stopper"
code=$(podman inspect --format '{{.State.ExitCode}}' "$sidecar")
[ "$code" = 0 ] && ok "the sidecar container exited 0" || bad "the sidecar container exited $code"
podman logs "$sidecar" >"$tmp/sidecar.out" 2>&1
grep -q "deregistered; exiting" "$tmp/sidecar.out" && ok "its log says it deregistered" ||
    { bad "its log says it deregistered"; tail -n 20 "$tmp/sidecar.out"; }

# --- halo-lb ----------------------------------------------------------------
lb_admin=$(free_port)
vip=$(free_port)
cat >"$tmp/lb.toml" <<EOF
[admin]
listen = "127.0.0.1:$lb_admin"
[[vip]]
name = "smoke"
listen = "127.0.0.1:$vip"
backends = ["127.0.0.1:$app"]
EOF
chmod 644 "$tmp/lb.toml"
lb="halo-smoke-lb-$tag"
containers+=("$lb")
if podman run -d --name "$lb" --network host \
    -v "$tmp/lb.toml:/etc/halo/halo-lb.toml:ro" \
    "localhost/halo-lb:$version" >/dev/null; then
    ok "halo-lb container started"
else
    bad "halo-lb container started"
fi
until_ok 15 "the VIP serves the app through halo-lb" curl -fsS "http://127.0.0.1:$vip/healthz"
until_ok 15 "podman healthcheck run passes (halo-lb healthcheck in the image)" podman healthcheck run "$lb"
podman stop -t 30 "$lb" >/dev/null 2>&1
code=$(podman inspect --format '{{.State.ExitCode}}' "$lb")
[ "$code" = 0 ] && ok "the halo-lb container exited 0 on podman stop" || bad "the halo-lb container exited $code"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
