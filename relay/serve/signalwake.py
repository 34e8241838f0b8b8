"""Signals end the engine loop's wait at once, whichever thread the kernel gave them to.

A process-directed signal (SIGTERM from the supervisor, SIGUSR1 from logrotate, the reporter's
SIGALRM) is delivered to any thread that does not block it. Only that thread's system call is
interrupted; when it is the flow-log writer or the command reader, the main thread stays asleep
in ``loop.run()`` until the wait's timeout, and the Python handler (which always runs in the
main thread, once ``run()`` is back in the interpreter) waits with it. CPython's C-level
handler writes a byte to the wakeup fd in whatever thread took the signal: pointing that fd at
the core loop's wake-up pipe (``Loop.wakeup_fd()``, not a connection slot) ends the wait.

Only ``relay run``'s workers install it: there is one wakeup fd per process, and an embedder on
asyncio already uses it for its own loop.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["SignalWakeup"]


class SignalWakeup:
    """Route the process's signal wakeups to ``loop`` until ``close()``; main thread only.

    A loop without ``wakeup_fd()`` (the asyncio engine) leaves the wakeup fd alone. ``close()``
    must come before the loop's own close(): the loop closes the pipe, and a signal arriving
    after that would be written to a closed, or reused, descriptor number.
    """

    def __init__(self, loop: Any) -> None:
        self._previous: int | None = None
        wakeup_fd = getattr(loop, "wakeup_fd", None)
        if wakeup_fd is None:
            return
        # warn_on_full_buffer=False: a burst of signals that fills the pipe loses bytes, not
        # wakeups (one byte is enough to end the wait), and must not print a warning each.
        self._previous = signal.set_wakeup_fd(wakeup_fd(), warn_on_full_buffer=False)

    @property
    def active(self) -> bool:
        return self._previous is not None

    def close(self) -> None:
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
            self._previous = None
