"""The budgets a worker runs within: open files and splice pipes, each computed one way here.

Open files (RLIMIT_NOFILE) sized to the connection limit: a relayed connection holds two sockets;
a spliced one also holds a pipe (two fds) from the pool. Workers inherit the limit from the
supervisor, so ``relay run`` raises it once, before forking.

Pipes: the kernel accounts pipe pages per user (:func:`pipe_budget`); the supervisor caps each
worker's pool with it, ``relay doctor`` reports the same numbers.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource

from relay.config.settings import RelaySettings
from relay.procfs import read_int

__all__ = [
    "FD_SLACK",
    "NofileReport",
    "PipeBudget",
    "nofile_needed",
    "nofile_needed_for",
    "nr_open",
    "pipe_budget",
    "raise_nofile",
]

FD_SLACK = 64
"""fds a worker needs besides connections and pipes: listeners, log, heartbeat, ring, eventfd..."""

_NR_OPEN_PATH = "/proc/sys/fs/nr_open"


@dataclasses.dataclass(frozen=True)
class NofileReport:
    """What ``raise_nofile`` found and did."""

    needed: int
    soft_before: int
    hard_before: int
    soft: int
    hard: int
    message: str

    @property
    def ok(self) -> bool:
        return self.soft >= self.needed

    @property
    def changed(self) -> bool:
        return (self.soft, self.hard) != (self.soft_before, self.hard_before)


def nofile_needed(maxconn: int, max_pipes: int, listeners: int = 0, slack: int = FD_SLACK) -> int:
    """fds one process needs: 2 per connection, 2 per pipe, 1 per listener, plus slack."""
    return 2 * maxconn + 2 * max_pipes + listeners + slack


def nofile_needed_for(settings: RelaySettings, listeners: int, workers: int | None = None) -> int:
    """fds one worker needs to serve its share of ``settings.maxconn``."""
    return nofile_needed(
        settings.maxconn_per_worker(workers), settings.pipes_per_worker(workers), listeners
    )


def nr_open() -> int | None:
    """The kernel's ceiling for any RLIMIT_NOFILE (``fs.nr_open``), or None if unreadable."""
    try:
        with open(_NR_OPEN_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _fmt(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def _effective(limit: int) -> int:
    return (1 << 62) if limit == resource.RLIM_INFINITY else limit


def raise_nofile(needed: int) -> NofileReport:
    """Raise RLIMIT_NOFILE (never lower it) so that at least ``needed`` fds can be open.

    Raises the soft limit up to the hard limit; as root (CAP_SYS_RESOURCE) the hard limit too, up
    to ``fs.nr_open``.  Returns a report whose ``message`` says what was done or why not.
    """
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _effective(soft0) >= needed:
        return NofileReport(
            needed,
            soft0,
            hard0,
            soft0,
            hard0,
            f"open-file limit {_fmt(soft0)} already covers the {needed} needed",
        )
    notes: list[str] = []
    soft, hard = soft0, hard0
    if _effective(hard0) < needed:
        ceiling = nr_open()
        target = needed if ceiling is None else min(needed, ceiling)
        if ceiling is not None and ceiling < needed:
            notes.append(
                f"fs.nr_open={ceiling} caps every process below the {needed} needed "
                f"(fix: sysctl -w fs.nr_open={needed})"
            )
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            soft = hard = target
            notes.insert(
                0,
                f"raised the open-file limit (soft/hard) {_fmt(soft0)}/{_fmt(hard0)} "
                f"-> {target}/{target}",
            )
        except (OSError, ValueError) as exc:
            denied = getattr(exc, "errno", None) == errno.EPERM or "not allowed" in str(exc)
            why = "not permitted (needs root with CAP_SYS_RESOURCE)" if denied else str(exc)
            notes.insert(
                0,
                f"could not raise the hard open-file limit {_fmt(hard0)} to {target}: {why} "
                f"(fix: LimitNOFILE={needed} in the systemd unit, or `ulimit -Hn {needed}`)",
            )
    if _effective(soft) < needed and _effective(soft) < _effective(hard):
        target = min(needed, _effective(hard))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            notes.append(f"could not raise the soft open-file limit to {target}: {exc}")
    if (soft, hard) != (soft0, hard0) and not any(n.startswith("raised") for n in notes):
        notes.insert(
            0, f"raised the soft open-file limit {_fmt(soft0)} -> {_fmt(soft)} (hard {_fmt(hard)})"
        )
    if _effective(soft) < needed:
        notes.append(
            f"only {_fmt(soft)} fds: about {max(0, (_effective(soft) - FD_SLACK) // 2)} "
            f"connections per worker fit, not the configured number"
        )
    return NofileReport(needed, soft0, hard0, soft, hard, "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class PipeBudget:
    """How many full-size splice pipes each worker may hold, and why."""

    per_worker: int
    pipe_bytes: int
    message: str


def pipe_budget(user: str | None, pipe_size: int, wanted: int, workers: int) -> PipeBudget:
    """Cap each worker's pipe pool to what the kernel lets the worker user hold at full size.

    fs/pipe.c accounts pipe pages per *user*, over all that user's processes: once the user holds
    more than fs.pipe-user-pages-soft pages, new pipes get a single page and F_SETPIPE_SZ fails with
    EPERM (root, CAP_SYS_RESOURCE or CAP_SYS_ADMIN are exempt). An unprivileged user also cannot
    grow a pipe past fs.pipe-max-size. `workers` share the user's budget evenly.

    `user`: who the workers run as, None when they are exempt (root, or keep CAP_SYS_RESOURCE /
    CAP_SYS_ADMIN).  The supervisor sizes the pools with it and ``relay doctor`` reports it.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    if user is None:
        return PipeBudget(wanted, pipe_size, f"{wanted} pipes of {pipe_size // 1024} KiB per "
                          "worker (workers keep root: no per-user pipe limit)")
    max_size = read_int("/proc/sys/fs/pipe-max-size") or pipe_size
    granted = min(pipe_size, max_size)
    # The kernel rounds a pipe up to a power-of-two number of pages.
    pages = 1
    while pages * page < granted:
        pages *= 2
    notes = []
    if granted < pipe_size:
        notes.append(f"pipe_size {pipe_size} exceeds fs.pipe-max-size {max_size} for "
                     f"user {user}")
    soft = read_int("/proc/sys/fs/pipe-user-pages-soft") or 0
    hard = read_int("/proc/sys/fs/pipe-user-pages-hard") or 0
    limits = [x for x in (soft, hard) if x > 0]
    per_worker = wanted
    if limits:
        user_pages = min(limits)
        user_pipes = user_pages // pages
        per_worker = min(wanted, user_pipes // max(1, workers))
        notes.append(
            f"user {user} may hold {user_pages} pipe pages (fs.pipe-user-pages-soft/hard) "
            f"= {user_pipes} pipes of {pages * page // 1024} KiB over {workers} workers"
        )
    head = f"{per_worker} pipes of {pages * page // 1024} KiB per worker"
    if per_worker < wanted:
        head += f" (configured {wanted})"
    return PipeBudget(per_worker, pages * page, head + ": " + "; ".join(notes) if notes else head)
