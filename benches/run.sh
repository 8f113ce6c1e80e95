#!/usr/bin/env bash
# halo-lb against HAProxy and NGINX on loopback: one command, one table.
#
#   benches/run.sh
#
# Knobs (environment): see benches/README.md.  Everything talks to 127.0.0.1
# only, every load step is bounded in time, and everything this script starts
# is stopped on exit (including Ctrl-C), by pid.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python3}
BENCH="$HERE/bench.py"

# ------------------------------------------------------------------ knobs
to_secs() { # 10s | 10 | 2m  -> whole seconds
  local v=$1
  case "$v" in
    *ms) echo 1 ;;
    *s) echo "${v%s}" ;;
    *m) echo $(( ${v%m} * 60 )) ;;
    *) echo "$v" ;;
  esac
}
DUR=$(to_secs "${BENCH_DURATION:-10s}")
WARM=$(to_secs "${BENCH_WARMUP:-1s}")
SYSCALL_DUR=$(to_secs "${BENCH_SYSCALL_DURATION:-3s}")
ROUNDS=${BENCH_ROUNDS:-3}
ROUND_DUR=$(to_secs "${BENCH_ROUND_DURATION:-5s}")
CONNS=${BENCH_CONNS:-50}
CPS_CONNS=${BENCH_CPS_CONNS:-$CONNS}
THREADS=${BENCH_THREADS:-2}
IDLE_REQ=${BENCH_IDLE_CONNS:-10000}
SWAP_RATE=${BENCH_SWAP_RATE:-100}
PROXIES=${BENCH_PROXIES:-"direct haproxy haproxy-splice nginx-stream halo halo-epoll halo-buffered"}
TESTS=${BENCH_TESTS:-"tput http idle swap udp table"}
CORES=$(nproc)
BUILD_TIMEOUT=${BENCH_BUILD_TIMEOUT:-1800}

if ! [[ "$DUR" =~ ^[0-9]+$ ]] || [ "$DUR" -lt 1 ]; then
  echo "BENCH_DURATION must be whole seconds (e.g. 10s), got '${BENCH_DURATION:-}'" >&2
  exit 2
fi
if ! [[ "$ROUNDS" =~ ^[0-9]+$ ]] || [ "$ROUNDS" -lt 1 ] || ! [[ "$ROUND_DUR" =~ ^[0-9]+$ ]] || [ "$ROUND_DUR" -lt 1 ]; then
  echo "BENCH_ROUNDS must be a whole number ≥ 1 and BENCH_ROUND_DURATION whole seconds, got '${BENCH_ROUNDS:-}' and '${BENCH_ROUND_DURATION:-}'" >&2
  exit 2
fi

# ------------------------------------------------------------- logging/IO
# Progress goes to the stderr the script started with (fd 3), even from a
# trap that fires while a tool's output is redirected to a file.
exec 3>&2
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&3; }
STAMP=$(date +%Y%m%d-%H%M%S)
OUTDIR="$HERE/results/$STAMP"
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/results.tsv"
: >"$RESULTS"
result() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$RESULTS"; }
TMP=$(mktemp -d /tmp/halo-bench.XXXXXX)

