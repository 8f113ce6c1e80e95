#!/usr/bin/env python3
"""Failover benchmark: how long a client goes without an answer when the
active of a pair dies (kill -9) or hands over (SIGTERM).

Run through benches/failover.sh, which builds halo-lb, provisions Consul
(scripts/consul.sh) and keepalived, and calls `failover.py run`. Standard
library only.

Three systems, one client:

- halo-lb pair: two halo-lb instances with `[ha]` at its defaults
  (check_ttl 1s, lock_delay 200ms) on one host against a Consul dev agent;
  the active binds the VIP on 127.0.0.1. Each instance has its own greeting
  backend, so an answer names the instance that carried it.
- `consul lock` with its defaults: two `consul lock -verbose <prefix>
  <child>` contenders whose child is a greeting server on the VIP port (the
  holder runs it). The event is the death of the holder's `consul lock`
  process with its child (kill -9 of its process group) or a SIGTERM to its
  `consul lock` process (which stops the child and releases the lock).
- keepalived VRRP, `advert_int 1`, unicast, in network namespaces (a client,
  two balancers, a bridge; 198.19.77.0/24 only): each balancer runs a
  greeting server bound to the VIP (IP_FREEBIND). kill -9 kills every process
  of the master's namespace, its keepalived (VRRP child first, so it cannot
  release the address on its way out) and its server, as a crash would; the
  address stays on the dead master's interface, as it would on a hung host.
  SIGTERM stops the master's keepalived gracefully (it sends priority 0 and
  removes the address); its server keeps running.

The client (`failover.py probe`) starts a TCP connection to the VIP every
5 ms (each with a 1 s deadline, many in flight if need be), reads the
greeting to EOF and logs the time each attempt ended and who answered. The
gap of one event is the longest time between two consecutive answers from
the last answer before the event to the first answer from the new active
after it: what a client polling every 5 ms saw. With no failover at all it is
about 5 ms.
"""

import argparse
import asyncio
import bisect
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PROBE_EVERY = 0.005
PROBE_DEADLINE = 1.0
PROBE_MAX_IN_FLIGHT = 400

# keepalived's network, in namespaces only: 198.18.0.0/15 is reserved for
# benchmarks (RFC 2544).
NET = "198.19.77"
NET_HOSTS = {"client": 10, "lb1": 11, "lb2": 12}
VIP_HOST = 100
VIP_PORT = 7000

PR_SET_PDEATHSIG = 1
IP_FREEBIND = 15


