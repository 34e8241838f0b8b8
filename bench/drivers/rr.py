"""Small-message request/response: runs rr_client in its own process and the proxy CPU around it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from bench.drivers import procstat


def run(port: int, conns: int, size: int, duration: float, cpu_pids: Callable[[], list[int]],
        cwd: str) -> dict[str, float]:
    """Returns rps, p50_us, p99_us, p999_us, cpu_s and cpu_us_per_req (proxy tree)."""
    argv = [
        sys.executable, "-m", "bench.drivers.rr_client", "--target", f"127.0.0.1:{port}",
        "--conns", str(conns), "--size", str(size), "--duration", f"{duration:g}",
    ]
    pids = cpu_pids()
    cpu_before = procstat.tree_cpu_seconds(pids)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 45, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"rr client timed out after {duration + 45:.0f}s") from exc
    cpu_after = procstat.tree_cpu_seconds(sorted(set(pids) | set(cpu_pids())))
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"rr client exit {done.returncode}: {tail[:200]}")
    result: dict[str, float] = json.loads(lines[-1])
    if result.get("errors"):
        raise RuntimeError(f"rr client: {result['errors']} connections failed: {result.get('error')}")
    cpu = max(0.0, cpu_after - cpu_before)
    requests = float(result.get("requests_total") or result["requests"])
    out = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    out["cpu_s"] = cpu
    out["cpu_us_per_req"] = cpu / requests * 1e6 if requests and pids else float("nan")
    return out
