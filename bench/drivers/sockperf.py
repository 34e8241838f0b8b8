"""Ping-pong latency with sockperf (TCP, 64-byte messages), client and server pinned with taskset.

The server (the origin) runs on CPU 1 and the client on CPU 0 for every contender, so runs differ
only by the proxy in between (which the scheduler places; it is one process like the tools).
On a machine with a single CPU both run unpinned.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from bench import procs

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PERCENTILE = re.compile(r"---> percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_EXTREME = re.compile(r"---> <(MAX|MIN)> observation\s*=\s*([\d.]+)")
_AVG = re.compile(r"avg-latency=([\d.]+)")
_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)")
_DROPPED = re.compile(r"# dropped messages = (\d+)")


def available() -> str | None:
    if shutil.which("sockperf") is None:
        return "not installed: sockperf"
    if shutil.which("taskset") is None:
        return "not installed: taskset (util-linux)"
    return None


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) > cpu else []


def start_server() -> procs.Service:
    """The sockperf TCP server (origin of the latency metric), pinned to CPU 1."""
    return procs.start_retrying(lambda port: procs.Service(
        "sockperf-server", [*_pin(1), "sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(port)]))


def parse(text: str) -> dict[str, float]:
    """sockperf ping-pong output -> p50_us, p99_us, p99.9_us, avg_us, min/max_us, msgs, msg_s, dropped.

    Raises ValueError when there is no latency summary (sockperf failed or saw no reply).
    """
    clean = _ANSI.sub("", text)
    out: dict[str, float] = {}
    for q, value in _PERCENTILE.findall(clean):
        out[f"p{float(q):g}_us"] = float(value)
    for which, value in _EXTREME.findall(clean):
        out[f"{which.lower()}_us"] = float(value)
    avg = _AVG.search(clean)
    if avg is None or "p50_us" not in out:
        raise ValueError(f"no latency summary in sockperf output: {clean.strip()[-200:]!r}")
    out["avg_us"] = float(avg.group(1))
    valid = _VALID.search(clean)
    if valid:
        seconds, received = float(valid.group(1)), float(valid.group(3))
        out["msgs"] = received
        out["msg_s"] = received / seconds if seconds else float("nan")
    dropped = _DROPPED.search(clean)
    out["dropped"] = float(dropped.group(1)) if dropped else 0.0
    return out


def run(port: int, duration: float, size: int = 64) -> dict[str, float]:
    argv = [*_pin(0), "sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port),
            "-t", str(max(1, round(duration))), "-m", str(size)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"sockperf timed out after {duration + 30:.0f}s") from exc
    try:
        return parse(done.stdout + done.stderr)
    except ValueError as exc:
        raise RuntimeError(f"sockperf exit {done.returncode}: {exc}") from exc
