#!/usr/bin/env python3
"""Helpers of the failover benchmark (benches/failover.sh, which runs the
`failover-dc` bench binary in halo_testkit's datacenter). Standard library
only.

- `probe`: the client. Starts a TCP connection to the VIP every 5 ms (each
  with a 1 s deadline, many in flight if need be), reads the greeting to EOF
  and logs each attempt as `<end ns> ok|fail <who> <start ns>`
  (CLOCK_MONOTONIC), which the bench binary reads.
- `serve`: a greeting server (`<name>\n`, then close). With `--freebind` it
  binds an address the host does not have yet; with `--claim ADDR/LEN` it
  first adds that address to `--dev`, announces it with gratuitous ARP, and
  removes it on SIGTERM: the child `consul lock` runs.
"""

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time


PROBE_EVERY = 0.005
PROBE_DEADLINE = 1.0
PROBE_MAX_IN_FLIGHT = 400

IP_FREEBIND = 15


def log(msg):
    print(f"[failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_ns():
    return time.monotonic_ns()


def require_ours(host):
    """Traffic goes to loopback or to 198.18.0.0/15 (inside our namespaces)."""
    if not (host.startswith("127.") or host.startswith("198.18.") or host.startswith("198.19.")):
        sys.exit(f"failover.py: refusing to send traffic to {host}")


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
    args = ap.parse_args()
    if args.cmd == "probe":
        probe_main(args)
    else:
        serve_main(args)


if __name__ == "__main__":
    main()
