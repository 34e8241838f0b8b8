"""`make soak`: a bounded churn soak through `relay run`, failing on a resource growth trend.

    python tests/soak/soak.py [--seconds 60] [--workers 2] [--clients 8] [--engine auto]

Client threads open connections through the relay for ``--seconds``, each picking one kind at
random (all checked end to end):

    short   64 bytes echoed, then close
    reset   bytes sent, then an RST from the client (SO_LINGER {1, 0})
    half    the client half-closes first, the origin answers 64 KiB after the EOF (SHA-256)
    bulk    2 MiB to an origin that answers the SHA-256 of what it read
    slow    1 MiB from the origin to a client with a 16 KiB receive buffer that reads slowly

Once a second it samples every worker: open fds, RSS, threads and pipes (/proc/PID). After a
warm-up (the first fifth), it compares the median of the first and the last third of the
samples: growth beyond a small allowance is a leak. At the end the churn stops and every
worker must come back to zero open connections and zero pipes in use. Any failed connection,
a worker that died, or a growth trend: exit status 1 with the reason. Not collected by pytest
(no test_ prefix); the tests' helpers and the relay lab are its harness.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

from helpers import (  # noqa: E402
    connect,
    echo,
    hash_reply,
    pattern,
    read_all,
    reset,
    respond_after_eof,
    source,
)

from relay.lab.origins import Origin  # noqa: E402
from relay.lab.process import RelayProcess, relay_config, write_config  # noqa: E402
from relay.ops.metrics import totals  # noqa: E402

HALF_N, BULK_N, SLOW_N = 64 * 1024, 2 * 1024 * 1024, 1024 * 1024
KINDS = ("short", "reset", "half", "bulk", "slow")
WEIGHTS = (40, 15, 15, 15, 15)
# Allowed growth from the first to the last third (medians): absolute + relative.
ALLOW = {"fds": (32, 0.10), "pipes": (32, 0.10), "threads": (2, 0.0),
         "rss_kib": (16 * 1024, 0.10)}


class Failure(Exception):
    pass


def _sample(pid: int) -> dict[str, int]:
    fds = pipes = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("pipe:"):
                pipes += 1
        except OSError:
            pass
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return {"fds": fds, "pipes": pipes, "threads": int(status["Threads"][0]),
            "rss_kib": int(status["VmRSS"][0])}


class Soak:
    def __init__(self, args: argparse.Namespace, addrs: dict[str, tuple[str, int]]) -> None:
        self.args = args
        self.addrs = addrs
        self.done = Counter[str]()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def one(self, kind: str, rng: random.Random) -> None:
        if kind == "short":
            with connect(self.addrs["main"]) as s:
                data = rng.randbytes(64)
                s.sendall(data)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        raise Failure(f"short: EOF after {len(got)} of 64 bytes")
                    got += chunk
                if got != data:
                    raise Failure("short: echo differs")
        elif kind == "reset":
            s = connect(self.addrs["main"])
            s.sendall(b"r" * rng.randrange(1, 4096))
            reset(s)
        elif kind == "half":
            with connect(self.addrs["half"]) as s:
                s.sendall(b"h" * 1000)
                s.shutdown(socket.SHUT_WR)
                seen = read_all(s)
                want = hashlib.sha256(pattern(HALF_N, 2)).hexdigest()
                if (seen.end, seen.nbytes, seen.sha256) != ("eof", HALF_N, want):
                    raise Failure(f"half: {seen.end} {seen.nbytes} bytes")
        elif kind == "bulk":
            seed = rng.randrange(1 << 20)
            data = pattern(BULK_N, seed)
            with connect(self.addrs["bulk"]) as s:
                sender = threading.Thread(target=lambda: (s.sendall(data),
                                                          s.shutdown(socket.SHUT_WR)))
                sender.start()
                digest = b""
                while len(digest) < 32:
                    chunk = s.recv(32 - len(digest))
                    if not chunk:
                        break
                    digest += chunk
                sender.join(30)
                if digest != hashlib.sha256(data).digest():
                    raise Failure(f"bulk: checksum mismatch ({len(digest)} digest bytes)")
        elif kind == "slow":
            with connect(self.addrs["slow"], rcvbuf=16 * 1024) as s:
                seen = read_all(s, chunk=16 * 1024, pause=0.002)
                want = hashlib.sha256(pattern(SLOW_N, 5)).hexdigest()
                if (seen.nbytes, seen.sha256) != (SLOW_N, want):
                    raise Failure(f"slow: {seen.end} {seen.nbytes} of {SLOW_N} bytes")

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            kind = rng.choices(KINDS, WEIGHTS)[0]
            try:
                self.one(kind, rng)
                with self.lock:
                    self.done[kind] += 1
            except (Failure, OSError) as exc:
                with self.lock:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")


def _trend(series: list[dict[str, int]]) -> list[str]:
    """Growth from the first to the last third of ``series`` (warm-up excluded) beyond ALLOW."""
    body = series[len(series) // 5:]
    if len(body) < 6:
        return ["too few samples for a trend (run longer)"]
    third = len(body) // 3
    problems = []
    for key, (absolute, relative) in ALLOW.items():
        first = statistics.median(s[key] for s in body[:third])
        last = statistics.median(s[key] for s in body[-third:])
        if last > first + absolute + relative * first:
            problems.append(f"{key} grew from {first:.0f} to {last:.0f}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--engine", default="auto")
    args = p.parse_args()

    origins = {"main": Origin(echo), "half": Origin(respond_after_eof(HALF_N, 2)),
               "bulk": Origin(hash_reply), "slow": Origin(source(SLOW_N, 5))}
    extra = "".join(f'\n[[listener]]\nname = "{name}"\nbind = "127.0.0.1:0"\n'
                    f'backend = "127.0.0.1:{o.port}"\n'
                    for name, o in origins.items() if name != "main")
    work = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    config = relay_config(origins["main"].port, engine=args.engine, workers=args.workers,
                          admin_socket=str(work / "admin.sock"), drain=5.0,
                          settings={"flow_log": False, "maxconn": 4096}, extra=extra)
    relay = RelayProcess(write_config(work, "soak", config))
    problems: list[str] = []
    try:
        addrs = relay.wait_ready()
        time.sleep(0.5)
        pids = sorted(relay.children())
        soak = Soak(args, addrs)
        clients = [threading.Thread(target=soak.client, args=(i,), daemon=True)
                   for i in range(args.clients)]
        series: dict[int, list[dict[str, int]]] = {pid: [] for pid in pids}
        started = time.monotonic()
        for t in clients:
            t.start()
        while time.monotonic() - started < args.seconds:
            time.sleep(1.0)
            for pid in pids:
                try:
                    series[pid].append(_sample(pid))
                except OSError:
                    problems.append(f"worker {pid} is gone")
            if problems:
                break
        soak.stop.set()
        for t in clients:
            t.join(60)
        if sorted(relay.children()) != pids:
            problems.append(f"workers changed: {pids} -> {sorted(relay.children())}")
        for pid, samples in series.items():
            problems += [f"worker {pid}: {text}" for text in _trend(samples)]
        deadline = time.monotonic() + 15
        while True:  # quiescence: nothing open, no pipe in use
            snap = relay.stats()
            t = totals(snap["workers"])
            if t.get("conns_open", 0) == 0 and t.get("pipes_in_use", 0) == 0:
                break
            if time.monotonic() > deadline:
                problems.append(f"not quiescent after the churn: conns_open "
                                f"{t.get('conns_open')}, pipes_in_use {t.get('pipes_in_use')}")
                break
            time.sleep(0.5)
        problems += soak.errors[:20]
        if len(soak.errors) > 20:
            problems.append(f"... and {len(soak.errors) - 20} more failed connections")
        total = sum(soak.done.values())
        print(f"soak: {total} connections in {args.seconds:.0f}s ({dict(soak.done)}), "
              f"{len(soak.errors)} failed, {args.workers} workers, engine {args.engine}")
        for pid, samples in series.items():
            if samples:
                a, b = samples[0], samples[-1]
                print(f"  worker {pid}: " + ", ".join(f"{k} {a[k]} -> {b[k]}" for k in ALLOW))
        if total == 0:
            problems.append("no connection completed")
    finally:
        relay.stop()
        for o in origins.values():
            o.close()
    for line in problems:
        print(f"soak: FAIL: {line}", file=sys.stderr)
    if not problems:
        print("soak: PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
