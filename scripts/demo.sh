#!/usr/bin/env bash
# halo's main job, locally: three demo backends behind halo-lb with the
# shipped example config (packaging/examples/lb.toml). Prints the VIP and
# admin URLs, sends a few requests, and runs until Ctrl-C, which stops
# everything it started. HALO_DEMO_ONESHOT=1 exits after the requests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

cargo build --release --quiet -p halo-lb --bin halo-lb --example demo-backend
bin=target/release
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for i in 1 2 3; do
  "$bin/examples/demo-backend" "127.0.0.1:900$i" "backend-$i" &
  pids+=($!)
done
"$bin/halo-lb" --config packaging/examples/lb.toml &
pids+=($!)

for _ in $(seq 100); do
  curl -sf http://127.0.0.1:9901/health >/dev/null && break
  sleep 0.1
done
echo
echo "halo-lb is balancing VIP web at 127.0.0.1:8080 over 127.0.0.1:9001-9003"
echo "  status:  curl http://127.0.0.1:9901/status"
echo "  metrics: curl http://127.0.0.1:9901/metrics"
echo "  disable: curl -X POST http://127.0.0.1:9901/vips/web/backends/127.0.0.1:9002/disable"
echo
for _ in 1 2 3 4 5 6 7 8; do
  curl -s http://127.0.0.1:8080/
done
if [ "${HALO_DEMO_ONESHOT:-0}" = 1 ]; then exit 0; fi
echo
echo "Running; kill a backend to watch retries and ejection, Ctrl-C to stop."
wait -n "${pids[@]}"