# ------------------------------------------------------ process tracking
# Every process this script starts is recorded here and stopped on exit.
PIDS=()
LAST_PID=
spawn() { # spawn LOGFILE CMD...   (sets LAST_PID; never call inside $(...))
  local logf=$1
  shift
  "$@" >"$logf" 2>&1 </dev/null 3>&- &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

forget() { # drop PID from PIDS
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# run_fg CMD...: run a (bounded) tool in the background and wait for it, so
# that Ctrl-C or SIGTERM interrupts the wait at once and cleanup stops it.
run_fg() {
  "$@" 3>&- &
  local pid=$! rc=0
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  forget "$pid"
  return "$rc"
}

starttime() { # field 22 of /proc/PID/stat, to recognise a pid later
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  set -- $s
  echo "${20}"
}

stop() { # stop PID: TERM, wait up to 5 s, then KILL; also its own children
  local pid=${1:-}
  [ -n "$pid" ] || return 0
  local kids=() k st
  for k in $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do
    st=$(starttime "$k") && kids+=("$k:$st")
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  # Children (nginx workers) normally leave with their master; if one is
  # still there and is the very process we saw (same start time), kill it.
  for k in "${kids[@]}"; do
    local kp=${k%%:*} ks=${k#*:}
    if [ "$(starttime "$kp" 2>/dev/null || true)" = "$ks" ]; then
      kill -KILL "$kp" 2>/dev/null || true
    fi
  done
  forget "$pid"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]}"; do stop "$p"; done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

freeport() { "$PY" "$BENCH" freeport; }
wait_ready() { "$PY" "$BENCH" wait-ready "$@"; }

# ---------------------------------------------------------------- tools
install_tools() {
  export PATH="$PATH:/usr/sbin:/sbin"
  local need=() cmd pkg pair
  for pair in haproxy:haproxy nginx:nginx-light iperf3:iperf3 wrk:wrk perf:linux-perf; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
  done
  [ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
  # The UDP rows: dnsmasq behind the proxies, dnsperf in front.
  for pair in dnsmasq:dnsmasq-base dnsperf:dnsperf dig:bind9-dnsutils; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
  done
  [ "${#need[@]}" -gt 0 ] || return 0
  log "installing ${need[*]} with apt-get"
  local SUDO=
  [ "$(id -u)" = 0 ] || SUDO=sudo
  # Where an init system runs, the packages would start system-wide nginx and
  # haproxy services; keep them from doing so (policy-rc.d exit 101) unless
  # the machine already has its own policy.
  local prc=/usr/sbin/policy-rc.d ours=
  if [ ! -e "$prc" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$prc" >/dev/null
    $SUDO chmod +x "$prc"
    ours=1
  fi
  local rc=0
  { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"; } >"$OUTDIR/apt.log" 2>&1 || rc=$?
  if [ -n "$ours" ]; then $SUDO rm -f "$prc"; fi
  if [ "$rc" != 0 ]; then
    log "apt-get failed (exit $rc), see $OUTDIR/apt.log"
    exit 1
  fi
}
install_tools

# ------------------------------------------------------------ fd limits
WANT_NOFILE=${BENCH_NOFILE:-65536}
HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt "$WANT_NOFILE" ]; then
  log "fd hard limit is $HARD (< $WANT_NOFILE): using $HARD for every process"
  WANT_NOFILE=$HARD
fi
ulimit -n "$WANT_NOFILE"
NOFILE=$(ulimit -n)
# A proxy holds 2 fds per proxied connection; leave room for listeners,
# pipes and logs.
IDLE_CAP=$(( (NOFILE - 1024) / 2 / 100 * 100 ))
IDLE=$IDLE_REQ
[ "$IDLE" -le "$IDLE_CAP" ] || IDLE=$IDLE_CAP
HAPROXY_MAXPIPES=256
HAPROXY_MAXCONN=$(( (NOFILE - 2 * HAPROXY_MAXPIPES - 100) / 2 ))
[ "$HAPROXY_MAXCONN" -le 20000 ] || HAPROXY_MAXCONN=20000
NGINX_WC=$(( NOFILE - 100 ))
[ "$NGINX_WC" -le 20000 ] || NGINX_WC=20000
[ "$IDLE" -eq "$IDLE_REQ" ] || log "idle connections: $IDLE instead of $IDLE_REQ (fd limit $NOFILE)"

# --------------------------------------------------------------- halo-lb
HALO_BIN=
HALO_NA=
have_package() { # have_package NAME: is NAME a package of this workspace?
  (cd "$ROOT" && cargo metadata --no-deps --format-version 1 2>/dev/null) |
    "$PY" -c 'import json,sys; sys.exit(0 if any(p["name"]==sys.argv[1] for p in json.load(sys.stdin)["packages"]) else 1)' "$1"
}
build_halo() {
  if [ -n "${HALO_LB_BIN:-}" ]; then
    if [ -x "$HALO_LB_BIN" ]; then HALO_BIN=$HALO_LB_BIN; else HALO_NA="n/a (HALO_LB_BIN not executable)"; fi
    return
  fi
  if ! command -v cargo >/dev/null 2>&1; then HALO_NA="n/a (no cargo)"; return; fi
  if ! have_package halo-lb; then HALO_NA="n/a (not built)"; log "halo-lb is not a workspace package yet: skipping halo columns"; return; fi
  log "cargo build --release -p halo-lb (log: $OUTDIR/build.log)"
  local json="$OUTDIR/build.json"
  if ! run_fg timeout "$BUILD_TIMEOUT" cargo build --manifest-path "$ROOT/Cargo.toml" --release -p halo-lb \
      --message-format=json-render-diagnostics >"$json" 2>"$OUTDIR/build.log"; then
    HALO_NA="n/a (not built)"
    log "halo-lb build failed: skipping halo columns; tail of $OUTDIR/build.log:"
    tail -n 15 "$OUTDIR/build.log" >&3 || true
    return
  fi
  HALO_BIN=$(artifact "$json" halo-lb)
  [ -n "$HALO_BIN" ] || HALO_BIN="$ROOT/target/release/halo-lb"
  [ -x "$HALO_BIN" ] || { HALO_NA="n/a (not built)"; HALO_BIN=; }
}
artifact() { # artifact CARGO_JSON TARGET: path of the built executable
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
exe = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[2]:
        exe = m["executable"]
print(exe)
EOF
}
# table-bench is built now, from the same tree as halo-lb, and run at the end.
TABLE_BIN=
TABLE_NA="not available"
build_table_bench() {
  command -v cargo >/dev/null 2>&1 || return 0
  if ! have_package halo-benches; then
    log "halo-benches is not a workspace package: table rows say not available"
    return 0
  fi
  log "cargo build --release -p halo-benches --bin table-bench"
  if run_fg timeout "$BUILD_TIMEOUT" cargo build --manifest-path "$ROOT/Cargo.toml" --release -p halo-benches \
      --bin table-bench --message-format=json-render-diagnostics >"$OUTDIR/build-table-bench.json" \
      2>"$OUTDIR/build-table-bench.log"; then
    TABLE_BIN=$(artifact "$OUTDIR/build-table-bench.json" table-bench)
  fi
  if [ -z "$TABLE_BIN" ] || [ ! -x "$TABLE_BIN" ]; then
    TABLE_BIN=
    TABLE_NA="not built"
    log "table-bench did not build; tail of $OUTDIR/build-table-bench.log:"
    tail -n 10 "$OUTDIR/build-table-bench.log" >&3 || true
  fi
}
case " $PROXIES " in *" halo"*) build_halo ;; *) HALO_NA="n/a (not selected)" ;; esac
[ -n "$HALO_BIN" ] && log "halo-lb: $HALO_BIN"
# Which halo this is, taken now (the tree may change while the run goes on).
if [ -n "${HALO_LB_BIN:-}" ] && [ -n "$HALO_BIN" ]; then
  HALO_V="halo-lb $HALO_LB_BIN"
elif [ -n "$HALO_BIN" ]; then
  HALO_V="halo-lb $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ -n "$(cd "$ROOT" && git status --porcelain -- lb benches/src benches/Cargo.toml Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    HALO_V+=" + uncommitted changes"
  fi
else
  HALO_V="halo-lb ${HALO_NA#n/a }"
fi
if [[ " $TESTS " == *" table "* ]]; then build_table_bench; fi

# -------------------------------------------------------------- backends
# (1) nginx HTTP backend: tiny fixed answer, on two ports (the second one is
#     the swap test's second backend).  (2) iperf3 server.  (3) idle holder.
nginx_http_conf() { # DIR PORT1 PORT2
  local d=$1
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes $CORES;
worker_rlimit_nofile $NOFILE;
pid $d/nginx.pid;
error_log $d/error.log warn;
daemon off;
events { worker_connections $NGINX_WC; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$2 backlog=4096 reuseport;
    listen 127.0.0.1:$3 backlog=4096 reuseport;
    location / { default_type text/plain; return 200 "ok"; }
  }
}
EOF
}

HTTP_PORT=$(freeport)
HTTP_PORT2=$(freeport)
while [ "$HTTP_PORT2" = "$HTTP_PORT" ]; do HTTP_PORT2=$(freeport); done
mkdir -p "$TMP/http"
nginx_http_conf "$TMP/http" "$HTTP_PORT" "$HTTP_PORT2"
spawn "$OUTDIR/backend-nginx.log" nginx -p "$TMP/http" -c "$TMP/http/nginx.conf" -e "$TMP/http/error.log"
HTTP_PID=$LAST_PID
wait_ready "$HTTP_PORT" --http "http://127.0.0.1:$HTTP_PORT/" || { log "HTTP backend did not start"; cat "$TMP/http/error.log" >&2 || true; exit 1; }
wait_ready "$HTTP_PORT2" --http "http://127.0.0.1:$HTTP_PORT2/" || { log "HTTP backend (2nd port) did not start"; exit 1; }

IPERF_PORT=
IPERF_PID=
start_iperf() {
  [ -n "$IPERF_PORT" ] || IPERF_PORT=$(freeport)
  spawn "$OUTDIR/backend-iperf3.log" iperf3 -s -p "$IPERF_PORT" -B 127.0.0.1
  IPERF_PID=$LAST_PID
  wait_ready "$IPERF_PORT" || { log "iperf3 server did not start"; return 1; }
}

IDLE_PORT=
IDLE_PID=
start_idle_backend() {
  IDLE_PORT=$(freeport)
  spawn "$OUTDIR/backend-idle.log" "$PY" "$BENCH" idle-backend "$IDLE_PORT" 3600
  IDLE_PID=$LAST_PID
  wait_ready "$IDLE_PORT" --connect || { log "idle backend did not start"; return 1; }
}

# --------------------------------------------------------------- proxies
PROXY_PID=
PROXY_PORT=
ADMIN_PORT=
PROXY_TAG= # suffix for config/log names: -tput, -http, -idle, -swap

haproxy_conf() { # FILE PORT BACKEND_PORT SPLICE(0|1)
  cat >"$1" <<EOF
global
  nbthread $CORES
  maxconn $HAPROXY_MAXCONN
  maxpipes $HAPROXY_MAXPIPES
defaults
  mode tcp
  $([ "$4" = 1 ] && echo "option splice-auto")
  timeout connect 5s
  timeout client 5m
  timeout server 5m
frontend fe
  bind 127.0.0.1:$2
  maxconn $HAPROXY_MAXCONN
  default_backend be
backend be
  server s1 127.0.0.1:$3 maxconn $HAPROXY_MAXCONN
EOF
}

nginx_stream_conf() { # DIR PORT BACKEND_PORT
  local d=$1
  cat >"$d/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $CORES;
worker_rlimit_nofile $NOFILE;
pid $d/nginx.pid;
error_log $d/error.log warn;
daemon off;
events { worker_connections $NGINX_WC; }
stream {
  server {
    listen 127.0.0.1:$2 backlog=4096 reuseport;
    proxy_pass 127.0.0.1:$3;
    proxy_connect_timeout 5s;
    proxy_timeout 5m;
  }
}
EOF
}

halo_conf() { # FILE ADMIN_PORT PORT COPY PLANE BACKEND_PORT [BACKEND_PORT...]
  local f=$1 admin=$2 port=$3 copy=$4 plane=$5
  shift 5
  local b list=
  for b in "$@"; do list+="${list:+, }\"127.0.0.1:$b\""; done
  cat >"$f" <<EOF
data_plane = "$plane"

[admin]
listen = "127.0.0.1:$admin"

[[vip]]
name = "web"
listen = "127.0.0.1:$port"
algorithm = "round_robin"
backends = [$list]
connect_timeout = "1s"
idle_timeout = "5m"
max_connections = 20000
proxy_protocol = "off"
copy = "$copy"
EOF
}

# start_proxy NAME PROBE BACKEND_PORT [BACKEND_PORT2]
#   PROBE=connect: also open one connection through it once it listens
#   (not for iperf3, which would count the probe as a client).
start_proxy() {
  local name=$1 probe=$2 bport=$3 bport2=${4:-}
  PROXY_PID= PROXY_PORT= ADMIN_PORT=
  local extra=()
  [ "$probe" = connect ] && extra=(--connect)
  case "$name" in
    direct)
      PROXY_PORT=$bport
      return 0 ;;
    haproxy | haproxy-splice)
      PROXY_PORT=$(freeport)
      local splice=0
      [ "$name" = haproxy-splice ] && splice=1
      haproxy_conf "$TMP/$name.cfg" "$PROXY_PORT" "$bport" "$splice"
      spawn "$OUTDIR/$name$PROXY_TAG.log" haproxy -db -f "$TMP/$name.cfg"
      PROXY_PID=$LAST_PID
      wait_ready "$PROXY_PORT" "${extra[@]}" ;;
    nginx-stream)
      PROXY_PORT=$(freeport)
      rm -rf "$TMP/stream"
      mkdir -p "$TMP/stream"
      nginx_stream_conf "$TMP/stream" "$PROXY_PORT" "$bport"
      spawn "$OUTDIR/$name$PROXY_TAG.log" nginx -p "$TMP/stream" -c "$TMP/stream/nginx.conf" -e "$TMP/stream/error.log"
      PROXY_PID=$LAST_PID
      wait_ready "$PROXY_PORT" "${extra[@]}" ;;
    halo | halo-epoll | halo-buffered)
      [ -n "$HALO_BIN" ] || return 1
      PROXY_PORT=$(freeport)
      ADMIN_PORT=$(freeport)
      while [ "$ADMIN_PORT" = "$PROXY_PORT" ]; do ADMIN_PORT=$(freeport); done
      # halo: the defaults, as in packaging/examples/lb.toml (data_plane =
      # "auto": io_uring here; copy = "splice"). halo-epoll: the epoll data
      # plane. halo-buffered: copy = "buffered" (no splice).
      local copy=splice plane=auto
      [ "$name" = halo-epoll ] && plane=epoll
      [ "$name" = halo-buffered ] && copy=buffered
      halo_conf "$TMP/$name.toml" "$ADMIN_PORT" "$PROXY_PORT" "$copy" "$plane" "$bport" ${bport2:+"$bport2"}
      cp "$TMP/$name.toml" "$OUTDIR/$name$PROXY_TAG.toml"
      spawn "$OUTDIR/$name$PROXY_TAG.log" env RUST_LOG="${RUST_LOG:-warn}" "$HALO_BIN" --config "$TMP/$name.toml"
      PROXY_PID=$LAST_PID
      wait_ready "$PROXY_PORT" --http "http://127.0.0.1:$ADMIN_PORT/health" "${extra[@]}" ;;
    *)
      log "unknown proxy $name"
      return 1 ;;
  esac
}

