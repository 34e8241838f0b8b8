"""How late an idle worker acts on a signal another of its threads received (docs/handoff.md).

    .venv/bin/python -m bench.signal_wake --engine uring --signals 30

A `relay run` with one worker writing to a log file; each round renames the log file and sends
SIGUSR1 with tgkill(2) to a worker thread that is not the one in loop.run() (the command
reader): the delivery that used to leave the wait asleep until its 100 ms timeout. Reported: the
time until the worker's reopened log file exists (median, p90, mean, max, in ms).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path

from relay.lab.process import RelayProcess, relay_config, write_config


def measure(engine: str, signals: int) -> dict[str, float]:
    libc = ctypes.CDLL(None, use_errno=True)
    origin = socket.create_server(("127.0.0.1", 0))
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-sig-"))
    log = directory / "relay.log"
    path = write_config(directory, "relay", relay_config(
        origin.getsockname()[1], admin_socket=str(directory / "admin.sock"), workers=1,
        engine=engine, settings={"log_file": str(log)}))
    rp = RelayProcess(path)
    times: list[float] = []
    try:
        rp.wait_ready()
        time.sleep(1.0)
        (pid,) = rp.children()
        tid = next(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        for i in range(signals):
            while not log.exists():
                time.sleep(0.01)
            log.rename(directory / f"relay.log.{i}")
            t0 = time.monotonic()
            if libc.tgkill(pid, tid, signal.SIGUSR1) != 0:
                raise OSError(ctypes.get_errno(), "tgkill")
            while not log.exists():
                time.sleep(0.0002)
            times.append((time.monotonic() - t0) * 1000)
            time.sleep(0.05 + (i % 7) * 0.013)  # no fixed period: do not lock onto the tick
    finally:
        rp.stop()
        origin.close()
    return {"median_ms": round(statistics.median(times), 2),
            "p90_ms": round(statistics.quantiles(times, n=10)[-1], 2),
            "mean_ms": round(statistics.mean(times), 2), "max_ms": round(max(times), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="auto")
    p.add_argument("--signals", type=int, default=30)
    args = p.parse_args()
    print(json.dumps({"engine": args.engine, "signals": args.signals,
                      **measure(args.engine, args.signals)}))


if __name__ == "__main__":
    main()