def log(msg):
    print(f"[failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_ns():
    return time.monotonic_ns()


def require_ours(host):
    """Traffic goes to loopback or to 198.18.0.0/15 (inside our namespaces)."""
    if not (host.startswith("127.") or host.startswith("198.18.") or host.startswith("198.19.")):
        sys.exit(f"failover.py: refusing to send traffic to {host}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_pdeathsig():
    """In a child before exec: die with the harness."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ---------------------------------------------------------------- probe


def probe_main(args):
    """The client: a connection every PROBE_EVERY, each logged on its end as
    `<end, monotonic ns> ok|fail <who> <start, monotonic ns>`."""
    require_ours(args.host)
    out = open(args.out, "w", buffering=1)
    stop = asyncio.Event()

    async def attempt():
        who = "-"
        ok = False
        start = now_ns()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(args.host, args.port), PROBE_DEADLINE)
            try:
                data = await asyncio.wait_for(reader.read(), PROBE_DEADLINE)
                if data:
                    ok = True
                    who = data.split()[0].decode(errors="replace") if data.split() else "?"
            finally:
                writer.close()
        except (OSError, asyncio.TimeoutError):
            pass
        out.write(f"{now_ns()} {'ok' if ok else 'fail'} {who} {start}\n")

    async def run():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = set()
        next_at = loop.time()
        while not stop.is_set():
            if len(tasks) < PROBE_MAX_IN_FLIGHT:
                t = asyncio.ensure_future(attempt())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            next_at += PROBE_EVERY
            delay = next_at - loop.time()
            if delay < 0:
                next_at = loop.time()
                delay = 0
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        for t in list(tasks):
            t.cancel()

    asyncio.run(run())


# ---------------------------------------------------------------- serve


def serve_main(args):
    """A greeting server: on each connection sends `<name>\\n` and closes
    (the server closes first, so TIME_WAIT stays on this side). Exits when
    its parent goes away (it may run under `consul lock`, whose threads make
    PR_SET_PDEATHSIG unreliable)."""
    require_ours(args.host)
    parent = os.getppid()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.freebind:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    greeting = f"{args.name}\n".encode()

    def watch_parent():
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    if args.claim:
        # Claim the floating address as an operator's script under `consul
        # lock` would: add it, announce it with gratuitous ARP (three now,
        # as the new owner must repoint the client), remove it on SIGTERM.
        ip = shutil.which("ip") or "/usr/sbin/ip"
        subprocess.run([ip, "addr", "add", args.claim, "dev", args.dev], check=False)
        address = args.claim.split("/")[0]
        threading.Thread(target=announce, args=(args.dev, address), daemon=True).start()

        def release(*_):
            subprocess.run([ip, "addr", "del", args.claim, "dev", args.dev], check=False)
            os._exit(0)

        signal.signal(signal.SIGTERM, release)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(greeting)
        except OSError:
            pass
        conn.close()


def announce(dev, address, count=3, every=0.2):
    """Gratuitous ARP (a broadcast ARP request for `address` from it) on
    `dev`, `count` times."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((dev, 0x0806))
    mac = sock.getsockname()[4][:6]
    ip4 = socket.inet_aton(address)
    frame = (
        b"\xff" * 6 + mac + b"\x08\x06"  # Ethernet: broadcast, ARP
        + b"\x00\x01\x08\x00\x06\x04\x00\x01"  # Ethernet/IPv4, request
        + mac + ip4 + b"\x00" * 6 + ip4
    )  # fmt: skip
    for _ in range(count):
        sock.send(frame)
        time.sleep(every)
    sock.close()


# ----------------------------------------------------------- processes


class Procs:
    """Every process the harness starts, stopped by pid (or by the process
    group it was given) on the way out."""

    def __init__(self):
        self.items = []

    def start(self, name, argv, logfile, env=None, group=False):
        f = open(logfile, "ab")
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=group,
            preexec_fn=None if group else set_pdeathsig,
        )
        f.close()
        p.name = name
        p.group = group
        p.logfile = logfile
        self.items.append(p)
        return p

    def signal(self, p, sig):
        try:
            if p.group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except ProcessLookupError:
            pass

    def stop(self, p, timeout=10.0):
        if p.poll() is None or p.group:
            self.signal(p, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{p.name} (pid {p.pid}) still runs {timeout:.0f}s after SIGTERM; killing it")
            self.signal(p, signal.SIGKILL)
            p.wait(5)
        if p.group:
            # Whatever is left of its group (a child that ignored SIGTERM).
            self.signal(p, signal.SIGKILL)

    def stop_all(self):
        for p in reversed(self.items):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"cannot stop {p.name} (pid {p.pid}): {e}")
        self.items = []


def wait_for(what, deadline_s, check, every=0.02, alive=()):
    end = time.monotonic() + deadline_s
    while True:
        v = check()
        if v:
            return v
        for p in alive:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} (pid {p.pid}) exited while waiting for {what}; see {p.logfile}")
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(every)