proxy_failed() { # NAME: say why, show the log tail
  log "$1 did not become ready; tail of its log:"
  tail -n 10 "$OUTDIR/$1$PROXY_TAG.log" >&3 2>/dev/null || true
  if [ "$1" = nginx-stream ] && [ -f "$TMP/stream/error.log" ]; then tail -n 5 "$TMP/stream/error.log" >&3; fi
  stop "$PROXY_PID"
  PROXY_PID=
}

skip_halo() { # NAME KEY...: record halo's n/a reason for rows it cannot run
  local name=$1
  shift
  local k
  for k in "$@"; do result "$k" "$name" "${HALO_NA:-n/a}"; done
}

is_halo() { [[ "$1" == halo* ]]; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; } # never `kill -0 0`

# ------------------------------------------------------------- the tests
run_tput() { # bulk throughput of one stream, iperf3 through the proxy
  local p=$1
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then skip_halo "$p" tput; return; fi
  alive "$IPERF_PID" || start_iperf || { result tput "$p" "failed"; return; }
  start_proxy "$p" listen "$IPERF_PORT" || { proxy_failed "$p"; result tput "$p" "failed (start)"; return; }
  log "$p: iperf3 -t $DUR"
  local out="$OUTDIR/tput-$p.json" g c0 c1
  c0=$(cpu_of "$PROXY_PID")
  if run_fg timeout $(( DUR + WARM + 30 )) iperf3 -c 127.0.0.1 -p "$PROXY_PORT" -t "$DUR" -O "$WARM" -J \
      --connect-timeout 5000 >"$out" 2>"$OUTDIR/tput-$p.err" &&
      g=$("$PY" "$BENCH" iperf "$out" 2>>"$OUTDIR/tput-$p.err"); then
    c1=$(cpu_of "$PROXY_PID")
    result tput "$p" "$g"
    log "$p: $g Gbit/s"
    if [ -n "$PROXY_PID" ]; then
      # ms of CPU per GB moved, over the whole run (omitted seconds too).
      local bytes
      bytes=$("$PY" "$BENCH" iperf-bytes "$out" 2>/dev/null || echo x)
      log "$p: $(per_unit cpu_gb "$p" "$c0" "$c1" "$bytes" 1e12) ms CPU per GB"
    fi
  else
    result tput "$p" "failed"
    log "$p: iperf3 failed (see $out)"
    # A broken session can wedge the server: restart it for the next proxy.
    stop "$IPERF_PID"
    IPERF_PID=
  fi
  stop "$PROXY_PID"
}

