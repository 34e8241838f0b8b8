"""What the flow log costs per connection: an interleaved A/B of `relay run --workers 1` (docs/flow-log.md).

    flock /work/bench.lock .venv/bin/python -m bench.flowlog_ab --rounds 10 --duration 3 \\
        on=/path/to/tree:on off=/path/to/tree:off [other=/other/tree:on ...]

Each contender is LABEL=TREE:on|off: `relay run` started from TREE (PYTHONPATH and cwd) with
`--flow-log` (to a file, as bench/contenders.py does) or `--no-flow-log`. All of them run at once
against one nginx origin; each round runs wrk (`-t1 -c32`, `Connection: close`) for --duration
seconds against every contender in turn, the order reversed every other round, so slow phases
of a shared machine hit every contender alike. Per run: conn/s, the relay tree's CPU-µs per
connection (utime+stime, bench.drivers.procstat) and, per thread of the supervisor and the
worker, CPU-µs per connection (schedstat, ns) and voluntary/involuntary context switches per
1000 connections. The flow log's writer is the worker thread that exists only with the log on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.competitors import nginx
from bench.drivers import procstat, wrk


def _threads(pids: list[int]) -> dict[str, list[int]]:
    """role -> [CPU ns, voluntary, involuntary switches], summed over the threads of that role."""
    out: dict[str, list[int]] = {}
    for n, pid in enumerate(pids):
        for tid in os.listdir(f"/proc/{pid}/task"):
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/schedstat") as f:
                    ns = int(f.read().split()[0])
                with open(f"{base}/status") as f:
                    status = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            vol = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
            inv = re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M)
            role = ("supervisor" if n == 0 else "worker") + (":main" if tid == str(pid) else f":{tid}")
            acc = out.setdefault(role, [0, 0, 0])
            acc[0] += ns
            acc[1] += int(vol.group(1)) if vol else 0
            acc[2] += int(inv.group(1)) if inv else 0
    return out


def _start_relay(label: str, tree: str, on: bool, origin_port: int, tmp: Path) -> tuple[subprocess.Popen[str], int]:
    argv = [sys.executable, "-m", "relay", "run", "--listen", "127.0.0.1:0",
            "--backend", f"127.0.0.1:{origin_port}", "--engine", "uring", "--workers", "1",
            "--drain-timeout", "1", "--flow-log" if on else "--no-flow-log",
            "--log-file", str(tmp / f"{label}.log")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=tree, env=dict(os.environ, PYTHONPATH=tree))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"=127\.0\.0\.1:(\d+)", line)
    if found is None:
        proc.terminate()
        raise RuntimeError(f"{label}: relay run did not report its port: {line!r}")
    return proc, int(found.group(1))


def run(contenders: list[tuple[str, str, bool]], rounds: int, duration: int) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-flowlog-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        origin_port = s.getsockname()[1]
    origin = subprocess.Popen(nginx.argv(nginx.origin_config(tmp, origin_port, 65536)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    relays: dict[str, tuple[subprocess.Popen[str], int]] = {}
    rows: list[dict[str, Any]] = []
    try:
        time.sleep(0.5)
        for label, tree, on in contenders:
            relays[label] = _start_relay(label, tree, on, origin_port, tmp)
        time.sleep(1.0)
        for _, port in relays.values():  # warm-up
            subprocess.run(["wrk", "-t1", "-c32", "-d1s", "-H", "Connection: close",
                            f"http://127.0.0.1:{port}/"], capture_output=True, check=False)
        for rnd in range(rounds):
            order = list(relays) if rnd % 2 == 0 else list(reversed(relays))
            for label in order:
                proc, port = relays[label]
                pids = procstat.descendants(proc.pid)
                before, cpu0 = _threads(pids), procstat.tree_cpu_seconds(pids)
                done = subprocess.run(["wrk", "-t1", "-c32", f"-d{duration}s", "--latency", "-H",
                                       "Connection: close", f"http://127.0.0.1:{port}/"],
                                      capture_output=True, text=True, check=False)
                after, cpu1 = _threads(pids), procstat.tree_cpu_seconds(pids)
                out = wrk.parse(done.stdout)
                n = out["requests"]
                threads = {role: [(v[0] - before.get(role, [0, 0, 0])[0]) / 1e3 / n,
                                  (v[1] - before.get(role, [0, 0, 0])[1]) / n * 1000,
                                  (v[2] - before.get(role, [0, 0, 0])[2]) / n * 1000]
                           for role, v in after.items()}
                row = {"round": rnd, "label": label, "conn_s": out["rps"],
                       "cpu_us_per_conn": (cpu1 - cpu0) / n * 1e6, "errors": out["errors"],
                       "threads": threads}
                rows.append(row)
                shown = " ".join(f"{role}={v[0]:.1f}us/{v[1]:.0f}v/{v[2]:.0f}i"
                                 for role, v in sorted(threads.items()) if v[0] > 0.05)
                print(f"round {rnd} {label:10s} conn/s {out['rps']:8.0f} "
                      f"cpu-us/conn {row['cpu_us_per_conn']:6.1f} | {shown}", flush=True)
    finally:
        for proc, _ in relays.values():
            proc.terminate()
        for proc, _ in relays.values():
            proc.wait(10)
        origin.terminate()
        origin.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)  # the logs: about 250 bytes per connection
    return rows


def summary(rows: list[dict[str, Any]], labels: list[str]) -> None:
    """Medians per contender, and per-round ratios to the last contender (the baseline)."""
    base = labels[-1]
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["label"]] = row
    for label in labels:
        mine = [r[label] for r in by_round.values()]
        print(f"{label}: median conn/s {statistics.median(r['conn_s'] for r in mine):.0f}, "
              f"CPU-us/conn {statistics.median(r['cpu_us_per_conn'] for r in mine):.1f}")
        if label != base:
            conn = [r[label]["conn_s"] / r[base]["conn_s"] for r in by_round.values()]
            cpu = [r[label]["cpu_us_per_conn"] / r[base]["cpu_us_per_conn"] for r in by_round.values()]
            print(f"  / {base}, per round: conn/s median {statistics.median(conn):.3f} "
                  f"(range {min(conn):.2f}-{max(conn):.2f}), CPU/conn median "
                  f"{statistics.median(cpu):.3f} (range {min(cpu):.2f}-{max(cpu):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("contenders", nargs="+", help="LABEL=TREE:on|off; the last is the baseline")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=3, help="seconds of wrk per run")
    parser.add_argument("--out", help="write the per-run rows here as JSON")
    args = parser.parse_args()
    contenders = []
    for spec in args.contenders:
        label, _, rest = spec.partition("=")
        tree, _, mode = rest.rpartition(":")
        if not label or not tree or mode not in ("on", "off"):
            parser.error(f"{spec}: expected LABEL=TREE:on|off")
        contenders.append((label, os.path.abspath(tree), mode == "on"))
    rows = run(contenders, args.rounds, args.duration)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    summary(rows, [c[0] for c in contenders])


if __name__ == "__main__":
    main()