def http_json(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


# ------------------------------------------------------------ probe log


class ProbeLog:
    """Reads the client's log as it grows."""

    def __init__(self, path):
        self.path = Path(path)
        self.pos = 0
        self.rest = b""
        self.ok_t = []  # end times of answers, ascending
        self.ok_who = []
        self.fail_end = []  # end times of failed attempts, ascending
        self.fail_start = []  # their start times, same order

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        data = self.rest + data
        lines = data.split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            parts = line.decode(errors="replace").split()
            if len(parts) < 4:
                continue
            t = int(parts[0])
            if parts[1] == "ok":
                self.ok_t.append(t)
                self.ok_who.append(parts[2])
            else:
                self.fail_end.append(t)
                self.fail_start.append(int(parts[3]))

    def first_ok_after(self, t, who=None):
        self.poll()
        i = bisect.bisect_right(self.ok_t, t)
        for j in range(i, len(self.ok_t)):
            if who is None or self.ok_who[j] == who:
                return j
        return None

    def steady(self):
        """Answers in the last 300 ms, and no attempt failed in the last
        1.2 s (an attempt that times out is logged a deadline after it
        started)."""
        self.poll()
        now = now_ns()
        recent_ok = bool(self.ok_t) and self.ok_t[-1] > now - 300_000_000
        recent_fail = bool(self.fail_end) and self.fail_end[-1] > now - int((PROBE_DEADLINE + 0.2) * 1e9)
        return recent_ok and not recent_fail

    def gap(self, t_event, who, deadline_s, alive=()):
        """Waits for an answer from `who` after `t_event`; returns the
        longest time between consecutive answers from the last one before
        the event to that one (ms), and the failed attempts in between."""
        found = []

        def answered():
            j = self.first_ok_after(t_event, who)
            if j is not None:
                found.append(j)
            return j is not None

        wait_for(f"an answer from {who}", deadline_s, answered, alive=alive)
        j = found[-1]
        i = bisect.bisect_right(self.ok_t, t_event) - 1
        if i < 0:
            raise RuntimeError("no answer before the event")
        times = self.ok_t[i : j + 1]
        worst = max(b - a for a, b in zip(times, times[1:]))
        # Attempts that started in the window and failed; those still in
        # flight are logged within a deadline.
        time.sleep(PROBE_DEADLINE + 0.1)
        self.poll()
        fails = sum(1 for t in self.fail_start if times[0] < t < times[-1])
        return worst / 1e6, fails


# --------------------------------------------------------------- consul


def start_consul(procs, consul_bin, workdir):
    ports = {k: free_port() for k in ("http", "dns", "server", "serf_lan", "serf_wan", "grpc")}
    argv = [
        consul_bin, "agent", "-dev", "-node=halo-bench",
        f"-data-dir={workdir / 'consul-data'}",
        "-bind=127.0.0.1", "-client=127.0.0.1",
        f"-http-port={ports['http']}", f"-dns-port={ports['dns']}", f"-server-port={ports['server']}",
        f"-serf-lan-port={ports['serf_lan']}", f"-serf-wan-port={ports['serf_wan']}", f"-grpc-port={ports['grpc']}",
        "-hcl=disable_update_check = true",
    ]  # fmt: skip
    p = procs.start("consul", argv, workdir / "consul.log")
    url = f"http://127.0.0.1:{ports['http']}"

    def ready():
        leader = http_json(f"{url}/v1/status/leader")
        checks = http_json(f"{url}/v1/health/node/halo-bench")
        return bool(leader) and bool(checks) and any(c.get("CheckID") == "serfHealth" for c in checks)

    wait_for("Consul to elect itself leader", 30, ready, every=0.1, alive=[p])
    return p, url


# ---------------------------------------------------------------- halo


def bench_halo(args, procs, consul_url, workdir, results):
    vip = free_port()
    ids = ["a", "b"]
    admin = {i: free_port() for i in ids}
    backends = {}
    for i in ids:
        port = free_port()
        backends[i] = port
        procs.start(
            f"backend-{i}",
            [sys.executable, __file__, "serve", "--host", "127.0.0.1", "--port", str(port), "--name", f"lb-{i}"],
            workdir / f"backend-{i}.log",
        )
    for i in ids:
        wait_for(f"backend {i}", 10, lambda p=backends[i]: listening("127.0.0.1", p))
        (workdir / f"lb-{i}.toml").write_text(
            f"""# halo-lb {i} of the benchmark pair: [ha] at its defaults.
drain_timeout = "2s"

[admin]
listen = "127.0.0.1:{admin[i]}"

[consul]
address = "{consul_url}"

[ha]
cluster = "bench"
id = "lb-{i}"

[[vip]]
name = "web"
listen = "127.0.0.1:{vip}"
backends = ["127.0.0.1:{backends[i]}"]
connect_timeout = "1s"
"""
        )
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
    lbs = {}

    def role(i):
        h = http_json(f"http://127.0.0.1:{admin[i]}/health")
        return h.get("role") if h else None

    def start_lb(i):
        lbs[i] = procs.start(
            f"lb-{i}", [args.halo_lb, "--config", str(workdir / f"lb-{i}.toml")], workdir / f"lb-{i}.log", env=env
        )

    start_lb("a")
    wait_for("lb-a to become active", 30, lambda: role("a") == "active", alive=[lbs["a"]])
    start_lb("b")
    wait_for("lb-b to become the standby", 30, lambda: role("b") == "standby", alive=[lbs["b"]])

    probe_log = workdir / "probe-halo.log"
    prober = procs.start(
        "probe-halo",
        [sys.executable, __file__, "probe", "--host", "127.0.0.1", "--port", str(vip), "--out", str(probe_log)],
        workdir / "probe-halo.stderr",
    )
    pl = ProbeLog(probe_log)
    t0 = now_ns()
    wait_for("the client to get answers through the VIP", 10, lambda: pl.first_ok_after(t0) is not None)

    for event, sig in (("kill", signal.SIGKILL), ("term", signal.SIGTERM)):
        rows = []
        for n in range(args.rounds):
            if over_budget(args):
                break
            active = next((i for i in ids if role(i) == "active"), None)
            if active is None:
                raise RuntimeError("no active halo-lb")
            standby = "b" if active == "a" else "a"
            wait_for("steady answers before the event", 10, pl.steady)
            t_event = now_ns()
            lbs[active].send_signal(sig)
            gap, fails = pl.gap(t_event, f"lb-{standby}", 30)
            lbs[active].wait(15)
            rows.append({"round": n + 1, "from": active, "to": standby, "gap_ms": gap, "failed_attempts": fails})
            log(f"halo {event} round {n + 1}: lb-{active} -> lb-{standby}: gap {gap:.1f} ms, {fails} failed attempts")
            # Back as the new standby before the next round.
            wait_for(f"lb-{standby} to report active", 30, lambda: role(standby) == "active")
            start_lb(active)
            wait_for(f"lb-{active} to come back as the standby", 30, lambda: role(active) == "standby", alive=[lbs[active]])
        results[("halo", event)] = rows
    procs.stop(prober)


def listening(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -------------------------------------------------------- consul lock


def bench_consul_lock(args, procs, consul_url, workdir, results):
    vip = free_port()
    env = dict(os.environ, CONSUL_HTTP_ADDR=consul_url)
    holders = {}
    logs_at = {}

    def start(name):
        logfile = workdir / f"consul-lock-{name}.log"
        logs_at[name] = logfile.stat().st_size if logfile.exists() else 0
        child = f"{sys.executable} {__file__} serve --host 127.0.0.1 --port {vip} --name {name}"
        # Its own process group: kill -9 takes consul lock and its child.
        holders[name] = procs.start(
            f"consul-lock-{name}",
            [args.consul, "lock", "-verbose", "halo-bench/lock", child],
            logfile,
            env=env,
            group=True,
        )

    def contending(name):
        """Its log (since it started) says it is waiting for the lock."""
        text = holders[name].logfile.read_bytes()[logs_at[name] :].decode(errors="replace")
        return "Attempting lock acquisition" in text

    probe_log = workdir / "probe-consul-lock.log"
    start("x")
    wait_for("consul lock x to run its child", 30, lambda: listening("127.0.0.1", vip), alive=[holders["x"]])
    start("y")
    wait_for("consul lock y to wait for the lock", 30, lambda: contending("y"), alive=[holders["y"]])
    time.sleep(1)
    prober = procs.start(
        "probe-consul-lock",
        [sys.executable, __file__, "probe", "--host", "127.0.0.1", "--port", str(vip), "--out", str(probe_log)],
        workdir / "probe-consul-lock.stderr",
    )
    pl = ProbeLog(probe_log)
    t0 = now_ns()
    wait_for("the client to get answers from the lock holder", 10, lambda: pl.first_ok_after(t0) is not None)

    for event, rounds in (("kill", args.consul_kill_rounds), ("term", args.rounds)):
        rows = []
        for n in range(rounds):
            if over_budget(args):
                break
            pl.poll()
            holder = pl.ok_who[-1]
            other = "y" if holder == "x" else "x"
            wait_for("steady answers before the event", 10, pl.steady)
            t_event = now_ns()
            if event == "kill":
                procs.signal(holders[holder], signal.SIGKILL)  # the whole group: consul lock and its child
            else:
                holders[holder].send_signal(signal.SIGTERM)  # consul lock alone: it stops the child and releases
            gap, fails = pl.gap(t_event, other, 180, alive=[holders[other]])
            holders[holder].wait(30)
            procs.signal(holders[holder], signal.SIGKILL)  # anything left of its group
            rows.append({"round": n + 1, "from": holder, "to": other, "gap_ms": gap, "failed_attempts": fails})
            log(f"consul lock {event} round {n + 1}: {holder} -> {other}: gap {gap:.1f} ms, {fails} failed attempts")
            start(holder)
            wait_for(f"consul lock {holder} to wait for the lock", 30, lambda: contending(holder), alive=[holders[holder]])
            time.sleep(1)
        results[("consul-lock", event)] = rows
    procs.stop(prober)


# ---------------------------------------------------------- keepalived


class Netns:
    """client, lb1 and lb2 on a bridge in a fourth namespace; removed with
    every process in them on the way out."""

    def __init__(self, run_id, ip):
        self.ip = ip
        self.prefix = f"hfb-{run_id}-"
        self.names = []

    def ns(self, host):
        return self.prefix + host

    def run(self, *argv, check=True):
        r = subprocess.run([self.ip, *argv], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(argv)}: {r.stderr.strip()}")
        return r.stdout

    def add(self, host):
        name = self.ns(host)
        self.run("netns", "add", name)
        self.names.append(name)
        # No IPv6 (no router solicitations or DAD traffic), loopback up.
        for key in ("all", "default"):
            self.run("netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1", check=False)
        self.run("-n", name, "link", "set", "lo", "up")
        return name

    def build(self):
        br = self.add("br")
        self.run("-n", br, "link", "add", "br0", "type", "bridge")
        self.run("-n", br, "link", "set", "br0", "up")
        for host, last in NET_HOSTS.items():
            name = self.add(host)
            self.run("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p-{host}", "netns", br)
            self.run("-n", br, "link", "set", f"p-{host}", "master", "br0", "up")
            self.run("-n", name, "addr", "add", f"{NET}.{last}/24", "dev", "eth0")
            self.run("-n", name, "link", "set", "eth0", "up")

    def pids(self, host):
        return [int(p) for p in self.run("netns", "pids", self.ns(host), check=False).split()]

    def has_vip(self, host):
        return f"{NET}.{VIP_HOST}/" in self.run("-n", self.ns(host), "-4", "-o", "addr", "show", "dev", "eth0", check=False)

    def teardown(self):
        for name in reversed(self.names):
            for pid in [int(p) for p in self.run("netns", "pids", name, check=False).split()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.run("netns", "del", name, check=False)
        self.names = []


def keepalived_conf(host, peer):
    return f"""# keepalived for the failover benchmark: {host} of a pair, VRRP with
# advert_int 1, unicast between the two (no multicast leaves the pair).
# Both start as BACKUP with the same priority and nopreempt, so the one
# started first becomes the master and a restarted one stays the backup:
# the roles alternate round by round, as halo's do.
global_defs {{
    router_id {host}
    enable_script_security
}}

vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 77
    priority 100
    advert_int 1
    nopreempt
    unicast_src_ip {NET}.{NET_HOSTS[host]}
    unicast_peer {{
        {NET}.{NET_HOSTS[peer]}
    }}
    virtual_ipaddress {{
        {NET}.{VIP_HOST}/24 dev eth0
    }}
}}
"""


def bench_keepalived(args, procs, workdir, results, notes):
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    keepalived = args.keepalived or shutil.which("keepalived") or (
        "/usr/sbin/keepalived" if os.path.exists("/usr/sbin/keepalived") else None
    )
    why = None
    if os.geteuid() != 0:
        why = "needs root (network namespaces)"
    elif not ip:
        why = "needs iproute2's ip"
    elif not keepalived:
        why = "keepalived is not installed and could not be installed"
    if why:
        notes["keepalived"] = why
        log(f"keepalived skipped: {why}")
        return
    version = subprocess.run([keepalived, "--version"], capture_output=True, text=True)
    notes["keepalived_version"] = (version.stdout + version.stderr).splitlines()[0] if (version.stdout + version.stderr) else "?"
    net = Netns(args.run_id, ip)
    try:
        net.build()
        vip = f"{NET}.{VIP_HOST}"
        kas = {}
        offsets = {}

        def start_server(host):
            procs.start(
                f"server-{host}",
                [ip, "netns", "exec", net.ns(host), sys.executable, __file__, "serve",
                 "--host", vip, "--port", str(VIP_PORT), "--name", host, "--freebind"],
                workdir / f"server-{host}.log",
            )  # fmt: skip

        def start_keepalived(host):
            peer = "lb2" if host == "lb1" else "lb1"
            conf = workdir / f"keepalived-{host}.conf"
            conf.write_text(keepalived_conf(host, peer))
            logfile = workdir / f"keepalived-{host}.log"
            offsets[host] = logfile.stat().st_size if logfile.exists() else 0
            kas[host] = procs.start(
                f"keepalived-{host}",
                [ip, "netns", "exec", net.ns(host), keepalived, "--dont-fork", "--log-console", "--log-detail",
                 "--vrrp", "--use-file", str(conf), "--pid", str(workdir / f"ka-{host}.pid"),
                 "--vrrp_pid", str(workdir / f"ka-{host}-vrrp.pid"),
                 "--checkers_pid", str(workdir / f"ka-{host}-checkers.pid")],
                logfile,
            )  # fmt: skip

        def state(host):
            text = kas[host].logfile.read_bytes()[offsets[host] :].decode(errors="replace")
            states = re.findall(r"Entering (MASTER|BACKUP|FAULT) STATE", text)
            return states[-1] if states else None

        for host in ("lb1", "lb2"):
            start_server(host)
        start_keepalived("lb1")
        wait_for("keepalived lb1 to become the master", 30, lambda: net.has_vip("lb1"), alive=[kas["lb1"]])
        start_keepalived("lb2")
        wait_for("keepalived lb2 to be the backup", 30, lambda: state("lb2") == "BACKUP", alive=[kas["lb2"]])

        probe_log = workdir / "probe-keepalived.log"
        prober = procs.start(
            "probe-keepalived",
            [ip, "netns", "exec", net.ns("client"), sys.executable, __file__, "probe",
             "--host", vip, "--port", str(VIP_PORT), "--out", str(probe_log)],
            workdir / "probe-keepalived.stderr",
        )  # fmt: skip
        pl = ProbeLog(probe_log)
        t0 = now_ns()
        wait_for("the client to get answers from the master", 10, lambda: pl.first_ok_after(t0) is not None)

        for event in ("kill", "term"):
            rows = []
            for n in range(args.rounds):
                if over_budget(args):
                    break
                master = next((h for h in ("lb1", "lb2") if net.has_vip(h)), None)
                if master is None:
                    raise RuntimeError("no keepalived master holds the VIP")
                other = "lb2" if master == "lb1" else "lb1"
                wait_for("steady answers before the event", 10, pl.steady)
                if event == "kill":
                    # The master host's processes die at once, the VRRP child
                    # before its parent (which would otherwise stop it
                    # gracefully), the parent last.
                    victims = [p for p in net.pids(master) if p != kas[master].pid] + [kas[master].pid]
                    t_event = now_ns()
                    for pid in victims:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                else:
                    t_event = now_ns()
                    kas[master].send_signal(signal.SIGTERM)
                gap, fails = pl.gap(t_event, other, 30, alive=[kas[other]])
                kas[master].wait(15)
                rows.append({"round": n + 1, "from": master, "to": other, "gap_ms": gap, "failed_attempts": fails})
                log(f"keepalived {event} round {n + 1}: {master} -> {other}: gap {gap:.1f} ms, {fails} failed attempts")
                if event == "kill":
                    # The crashed host comes back: without the address, with
                    # its server and keepalived.
                    net.run("-n", net.ns(master), "addr", "del", f"{vip}/24", "dev", "eth0", check=False)
                    start_server(master)
                start_keepalived(master)
                wait_for(f"keepalived {master} to come back as the backup", 30,
                         lambda: state(master) == "BACKUP", alive=[kas[master]])  # fmt: skip
                if net.has_vip(master):
                    raise RuntimeError(f"{master} took the VIP back on restart")
            results[("keepalived", event)] = rows
        procs.stop(prober)
    finally:
        procs.stop_all()
        net.teardown()


# ---------------------------------------------------------------- report


def over_budget(args):
    if time.monotonic() - args.started > args.max_seconds:
        if not args.over_budget_noted:
            log(f"time budget of {args.max_seconds}s used up; skipping the remaining rounds")
            args.over_budget_noted = True
        return True
    return False


SYSTEMS = {
    "halo": "halo-lb pair (check_ttl 1s, lock_delay 200ms; one host)",
    "consul-lock": "`consul lock` (defaults: session TTL 15s, lock-delay 15s)",
    "keepalived": "keepalived VRRP (`advert_int 1`, unicast; netns)",
}
EVENTS = {
    ("halo", "kill"): "kill -9 of the active",
    ("halo", "term"): "SIGTERM of the active (handover)",
    ("consul-lock", "kill"): "kill -9 of the holder (`consul lock` + child)",
    ("consul-lock", "term"): "SIGTERM of the holder's `consul lock`",
    ("keepalived", "kill"): "kill -9 of the master (keepalived + server)",
    ("keepalived", "term"): "SIGTERM of the master's keepalived",
}


def fmt_ms(ms):
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms"


def render(args, results, notes):
    lines = [
        "| system | event | rounds | median gap | worst gap | notes |",
        "|---|---|---|---|---|---|",
    ]
    for (system, event), label in EVENTS.items():
        rows = results.get((system, event))
        if rows is None:
            why = notes.get(system, "not run")
            lines.append(f"| {SYSTEMS[system]} | {label} | 0 | n/a | n/a | skipped: {why} |")
            continue
        if not rows:
            lines.append(f"| {SYSTEMS[system]} | {label} | 0 | n/a | n/a | no round completed (time budget) |")
            continue
        gaps = [r["gap_ms"] for r in rows]
        fails = [r["failed_attempts"] for r in rows]
        note = f"failed attempts per event: median {statistics.median(fails):.0f}, most {max(fails)}"
        if system == "consul-lock" and event == "kill":
            note += "; few rounds: each takes about 45 s"
        lines.append(
            f"| {SYSTEMS[system]} | {label} | {len(rows)} | {fmt_ms(statistics.median(gaps))} | {fmt_ms(max(gaps))} | {note} |"
        )
    meta = (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Linux {platform.release()}, {os.cpu_count()} cores, "
        f"in {time.monotonic() - args.started:.0f}s; halo-lb {notes.get('halo_commit', '?')}, "
        f"{notes.get('consul_version', 'consul ?')}, {notes.get('keepalived_version', 'keepalived not run')}. "
        f"Client: a TCP connection every {PROBE_EVERY * 1000:.0f} ms (1 s deadline), greeting read to EOF; gap = the longest "
        "time between two consecutive answers, from the last answer before the event to the first answer from the new "
        f"active. Raw data: benches/results/{args.out.name}/."
    )
    return "\n".join(lines) + "\n\n" + meta + "\n"


def run_main(args):
    args.started = time.monotonic()
    args.over_budget_noted = False
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    systems = args.systems.split(",")
    procs = Procs()
    results, notes = {}, {}
    notes["halo_commit"] = args.halo_commit
    v = subprocess.run([args.consul, "version"], capture_output=True, text=True).stdout.splitlines()
    notes["consul_version"] = v[0] if v else "consul ?"
    if args.keepalived_note:
        notes["keepalived"] = args.keepalived_note

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    failed = None
    try:
        if "halo" in systems or "consul-lock" in systems:
            _, consul_url = start_consul(procs, args.consul, args.out)
            if "halo" in systems:
                log("halo-lb pair")
                bench_halo(args, procs, consul_url, args.out, results)
                procs.stop_all()
                _, consul_url = start_consul(procs, args.consul, args.out)
            if "consul-lock" in systems:
                log("consul lock")
                bench_consul_lock(args, procs, consul_url, args.out, results)
            procs.stop_all()
        if "keepalived" in systems and "keepalived" not in notes:
            log("keepalived")
            bench_keepalived(args, procs, args.out, results, notes)
    except KeyboardInterrupt as e:
        failed = f"interrupted ({e})"
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
        log(f"failed: {failed}")
    finally:
        procs.stop_all()
    (args.out / "rounds.json").write_text(
        json.dumps({f"{s}/{e}": rows for (s, e), rows in results.items()}, indent=1) + "\n"
    )
    table = render(args, results, notes)
    if failed:
        table += f"\nThe run did not finish: {failed}.\n"
    print(table)
    if args.table:
        Path(args.table).write_text(table)
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--freebind", action="store_true")
    s.add_argument("--claim", default=None, help="add this address/prefix to --dev first, announce it, remove it on SIGTERM")
    s.add_argument("--dev", default="eth0")
    r = sub.add_parser("run")
    r.add_argument("--run-id", required=True, help="names the namespaces hfb-<run-id>-*")
    r.add_argument("--consul", required=True)
    r.add_argument("--halo-lb", required=True)
    r.add_argument("--halo-commit", default="?")
    r.add_argument("--keepalived", default=None)
    r.add_argument("--keepalived-note", default=None, help="why keepalived cannot run (skips it)")
    r.add_argument("--out", required=True, help="directory for raw output")
    r.add_argument("--table", default=None, help="write the Markdown table here too")
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--consul-kill-rounds", type=int, default=3)
    r.add_argument("--systems", default="halo,consul-lock,keepalived")
    r.add_argument("--max-seconds", type=float, default=2400)
    args = ap.parse_args()
    if args.cmd == "probe":
        probe_main(args)
    elif args.cmd == "serve":
        serve_main(args)
    else:
        sys.exit(run_main(args))


if __name__ == "__main__":
    main()
