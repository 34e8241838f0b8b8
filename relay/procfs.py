"""Readers of /proc and sysctl files, shared by the host probes and the process budgets."""

from __future__ import annotations

__all__ = ["read_int", "read_proc"]


def read_proc(path: str) -> str | None:
    """The stripped text of a /proc (or any) file; None when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_int(path: str) -> int | None:
    """The integer in a /proc file (a sysctl); None when unreadable or not a number."""
    text = read_proc(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
