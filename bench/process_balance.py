"""How evenly does `relay run --workers N` split connections between its workers?

    PYTHONPATH=$PWD python -m bench.process_balance [--engines uring,epoll] [--workers 2]
        [--burst 2000] [--concurrency 16] [--held 400] [--runs 3]

Starts `relay run` (an echo origin behind it) and measures, per engine:

* burst: ``--burst`` short connections (connect, 4-byte echo, close) from ``--concurrency``
  client threads; each worker's share of the accepted connections (``flows_accepted``);
* held: ``--held`` connections opened one after another and kept open; each worker's share of
  the open connections (``flows_open``).

A measurement, not a test: the numbers go in docs/worker-balance.md with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from relay.lab.origins import Origin
from relay.lab.process import RelayProcess, relay_config, write_config


def echo(conn: socket.socket, _seen: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def roundtrip(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(b"ping")
            got = b""
            while len(got) < 4 and (data := s.recv(64)):
                got += data
            return got == b"ping"
    except OSError:
        return False


def worker_counts(rp: RelayProcess, key: str) -> list[int]:
    time.sleep(1.2)  # workers report once a second
    return sorted(int(w["stats"].get(key, 0)) for w in rp.workers())


def shares(counts: list[int]) -> str:
    total = sum(counts) or 1
    return " / ".join(f"{c} ({100 * c / total:.0f} %)" for c in counts)


def measure(engine: str, workers: int, burst: int, concurrency: int, held: int) -> dict[str, Any]:
    origin = Origin(echo, backlog=4096)
    directory = Path(tempfile.mkdtemp(prefix="relay-balance-"))
    path = write_config(directory, "relay", relay_config(
        origin.port, engine=engine, workers=workers, admin_socket=str(directory / "a.sock"),
        settings={"maxconn": 100000}))
    rp = RelayProcess(path, name=f"relay-{engine}")
    try:
        rp.wait_ready()
        addr = rp.address()
        base = worker_counts(rp, "flows_accepted")
        with ThreadPoolExecutor(concurrency) as pool:
            ok = sum(pool.map(lambda _i: roundtrip(addr), range(burst)))
        after = worker_counts(rp, "flows_accepted")
        burst_counts = [a - b for a, b in zip(after, base, strict=True)]
        socks = []
        for _ in range(held):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"x")
            s.recv(1)
            socks.append(s)
        held_counts = worker_counts(rp, "flows_open")
        for s in socks:
            s.close()
        return {"engine": engine, "burst": burst_counts, "burst_failed": burst - ok,
                "held": held_counts, "load": os.getloadavg()[0]}
    finally:
        rp.stop()
        origin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="uring,epoll")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--held", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.runs):
        for engine in args.engines.split(","):
            r = measure(engine, args.workers, args.burst, args.concurrency, args.held)
            print(f"{engine:6} burst {shares(r['burst'])} (failed {r['burst_failed']}); "
                  f"held {shares(r['held'])}; load {r['load']:.2f}", flush=True)


if __name__ == "__main__":
    main()
