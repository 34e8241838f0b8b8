"""The machine a batch ran on: host, kernel, CPU model, nproc, tool versions."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Any


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "haproxy": _first_line(["haproxy", "-v"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "socat": _first_line(["socat", "-V"], contains="socat version"),
        "nginx": _first_line(["nginx", "-v"], stderr=True),
        "wrk": _first_line(["wrk", "--version"], contains="wrk"),
        "sockperf": _first_line(["sockperf", "--version"], contains="ersion"),
    }


def _first_line(argv: list[str], contains: str = "", stderr: bool = False) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    out = done.stderr if stderr else done.stdout + done.stderr
    lines = [ln.strip() for ln in out.splitlines() if contains in ln]
    return lines[0] if lines else "unknown"
