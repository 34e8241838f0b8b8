"""Idle connections through one proxy: RSS per connection, thread growth, pipes held while idle.

The driver (this process) opens N connections to the proxy, in batches, and sends one byte on
each, which the echo origin returns: so every connection is known to be established end to end.
Then it leaves them idle and reads /proc of the proxy's process tree.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable
from typing import cast

from bench.drivers import procstat
from bench.procs import raise_nofile

BATCH = 256


def _snapshot(pids: list[int]) -> dict[str, int]:
    return {
        "rss": sum(procstat.rss_bytes(p) for p in pids),
        "threads": sum(procstat.thread_count(p) for p in pids),
        "pipes": sum(procstat.pipe_fds(p) for p in pids),
        "fds": sum(procstat.fd_count(p) for p in pids),
    }


def _open_batch(port: int, count: int, timeout: float) -> list[socket.socket]:
    """Open `count` connections, send one byte on each and wait for its echo."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
            sel.register(s, selectors.EVENT_WRITE)
        waiting = len(socks)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{waiting} of {count} connections not echoed within {timeout:.0f}s")
            for key, events in sel.select(min(left, 1.0)):
                s = cast(socket.socket, key.fileobj)
                if events & selectors.EVENT_WRITE:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
                    s.send(b"x")
                    sel.modify(s, selectors.EVENT_READ)
                else:
                    data = s.recv(16)
                    if not data:
                        raise ConnectionError("connection closed by the proxy before the echo")
                    sel.unregister(s)
                    waiting -= 1
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()
    return socks


def run(port: int, count: int, pids_of: Callable[[], list[int]], settle: float = 1.0) -> dict[str, float]:
    """Open `count` idle connections through the proxy on `port`; returns the /proc deltas."""
    raise_nofile()
    for s in _open_batch(port, 64, 30.0):  # warm-up: lazy set-up of the first connection
        s.close()
    time.sleep(settle)
    pids = pids_of()
    before = _snapshot(pids)
    held: list[socket.socket] = []
    started = time.monotonic()
    try:
        while len(held) < count:
            held.extend(_open_batch(port, min(BATCH, count - len(held)), 60.0))
        open_s = time.monotonic() - started
        time.sleep(settle)
        pids_idle = pids_of()
        idle = _snapshot(pids_idle)
    finally:
        for s in held:
            s.close()
    time.sleep(settle)
    after = _snapshot(pids_of())
    return {
        "connections": float(count),
        "open_seconds": open_s,
        "processes": float(len(pids_idle)),
        "rss_before": float(before["rss"]),
        "rss_idle": float(idle["rss"]),
        "rss_per_conn": (idle["rss"] - before["rss"]) / count,
        "threads_before": float(before["threads"]),
        "threads_idle": float(idle["threads"]),
        "threads_after_close": float(after["threads"]),
        "thread_growth": float(idle["threads"] - before["threads"]),
        "pipes_before": float(before["pipes"]),
        "pipes_idle": float(idle["pipes"]),
        "pipes_held": float(idle["pipes"] - before["pipes"]),
        "fds_idle": float(idle["fds"]),
    }
