#!/usr/bin/env bash
# halo's main job, locally and for real:
#
#   - a Consul dev agent (from scripts/consul.sh) on ports of its own
#     (HTTP 18500, DNS 18600, ...), so a normal local Consul is not in the way;
#   - three demo backends on 127.0.0.1:9001-9003, each with a halo-sidecar
#     registering it as service "web" (zones zone-a, zone-a, zone-b) and
#     probing it over HTTP (packaging/examples/demo/sidecar-N.toml);
#   - two halo-lb instances as an active/standby pair, cluster "demo", ids
#     lb-1 and lb-2 (packaging/examples/lb-ha-1.toml, lb-ha-2.toml), VIP
#     "web" on 127.0.0.1:8080: the active binds it, the standby only when it
#     takes the lock over.
#
# It prints the VIP, the admin URLs and how to kill the active to watch the
# failover, then runs until Ctrl-C, which stops everything it started (by
# pid). A killed halo-lb is started again after a few seconds, as the new
# standby, so the failover can be repeated.
#
# HALO_DEMO_ONESHOT=1: start everything, kill -9 the active once, print the
# gap a client saw, stop everything and exit 0 (non-zero if something fails).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

oneshot=${HALO_DEMO_ONESHOT:-0}
vip=127.0.0.1:8080
consul_http=18500 # the agent's other ports: DNS 18600, server 18300, serf 18301/18302, gRPC 18502
lb_ids=(lb-1 lb-2)
lb_admins=(127.0.0.1:9901 127.0.0.1:9911)
lb_zones=(zone-a zone-b)
backend_zones=(zone-a zone-a zone-b)
bin=target/release

die() { echo "demo.sh: $*" >&2; exit 1; }
say() { echo "demo.sh: $*"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

command -v curl >/dev/null || die "needs curl"

# Every TCP port it listens on must be free, before anything starts.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 9001 9002 9003 9901 9911 9921 9922 9923 18500 18600 18300 18301 18302 18502; do
  if port_taken "$port"; then
    die "port 127.0.0.1:$port is taken (a demo already running? another Consul or halo?); stop what listens there (ss -ltnp 'sport = :$port') and try again"
  fi
done

cargo build --release --quiet -p halo-lb --bin halo-lb --example demo-backend -p halo-sidecar --bin halo-sidecar
consul=$(scripts/consul.sh) || die "no Consul binary (scripts/consul.sh failed; set CONSUL_BIN)"

tmp=$(mktemp -d /tmp/halo-demo.XXXXXX)
export CONSUL_HTTP_ADDR="http://127.0.0.1:$consul_http"
export RUST_LOG=${RUST_LOG:-info} NO_COLOR=1
no_halo_env=()
for var in $(compgen -e); do
  case $var in HALO_*) no_halo_env+=(-u "$var") ;; esac
done

# ---------------------------------------------------------------- processes
pids=()              # everything started, in order
declare -A name_of   # pid -> what it is
lb_pids=("" "")      # the current pid of lb-1, lb-2 ("" while not running)
stopping=0

spawn() { # spawn NAME CMD... ; sets $spawned
  local name=$1
  shift
  # In a session of its own (setsid execs in place: same pid), so a Ctrl-C
  # in the terminal reaches only this script, which stops everything in
  # order, rather than every process at once.
  local wrap=$setsid
  if declare -F "$1" >/dev/null; then wrap=""; fi # a shell function (the probe loop)
  $wrap "$@" >>"$tmp/$name.log" 2>&1 </dev/null &
  spawned=$!
  # Out of the job table: bash still reaps it, but does not print "Killed"
  # when the user kill -9s a balancer. Waits poll `alive` instead.
  disown "$spawned"
  pids+=("$spawned")
  name_of[$spawned]=$name
}

alive() { kill -0 "$1" 2>/dev/null; }
setsid=$(command -v setsid || true)

# Stops every process it started, by pid: first the balancers and sidecars
# (the sidecars drain: maintenance, then deregistration, so Consul goes
# last), then the backends and Consul; SIGKILL for anything still there 10 s
# after its SIGTERM.
stop_all() {
  local group pid deadline
  for group in "lb sidecar probe" "backend consul"; do
    local sent=()
    for pid in "${pids[@]}"; do
      case " $group " in *" ${name_of[$pid]%%-*} "*) ;; *) continue ;; esac
      if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; sent+=("$pid"); fi
    done
    deadline=$(($(now_ms) + 10000))
    for pid in "${sent[@]}"; do
      while alive "$pid" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
      if alive "$pid"; then
        say "${name_of[$pid]} (pid $pid) still runs 10 s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$pid"; do sleep 0.05; done
      fi
    done
  done
}

