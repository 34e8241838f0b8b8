"""The reload handoff pause with many active connections (docs/handoff.md).

    .venv/bin/python -m bench.handoff_pause                     # 1,000 connections, 2 workers
    .venv/bin/python -m bench.handoff_pause --conns 200 --reloads 3 --engine epoll --json

A `relay run` (backend mode, flow log off) in front of an echo origin; every connection sends a
small timestamped message every `--interval` seconds (staggered) and checks each echo. After a
warm-up the relay is reloaded (SIGHUP) `--reloads` times; each reload hands every connection to
the new generation. Reported per reload, from the relay itself (`relay stats json`): the pause
histogram (export by the old worker -> import by the new one, per flow) as p50/p99 (bucket
upper bounds), mean and max; and from the clients: the round trips in flight across the reload
(p50/p99/max), next to the round trips before it. Every connection must survive every reload
with every echo intact, or the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from relay.lab.process import RelayProcess, relay_config, write_config
from relay.ops.handoff_report import quantile
from relay.ops.metrics import totals

MSG = struct.Struct("!QQ")  # connection index, send time (ns)


class EchoOrigin(threading.Thread):
    """A selectors echo server (one thread for every connection)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            for key, _ in self.sel.select(0.2):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            conn, _ = self.sock.accept()
                            conn.setblocking(False)
                            self.sel.register(conn, selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(conn)
                    conn.close()
                    continue
                conn.setblocking(True)
                conn.sendall(data)
                conn.setblocking(False)


class Clients:
    """`n` connections, each sending MSG every `interval` s; round trips by send time."""

    def __init__(self, addr: tuple[str, int], n: int, interval: float) -> None:
        self.interval = interval
        self.socks: list[socket.socket] = []
        for _ in range(n):
            s = socket.create_connection(addr, timeout=10)
            s.setblocking(False)
            self.socks.append(s)
        self.rtts: list[tuple[int, float]] = []  # (send time ns, rtt s)
        self.errors: list[str] = []
        self.buffers = [b""] * n
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        n = len(self.socks)
        start = time.monotonic()
        next_send = [start + self.interval * i / n for i in range(n)]
        while not self.stop:
            now = time.monotonic()
            for i in range(n):
                if next_send[i] <= now:
                    next_send[i] += self.interval
                    try:
                        self.socks[i].send(MSG.pack(i, time.monotonic_ns()))
                    except OSError as exc:
                        self.errors.append(f"conn {i}: send: {exc}")
            for key, _ in sel.select(0.002):
                i = key.data
                try:
                    data = self.socks[i].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self.errors.append(f"conn {i}: {exc}")
                    sel.unregister(self.socks[i])
                    continue
                if not data:
                    self.errors.append(f"conn {i}: EOF")
                    sel.unregister(self.socks[i])
                    continue
                buf = self.buffers[i] + data
                now_ns = time.monotonic_ns()
                while len(buf) >= MSG.size:
                    idx, sent = MSG.unpack_from(buf)
                    buf = buf[MSG.size:]
                    if idx != i:
                        self.errors.append(f"conn {i}: echo of connection {idx}")
                    self.rtts.append((sent, (now_ns - sent) / 1e9))
                self.buffers[i] = buf

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        for s in self.socks:
            s.close()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f} ms"


