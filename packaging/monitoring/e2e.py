#!/usr/bin/env python3
"""End-to-end test of halo's alert rules and dashboard against a real Prometheus.

Starts, on 127.0.0.1 with free ports and in a temporary directory of its own:
a Consul dev agent, two demo backends each with a halo-sidecar (service
"web", zones zone-a and zone-b), a halo-lb active/standby pair (cluster
"mon") discovering "web", and Prometheus scraping all four admin addresses
every second with halo.rules.yml loaded (evaluation every second).

Then:
  1. sends traffic through the VIP, and freezes the active (SIGSTOP) so the
     standby forces a takeover and the frozen one steps down when thawed:
     failover events for the dashboard;
  2. evaluates every query of halo-dashboard.json over the test's time range
     (query_range, as Grafana does; $__rate_interval = 5s, $vip = .*): each
     must return data;
  3. evaluates every alert expression of halo.rules.yml now: each must be
     well formed, and each metric it names must have data; with everything
     healthy each must be empty, except those listed in EXPECT_FIRING;
  4. stops both balancers and sees HaloNoActiveInstance go pending (then
     firing) in Prometheus' /api/v1/alerts.

Prints one line per check and "N passed, N failed"; exits 1 if any failed.
Kills every process it started, by pid.

Usage: e2e.py --lb BIN --sidecar BIN --backend BIN --consul BIN --prometheus BIN
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = os.path.join(HERE, "halo.rules.yml")
DASHBOARD = os.path.join(HERE, "halo-dashboard.json")

# Alerts whose expression has a result while everything is up, and why.
EXPECT_FIRING = {
    # Backends web-1 and web-2 are in zones zone-a and zone-b: two zones, so
    # HaloVipHealthyBackendsInOneZone stays empty; nothing else is wrong.
}

passed = 0
failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}{': ' + detail if detail else ''}")
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0, limit=4 << 20):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read(limit).decode()


def eventually(seconds, what, probe):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            v = probe()
            if v:
                return v
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {seconds}s waiting for {what} (last error: {last})")


class Procs:
    """Every process started, killed by pid at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = {}

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def signal(self, name, sig):
        os.kill(self.procs[name].pid, sig)

    def stop(self, name, timeout=10):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()

    def stop_all(self):
        for name in list(self.procs)[::-1]:
            p = self.procs[name]
            if p.poll() is None:
                # A frozen process ignores SIGTERM until continued.
                os.kill(p.pid, signal.SIGCONT)
            self.stop(name)

    def log_tail(self, name, lines=20):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def clean_env():
    # halo-sidecar reads every HALO_* variable as config; keep the caller's out.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALO_") and not k.startswith("CONSUL_")}
    env["NO_COLOR"] = "1"
    env.setdefault("RUST_LOG", "info")
    return env


def prom_query(prom, path, **params):
    url = f"http://{prom}/api/v1/{path}?" + urllib.parse.urlencode(params)
    try:
        _, body = http_get(url, timeout=10)
    except urllib.error.HTTPError as e:
        return {"status": "error", "error": e.read(2000).decode(errors="replace")}
    return json.loads(body)


def dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((f'{p["title"]} [{t["refId"]}]', t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f'annotation {a["name"]}', a["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", q["query"])
            if m:
                # label_values(metric, label): the metric's series, with the label.
                out.append((f'variable {v["name"]}', f'count by ({m.group(2)}) ({m.group(1)})'))
    return out


# Metrics only an instance with ha.mode = "ecmp" exports.
ECMP_PREFIX = "halo_ecmp_"


def alert_rules():
    # The rules file is YAML; promtool has checked it. Read the few fields
    # needed without a YAML library: alert names and their expressions
    # (a block scalar "expr: |" or a one-line "expr: ...").
    rules = []
    lines = open(RULES).read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*- alert: (\S+)", lines[i])
        if not m:
            i += 1
            continue
        name = m.group(1)
        i += 1
        expr = None
        while i < len(lines) and not re.match(r"\s*- alert:", lines[i]):
            e = re.match(r"(\s*)expr: (.*)", lines[i])
            if e and e.group(2).strip() == "|":
                indent = None
                body = []
                i += 1
                while i < len(lines):
                    ln = lines[i]
                    cur = len(ln) - len(ln.lstrip())
                    if ln.strip() and indent is None:
                        indent = cur
                    if ln.strip() and cur < (indent or 0):
                        break
                    body.append(ln.strip())
                    i += 1
                expr = " ".join(x for x in body if x)
                continue
            if e:
                expr = e.group(2).strip()
            i += 1
        rules.append((name, expr))
    return rules


def main():
    ap = argparse.ArgumentParser()
    for a in ("lb", "sidecar", "backend", "consul", "prometheus"):
        ap.add_argument(f"--{a}", required=True)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="halo-monitoring.")
    procs = Procs(tmp)
    ok = False
    try:
        run(args, tmp, procs)
        ok = True
    except Exception as e:  # report, then clean up
        check(False, "the scenario ran to the end", f"{type(e).__name__}: {e}")
        for name in list(procs.procs):
            print(f"--- {name} log (last lines):\n{procs.log_tail(name)}")
    finally:
        procs.stop_all()
        if ok and failed == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def run(args, tmp, procs):
    env = clean_env()
    started = time.time()

    # -- Consul
    cp = {k: free_port() for k in ("http", "dns", "server", "serf_lan", "serf_wan", "grpc")}
    consul_url = f"http://127.0.0.1:{cp['http']}"
    procs.start("consul", [args.consul, "agent", "-dev", "-node=halo-mon", f"-data-dir={tmp}/consul",
                           "-bind=127.0.0.1", "-client=127.0.0.1", f"-http-port={cp['http']}",
                           f"-dns-port={cp['dns']}", f"-server-port={cp['server']}",
                           f"-serf-lan-port={cp['serf_lan']}", f"-serf-wan-port={cp['serf_wan']}",
                           f"-grpc-port={cp['grpc']}", "-hcl=disable_update_check = true"], env)
    eventually(30, "Consul to elect itself", lambda: ":" in http_get(f"{consul_url}/v1/status/leader")[1])

    # -- two backends, each with a sidecar
    sidecar_admins = []
    for i, (zone, rack) in enumerate([("zone-a", "r1"), ("zone-b", "r2")], start=1):
        port, admin = free_port(), f"127.0.0.1:{free_port()}"
        sidecar_admins.append(admin)
        procs.start(f"backend-{i}", [args.backend, f"127.0.0.1:{port}", f"web-{i}"], env)
        cfg = os.path.join(tmp, f"sidecar-{i}.toml")
        with open(cfg, "w") as f:
            f.write(f"""[consul]
address = "{consul_url}"
[service]
name = "web"
id = "web-{i}"
address = "127.0.0.1"
port = {port}
meta = {{ zone = "{zone}", region = "eu", rack = "{rack}" }}
check_ttl = "3s"
[[check]]
name = "http"
type = "http"
url = "http://127.0.0.1:{port}/"
interval = "500ms"
timeout = "300ms"
rise = 1
fall = 2
[admin]
listen = "{admin}"
[drain]
grace = "1s"
""")
        procs.start(f"sidecar-{i}", [args.sidecar, "--config", cfg], env)

    def passing():
        _, body = http_get(f"{consul_url}/v1/health/service/web?passing")
        return len(json.loads(body)) == 2
    eventually(30, "both instances of web to pass in Consul", passing)

    # -- the pair
    vip = f"127.0.0.1:{free_port()}"
    lb_admins = {}
    # A UDP echo server behind a UDP VIP, for the dashboard's UDP panels.
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo_addr = "127.0.0.1:%d" % echo.getsockname()[1]

    def echo_loop():
        while True:
            try:
                data, peer = echo.recvfrom(2048)
                echo.sendto(data, peer)
            except OSError:
                return
    threading.Thread(target=echo_loop, daemon=True).start()
    udp_vip = f"127.0.0.1:{free_port()}"

    def lb_config(name):
        admin = lb_admins.setdefault(name, f"127.0.0.1:{free_port()}")
        cfg = os.path.join(tmp, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write(f"""drain_timeout = "2s"
[admin]
listen = "{admin}"
[consul]
address = "{consul_url}"
[ha]
cluster = "mon"
id = "{name}"
[[vip]]
name = "web"
listen = "{vip}"
service = "web"
connect_timeout = "1s"
[[vip]]
name = "web-udp"
listen = "{udp_vip}"
protocol = "udp"
backends = ["{echo_addr}"]
""")
        return cfg

    def role(name):
        _, body = http_get(f"http://{lb_admins[name]}/status")
        return json.loads(body)["ha"]["role"]

    procs.start("lb-1", [args.lb, "--config", lb_config("lb-1")], env)
    eventually(30, "lb-1 to become active", lambda: role("lb-1") == "active")
    procs.start("lb-2", [args.lb, "--config", lb_config("lb-2")], env)
    eventually(30, "lb-2 to become the standby", lambda: role("lb-2") == "standby")

    def table_full():
        _, body = http_get(f"http://{lb_admins['lb-1']}/status")
        web = [v for v in json.loads(body)["vips"] if v["name"] == "web"]
        return bool(web) and len(web[0]["backends"]) == 2
    eventually(30, "both backends in lb-1's table", table_full)

    # -- Prometheus
    prom = f"127.0.0.1:{free_port()}"
    prom_cfg = os.path.join(tmp, "prometheus.yml")
    with open(prom_cfg, "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: halo-lb
    static_configs:
      - targets: ["{lb_admins['lb-1']}", "{lb_admins['lb-2']}"]
  - job_name: halo-sidecar
    static_configs:
      - targets: ["{sidecar_admins[0]}", "{sidecar_admins[1]}"]
""")
    procs.start("prometheus", [args.prometheus, f"--config.file={prom_cfg}",
                               f"--storage.tsdb.path={tmp}/prometheus", f"--web.listen-address={prom}",
                               "--log.level=warn"], env)
    eventually(30, "Prometheus to be ready", lambda: http_get(f"http://{prom}/-/ready")[0] == 200)

    def all_up():
        r = prom_query(prom, "query", query="sum(up)")
        return r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) == 4
    eventually(30, "Prometheus to scrape all four targets", all_up)

    # -- traffic through the VIP
    host, port = vip.split(":")
    served = 0
    for _ in range(40):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            served += b"hello from web-" in s.recv(4096)
    check(served == 40, "40 requests served through the VIP", f"{served} served")
    uhost, uport = udp_vip.split(":")
    echoed = 0
    for i in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            u.sendto(b"ping %d" % i, (uhost, int(uport)))
            try:
                echoed += u.recvfrom(64)[0] == b"ping %d" % i
            except OSError:
                pass
    check(echoed == 20, "20 datagrams echoed through the UDP VIP", f"{echoed} echoed")

    # -- failover events: freeze the active; the standby forces a takeover
    procs.signal("lb-1", signal.SIGSTOP)

    def forced():
        _, body = http_get(f"http://{lb_admins['lb-2']}/status")
        return json.loads(body)["ha"]["detector"]["forced_takeovers"] >= 1
    eventually(30, "lb-2 to force a takeover", forced)
    time.sleep(1)
    procs.signal("lb-1", signal.SIGCONT)
    eventually(30, "an active again", lambda: "active" in (role("lb-1"), role("lb-2")))

    def step_down_scraped():
        r = prom_query(prom, "query", query='sum(halo_ha_step_downs_total{reason!="shutdown"})')
        return r["data"]["result"] and float(r["data"]["result"][0]["value"][1]) >= 1
    eventually(30, "the step-down to be scraped", step_down_scraped)
    eventually(30, "all four targets up again", all_up)
    # A few more scrapes, so every rate() window has two samples after the events.
    time.sleep(6)

    # -- every dashboard query over the test's range
    end = time.time()
    for what, expr in dashboard_queries():
        q = expr.replace("$__rate_interval", "5s").replace("$vip", ".*")
        r = prom_query(prom, "query_range", query=q, start=f"{started:.3f}", end=f"{end:.3f}", step="1")
        if r.get("status") != "success":
            check(False, f"dashboard {what}", r.get("error", "?"))
            continue
        series = r["data"]["result"]
        check(len(series) > 0, f"dashboard {what}: {len(series)} series", f"no data for {q}")

    # -- every alert expression, now
    rules = alert_rules()
    # Every alert the file names, each with an expression (promtool has
    # validated the file; this checks the reader above missed none).
    named = len(re.findall(r"^\s*- alert: ", open(RULES).read(), re.M))
    check(
        len(rules) == named and all(expr for _, expr in rules),
        f"{len(rules)} alert rules read from halo.rules.yml, each with its expression",
        f"read {len(rules)} of {named}",
    )
    for name, expr in rules:
        r = prom_query(prom, "query", query=expr)
        if r.get("status") != "success":
            check(False, f"alert {name}: well formed", r.get("error", "?"))
            continue
        n = len(r["data"]["result"])
        if name in EXPECT_FIRING:
            check(n > 0, f"alert {name}: returns data ({EXPECT_FIRING[name]})", f"empty: {expr}")
        else:
            check(n == 0, f"alert {name}: empty while its condition is false", json.dumps(r["data"]["result"])[:500])
        for metric in sorted(set(re.findall(r"\bhalo_[a-z_]+\b", expr))):
            if metric.startswith(ECMP_PREFIX):
                # This run is a pair; ha.mode = "ecmp" runs in network
                # namespaces behind a router (lb/tests/it/ecmp.rs), and its
                # alerts have their promtool unit tests.
                continue
            r = prom_query(prom, "query", query=f"count({metric})")
            has = r.get("status") == "success" and r["data"]["result"]
            check(bool(has), f"alert {name}: {metric} has data")

    # -- both balancers stop: HaloNoActiveInstance goes pending, then fires
    procs.stop("lb-1")
    procs.stop("lb-2")

    def alert_state():
        r = prom_query(prom, "alerts")
        for a in r["data"]["alerts"]:
            if a["labels"].get("alertname") == "HaloNoActiveInstance" and a["labels"].get("cluster") == "mon":
                return a["state"]
        return None
    t0 = time.monotonic()
    state = eventually(30, "HaloNoActiveInstance to be pending", lambda: alert_state())
    check(state in ("pending", "firing"), f"HaloNoActiveInstance is {state} {time.monotonic() - t0:.1f}s after both balancers stopped")
    state = eventually(60, "HaloNoActiveInstance to fire", lambda: alert_state() == "firing" and "firing")
    check(state == "firing", f"HaloNoActiveInstance fires {time.monotonic() - t0:.1f}s after both balancers stopped (for: 30s)")


if __name__ == "__main__":
    sys.exit(main())
