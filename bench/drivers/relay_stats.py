"""Per-worker connection counts of a running relay, from its admin socket (`stats json`).

Workers ship their counters to the supervisor once a second (relay.worker's reporter), so a
reading taken right after a run lags by up to a second: `shares_around` waits for that.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

REPORT_LAG_S = 1.3  # the workers' 1 s stats interval, plus slack

T = TypeVar("T")


def snapshot(path: str, timeout: float = 3.0) -> dict[str, Any]:
    """The supervisor's snapshot: the admin socket's answer to 'stats json'."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"stats json\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith("error "):
        raise OSError(f"admin socket {path}: {text[6:].strip()}")
    doc: dict[str, Any] = json.loads(text)
    return doc


def worker_totals(snap: dict[str, Any]) -> dict[int, int]:
    """pid -> connections accepted so far (conns_total), for every worker in the snapshot."""
    return {int(w["pid"]): int((w.get("stats") or {}).get("conns_total", 0)) for w in snap.get("workers", [])}


def shares(before: dict[int, int], after: dict[int, int]) -> list[float]:
    """Each worker's share of the connections accepted between two readings, largest first.

    A worker that is only in `after` (restarted) counts from zero; empty when none was accepted.
    """
    deltas = [max(0, count - before.get(pid, 0)) for pid, count in after.items()]
    total = sum(deltas)
    return sorted((d / total for d in deltas), reverse=True) if total else []


def shares_around(path: str, run: Callable[[], T]) -> tuple[T, list[float], str]:
    """Run `run()` between two readings of the per-worker totals.

    Returns its result, the shares, and why there are none ("" when read): a relay whose admin
    socket does not answer still gets its run measured.
    """
    time.sleep(REPORT_LAG_S)  # the previous run's last connections reach the counters
    try:
        before: dict[int, int] | None = worker_totals(snapshot(path))
    except (OSError, ValueError) as exc:
        before, why = None, f"stats json before the run: {exc}"
    result = run()
    if before is None:
        return result, [], why
    time.sleep(REPORT_LAG_S)
    try:
        after = worker_totals(snapshot(path))
    except (OSError, ValueError) as exc:
        return result, [], f"stats json after the run: {exc}"
    return result, shares(before, after), ""