cpu_of() { # PID: CPU seconds of the proxy (all threads and processes), "" for none
  if [ -n "${1:-}" ]; then "$PY" "$BENCH" cpu "$1"; fi
}

kcpu_of() { # PID: the same, kernel (system) time only
  if [ -n "${1:-}" ]; then "$PY" "$BENCH" cpu-kernel "$1"; fi
}

add_cpu() { # SUM C0 C1: SUM + C1 - C0
  "$PY" -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[3]) - float(sys.argv[2]))' "$1" "$2" "$3"
}

per_unit() { # KEY PROXY CPU0 CPU1 UNITS SCALE: record (CPU1-CPU0)*SCALE/UNITS
  local v
  v=$("$PY" "$BENCH" per-unit "${3:-x}" "${4:-x}" "${5:-x}" "$6")
  result "$1" "$2" "$v"
  echo "$v"
}

# syscalls_run KEY PROXY WRK-ARGS...: counts the proxy's system calls (every
# thread and process, `perf stat -e raw_syscalls:sys_enter`) over a separate
# wrk run of SYSCALL_DUR seconds, and records them per request. Separate,
# so the tracepoint's own cost never lands in the CPU rows.
syscalls_run() {
  local key=$1 p=$2
  shift 2
  if [ -z "$PROXY_PID" ] || ! command -v perf >/dev/null 2>&1; then
    result "$key" "$p" "n/a (no perf)"
    return
  fi
  local pids out="$OUTDIR/$key-$p.perf" w="$OUTDIR/$key-$p.wrk"
  pids=$("$PY" "$BENCH" pids "$PROXY_PID")
  # Counting starts disabled (-D -1); perf answers "ack" to "enable" on its
  # control fifos once it is attached and counting, so the run starts then.
  local ctl="$OUTDIR/$key-$p.perf-ctl" ack="$OUTDIR/$key-$p.perf-ack"
  rm -f "$ctl" "$ack"
  mkfifo "$ctl" "$ack"
  spawn "$OUTDIR/$key-$p.perf.log" perf stat -x, -e raw_syscalls:sys_enter -p "$pids" -o "$out" \
    -D -1 --control "fifo:$ctl,$ack"
  local perf_pid=$LAST_PID
  if ! timeout 10 bash -c 'echo enable >"$1" && read -r reply <"$2" && [ "$reply" = ack ]' _ "$ctl" "$ack"; then
    log "$p: perf did not start counting; no syscall row"
    stop "$perf_pid"
    rm -f "$ctl" "$ack"
    result "$key" "$p" "n/a (perf did not start)"
    return
  fi
  wrk_run "$w" "$SYSCALL_DUR" "$@" || true
  kill -INT "$perf_pid" 2>/dev/null || true
  local deadline=$(( SECONDS + 10 ))
  while kill -0 "$perf_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  stop "$perf_pid"
  rm -f "$ctl" "$ack"
  local n req
  n=$("$PY" "$BENCH" perf-count "$out" 2>/dev/null || echo x)
  req=$("$PY" "$BENCH" wrk "$w" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("requests") or "x")')
  local v
  v=$(per_unit "$key" "$p" 0 "$n" "$req" 1)
  log "$p: $v syscalls per request ($n in $req requests)"
}

wrk_run() { # OUTFILE SECONDS CONNS [wrk args...] URL
  local out=$1 secs=$2 c=$3
  shift 3
  run_fg timeout $(( secs + 30 )) wrk -t "$THREADS" -c "$c" -d "${secs}s" --timeout 5s "$@" >"$out" 2>&1
}