failed=0
cleanup() {
  local rc=$?
  trap - INT TERM
  stopping=1
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then failed=1; fi
  echo
  say "stopping everything it started (${#pids[@]} processes)"
  stop_all
  if [ "$failed" = 1 ] && [ -d "$tmp" ]; then
    say "something failed; the last lines of each log:"
    for f in "$tmp"/*.log; do
      [ -f "$f" ] || continue
      echo "---- $(basename "$f")"
      tail -n 15 "$f"
    done
  fi
  rm -rf "$tmp"
  say "stopped"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { failed=1; die "$@"; }

# wait_until SECONDS WHAT CMD...: polls CMD every 0.1 s; gives up with the
# logs if it does not succeed in time or a process it needs died.
wait_until() {
  local secs=$1 what=$2 pid
  shift 2
  local deadline=$(($(now_ms) + secs * 1000))
  until "$@"; do
    for pid in "${pids[@]}"; do
      case ${name_of[$pid]} in lb-* | probe) continue ;; esac
      alive "$pid" || fail "${name_of[$pid]} (pid $pid) exited while waiting for $what"
    done
    [ "$(now_ms)" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.1
  done
}

role() { # role N -> active | standby | starting | down
  local body
  body=$(curl -s --max-time 1 "http://${lb_admins[$1]}/health" 2>/dev/null) || { echo down; return; }
  # GET /health answers {"status": "ok", "role": "active"} (pretty-printed).
  if [[ $body =~ \"role\":\ *\"([a-z_]+)\" ]]; then echo "${BASH_REMATCH[1]}"; else echo starting; fi
}
is_role() { [ "$(role "$1")" = "$2" ]; }
active_index() { # prints 0 or 1, or nothing
  local i
  for i in 0 1; do if is_role "$i" active; then echo "$i"; return; fi; done
}
one_active() { [ -n "$(active_index)" ]; }
vip_answers() { curl -sf --max-time 1 "http://$vip/" >/dev/null 2>&1; }

start_lb() { # start_lb N
  spawn "${lb_ids[$1]}" "$bin/halo-lb" --config "packaging/examples/lb-ha-$(($1 + 1)).toml"
  lb_pids[$1]=$spawned
}

# ------------------------------------------------------------------- start
say "starting a Consul dev agent on 127.0.0.1:$consul_http (logs in $tmp)"
spawn consul "$consul" agent -dev -node=halo-demo -data-dir="$tmp/consul-data" \
  -bind=127.0.0.1 -client=127.0.0.1 \
  -http-port="$consul_http" -dns-port=18600 -server-port=18300 \
  -serf-lan-port=18301 -serf-wan-port=18302 -grpc-port=18502 \
  -hcl='disable_update_check = true'
consul_ready() {
  curl -sf --max-time 1 "$CONSUL_HTTP_ADDR/v1/status/leader" 2>/dev/null | grep -q ':' &&
    curl -sf --max-time 1 "$CONSUL_HTTP_ADDR/v1/health/node/halo-demo" 2>/dev/null | grep -q serfHealth
}
wait_until 30 "Consul to elect itself leader" consul_ready

say "starting 3 demo backends on 127.0.0.1:9001-9003, each with a halo-sidecar"
for i in 1 2 3; do
  spawn "backend-$i" "$bin/examples/demo-backend" "127.0.0.1:900$i" "backend-$i (${backend_zones[$((i - 1))]})"
  # The sidecars take their settings from their files only: no HALO_*
  # variable of the caller's (HALO_DEMO_ONESHOT among them) leaks in.
  spawn "sidecar-$i" env "${no_halo_env[@]}" "$bin/halo-sidecar" --config "packaging/examples/demo/sidecar-$i.toml"
done
web_passing() { # all three instances of "web" pass their checks in Consul
  [ "$(curl -sf --max-time 1 "$CONSUL_HTTP_ADDR/v1/health/service/web?passing" 2>/dev/null | grep -o '"ServiceID": *"web-[0-9]"' | sort -u | wc -l)" = 3 ]
}
wait_until 30 "the 3 instances of service web to pass their checks in Consul" web_passing

say "starting the halo-lb pair: lb-1 first, so it becomes the active, then lb-2"
start_lb 0
wait_until 30 "lb-1 to become active" is_role 0 active
start_lb 1
wait_until 30 "lb-2 to become the standby" is_role 1 standby
wait_until 30 "the VIP $vip to answer" vip_answers

echo
say "a few requests through the VIP (lb-1 is in zone-a, so it prefers backends 1 and 2):"
for _ in 1 2 3 4 5 6; do curl -s --max-time 2 "http://$vip/" | sed 's/^/  /'; done

print_info() {
  local a=$1 s=$((1 - $1)) i
  echo
  echo "halo is running"
  echo "  VIP web:        http://$vip/   (curl -s http://$vip/)"
  for i in 0 1; do
    printf '  %-15s http://%s/status  http://%s/metrics  (%s, pid %s, %s)\n' "${lb_ids[$i]} admin:" \
      "${lb_admins[$i]}" "${lb_admins[$i]}" "${lb_zones[$i]}" "${lb_pids[$i]}" "$(role "$i")"
  done
  echo "  Consul:         $CONSUL_HTTP_ADDR/ui/   (dev agent, its state in memory)"
  echo "  sidecars:       http://127.0.0.1:9921/health/ready  (9922, 9923 likewise)"
  echo "  logs:           $tmp/"
  echo
  echo "  ${lb_ids[$a]} is the active. Kill it the hard way and watch ${lb_ids[$s]} take over:"
  echo "    kill -9 ${lb_pids[$a]}"
  echo "  Watch from another terminal (each instance's role, then what the VIP answers):"
  cat <<EOF
    watch -n0.2 'for p in 9901 9911; do printf "%s " \$p; curl -s -m1 127.0.0.1:\$p/health | grep -o "\"role\": \"[a-z]*\"" || echo down; done; curl -s -m1 http://$vip/'
    while sleep 0.2; do printf '%s ' "\$(date +%T.%N | cut -c1-12)"; curl -s -m1 http://$vip/ || echo 'no answer'; done
EOF
}

# ---------------------------------------------------------------- oneshot
if [ "$oneshot" = 1 ]; then
  active=$(active_index)
  [ -n "$active" ] || fail "no active instance"
  standby=$((1 - active))
  print_info "$active"
  echo
  say "HALO_DEMO_ONESHOT: kill -9 of ${lb_ids[$active]} (pid ${lb_pids[$active]}), measuring the gap with a curl loop"
  # The client: one connection and request every ~10 ms; one line per
  # attempt, "<ms> ok" or "<ms> fail", stamped when the attempt ended.
  probe() {
    while :; do
      if curl -sf --max-time 0.5 "http://$vip/" >/dev/null 2>&1; then echo "$(now_ms) ok"; else echo "$(now_ms) fail"; fi
      sleep 0.01
    done
  }
  spawn probe probe
  probe_pid=$spawned
  probe_ok_after() { awk -v t="$1" '$1 > t && $2 == "ok" { found = 1 } END { exit !found }' "$tmp/probe.log"; }
  start=$(now_ms)
  wait_until 10 "the client loop to get answers" probe_ok_after "$start"
  sleep 1
  killed=$(now_ms)
  kill -KILL "${lb_pids[$active]}"
  lb_pids[$active]=""
  wait_until 30 "${lb_ids[$standby]} to become active" is_role "$standby" active
  promoted=$(now_ms)
  wait_until 10 "the VIP to answer through ${lb_ids[$standby]}" probe_ok_after "$promoted"
  sleep 0.5
  kill -TERM "$probe_pid" 2>/dev/null || true
  # The longest run without an answer: a request in flight at the kill can
  # still end after it, so "first answer after the kill" would understate it.
  gap=$(awk -v k="$killed" '
    $2 == "ok" {
      if (prev && $1 - prev > worst) { worst = $1 - prev; from = prev; to = $1; fails = pending }
      prev = $1; pending = 0
    }
    $2 == "fail" { pending++ }
    END { if (!worst) print "?"; else printf "%d ms, ending %d ms after the kill (%d failed attempts)", worst, to - k, fails }
  ' "$tmp/probe.log")
  echo
  say "failover: ${lb_ids[$standby]} is active; the client saw no answer for $gap"
  say "through the VIP now (${lb_ids[$standby]} is in ${lb_zones[$standby]}):"
  for _ in 1 2 3; do curl -s --max-time 2 "http://$vip/" | sed 's/^/  /'; done
  exit 0
fi

# ------------------------------------------------------------ interactive
print_info "$(active_index)"
echo
echo "Running. A killed halo-lb is started again after 3 s, as the new standby. Ctrl-C stops everything."
last_roles=""
declare -A died_at
while :; do
  for i in 0 1; do
    pid=${lb_pids[$i]}
    if [ -n "$pid" ] && ! alive "$pid"; then
      say "$(date +%T) ${lb_ids[$i]} (pid $pid) exited; starting it again in 3 s"
      lb_pids[$i]=""
      died_at[$i]=$(now_ms)
    fi
    if [ -z "${lb_pids[$i]}" ] && [ $(($(now_ms) - ${died_at[$i]:-0})) -ge 3000 ]; then
      start_lb "$i"
      say "$(date +%T) ${lb_ids[$i]} started again (pid ${lb_pids[$i]})"
    fi
  done
  for pid in "${pids[@]}"; do
    case ${name_of[$pid]} in consul) alive "$pid" || fail "Consul (pid $pid) exited" ;; esac
  done
  roles="${lb_ids[0]} $(role 0), ${lb_ids[1]} $(role 1)"
  if [ "$roles" != "$last_roles" ]; then
    line="$(date +%T) $roles"
    a=$(active_index)
    if [ -n "$a" ]; then line="$line; kill the active: kill -9 ${lb_pids[$a]}"; fi
    say "$line"
    last_roles=$roles
  fi
  sleep 0.3
done