def run(args: argparse.Namespace) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * args.conns + 256                   # our client ends and the origin's ends
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    origin = EchoOrigin()
    origin.start()
    workdir = Path(tempfile.mkdtemp(prefix="relay-handoff-bench-"))
    adm = str(workdir / "admin.sock")
    cfg = relay_config(origin.port, engine=args.engine, workers=args.workers, admin_socket=adm,
                       drain=10.0, settings={"flow_log": False})
    rp = RelayProcess(write_config(workdir, "relay", cfg))
    out: dict[str, Any] = {"conns": args.conns, "workers": args.workers, "engine": args.engine,
                           "interval_s": args.interval, "reloads": []}
    try:
        rp.wait_ready()
        clients = Clients(rp.address(), args.conns, args.interval)
        clients.thread.start()
        time.sleep(args.warmup)
        prev: dict[str, Any] = {}
        for n in range(args.reloads):
            before_ns = time.monotonic_ns()
            rp.send_signal(signal.SIGHUP)
            want = n + 2
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                snap = json.loads(rp.admin("stats json"))
                if snap["generation"] == want and all(
                        w["generation"] == want for w in snap["workers"]):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"reload {n + 1}: old workers still alive after 30 s")
            time.sleep(1.5)                       # stats of the new workers arrive (1 s)
            snap = json.loads(rp.admin("stats json"))
            t = totals(snap["workers"], snap.get("retired"))
            hist = _delta_hist(t.get("handoff_pause_seconds", {}), prev)
            prev = t.get("handoff_pause_seconds", {})
            window = [rtt for sent, rtt in clients.rtts
                      if before_ns - 1e8 <= sent <= before_ns + 1.5e9]
            base = [rtt for sent, rtt in clients.rtts if sent < before_ns - 1e8]
            out["reloads"].append({
                "adopted": hist.get("count", 0),
                "pause_p50_s_le": quantile(hist, 0.5),
                "pause_p99_s_le": quantile(hist, 0.99),
                "pause_mean_s": hist["sum"] / hist["count"] if hist.get("count") else None,
                "pause_max_s_all_reloads": t.get("handoff_pause_max_seconds"),
                "client_rtt_reload_p50_s": _pct(window, 0.5),
                "client_rtt_reload_p99_s": _pct(window, 0.99),
                "client_rtt_reload_max_s": max(window, default=0.0),
                "client_rtt_before_p99_s": _pct(base[-20000:], 0.99),
                "lost": t.get("handoff_lost", 0),
                "refused": sum(t.get("handoff_refused", {}).values()),
            })
            time.sleep(args.gap)
        clients.close()
        out["errors"] = clients.errors[:10]
        out["round_trips"] = len(clients.rtts)
        out["ok"] = not clients.errors and all(r["adopted"] == args.conns and not r["lost"]
                                               for r in out["reloads"])
    finally:
        rp.cleanup()
        origin.stop = True
    return out


def _delta_hist(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    old = dict(before.get("buckets", []))
    return {
        "buckets": [(b, c - old.get(b, 0)) for b, c in now.get("buckets", [])],
        "sum": now.get("sum", 0.0) - before.get("sum", 0.0),
        "count": now.get("count", 0) - before.get("count", 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.handoff_pause", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", default="auto")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between messages")
    p.add_argument("--reloads", type=int, default=3)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--gap", type=float, default=1.0, help="seconds between reloads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.conns} active connections, {args.workers} workers, engine {args.engine}, "
              f"one message per connection every {args.interval:g}s; {result['round_trips']} "
              "round trips")
        for i, r in enumerate(result["reloads"], 1):
            print(f"reload {i}: adopted {r['adopted']}, lost {r['lost']}, refused {r['refused']}; "
                  f"pause p50 <= {_ms(r['pause_p50_s_le'])}, p99 <= {_ms(r['pause_p99_s_le'])}, "
                  f"mean {_ms(r['pause_mean_s'])}; client round trips across the reload "
                  f"p50 {_ms(r['client_rtt_reload_p50_s'])}, p99 {_ms(r['client_rtt_reload_p99_s'])}, "
                  f"max {_ms(r['client_rtt_reload_max_s'])} (before: p99 "
                  f"{_ms(r['client_rtt_before_p99_s'])})")
        if result["reloads"]:
            print(f"pause max over all reloads: {_ms(result['reloads'][-1]['pause_max_s_all_reloads'])}")
        print("OK: every connection survived" if result["ok"] else
              f"FAILED: {result['errors']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