record_wrk() { # KEY PROXY FILE FIELD [NOTE-IF-ERRORS]
  local key=$1 p=$2 f=$3 field=$4
  local v
  v=$("$PY" - "$f" "$field" "$BENCH" <<'EOF'
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location("bench", sys.argv[3])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
try:
    d = b.parse_wrk(sys.argv[1])
except Exception:
    print("failed"); sys.exit()
v = d.get(sys.argv[2])
if v is None:
    print("failed"); sys.exit()
bad = d.get("errors", 0) + d.get("non2xx", 0)
note = ""
if bad:
    note = f"{bad} errors" if d.get("requests") is None or bad < d["requests"] else "all failed"
print(f"{v}\t{note}")
EOF
)
  local val=${v%%$'\t'*} note=
  [[ "$v" == *$'\t'* ]] && note=${v#*$'\t'}
  result "$key" "$p" "$val" "$note"
  echo "$val"
}

# The HTTP rows are measured in ROUNDS interleaved passes over the proxies
# (round 1: each proxy in turn, then round 2, ...), each a fresh proxy
# process measured for ROUND_DUR seconds per row. The machine's own drift
# (±20 % between minutes here) then lands on every proxy alike instead of on
# whichever ran in a slow minute, which is what a ratio between proxies
# needs. Rates are all requests over all measured time, CPU per unit is all
# CPU over all units, latency percentiles are the median of the rounds'.
declare -A HTTP_CPU_CPS HTTP_CPU_KA HTTP_KCPU_CPS HTTP_KCPU_KA HTTP_FAILED

http_round() { # PROXY ROUND: one pass of conn/s and keep-alive for one proxy
  local p=$1 r=$2
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then return; fi
  [ -n "${HTTP_FAILED[$p]:-}" ] && return
  if [ "$r" -eq 1 ]; then rm -f "$OUTDIR/cps-$p.txt" "$OUTDIR/ka-$p.txt"; fi
  start_proxy "$p" connect "$HTTP_PORT" || {
    proxy_failed "$p"
    HTTP_FAILED[$p]=1
    return
  }
  local url="http://127.0.0.1:$PROXY_PORT/" c0 c1 k0 k1 one="$TMP/wrk-round.txt"
  log "$p: round $r/$ROUNDS: wrk Connection: close -c $CPS_CONNS, ${ROUND_DUR}s"
  wrk_run "$OUTDIR/warm-cps-$p.txt" "$WARM" "$CPS_CONNS" -H "Connection: close" "$url" || true
  c0=$(cpu_of "$PROXY_PID"); k0=$(kcpu_of "$PROXY_PID")
  wrk_run "$one" "$ROUND_DUR" "$CPS_CONNS" -H "Connection: close" "$url" || true
  c1=$(cpu_of "$PROXY_PID"); k1=$(kcpu_of "$PROXY_PID")
  cat "$one" >>"$OUTDIR/cps-$p.txt"
  if [ -n "$PROXY_PID" ]; then
    HTTP_CPU_CPS[$p]=$(add_cpu "${HTTP_CPU_CPS[$p]:-0}" "$c0" "$c1")
    HTTP_KCPU_CPS[$p]=$(add_cpu "${HTTP_KCPU_CPS[$p]:-0}" "$k0" "$k1")
  fi
  log "$p: round $r/$ROUNDS: wrk keep-alive --latency -c $CONNS, ${ROUND_DUR}s"
  wrk_run "$OUTDIR/warm-ka-$p.txt" "$WARM" "$CONNS" "$url" || true
  c0=$(cpu_of "$PROXY_PID"); k0=$(kcpu_of "$PROXY_PID")
  wrk_run "$one" "$ROUND_DUR" "$CONNS" --latency "$url" || true
  c1=$(cpu_of "$PROXY_PID"); k1=$(kcpu_of "$PROXY_PID")
  cat "$one" >>"$OUTDIR/ka-$p.txt"
  if [ -n "$PROXY_PID" ]; then
    HTTP_CPU_KA[$p]=$(add_cpu "${HTTP_CPU_KA[$p]:-0}" "$c0" "$c1")
    HTTP_KCPU_KA[$p]=$(add_cpu "${HTTP_KCPU_KA[$p]:-0}" "$k0" "$k1")
  fi
  if [ "$r" -eq 1 ] && [ -n "$PROXY_PID" ]; then
    # System calls are counted (not timed) once, on a separate run each, so
    # the tracepoint's cost never lands in the CPU rows.
    syscalls_run sys_cps "$p" "$CPS_CONNS" -H "Connection: close" "$url"
    syscalls_run sys_ka "$p" "$CONNS" "$url"
  fi
  stop "$PROXY_PID"
}

http_results() { # PROXY: the rows from all rounds
  local p=$1 v n k
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then skip_halo "$p" cps ka_rps lat_p50 lat_p99; return; fi
  if [ -n "${HTTP_FAILED[$p]:-}" ]; then
    for k in cps ka_rps lat_p50 lat_p99; do result "$k" "$p" "failed (start)"; done
    return
  fi
  v=$(record_wrk cps "$p" "$OUTDIR/cps-$p.txt" rps)
  n=$("$PY" "$BENCH" wrk "$OUTDIR/cps-$p.txt" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("requests") or "x")')
  if [ -n "${HTTP_CPU_CPS[$p]:-}" ]; then
    log "$p: $v conn/s, $(per_unit cpu_cps "$p" 0 "${HTTP_CPU_CPS[$p]}" "$n" 1e6) µs CPU per connection, $(per_unit kcpu_cps "$p" 0 "${HTTP_KCPU_CPS[$p]}" "$n" 1e6) of it in the kernel"
  else
    log "$p: $v conn/s"
  fi
  v=$(record_wrk ka_rps "$p" "$OUTDIR/ka-$p.txt" rps)
  local p50 p99
  p50=$(record_wrk lat_p50 "$p" "$OUTDIR/ka-$p.txt" p50_ms)
  p99=$(record_wrk lat_p99 "$p" "$OUTDIR/ka-$p.txt" p99_ms)
  log "$p: $v req/s, p50 $p50 ms, p99 $p99 ms"
  if [ -n "${HTTP_CPU_KA[$p]:-}" ]; then
    n=$("$PY" "$BENCH" wrk "$OUTDIR/ka-$p.txt" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("requests") or "x")')
    log "$p: $(per_unit cpu_ka "$p" 0 "${HTTP_CPU_KA[$p]}" "$n" 1e6) µs CPU per keep-alive request, $(per_unit kcpu_ka "$p" 0 "${HTTP_KCPU_KA[$p]}" "$n" 1e6) of it in the kernel"
  fi
}

# ------------------------------------------------------------------ UDP
# DNS through a UDP VIP: two dnsmasq resolvers behind the proxy, dnsperf in
# front (UDP_THREADS threads, as wrk's -t 2; UDP_CLIENTS sockets, i.e. flows;
# at most UDP_OUTSTANDING queries in flight), in ROUNDS interleaved rounds of ROUND_DUR seconds, as the HTTP
# rows. halo runs packaging/examples/lb-udp.toml with only its addresses
# changed; NGINX its stream module with `listen ... udp` and
# `proxy_responses 1`, the same two resolvers round-robin. HAProxy 2.6 has no
# UDP load balancing.
UDP_CLIENTS=${BENCH_UDP_CLIENTS:-20}
UDP_THREADS=${BENCH_UDP_THREADS:-2}
UDP_OUTSTANDING=${BENCH_UDP_OUTSTANDING:-200}
UDP_PROXIES="direct nginx-stream halo"
declare -A UDP_CPU UDP_FAILED
UDP_BACKENDS=()

start_dns_backends() {
  local i port
  for i in 1 2; do
    port=$(freeport)
    spawn "$OUTDIR/dnsmasq-$i.log" dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
      --cache-size=0 --bind-interfaces --listen-address=127.0.0.1 --interface=lo --port="$port" \
      --address=/example.test/198.18.0.$i --pid-file="$TMP/dnsmasq-$i.pid" --user=root
    UDP_BACKENDS+=("$port")
  done
  local deadline=$(( SECONDS + 20 )) p
  for p in "${UDP_BACKENDS[@]}"; do
    until [ -n "$(dig +short +tries=1 +time=1 @127.0.0.1 -p "$p" ready.example.test A 2>/dev/null)" ]; do
      [ "$SECONDS" -lt "$deadline" ] || return 1
      sleep 0.1
    done
  done
}

start_udp_proxy() { # NAME: sets PROXY_PID, PROXY_PORT
  local name=$1
  PROXY_PID= PROXY_PORT=
  case "$name" in
    direct)
      PROXY_PORT=${UDP_BACKENDS[0]} ;;
    nginx-stream)
      PROXY_PORT=$(freeport)
      rm -rf "$TMP/ustream"
      mkdir -p "$TMP/ustream"
      cat >"$TMP/ustream/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $CORES;
