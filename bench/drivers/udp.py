"""UDP datagram rate, loss and CPU per datagram: udp_blast (own process) -> proxy -> udp_sink.

The sink is the long-lived origin; its counters are read over its control port before and after
each run (after the blaster has stopped and the counter has stopped moving), so datagrams still
queued in the proxy when the blaster ends are counted as delivered, and only those dropped are
loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

from bench import procs
from bench.drivers import procstat, udp_sink

SETTLE_S = 0.1  # the sink's counter must stay unchanged this long after the blaster stopped
SETTLE_MAX_S = 2.0


def start_sink(cwd: str) -> procs.Service:
    argv = [sys.executable, "-m", "bench.drivers.udp_sink", "--listen", "127.0.0.1:0"]
    svc = procs.start_reporting_port("udp-sink", argv, cwd=cwd, protocol="udp")
    svc.control_port = udp_sink.control_port(svc.ready_line)
    return svc


def _settled(control: int) -> dict[str, int]:
    last = udp_sink.query(control)
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = udp_sink.query(control)
        if now["datagrams"] == last["datagrams"]:
            return now
        last = now
    return last


def result(blast: dict[str, float], before: dict[str, int], after: dict[str, int], cpu: float,
           measured_cpu: bool) -> dict[str, float]:
    """One run's numbers from the blaster's report, the sink's counters and the proxy's CPU seconds.

    dgram_s: delivered per second of sending; loss_pct: of the datagrams the blaster sent, those
    that never reached the sink; cpu_s_per_mdgram: proxy CPU-seconds per million delivered.
    """
    received = after["datagrams"] - before["datagrams"]
    sent = blast["sent"]
    seconds = blast["seconds"]
    return {
        "sent": sent,
        "received": float(received),
        "bytes": float(after["bytes"] - before["bytes"]),
        "offered_s": sent / seconds if seconds else float("nan"),
        "dgram_s": received / seconds if seconds else float("nan"),
        "loss_pct": 100.0 * max(0.0, sent - received) / sent if sent else float("nan"),
        "send_errors": blast.get("send_errors", 0.0),
        "cpu_s": cpu,
        "cpu_s_per_mdgram": cpu / received * 1e6 if received and measured_cpu else float("nan"),
    }


def run(port: int, control: int, size: int, duration: float, rate: float, flows: bool,
        cpu_pids: Callable[[], list[int]], cwd: str) -> dict[str, float]:
    argv = [sys.executable, "-m", "bench.drivers.udp_blast", "--target", f"127.0.0.1:{port}",
            "--size", str(size), "--duration", f"{duration:g}", "--rate", f"{rate:g}"]
    if flows:
        argv.append("--flows")
    pids = cpu_pids()
    before = _settled(control)
    cpu_before = procstat.tree_cpu_seconds(pids)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"udp blaster timed out after {duration + 30:.0f}s") from exc
    after = _settled(control)
    cpu_after = procstat.tree_cpu_seconds(sorted(set(pids) | set(cpu_pids())))
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"udp blaster exit {done.returncode}: {tail[:200]}")
    blast = json.loads(lines[-1])
    if not blast["sent"]:
        raise RuntimeError(f"udp blaster sent nothing ({blast['send_errors']} send errors)")
    return result(blast, before, after, max(0.0, cpu_after - cpu_before), bool(pids))
