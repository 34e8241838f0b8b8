"""Telling an OOM kill from any other SIGKILL: the memory cgroup's oom_kill counter.

The kernel's OOM killer ends its victim with SIGKILL, so a wait status cannot tell it from
`kill -9`. The memory controller counts its kills per cgroup: ``oom_kill N`` in memory.events
(cgroup v2) or memory.oom_control (v1, kernel >= 4.13). A worker reaped as killed by SIGKILL
while the counter of its cgroup went up was most likely OOM-killed; another process of the same
cgroup may have been the victim, so the log says "possibly".

    oom = OomCounter()                # the cgroup of this process (workers are forked into it)
    ...
    if killed_by_sigkill and oom.moved(): how += " (possibly the OOM killer)"
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["OomCounter", "oom_kill_file", "read_oom_kills"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def oom_kill_file(pid: int | str = "self") -> Path | None:
    """The file holding the oom_kill counter of `pid`'s memory cgroup, or None when there is
    none (no memory controller, or not mounted where we look)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        bases: tuple[Path, ...]
        if controllers == "":  # v2 unified hierarchy
            bases, name = (CGROUP_ROOT, CGROUP_ROOT / "unified"), "memory.events"
        elif "memory" in controllers.split(","):  # v1 memory controller
            bases, name = (CGROUP_ROOT / "memory",), "memory.oom_control"
        else:
            continue
        # Inside a container the hierarchy is often mounted at the container's own cgroup, so
        # the path /proc shows is longer than the one under the mount: try its tails, longest
        # first, then the mount's root.
        parts = [p for p in path.split("/") if p]
        for base in bases:
            candidates += [base.joinpath(*parts[i:], name) for i in range(len(parts) + 1)]
    for candidate in candidates:
        if read_oom_kills(candidate) is not None:
            return candidate
    return None


def read_oom_kills(path: Path) -> int | None:
    """The ``oom_kill`` counter in a memory.events / memory.oom_control file, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


class OomCounter:
    """Watches one cgroup's oom_kill counter; ``moved()`` says whether it rose since last asked."""

    def __init__(self, pid: int | str = "self") -> None:
        self.path = oom_kill_file(pid)
        self.seen = read_oom_kills(self.path) if self.path is not None else None

    def moved(self) -> bool:
        if self.path is None:
            return False
        now = read_oom_kills(self.path)
        rose = now is not None and self.seen is not None and now > self.seen
        if now is not None:
            self.seen = now
        return rose
