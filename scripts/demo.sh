#!/usr/bin/env bash
# Starts a throwaway Consul dev agent on a free loopback port and runs halo's
# demo against it. Everything it started is stopped on exit (Ctrl-C included).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
consul=$(scripts/consul.sh)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(port); dns=$(port); lan=$(port); wan=$(port); srv=$(port); grpc=$(port)
log=$(mktemp -t halo-demo-consul.XXXXXX.log)
"$consul" agent -dev -bind 127.0.0.1 -client 127.0.0.1 -http-port "$http" -dns-port "$dns" \
  -serf-lan-port "$lan" -serf-wan-port "$wan" -server-port "$srv" -grpc-port "$grpc" \
  -hcl 'disable_update_check = true' >"$log" 2>&1 &
consul_pid=$!
trap 'kill "$consul_pid" 2>/dev/null; wait "$consul_pid" 2>/dev/null || true' EXIT
export CONSUL_HTTP_ADDR="127.0.0.1:$http"
for _ in $(seq 100); do
  curl -sf "http://$CONSUL_HTTP_ADDR/v1/status/leader" | grep -q 127 && break
  sleep 0.1
done
echo "Consul dev agent at http://$CONSUL_HTTP_ADDR (log: $log)"
cargo run --quiet -p halo-consul --example watch
