"""Embedding API: relay two connected sockets from inside an asyncio (or uvloop) service.

    result = await relay.splice(client_sock, upstream_sock)      # per-event-loop default Relay

    async with relay.Relay() as r:                                # or an explicit one
        result = await r.splice(client_sock, upstream_sock)
    result.c2s_bytes, result.s2c_bytes, result.reason, ...

Two loops meet here, and this module always says which: the **event loop** is asyncio's (the
running one, ``asyncio.get_running_loop()``); the **engine loop** is the relay's
(``relay.engines.EngineLoop``: the core's ``Loop``, or the asyncio engine's ``AioLoop``).

A ``Relay`` owns one engine loop (``auto``: uring, else epoll, else the asyncio engine) and drives
it from the running event loop: ``event_loop.add_reader(engine_loop.fileno(), ...)`` calls
``engine_loop.run(0)`` when the engine has work, plus a periodic tick while pairs are open (the
asyncio engine's timers only fire inside ``run()``). Everything happens on the event loop's
thread, so the engine loop is never touched from two threads.

Socket ownership: a ``socket.socket`` is detached (the object is left closed, the Relay owns the
connection and closes it when the pair is done). Any other object with ``fileno()`` is
duplicated; the caller must then close its own copy at once, or the FIN/RST the relay sends on
close is held back by the kernel until the last copy goes. A socket that an asyncio transport
owns (``writer.get_extra_info("socket")`` of asyncio streams, a Protocol's transport) is
refused with a TypeError: the transport keeps reading it and holds what it already read, so the
relay would move nothing. Accept and connect with ``loop.sock_accept`` / ``loop.sock_connect``
on plain non-blocking sockets instead.

Cancelling ``splice()`` aborts the pair (both sides get an RST), closes both sockets and re-raises
``CancelledError``.
"""

from __future__ import annotations

import _socket
import asyncio
import asyncio.trsock
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from relay import engines
from relay.engines.constants import CLOSE_REASONS, EV_DONE, LOOP_DEFAULTS

__all__ = ["Relay", "SpliceResult", "splice"]

log = logging.getLogger("relay.embed")

_CORE_TICK_S = 1.0  # safety net for core engines, whose fileno() also covers their timers
_AIO_TICK_MIN_S = 0.01
_AIO_TICK_MAX_S = 0.5
_CLOSE_WAIT_S = 2.0  # aclose(): how long aborted pairs may take to report
_SOCK_STREAM = int(socket.SOCK_STREAM)


@dataclass(frozen=True, slots=True)
class SpliceResult:
    """How one relayed pair ended."""

    c2s_bytes: int  # client -> upstream (first socket -> second)
    s2c_bytes: int  # upstream -> client
    spliced_bytes: int  # moved with splice(2), never copied to user space
    copied_bytes: int  # copied through a buffer
    reason: str  # one of relay.engines.CLOSE_REASONS: "eof" is the only clean end
    duration: float  # seconds


TRANSPORT_OWNED = (
    "splice: {what} belongs to an asyncio transport (asyncio streams or a Protocol): the "
    "transport keeps reading it and holds the bytes it already read, so the relay would move "
    "nothing. Pass a socket.socket you own instead: accept with `await loop.sock_accept(listener)`"
    " and connect with `await loop.sock_connect(sock, address)` on a non-blocking socket"
)


# socket.socket.type converts the kernel's int to a SocketKind enum on every access (a third of
# _take_fd's time under connection churn): the plain type is the int, read without the enum.
_raw_type = _socket.socket.type.__get__


