"""Connection rate: wrk with `Connection: close` through the proxy to the nginx origin.

Every request is a new TCP connection (nginx closes after the response, wrk reconnects), so
requests/s = connections/s, and the proxy's CPU divided by the requests is its CPU per proxied
connection (accept, connect upstream, relay a few hundred bytes each way, close both).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

from bench.drivers import procstat

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)(us|ms|s|m)\s*$")
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


def available() -> str | None:
    return None if shutil.which("wrk") else "not installed: wrk"


def parse(text: str) -> dict[str, float]:
    """wrk's --latency output -> rps, requests, seconds, p50_us .. p99_us, errors (all kinds).

    Raises ValueError when the output has no 'Requests/sec' line (wrk failed).
    """
    rps = _RPS.search(text)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output: {text.strip()[-200:]!r}")
    out: dict[str, float] = {"rps": float(rps.group(1))}
    for line in text.splitlines():
        m = _PERCENTILE.match(line)
        if m:
            out[f"p{float(m.group(1)):g}_us"] = float(m.group(2)) * _UNITS[m.group(3)]
            continue
        m = _REQUESTS.match(line)
        if m:
            out["requests"] = float(m.group(1))
            out["seconds"] = float(m.group(2)) * _UNITS[m.group(3)] / 1e6
    errors = _SOCKET_ERRORS.search(text)
    kinds = ("connect", "read", "write", "timeout")
    for kind, count in zip(kinds, errors.groups() if errors else ("0",) * 4, strict=True):
        out[f"errors_{kind}"] = float(count)
    non_2xx = _NON_2XX.search(text)
    out["errors_http"] = float(non_2xx.group(1)) if non_2xx else 0.0
    out["errors"] = sum(out[f"errors_{k}"] for k in (*kinds, "http"))
    return out


def run(port: int, conns: int, duration: float, cpu_pids: Callable[[], list[int]]) -> dict[str, float]:
    """One wrk run against 127.0.0.1:port; returns conn_s, p50/p99 us, errors and
    cpu_us_per_conn (proxy tree; NaN for the direct baseline)."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
            "-H", "Connection: close", f"http://127.0.0.1:{port}/"]
    pids = cpu_pids()
    cpu_before = procstat.tree_cpu_seconds(pids)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"wrk timed out after {duration + 30:.0f}s") from exc
    cpu_after = procstat.tree_cpu_seconds(sorted(set(pids) | set(cpu_pids())))
    try:
        out = parse(done.stdout)
    except ValueError as exc:
        raise RuntimeError(f"wrk exit {done.returncode}: {(done.stderr or done.stdout).strip()[-200:]}") from exc
    requests = out.get("requests", 0.0)
    if not requests:
        raise RuntimeError("wrk completed no request")
    cpu = max(0.0, cpu_after - cpu_before)
    out["conn_s"] = out["rps"]
    out["cpu_s"] = cpu
    out["cpu_us_per_conn"] = cpu / requests * 1e6 if pids else float("nan")
    out["error_pct"] = 100.0 * out["errors"] / (requests + out["errors"])
    return out