worker_rlimit_nofile $NOFILE;
pid $TMP/ustream/nginx.pid;
error_log $TMP/ustream/error.log warn;
daemon off;
events { worker_connections $NGINX_WC; }
stream {
  upstream dns { server 127.0.0.1:${UDP_BACKENDS[0]}; server 127.0.0.1:${UDP_BACKENDS[1]}; }
  server {
    listen 127.0.0.1:$PROXY_PORT udp reuseport;
    proxy_pass dns;
    proxy_responses 1;
    proxy_timeout 10s;
  }
}
EOF
      spawn "$OUTDIR/$name-udp.log" nginx -p "$TMP/ustream" -c "$TMP/ustream/nginx.conf" -e "$TMP/ustream/error.log"
      PROXY_PID=$LAST_PID ;;
    halo)
      [ -n "$HALO_BIN" ] || return 1
      PROXY_PORT=$(freeport)
      local admin
      admin=$(freeport)
      # The shipped example, addresses changed: admin, the VIP's port (both
      # of its VIPs), the two resolvers.
      sed -e "s/127\.0\.0\.1:9901/127.0.0.1:$admin/" \
        -e "s/127\.0\.0\.1:5353/127.0.0.1:$PROXY_PORT/" \
        -e "s/127\.0\.0\.1:5301/127.0.0.1:${UDP_BACKENDS[0]}/g" \
        -e "s/127\.0\.0\.1:5302/127.0.0.1:${UDP_BACKENDS[1]}/g" \
        "$ROOT/packaging/examples/lb-udp.toml" >"$TMP/halo-udp.toml"
      cp "$TMP/halo-udp.toml" "$OUTDIR/halo-udp.toml"
      spawn "$OUTDIR/halo-udp.log" env RUST_LOG="${RUST_LOG:-warn}" "$HALO_BIN" --config "$TMP/halo-udp.toml"
      PROXY_PID=$LAST_PID ;;
  esac
  # Ready when a query through it is answered.
  local deadline=$(( SECONDS + 20 ))
  until [ -n "$(dig +short +tries=1 +time=1 @127.0.0.1 -p "$PROXY_PORT" ready.example.test A 2>/dev/null)" ]; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

udp_round() { # PROXY ROUND
  local p=$1 r=$2
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then return; fi
  [ -n "${UDP_FAILED[$p]:-}" ] && return
  [ "$r" -eq 1 ] && rm -f "$OUTDIR/udp-$p.txt"
  start_udp_proxy "$p" || { log "$p: UDP proxy not ready"; UDP_FAILED[$p]=1; stop "$PROXY_PID"; return; }
  printf 'a.example.test A\nb.example.test A\nc.example.test A\n' >"$TMP/queries"
  log "$p: round $r/$ROUNDS: dnsperf -T $UDP_THREADS -c $UDP_CLIENTS -q $UDP_OUTSTANDING, ${ROUND_DUR}s"
  run_fg timeout $(( WARM + 30 )) dnsperf -s 127.0.0.1 -p "$PROXY_PORT" -d "$TMP/queries" -l "$WARM" \
    -T "$UDP_THREADS" -c "$UDP_CLIENTS" -q "$UDP_OUTSTANDING" >/dev/null 2>&1 || true
  local c0 c1
  c0=$(cpu_of "$PROXY_PID")
  run_fg timeout $(( ROUND_DUR + 30 )) dnsperf -s 127.0.0.1 -p "$PROXY_PORT" -d "$TMP/queries" -l "$ROUND_DUR" \
    -T "$UDP_THREADS" -c "$UDP_CLIENTS" -q "$UDP_OUTSTANDING" >>"$OUTDIR/udp-$p.txt" 2>&1 || true
  c1=$(cpu_of "$PROXY_PID")
  if [ -n "$PROXY_PID" ]; then
    UDP_CPU[$p]=$("$PY" -c 'import sys; print(float(sys.argv[1]) + float(sys.argv[3]) - float(sys.argv[2]))' "${UDP_CPU[$p]:-0}" "$c0" "$c1")
  fi
  stop "$PROXY_PID"
}

