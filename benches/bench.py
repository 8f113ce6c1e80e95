#!/usr/bin/env python3
"""Helpers for benches/run.sh: ports, readiness, load clients, parsers, table.

Every helper is bounded in time and only ever talks to loopback
(127.0.0.0/8).  Standard library only.

Subcommands (see `main` at the bottom):
  freeport                         print a free loopback TCP port
  wait-ready PORT [--http URL] [--connect] [--timeout S]
  idle-backend PORT                accept, echo one byte, hold (asyncio)
  idle-client PORT N READYFILE [--hold S] [--timeout S]
  rss PID                          VmRSS in KiB, summed over PID and descendants
  cpu PID                          CPU seconds (utime + stime, all threads) of PID and descendants
  cpu-kernel PID                   the same, stime only (time in the kernel)
  pids PID                         PID and its descendants, comma-separated (for perf stat -p)
  perf-count FILE                  the count from `perf stat -x,` output
  per-unit CPU0 CPU1 UNITS SCALE   (CPU1 - CPU0) * SCALE / UNITS, or "failed"
  iperf-bytes FILE                 bytes received over every interval (omitted ones too)
  iperf FILE                       receiver Gbit/s from iperf3 -J output
  wrk FILE                         JSON: rps, p50_ms, p99_ms, errors
  dnsperf FILE                     "qps completed lost%" over every dnsperf summary in FILE
  swap-loop ADMIN VIP ADDR RATE SECONDS OUTFILE
  table-bench FILE RESULTS         turn table-bench JSON lines into result rows
  render RESULTS META OUT          print the Markdown table and write OUT
"""

import asyncio
import http.client
import ipaddress
import json
import os
import random
import re
import resource
import socket
import statistics
import sys
import time

LOOPBACK = "127.0.0.1"


def die(msg):
    print(f"bench.py: {msg}", file=sys.stderr)
    sys.exit(1)


def require_loopback(host):
    if not ipaddress.ip_address(host).is_loopback:
        die(f"refusing non-loopback address {host}")


# --------------------------------------------------------------- ports


def ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except OSError:
        return 32768, 60999


def bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def freeport():
    """A free port, preferably *below* the kernel's ephemeral range.

    Ports handed out by bind(port 0) come from the ephemeral range, which the
    connections/s runs cycle through hundreds of thousands of times; a port
    picked there early can be taken by a client socket before the service that
    wanted it binds.  So try bind-checked random ports under the range first
    and fall back to bind(0)."""
    lo, _ = ephemeral_range()
    if lo > 12000:
        for _ in range(200):
            p = random.randint(10000, lo - 1)
            if bindable(p):
                return p
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def listening(port):
    """True when some socket is in LISTEN state on port (no connection made)."""
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def http_status(url, timeout=1.0):
    m = re.match(r"http://([^/:]+):(\d+)(/.*)?$", url)
    if not m:
        die(f"bad url {url}")
    host, port, path = m.group(1), int(m.group(2)), m.group(3) or "/"
    require_loopback(host)
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def wait_ready(args):
    port = int(args[0])
    url = None
    connect = False
    timeout = 20.0
    i = 1
    while i < len(args):
        if args[i] == "--http":
            url = args[i + 1]
            i += 2
        elif args[i] == "--connect":
            connect = True
            i += 1
        elif args[i] == "--timeout":
            timeout = float(args[i + 1])
            i += 2
        else:
            die(f"wait-ready: unknown argument {args[i]}")
    deadline = time.monotonic() + timeout
    last = "never listened"
    while time.monotonic() < deadline:
        try:
            if not listening(port):
                last = f"port {port} not listening"
                raise OSError(last)
            if url is not None:
                st = http_status(url)
                if st != 200:
                    last = f"{url} answered {st}"
                    raise OSError(last)
            if connect:
                with socket.create_connection((LOOPBACK, port), timeout=1.0):
                    pass
            return 0
        except (OSError, http.client.HTTPException) as e:
            last = str(e) or last
            time.sleep(0.05)
    print(f"wait-ready: not ready after {timeout}s: {last}", file=sys.stderr)
    return 1


