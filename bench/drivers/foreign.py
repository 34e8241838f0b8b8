"""CPU used by everything that is not this harness or its children, during one run.

Other engineers' tests share this 2-vCPU VM: a run with foreign load is a noisy run. Foreign CPU
= machine-wide busy time (/proc/stat, all CPUs) minus the CPU of this process tree (the harness,
its reaped children such as iperf3 clients, and live descendants: proxies, origins), per second.
"""

from __future__ import annotations

import os
import time

from bench.drivers import procstat


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / procstat.CLK_TCK


def _ours() -> float:
    return procstat.tree_cpu_seconds(procstat.descendants(os.getpid()))


class ForeignLoad:
    """with ForeignLoad() as load: ...; load.cpus -> average foreign CPUs busy during the block."""

    def __init__(self) -> None:
        self.cpus = 0.0

    def __enter__(self) -> ForeignLoad:
        self._t0, self._busy0, self._ours0 = time.monotonic(), _busy_seconds(), _ours()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        foreign = (_busy_seconds() - self._busy0) - (_ours() - self._ours0)
        self.cpus = max(0.0, foreign / wall) if wall > 0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 0.3, probe: float = 0.25) -> float:
    """Wait (up to max_wait seconds) until foreign load over one probe interval is below
    threshold CPUs; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait:
        with ForeignLoad() as load:
            time.sleep(probe)
        if load.cpus < threshold:
            break
    return time.monotonic() - started
