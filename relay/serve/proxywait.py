"""Connections from trusted proxies waiting for their PROXY v2 header, parked in the engine loop.

A trusted proxy normally sends its header with the first segment, but one that dribbles it in, or
a load balancer's health check that connects and sends nothing, must never make the worker wait:
every other connection of the worker would wait with it. So the server reads what has arrived
(``proxyproto.HeaderReader``, never blocking); while the header is incomplete the socket is
parked with ``loop.watch(fd, tag, remaining_ms)`` and read again when it turns readable, until
its deadline (``relay.proxy_header_timeout``). At most ``cap`` connections wait per worker: the
next one is reset at once (denied ``proxy_header_overflow``), so a flood of silent connections
costs a bounded number of descriptors.

    waits = HeaderWaits(loop, timeout=3.0, cap=1024)
    info = waits.begin(w)            # header, or None: parked (raises Denied, OSError)
    on (EV_READABLE | EV_WATCH_TIMEOUT, tag, fd) from the loop:
        w = waits.pop(fd); info = waits.resume(w, timed_out)   # same contract as begin
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from relay.engines import EngineLoop
from relay.serve.proxyproto import HeaderReader, ProxyInfo, ProxyProtocolError
from relay.serve.routing import Denied

__all__ = ["HeaderWaits", "Waiting"]


@dataclass(slots=True, eq=False)
class Waiting:
    """One accepted client whose header is awaited; `listener` and `source` are the server's."""

    listener: Any
    tag: int
    client: socket.socket
    peer: Any
    source: bytes | None
    reader: HeaderReader = field(default_factory=HeaderReader)
    deadline: float = 0.0
    wid: int = -1


class HeaderWaits:
    """The parked connections of one worker, by client fd. Use from the loop's thread only."""

    def __init__(self, loop: EngineLoop, timeout: float, cap: int) -> None:
        self._loop = loop
        self.timeout = timeout
        self.cap = cap
        self._by_fd: dict[int, Waiting] = {}

    def __len__(self) -> int:
        return len(self._by_fd)

    def __iter__(self) -> Iterator[Waiting]:
        return iter(list(self._by_fd.values()))

    def begin(self, w: Waiting) -> ProxyInfo | None:
        """Read what the client sent so far: the header, or None when `w` is now parked.
        Raises Denied (proxy_header_invalid, proxy_header_overflow) or OSError (a reset);
        then nothing is parked and the caller resets the client."""
        w.deadline = time.monotonic() + self.timeout
        info = self._read(w)
        if info is None:
            if len(self._by_fd) >= self.cap:
                raise Denied("proxy_header_overflow",
                             f"{len(self._by_fd)} connections already wait for a header")
            self._park(w)
        return info

    def pop(self, fd: int) -> Waiting | None:
        """The parked connection of a watch event (None: not ours, or already gone)."""
        return self._by_fd.pop(fd, None)

    def resume(self, w: Waiting, timed_out: bool) -> ProxyInfo | None:
        """After `w`'s watch event: the header, or None when parked again (same contract as
        begin; the deadline is the one set by begin)."""
        info = self._read(w)
        if info is not None:
            return info
        remaining = w.deadline - time.monotonic()
        if timed_out or remaining <= 0:
            raise Denied("proxy_header_timeout",
                         f"{len(w.reader.buf)} of {w.reader.need} bytes in {self.timeout:g}s")
        self._park(w)
        return None

    def discard(self, w: Waiting) -> None:
        """Forget `w` (stop watching it); the caller closes its socket."""
        if self._by_fd.pop(w.client.fileno(), None) is not None:
            self._loop.unwatch(w.wid)

    @staticmethod
    def _read(w: Waiting) -> ProxyInfo | None:
        try:
            return w.reader.read_from(w.client)
        except ProxyProtocolError as exc:
            raise Denied("proxy_header_invalid", str(exc)) from None

    def _park(self, w: Waiting) -> None:
        remaining_ms = max(1, int((w.deadline - time.monotonic()) * 1000 + 0.999))
        fd = w.client.fileno()
        w.wid = self._loop.watch(fd, w.tag, remaining_ms)
        self._by_fd[fd] = w
