"""Process and build metrics of the supervisor's /metrics, beside relay.ops.metrics' counters.

- The supervisor's own `process_*` come from prometheus_client's ProcessCollector.
- `relay_worker_process_*`: the same figures summed over the live workers, read from
  /proc/PID/stat and /proc/PID/fd at scrape time (a few small reads per worker, no state).
  Sums over live workers: they drop when a worker is replaced, so they are gauges.
- `relay_build_info`: 1, labelled with the relay version, the engines the workers run, Python
  and the liburing headers the core was built against (read from python-liburing's include
  directory without importing it: the supervisor loads neither the core nor liburing).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay._version import __version__

__all__ = ["BuildInfoCollector", "WorkerProcessCollector", "liburing_headers", "proc_stat"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_stat(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds user+system, resident bytes, open fds) of `pid`; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    # man 5 proc: after "(comm)", field 3 is index 0; utime = 14, stime = 15, rss = 24.
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    return cpu, int(fields[21]) * _PAGE, fds


class WorkerProcessCollector(Collector):
    """`relay_worker_process_*`: CPU, memory and fds summed over the live workers."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        cpu = rss = fds = 0.0
        for w in self._snapshot()["workers"]:
            stat = proc_stat(int(w["pid"]))
            if stat is not None:
                cpu, rss, fds = cpu + stat[0], rss + stat[1], fds + stat[2]
        yield GaugeMetricFamily("relay_worker_process_cpu_seconds",
                                "User and system CPU time of the live workers, summed", value=cpu)
        yield GaugeMetricFamily("relay_worker_process_resident_memory_bytes",
                                "Resident memory of the live workers, summed", value=rss)
        yield GaugeMetricFamily("relay_worker_process_open_fds",
                                "Open file descriptors of the live workers, summed", value=fds)


def liburing_headers() -> str:
    """Version of the liburing headers python-liburing ships (what the core compiles against)."""
    spec = importlib.util.find_spec("liburing")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(list(spec.submodule_search_locations)[0], "include", "liburing",
                        "io_uring_version.h")
    try:
        with open(path) as f:
            header = f.read()
    except OSError:
        return ""
    major = re.search(r"IO_URING_VERSION_MAJOR\s+(\d+)", header)
    minor = re.search(r"IO_URING_VERSION_MINOR\s+(\d+)", header)
    return f"{major.group(1)}.{minor.group(1)}" if major and minor else ""


class BuildInfoCollector(Collector):
    """`relay_build_info{version, engine, python, liburing_headers} 1`."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot
        self._static = (__version__, platform.python_version(), liburing_headers())

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        engine = ",".join(snap.get("engines") or []) or str(snap.get("engine", ""))
        version, python, headers = self._static
        info = GaugeMetricFamily("relay_build_info", "relay build and runtime: always 1",
                                 labels=["version", "engine", "python", "liburing_headers"])
        info.add_metric([version, engine, python, headers], 1)
        yield info
