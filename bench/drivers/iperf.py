"""iperf3 on loopback: one server for the batch, a JSON client per measurement."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable

from bench import procs
from bench.drivers import procstat


def available() -> str | None:
    return None if shutil.which("iperf3") else "iperf3 not installed"


def start_server() -> procs.Service:
    """A persistent iperf3 server on a picked loopback port (retried if the port was taken)."""
    return procs.start_retrying(
        lambda port: procs.Service("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)])
    )


def run_client(port: int, streams: int, duration: float, cpu_pids: Callable[[], list[int]]) -> dict[str, float]:
    """Run one iperf3 test against 127.0.0.1:port; measure the proxy's CPU around it.

    Returns gbit_s, bytes (received by the server side), cpu_s (proxy tree) and cpu_s_per_gb
    (GB = 1e9 bytes). Raises RuntimeError with iperf3's message on failure.
    """
    argv = [
        "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{duration:g}", "-P", str(streams),
        "-J", "--connect-timeout", "3000",
    ]
    pids = cpu_pids()
    cpu_before = procstat.tree_cpu_seconds(pids)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 20)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"iperf3 client timed out after {duration + 20:.0f}s") from exc
    pids_after = cpu_pids()
    # Processes that appeared during the run (socat forks) and exited were reaped by their
    # parent: their time is in its cutime/cstime, counted by tree_cpu_seconds.
    cpu_after = procstat.tree_cpu_seconds(sorted(set(pids) | set(pids_after)))
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"iperf3 exit {done.returncode}: {done.stderr.strip()[:200]}") from exc
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    nbytes = float(received["bytes"])
    cpu = max(0.0, cpu_after - cpu_before)
    return {
        "gbit_s": float(received["bits_per_second"]) / 1e9,
        "bytes": nbytes,
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (nbytes / 1e9) if nbytes and pids else float("nan"),
    }
