"""Read CPU time, RSS, threads and pipe fds of a process tree from /proc.

CPU seconds of a process = max(utime+stime of /proc/<pid>/stat, sum over /proc/<pid>/task/*/stat)
+ cutime+cstime (children it already reaped, e.g. socat's forked children). The process-level
counter also holds threads that already exited (short-lived io-wq workers); the task sum is what
the brief asks for, and io_uring io-wq workers appear there as tasks of the process. Live
descendants (relay workers forked by the supervisor) are added on top.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The comm field may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def _ticks(fields: list[str], first: int, count: int) -> int:
    # Field numbers from proc(5): utime=14, stime=15, cutime=16, cstime=17; rest[0] is field 3.
    return sum(int(fields[first - 3 + i]) for i in range(count))


def descendants(root: int) -> list[int]:
    """The root pid and all its live descendants, found through /proc/*/stat ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(f"/proc/{entry}/stat")
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if not os.path.exists(f"/proc/{pid}"):
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of one process: all its threads (live and exited) plus reaped children."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return 0.0
    own = _ticks(fields, 14, 2)
    task_sum = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        tids = []
    for tid in tids:
        tf = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if tf is not None:
            task_sum += _ticks(tf, 14, 2)
    reaped = _ticks(fields, 16, 2)
    return (max(own, task_sum) + reaped) / CLK_TCK


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(process_cpu_seconds(p) for p in pids)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (FileNotFoundError, ProcessLookupError):
        return 0


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return 0


def pipe_fds(pid: int) -> int:
    """Number of fds of the process that are pipes (splice pipes show up here)."""
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                count += 1
        except OSError:
            continue
    return count


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def system_cpu_ticks() -> dict[str, int]:
    """Machine-wide CPU ticks from /proc/stat: total and steal (time the hypervisor took away)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return {"total": sum(fields[:8]), "steal": steal}