udp_results() { # PROXY
  local p=$1 v
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then skip_halo "$p" udp_qps udp_cpu udp_lost; return; fi
  if [ -n "${UDP_FAILED[$p]:-}" ]; then
    for v in udp_qps udp_cpu udp_lost; do result "$v" "$p" "failed (start)"; done
    return
  fi
  v=$("$PY" "$BENCH" dnsperf "$OUTDIR/udp-$p.txt")
  local qps completed lost
  read -r qps completed lost <<<"$v"
  result udp_qps "$p" "$qps"
  result udp_lost "$p" "$lost"
  if [ -n "${UDP_CPU[$p]:-}" ]; then
    log "$p: $qps DNS queries/s, $lost % lost, $(per_unit udp_cpu "$p" 0 "${UDP_CPU[$p]}" "$completed" 1e6) µs CPU per query"
  else
    log "$p: $qps DNS queries/s, $lost % lost"
  fi
}

run_udp() {
  start_dns_backends || { log "dnsmasq did not start; UDP rows skipped"; for p in $UDP_PROXIES; do result udp_qps "$p" failed; done; return; }
  local r p
  for r in $(seq 1 "$ROUNDS"); do for p in $UDP_PROXIES; do udp_round "$p" "$r"; done; done
  for p in $UDP_PROXIES; do udp_results "$p"; done
}

run_idle() { # RSS growth of the proxy for IDLE held connections
  local p=$1
  [ "$p" = direct ] && return
  if is_halo "$p" && [ -z "$HALO_BIN" ]; then skip_halo "$p" idle_kib; return; fi
  alive "$IDLE_PID" || start_idle_backend || { result idle_kib "$p" failed; return; }
  start_proxy "$p" connect "$IDLE_PORT" || { proxy_failed "$p"; result idle_kib "$p" "failed (start)"; return; }
  sleep 0.5 # let the fresh proxy settle (not a readiness wait)
  local before after ready="$TMP/idle-$p.ready"
  rm -f "$ready"
  before=$("$PY" "$BENCH" rss "$PROXY_PID")
  log "$p: opening $IDLE idle connections (RSS before: $before KiB)"
  spawn "$OUTDIR/idle-client-$p.log" "$PY" "$BENCH" idle-client "$PROXY_PORT" "$IDLE" "$ready" --timeout 90 --hold 150
  local client=$LAST_PID deadline=$(( SECONDS + 120 ))
  while [ ! -f "$ready" ] && [ "$SECONDS" -lt "$deadline" ] && kill -0 "$client" 2>/dev/null; do sleep 0.2; done
  if [ ! -f "$ready" ]; then
    log "$p: idle client did not finish"
    result idle_kib "$p" failed
    stop "$client"
    stop "$PROXY_PID"
    return
  fi
  sleep 1 # let RSS settle after the last connection
  after=$("$PY" "$BENCH" rss "$PROXY_PID")
  local established
  established=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["established"])' "$ready")
  cp "$ready" "$OUTDIR/idle-$p.json"
  stop "$client"
  stop "$PROXY_PID"
  if [ "$established" -gt 0 ]; then
    local kib note=
    kib=$("$PY" -c "print(($after - $before) / $established)")
    [ "$established" -lt "$IDLE" ] && note="only $established of $IDLE connected"
    result idle_kib "$p" "$kib" "$note"
    log "$p: RSS $before -> $after KiB over $established connections = $kib KiB/conn"
  else
    result idle_kib "$p" "failed" "no connection established"
    log "$p: no idle connection could be established"
  fi
}

run_swap() { # halo's latency and conn/s while its table swaps SWAP_RATE/s
  if [ -z "$HALO_BIN" ]; then
    result swap_p50 halo "${HALO_NA:-n/a}"
    result swap_p99 halo "${HALO_NA:-n/a}"
    result swap_cps halo "${HALO_NA:-n/a}"
    return
  fi
  start_proxy halo connect "$HTTP_PORT" "$HTTP_PORT2" || {
    proxy_failed halo
    result swap_p50 halo "failed (start)"; result swap_p99 halo "failed (start)"; result swap_cps halo "failed (start)"
    return
  }
  local url="http://127.0.0.1:$PROXY_PORT/" admin="127.0.0.1:$ADMIN_PORT" b2="127.0.0.1:$HTTP_PORT2"
  local swaps=$(( DUR + 1 ))
  wrk_run "$OUTDIR/warm-swap-halo.txt" "$WARM" "$CONNS" "$url" 2>/dev/null || true

  # Baselines first: the same 2-backend VIP, same process, no swaps.
  log "halo (2 backends): keep-alive latency without swaps (baseline)"
  wrk_run "$OUTDIR/swapbase-ka-halo.txt" "$DUR" "$CONNS" --latency "$url" || true
  record_wrk swapbase_p50 halo "$OUTDIR/swapbase-ka-halo.txt" p50_ms >/dev/null
  record_wrk swapbase_p99 halo "$OUTDIR/swapbase-ka-halo.txt" p99_ms >/dev/null

  log "halo: keep-alive latency while POSTing disable/enable on $b2 at $SWAP_RATE/s"
  spawn "$OUTDIR/swap-loop-lat.log" "$PY" "$BENCH" swap-loop "$admin" web "$b2" "$SWAP_RATE" "$swaps" "$OUTDIR/swap-lat.json"
  local loop=$LAST_PID
  wrk_run "$OUTDIR/swap-ka-halo.txt" "$DUR" "$CONNS" --latency "$url" || true
  wait "$loop" 2>/dev/null || true
  stop "$loop"
  local p50 p99 cps
  p50=$(record_wrk swap_p50 halo "$OUTDIR/swap-ka-halo.txt" p50_ms)
  p99=$(record_wrk swap_p99 halo "$OUTDIR/swap-ka-halo.txt" p99_ms)
  result swapinfo_lat halo "$(swap_summary "$OUTDIR/swap-lat.json")"

  log "halo (2 backends): new connections/s without swaps (baseline)"
  wrk_run "$OUTDIR/swapbase-cps-halo.txt" "$DUR" "$CPS_CONNS" -H "Connection: close" "$url" || true
  record_wrk swapbase_cps halo "$OUTDIR/swapbase-cps-halo.txt" rps >/dev/null

  log "halo: new connections/s while swapping at $SWAP_RATE/s"
  spawn "$OUTDIR/swap-loop-cps.log" "$PY" "$BENCH" swap-loop "$admin" web "$b2" "$SWAP_RATE" "$swaps" "$OUTDIR/swap-cps.json"
  loop=$LAST_PID
  wrk_run "$OUTDIR/swap-cps-halo.txt" "$DUR" "$CPS_CONNS" -H "Connection: close" "$url" || true
  wait "$loop" 2>/dev/null || true
  stop "$loop"
  cps=$(record_wrk swap_cps halo "$OUTDIR/swap-cps-halo.txt" rps)
  result swapinfo_cps halo "$(swap_summary "$OUTDIR/swap-cps.json")"
  log "halo under swaps: p50 $p50 ms, p99 $p99 ms, $cps conn/s"
  stop "$PROXY_PID"
}

