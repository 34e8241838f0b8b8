"""Worker liveness through an unlinked heartbeat file shared by supervisor and worker.

The supervisor creates the file in its private runtime directory, unlinks it at once (nothing on
disk to clean up or tamper with) and keeps the descriptor; the forked worker inherits the same
open file description. The worker stamps CLOCK_MONOTONIC into the first 8 bytes with pwrite(2) on
every turn of its loop; the supervisor reads it back with pread(2). Writing through an already
open descriptor needs no permission check, so this keeps working after the worker dropped to an
unprivileged user, and CLOCK_MONOTONIC is the same clock in both processes (no wall-clock jumps).
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

__all__ = ["Heartbeat"]

_STAMP = struct.Struct("=d")


class Heartbeat:
    """One worker's heartbeat: `beat()` in the worker, `age()` in the supervisor."""

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="heartbeat-", dir=directory)
        os.unlink(path)
        self._fd: int = fd
        self.beat()

    def fileno(self) -> int:
        return self._fd

    def beat(self) -> None:
        """Record that the worker is alive now."""
        os.pwrite(self._fd, _STAMP.pack(time.monotonic()), 0)

    def last_beat(self) -> float:
        """CLOCK_MONOTONIC time of the last beat."""
        data = os.pread(self._fd, _STAMP.size, 0)
        if len(data) != _STAMP.size:
            return 0.0
        return float(_STAMP.unpack(data)[0])

    def age(self) -> float:
        """Seconds since the worker last beat."""
        return time.monotonic() - self.last_beat()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