def _take_fd(sock: Any) -> int:
    """The fd the core will own: detached from a socket.socket, else a duplicate."""
    kind = type(sock)
    if kind is socket.socket:  # the common case: not a transport's, checks below not needed
        if sock.fileno() < 0:
            raise ValueError(f"splice: {sock!r} is closed")
        if _raw_type(sock) != _SOCK_STREAM:
            raise ValueError(f"splice: {sock!r} is not a stream socket")
        fd: int = sock.detach()
        return fd
    if isinstance(sock, asyncio.trsock.TransportSocket) or (
            kind.__name__ == "PseudoSocket" and kind.__module__.startswith("uvloop")):
        raise TypeError(TRANSPORT_OWNED.format(what="this socket"))
    # transports (uvloop's are not asyncio.BaseTransport subclasses) and StreamWriters
    if isinstance(sock, asyncio.StreamReader) or hasattr(sock, "get_extra_info"):
        raise TypeError(TRANSPORT_OWNED.format(what=f"this {type(sock).__name__}"))
    if isinstance(sock, socket.socket):
        if sock.fileno() < 0:
            raise ValueError(f"splice: {sock!r} is closed")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"splice: {sock!r} is not a stream socket")
        return sock.detach()
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        raise TypeError(f"splice: expected a socket, got {type(sock).__name__}")
    fd = int(fileno())
    if fd < 0:
        raise ValueError(f"splice: {sock!r} is closed")
    return os.dup(fd)