swap_summary() { # JSON -> "N swaps (R/s), E failed"
  "$PY" - "$1" <<'EOF' 2>/dev/null || echo "swap loop failed"
import json, sys
d = json.load(open(sys.argv[1]))
s = f"{d['ok']} swaps ({d['rate']}/s, {d.get('changed', '?')} answered changed=true)"
bad = d["non2xx"] + d["errors"]
if bad:
    s += f", {bad} POSTs failed"
    if d.get("statuses"):
        s += " " + ",".join(f"{k}x{v}" for k, v in d["statuses"].items())
    if d.get("first_error"):
        s += f" ({d['first_error'][:60]})"
print(s)
EOF
}

run_table_bench() { # the executable `cargo run -p halo-benches --bin table-bench` would run
  if [ -z "$TABLE_BIN" ]; then
    result tbl_state all "$TABLE_NA"
    return
  fi
  log "table-bench ($TABLE_BIN)"
  if run_fg timeout 900 "$TABLE_BIN" >"$OUTDIR/table-bench.jsonl" 2>"$OUTDIR/table-bench.log" &&
      "$PY" "$BENCH" table-bench "$OUTDIR/table-bench.jsonl" "$RESULTS"; then
    log "table-bench: $(wc -l <"$OUTDIR/table-bench.jsonl") rows"
  else
    result tbl_state all "failed (see results/$STAMP/table-bench.log)"
    log "table-bench failed; tail of its log:"
    tail -n 10 "$OUTDIR/table-bench.log" >&3 || true
  fi
}

# ---------------------------------------------------------------- run it
T0=$SECONDS
has_test() { [[ " $TESTS " == *" $1 "* ]]; }
log "proxies: $PROXIES; tests: $TESTS; ${DUR}s per measurement (HTTP: $ROUNDS rounds of ${ROUND_DUR}s); results in $OUTDIR"
PROXY_TAG=-tput
if has_test tput; then for p in $PROXIES; do run_tput "$p"; done; fi
PROXY_TAG=-http
if has_test http; then
  for r in $(seq 1 "$ROUNDS"); do for p in $PROXIES; do http_round "$p" "$r"; done; done
  for p in $PROXIES; do http_results "$p"; done
fi
PROXY_TAG=-idle
if has_test idle; then for p in $PROXIES; do run_idle "$p"; done; fi
PROXY_TAG=-swap
if has_test swap && [[ " $PROXIES " == *" halo "* ]]; then run_swap; fi
PROXY_TAG=-udp
if has_test udp; then run_udp; fi
if has_test table; then run_table_bench; else result tbl_state all "not run"; fi
if has_test idle; then
  if [ "$IDLE" -eq "$IDLE_REQ" ]; then result idle_count all "$IDLE conns"
  else result idle_count all "$IDLE conns (fd limit $NOFILE; asked $IDLE_REQ)"; fi
fi
ELAPSED=$(( SECONDS - T0 ))

# -------------------------------------------------------------- the table
# (awk reads all input: no SIGPIPE for the tool under pipefail)
HAPROXY_V=$( (haproxy -v 2>/dev/null || true) | awk 'NR==1 {print $3}')
NGINX_V=$( (nginx -v 2>&1 || true) | awk 'NR==1 {sub(/.*nginx\//, ""); print}')
IPERF_V=$( (iperf3 --version 2>/dev/null || true) | awk 'NR==1 {print $2}')
WRK_V=$( (wrk -v 2>&1 || true) | awk 'NR==1 {print $2}')
DESC="Run $(date -u '+%Y-%m-%d %H:%M UTC'), Linux $(uname -r), $CORES cores, loopback only, in ${ELAPSED}s; HAProxy $HAPROXY_V (nbthread $CORES, maxconn $HAPROXY_MAXCONN), NGINX $NGINX_V (stream, $CORES workers, reuseport), iperf3 $IPERF_V, wrk $WRK_V, $HALO_V; fd limit $NOFILE for every process. Throughput: iperf3 -t $DUR (first ${WARM}s omitted), receiver rate. HTTP rows: $ROUNDS interleaved rounds over the proxies, each a fresh proxy and wrk -t $THREADS for ${ROUND_DUR}s per row after a ${WARM}s warm-up (rates: all requests over all rounds; CPU: all CPU over all units; latency: median of the rounds), -c $CPS_CONNS with Connection: close for conn/s, -c $CONNS keep-alive for requests/s and latency (wrk is closed-loop: latency is at the load it drives, not a fixed rate), backend nginx returning \"ok\". Idle memory: $IDLE connections each pinged once through the proxy, VmRSS of the proxy (all its processes) after minus before, ÷ connections. Table swaps: $SWAP_RATE POST/s alternating disable/enable of a second backend on halo's admin API during the ${DUR}s wrk run. Raw output: benches/results/$STAMP/."
export DESC SWAP_RATE CONNS HALO_NA
"$PY" - "$OUTDIR/meta.json" <<'EOF'
import json, os, sys
json.dump({
    "description": os.environ["DESC"],
    "swap_rate": int(os.environ["SWAP_RATE"]),
    "conns": int(os.environ["CONNS"]),
    "halo_na": os.environ.get("HALO_NA") or None,
}, open(sys.argv[1], "w"))
EOF
"$PY" "$BENCH" render "$RESULTS" "$OUTDIR/meta.json" "$OUTDIR/table.md" >/dev/null
cp "$OUTDIR/table.md" "$HERE/results/latest.md"
echo
cat "$HERE/results/latest.md"
log "done in ${ELAPSED}s; table written to benches/results/latest.md"