# ------------------------------------------------------ idle connections


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_backend(args):
    port = int(args[0])
    max_seconds = float(args[1]) if len(args) > 1 else 3600.0
    raise_nofile()

    async def handle(reader, writer):
        try:
            b = await reader.read(1)
            if b:
                writer.write(b)
                await writer.drain()
                while await reader.read(4096):
                    pass
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def run():
        srv = await asyncio.start_server(handle, LOOPBACK, port, backlog=4096)
        async with srv:
            await asyncio.sleep(max_seconds)  # bounded: stops by itself

    asyncio.run(run())
    return 0


def idle_client(args):
    port = int(args[0])
    n = int(args[1])
    readyfile = args[2]
    hold = 120.0
    timeout = 60.0
    i = 3
    while i < len(args):
        if args[i] == "--hold":
            hold = float(args[i + 1])
            i += 2
        elif args[i] == "--timeout":
            timeout = float(args[i + 1])
            i += 2
        else:
            die(f"idle-client: unknown argument {args[i]}")
    limit = raise_nofile()
    if limit < n + 64:
        print(f"idle-client: fd limit {limit} too low for {n}", file=sys.stderr)

    async def run():
        conns = []
        failures = 0
        sem = asyncio.Semaphore(128)
        first_err = []

        # Give up early once it is clear the proxy refuses more (e.g. out of
        # fds): the rest would only burn the time limit.
        give_up = max(100, n // 20)

        async def one():
            nonlocal failures
            async with sem:
                if failures >= give_up:
                    return
                try:
                    r, w = await asyncio.wait_for(
                        asyncio.open_connection(LOOPBACK, port), 10.0
                    )
                    w.write(b"p")
                    await w.drain()
                    got = await asyncio.wait_for(r.readexactly(1), 10.0)
                    if got != b"p":
                        raise OSError("bad echo")
                    conns.append((r, w))
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                    failures += 1
                    if not first_err:
                        first_err.append(repr(e))

        t0 = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(one() for _ in range(n))), timeout
            )
        except asyncio.TimeoutError:
            pass
        took = time.monotonic() - t0
        info = {
            "requested": n,
            "established": len(conns),
            "failed": failures,
            "seconds": round(took, 2),
            "first_error": first_err[0] if first_err else None,
            "gave_up": failures >= give_up,
        }
        tmp = readyfile + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.rename(tmp, readyfile)
        await asyncio.sleep(hold)  # harness kills us earlier; bounded anyway
        for _, w in conns:
            w.close()

    asyncio.run(run())
    return 0


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pid):
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid, kernel_only=False):
    """utime + stime of PID and its descendants, in seconds: every thread,
    including threads that have exited (the process's own counters keep
    them), from /proc/PID/stat fields 14 and 15 (clock ticks). With
    `kernel_only`, stime alone: the time spent in the kernel on the
    process's behalf (system calls, and the softirq work the kernel does in
    its context, such as delivering what it sends over loopback)."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rindex(")") + 2 :].split()
            total += int(fields[12]) if kernel_only else int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / hz


def perf_count(path):
    """The first counter of `perf stat -x,` output (CSV: value,unit,event,...)."""
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) >= 3 and parts[0].isdigit():
                return int(parts[0])
    raise ValueError(f"no count in {path}")


def iperf_bytes(path):
    with open(path) as f:
        d = json.load(f)
    return sum(i["sum"]["bytes"] for i in d["intervals"])


# ------------------------------------------------------------- parsers


def parse_iperf(path):
    with open(path) as f:
        d = json.load(f)
    if "error" in d and "end" not in d:
        die(f"iperf3 error: {d['error']}")
    bps = d["end"]["sum_received"]["bits_per_second"]
    return bps / 1e9


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def wrk_time_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", s)
    if not m:
        raise ValueError(s)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(path):
    """One wrk output, or several appended to one file (the rounds of an
    interleaved measurement): requests and errors add up, the rate is all
    requests over all the time, and a latency percentile is the median of
    the rounds' (wrk reports no histogram to merge)."""
    with open(path) as f:
        text = f.read()
    out = {"rps": None, "p50_ms": None, "p99_ms": None, "requests": None,
           "errors": 0, "non2xx": 0, "rounds": 0}
    runs = re.findall(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if runs:
        requests = sum(int(n) for n, _, _ in runs)
        secs = sum(wrk_time_ms(t + u) / 1000.0 for _, t, u in runs)
        out["requests"] = requests
        out["rounds"] = len(runs)
        if secs > 0:
            out["rps"] = round(requests / secs, 2)
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        vals = [wrk_time_ms(v) for v in re.findall(rf"^\s+{pct}%\s+(\S+)\s*$", text, re.M)]
        if vals:
            out[key] = round(statistics.median(vals), 4)
    errs = re.findall(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if errs:
        out["errors"] = sum(int(x) for m in errs for x in m)
        out["socket_errors"] = "; ".join(
            f"connect {a}, read {b}, write {c}, timeout {d}" for a, b, c, d in errs
        )
    out["non2xx"] = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    return out


# ----------------------------------------------------------- swap loop


def swap_loop(args):
    """POST disable/enable alternately on one backend, RATE per second, for
    SECONDS, over one persistent HTTP connection (reopened if the server
    closes it).  Writes a JSON summary to OUTFILE."""
    admin, vip, addr, rate, seconds, outfile = args
    host, port = admin.rsplit(":", 1)
    require_loopback(host)
    rate = float(rate)
    seconds = float(seconds)
    interval = 1.0 / rate
    max_posts = int(rate * seconds) + 1
    conn = http.client.HTTPConnection(host, int(port), timeout=2.0)
    ok = bad = errors = changed = 0
    statuses = {}
    first_err = None
    t0 = time.monotonic()
    deadline = t0 + seconds
    nxt = t0
    i = 0
    while i < max_posts and time.monotonic() < deadline:
        action = "disable" if i % 2 == 0 else "enable"
        path = f"/vips/{vip}/backends/{addr}/{action}"
        try:
            conn.request("POST", path, body=b"", headers={"Content-Length": "0", "X-Halo-Request": "1"})
            r = conn.getresponse()
            body = r.read()
            statuses[r.status] = statuses.get(r.status, 0) + 1
            try:
                if json.loads(body).get("changed") is True:
                    changed += 1
            except (ValueError, AttributeError):
                pass
            if 200 <= r.status < 300:
                ok += 1
            else:
                bad += 1
            if r.will_close:
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            errors += 1
            if first_err is None:
                first_err = repr(e)
            conn.close()
        i += 1
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            nxt = time.monotonic()  # fell far behind: do not burst to catch up
    # Leave the backend enabled whatever happened.
    try:
        conn.request("POST", f"/vips/{vip}/backends/{addr}/enable", body=b"",
                     headers={"Content-Length": "0", "X-Halo-Request": "1"})
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass
    conn.close()
    took = time.monotonic() - t0
    summary = {
        "posts": i, "ok": ok, "changed": changed, "non2xx": bad, "errors": errors,
        "seconds": round(took, 2), "rate": round(ok / took, 1) if took else 0,
        "statuses": statuses, "first_error": first_err,
    }
    with open(outfile, "w") as f:
        json.dump(summary, f)
    return 0


# --------------------------------------------------------------- table

PROXIES = ["direct", "haproxy", "haproxy-splice", "nginx-stream", "halo", "halo-epoll", "halo-buffered"]
# Ratio columns: (halo variant, what it is compared with).
RATIOS = (("halo", "haproxy"), ("halo-epoll", "haproxy"), ("halo-buffered", "haproxy"))

# key -> (row title, higher_is_better, number format)
ROWS = [
    ("tput", "bulk throughput, 1 TCP stream, Gbit/s (higher is better)", True, "{:.2f}"),
    ("cps", "new connections/s, `Connection: close` (higher is better)", True, "{:,.0f}"),
    ("ka_rps", "keep-alive requests/s (higher is better)", True, "{:,.0f}"),
    ("lat_p50", "keep-alive latency p50, ms (lower is better)", False, "{:.3f}"),
    ("lat_p99", "keep-alive latency p99, ms (lower is better)", False, "{:.3f}"),
    ("idle_kib", "memory per idle connection, KiB RSS (lower is better)", False, "{:.2f}"),
    ("cpu_gb", "CPU per GB bulk (one iperf3 stream), ms (lower is better)", False, "{:.0f}"),
    ("cpu_cps", "CPU per new connection, µs (lower is better)", False, "{:.2f}"),
    ("cpu_ka", "CPU per keep-alive request, µs (lower is better)", False, "{:.2f}"),
    ("kcpu_cps", "of which in the kernel (system time), per new connection, µs (lower is better)", False, "{:.2f}"),
    ("kcpu_ka", "of which in the kernel (system time), per keep-alive request, µs (lower is better)", False, "{:.2f}"),
    ("sys_cps", "syscalls per new connection (lower is better)", False, "{:.2f}"),
    ("sys_ka", "syscalls per keep-alive request (lower is better)", False, "{:.2f}"),
    ("swap_p50", "keep-alive latency p50 while tables swap {rate}/s, ms (lower is better)", False, "{:.3f}"),
    ("swap_p99", "keep-alive latency p99 while tables swap {rate}/s, ms (lower is better)", False, "{:.3f}"),
    ("swap_cps", "new connections/s while tables swap {rate}/s (higher is better)", True, "{:,.0f}"),
]


def load_results(path):
    """Lines: key<TAB>proxy<TAB>value<TAB>note.  value is a number or text."""
    res = {}
    if not os.path.exists(path):
        return res
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            while len(parts) < 4:
                parts.append("")
            key, proxy, value, note = parts[:4]
            res[(key, proxy)] = (value, note)
    return res


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def table_bench(args):
    """Turn table-bench JSON lines into result rows (key tbl:<algorithm>:<backends>)."""
    src, results = args
    with open(src) as f, open(results, "a") as out:
        n = 0
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                d = json.loads(line)
                b = int(d["backends"])
                alg = str(d.get("algorithm", "")).replace(":", "_").replace("\t", " ")
                cell = f"build {float(d['build_us']):,.1f} µs, swap {float(d['swap_ns']):.1f} ns"
                if "remove_us" in d:
                    cell += (
                        f"; one removed {float(d['remove_us']):,.1f} µs;"
                        f" full build (first table, or a new table size) {float(d['full_build_us']):,.1f} µs"
                    )
                if "spread_pct" in d:
                    cell += (
                        f"; table of {int(d['slots']):,} slots, slot spread {float(d['spread_pct']):.2f} %,"
                        f" one of {b:,} gone moves {float(d['moved_pct']):.2f} % of clients"
                        f" (ideal {float(d['ideal_moved_pct']):.2f} %)"
                    )
            except (ValueError, KeyError, TypeError):
                continue
            out.write(f"tbl:{alg}:{b}\thalo\t{cell}\t\n")
            n += 1
    return 0 if n else 1


UDP_PROXIES = ["direct", "nginx-stream", "halo"]
UDP_ROWS = [
    ("udp_qps", "DNS queries/s through a UDP VIP, dnsperf (higher is better)", True, "{:,.0f}"),
    ("udp_cpu", "CPU per DNS query, µs (lower is better)", False, "{:.2f}"),
    ("udp_lost", "DNS queries lost, % (lower is better)", False, "{:.3f}"),
]


def udp_table(res, meta):
    """The UDP rows: a table of their own, since HAProxy 2.6 balances no
    UDP; halo is compared with NGINX's stream module."""
    if not any(k.startswith("udp_") for (k, _p) in res):
        return []
    header = ["UDP (DNS)"] + UDP_PROXIES + ["halo ÷ nginx-stream", "notes"]
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, title, higher, fmt in UDP_ROWS:
        cells, vals = [], {}
        for p in UDP_PROXIES:
            v = res.get((key, p))
            x = num(v[0]) if v else None
            if key == "udp_cpu" and p == "direct":
                cells.append("n/a (no proxy)")
            elif x is None:
                cells.append(v[0] if v else "n/a")
            else:
                cells.append(fmt.format(x))
            vals[p] = x
        a, b = vals.get("halo"), vals.get("nginx-stream")
        notes = []
        if a is not None and b:
            r = a / b
            ratio = f"{r:.2f}"
            if (r < 1) if higher else (r > 1):
                notes.append("**behind** (halo vs nginx-stream)")
        else:
            ratio = "n/a"
        lines.append("| " + " | ".join([title] + cells + [ratio, "; ".join(notes)]) + " |")
    return lines


def parse_dnsperf(path):
    """One or more dnsperf summaries appended to one file: queries per
    second over all of them (completed ÷ run time), completed, and the
    share lost in percent."""
    with open(path) as f:
        text = f.read()
    sent = sum(int(x) for x in re.findall(r"Queries sent:\s+(\d+)", text))
    done = sum(int(x) for x in re.findall(r"Queries completed:\s+(\d+)", text))
    secs = sum(float(x) for x in re.findall(r"Run time \(s\):\s+([\d.]+)", text))
    if not sent or not secs:
        return None
    return done / secs, done, (sent - done) * 100.0 / sent


def render(args):
    results_path, meta_path, out_path = args
    res = load_results(results_path)
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    rate = meta.get("swap_rate", 100)
    halo_na = meta.get("halo_na")  # e.g. "n/a (not built)"

    def cell(key, proxy, fmt):
        if (key, proxy) not in res:
            if proxy.startswith("halo") and halo_na:
                return halo_na, None
            return "n/a", None
        v, note = res[(key, proxy)]
        x = num(v)
        if x is None:
            return v, None
        s = fmt.format(x)
        if note:
            s += f" ({note})"
        return s, x

    header = ["measurement"] + PROXIES + [f"{a} ÷ {b}" for a, b in RATIOS] + ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    # What the swap rows are compared with: the same 2-backend VIP without
    # swaps, measured just before (falls back to the 1-backend rows).
    steady = {}
    for k, base in (("swap_p50", "lat_p50"), ("swap_p99", "lat_p99"), ("swap_cps", "cps")):
        b = num(res.get(("swapbase_" + k.split("_")[1], "halo"), (None, None))[0])
        steady[k] = (b, "without swaps, same VIP") if b else (
            num(res.get((base, "halo"), (None, None))[0]), "without swaps, 1-backend VIP")

    for key, title, higher, fmt in ROWS:
        title = title.format(rate=rate)
        cells, vals = [], {}
        for p in PROXIES:
            s, x = cell(key, p, fmt)
            if key.startswith("swap") and p != "halo":
                s, x = "n/a (halo only)", None
            if key == "idle_kib" and p == "direct":
                s, x = "n/a (no proxy)", None
            cells.append(s)
            vals[p] = x
        notes = []
        ratios = []
        for a, b in RATIOS:
            if key.startswith("swap"):
                ratios.append("n/a")
                continue
            va, vb = vals.get(a), vals.get(b)
            if va is None or vb is None or vb == 0:
                ratios.append("n/a")
                continue
            r = va / vb
            ratios.append(f"{r:.2f}")
            behind = r < 1 if higher else r > 1
            if behind:
                close = abs(r - 1) <= 0.05
                notes.append(f"**behind** ({a} vs {b}{', within 5%' if close else ''})")
        if key.startswith("swap"):
            b, what = steady[key]
            if vals.get("halo") is not None and b:
                change = (vals["halo"] / b - 1) * 100
                notes.append(f"{change:+.0f}% vs {fmt.format(b)} {what}")
            info = res.get(("swapinfo_cps" if key == "swap_cps" else "swapinfo_lat", "halo"))
            if info and key != "swap_p99":
                notes.append(info[0])
        if key == "idle_kib":
            ic = res.get(("idle_count", "all"))
            if ic:
                notes.append(ic[0])
        if key == "ka_rps" or key.startswith("lat"):
            notes.append(f"wrk closed loop, c={meta.get('conns', '?')}")
        lines.append("| " + " | ".join([title] + cells + ratios + ["; ".join(notes)]) + " |")

    # Table rebuild + swap rows from table-bench (halo only).
    tbl = []
    for (k, _p), (v, _n) in res.items():
        if k.startswith("tbl:"):
            _, alg, n = k.split(":", 2)
            tbl.append((alg, int(n), v))
    tbl.sort()
    tbl_state = res.get(("tbl_state", "all"))
    note = "halo only, `table-bench` (in-process: rebuild of the whole table + one atomic swap; swap alone)"
    if tbl:
        for alg, n, v in tbl:
            what = f"{alg}, " if alg else ""
            row = [f"table rebuild + swap, {what}{n} backends (lower is better)"]
            row += ["n/a"] * 4 + [v, "= halo", "= halo", "n/a", "n/a", "n/a", note]
            lines.append("| " + " | ".join(row) + " |")
    else:
        why = tbl_state[0] if tbl_state else "not available"
        for n in (10, 1000, 10000):
            row = [f"table rebuild + swap, {n} backends (lower is better)"]
            row += ["n/a"] * 4 + [why, "n/a", "n/a", "n/a", "n/a", "n/a", "halo-benches `table-bench`: " + why]
            lines.append("| " + " | ".join(row) + " |")

    lines += udp_table(res, meta)
    desc = meta.get("description", "")
    md = "\n".join(lines) + "\n\n" + desc + "\n"
    sys.stdout.write(md)
    with open(out_path, "w") as f:
        f.write(md)
    return 0


# ---------------------------------------------------------------- main


def main():
    if len(sys.argv) < 2:
        die(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "freeport":
        print(freeport())
        return 0
    if cmd == "wait-ready":
        return wait_ready(args)
    if cmd == "idle-backend":
        return idle_backend(args)
    if cmd == "idle-client":
        return idle_client(args)
    if cmd == "rss":
        print(rss_kib(int(args[0])))
        return 0
    if cmd == "cpu":
        print(f"{cpu_seconds(int(args[0])):.2f}")
        return 0
    if cmd == "cpu-kernel":
        print(f"{cpu_seconds(int(args[0]), kernel_only=True):.2f}")
        return 0
    if cmd == "pids":
        print(",".join(str(p) for p in descendants(int(args[0]))))
        return 0
    if cmd == "perf-count":
        print(perf_count(args[0]))
        return 0
    if cmd == "iperf-bytes":
        print(iperf_bytes(args[0]))
        return 0
    if cmd == "per-unit":
        c0, c1, units, scale = (num(a) for a in args)
        if None in (c0, c1, units, scale) or units <= 0:
            print("failed")
        else:
            print(f"{(c1 - c0) * scale / units:.4g}")
        return 0
    if cmd == "iperf":
        print(f"{parse_iperf(args[0]):.4f}")
        return 0
    if cmd == "wrk":
        print(json.dumps(parse_wrk(args[0])))
        return 0
    if cmd == "dnsperf":
        r = parse_dnsperf(args[0]) if os.path.exists(args[0]) else None
        print("failed x x" if r is None else f"{r[0]:.1f} {r[1]} {r[2]:.4f}")
        return 0
    if cmd == "swap-loop":
        return swap_loop(args)
    if cmd == "table-bench":
        return table_bench(args)
    if cmd == "render":
        return render(args)
    die(f"unknown command {cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