class Relay:
    """One engine loop driven by the running asyncio event loop (see the module docstring).

    ``engine``: ``"auto"`` (uring, else epoll, else asyncio), or a name from
    ``relay.engines.ENGINES``; ``engine_options`` go to the engine (``idle_timeout_ms``...).
    """

    def __init__(self, engine: str = "auto", **engine_options: Any) -> None:
        self._engine_name = engine
        self._engine_options = engine_options
        self._engine_loop: Any = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._waiters: dict[int, asyncio.Future[SpliceResult] | None] = {}
        self._tick_s = _CORE_TICK_S
        self._tick_handle: asyncio.TimerHandle | None = None
        self._drive_scheduled = False
        self._closed = False
        self.engine = ""
        self.engine_reason = ""

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def open(self) -> None:
        """Create the engine loop and attach it to the running event loop."""
        if self._engine_loop is not None or self._closed:
            raise RuntimeError("Relay: already opened")
        event_loop = asyncio.get_running_loop()
        try:
            engine_loop, reason = engines.create(self._engine_name, **self._engine_options)
        except OSError as exc:
            if self._engine_name != "auto":
                raise
            engine_loop, _ = engines.create("asyncio", **self._engine_options)
            reason = f"auto: asyncio engine because {exc}"
            log.warning("%s", reason)
        self._engine_loop = engine_loop
        self.engine = engine_loop.backend
        self.engine_reason = reason
        if engine_loop.backend == "asyncio":
            timeouts = [self._engine_options.get(k, LOOP_DEFAULTS[k]) for k in (
                "connect_timeout_ms", "idle_timeout_ms", "half_close_timeout_ms")]
            shortest = min((t for t in timeouts if t > 0), default=10_000) / 1000.0
            self._tick_s = min(max(shortest / 10.0, _AIO_TICK_MIN_S), _AIO_TICK_MAX_S)
        self._event_loop = event_loop
        self._fd = engine_loop.fileno()
        event_loop.add_reader(self._fd, self._drive)

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Abort the pairs still open (their ``splice()`` returns reason "aborted"), then free
        the engine loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._engine_loop is None:
            return
        self._check_thread()
        for cid, fut in self._waiters.items():
            if fut is None or not fut.done():
                self._engine_loop.abort(cid)
        deadline = asyncio.get_running_loop().time() + _CLOSE_WAIT_S
        while self._waiters and asyncio.get_running_loop().time() < deadline:
            self._process(self._engine_loop.run(0))
            if self._waiters:
                await asyncio.sleep(0.005)
        self._release()

    def _release(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._event_loop is not None and not self._event_loop.is_closed():
            self._event_loop.remove_reader(self._fd)
        self._engine_loop.close()
        for fut in self._waiters.values():
            if fut is not None and not fut.done():
                fut.set_result(SpliceResult(0, 0, 0, 0, "aborted", 0.0))
        self._waiters.clear()

    def _check_thread(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._event_loop:
            raise RuntimeError("Relay used outside the event loop that opened it")

    # -- relaying ------------------------------------------------------------------------------

    async def splice(self, client: Any, upstream: Any) -> SpliceResult:
        """Move bytes both ways until both directions are done; returns how it went.

        Both sockets must be connected streams (TCP or unix). A reset on one side is passed on
        as a reset to the other (``reason`` "reset_client"/"reset_origin"): only "eof" means
        both directions ended cleanly.
        """
        if self._closed or self._engine_loop is None:
            raise RuntimeError("Relay is not open (use `async with Relay()` or relay.splice)")
        self._check_thread()
        client_fd = _take_fd(client)
        try:
            upstream_fd = _take_fd(upstream)
        except BaseException:
            os.close(client_fd)
            raise
        try:
            cid = self._engine_loop.add_pair(client_fd, upstream_fd)
        except BaseException:
            os.close(client_fd)
            os.close(upstream_fd)
            raise
        assert self._event_loop is not None
        fut: asyncio.Future[SpliceResult] = self._event_loop.create_future()
        self._waiters[cid] = fut
        self._schedule_drive()
        self._arm_tick()
        try:
            return await fut
        except asyncio.CancelledError:
            if cid in self._waiters and not self._closed:
                self._waiters[cid] = None  # still running: its EV_DONE is dropped when it comes
                self._engine_loop.abort(cid)
                self._process(self._engine_loop.run(0))  # closes the sockets now, not at the next tick
            raise

    def _schedule_drive(self) -> None:
        if not self._drive_scheduled:
            self._drive_scheduled = True
            assert self._event_loop is not None
            self._event_loop.call_soon(self._drive)

    def _drive(self) -> None:
        self._drive_scheduled = False
        if self._closed:
            return
        self._process(self._engine_loop.run(0))

    def _process(self, events: list[tuple[Any, ...]]) -> None:
        for ev in events:
            if ev[0] != EV_DONE:
                continue
            _k, cid, _tag, reason, c2s, s2c, spliced, copied, duration_us, _err = ev
            if cid not in self._waiters:
                continue
            fut = self._waiters.pop(cid)
            if fut is not None and not fut.done():
                fut.set_result(SpliceResult(c2s, s2c, spliced, copied, CLOSE_REASONS[reason],
                                            duration_us / 1e6))

    def _arm_tick(self) -> None:
        if self._tick_handle is None and self._event_loop is not None:
            self._tick_handle = self._event_loop.call_later(self._tick_s, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_handle = None
        if self._closed:
            return
        self._process(self._engine_loop.run(0))
        if self._waiters:
            self._arm_tick()

    def stats(self) -> dict[str, int]:
        """The engine loop's counters (see docs/architecture.md)."""
        if self._engine_loop is None or self._closed:
            raise RuntimeError("Relay is not open")
        self._check_thread()
        stats: dict[str, int] = self._engine_loop.stats()
        return stats


# -- the per-event-loop default Relay ------------------------------------------------------------

_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Relay] = (
    weakref.WeakKeyDictionary())
_closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncIterator[None]] = (
    weakref.WeakKeyDictionary())


async def _close_at_shutdown(event_loop: asyncio.AbstractEventLoop, relay: Relay
                             ) -> AsyncIterator[None]:
    # An async generator parked at its yield: asyncio.run() (and uvloop) call
    # loop.shutdown_asyncgens() before closing the loop, which runs this finally clause inside the
    # loop, so the default Relay is released cleanly with its event loop.
    try:
        yield
    finally:
        if _defaults.get(event_loop) is relay:
            del _defaults[event_loop]
        _closers.pop(event_loop, None)
        await relay.aclose()


async def splice(client: Any, upstream: Any) -> SpliceResult:
    """``Relay.splice`` on the running event loop's default Relay (created on first use,
    closed by ``loop.shutdown_asyncgens()``, which ``asyncio.run`` calls)."""
    event_loop = asyncio.get_running_loop()
    relay = _defaults.get(event_loop)
    if relay is None or relay.closed:
        relay = Relay()
        relay.open()
        _defaults[event_loop] = relay
        closer = _close_at_shutdown(event_loop, relay)
        await closer.__anext__()
        _closers[event_loop] = closer
    return await relay.splice(client, upstream)
