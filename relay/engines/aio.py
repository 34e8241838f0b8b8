"""The pure-asyncio engine: the semantic reference for the core's ``Loop``.

``AioLoop`` implements exactly the ``Loop`` interface of docs/architecture.md with
``asyncio.Protocol`` transports on a private ``SelectorEventLoop`` that only runs inside
``run(timeout_ms)``. Bytes are copied through Python (``spliced_bytes`` is always 0); a transport
write buffer whose high-water mark is ``pipe_size`` plays the role of the core's pipe.

TCP semantics (the same in every engine):

* half-close: ``eof_received`` returns True so the read side stays half-open, and the peer gets
  ``write_eof()``, which asyncio turns into ``shutdown(SHUT_WR)`` only once its write buffer is
  empty: a FIN is forwarded after the read side hit EOF *and* the buffer of that direction drained.
* reset: a read or write error on one socket (ECONNRESET, EPIPE...) aborts the other with
  ``SO_LINGER {1, 0}`` so the kernel sends an RST instead of a FIN: a truncated stream never looks
  like a clean close.  Both sockets carry ``SO_LINGER {1, 0}`` from ``add_pair`` on, cleared just
  before the graceful close, so a process that dies mid-stream resets its peers too.
* timeouts: one lazily re-armed timer per pair (data only updates a timestamp): connect, idle (no
  byte either way), half-close (one direction finished, the other idle).  Bytes leaving a write
  buffer while nothing is read are progress: the buffered amount is sampled about 8 times per
  timeout, from a baseline taken after the last activity, so a stalled peer times out on time.
* watch: ``watch(fd, tag, timeout_ms)`` reports once (EV_READABLE or EV_WATCH_TIMEOUT) without
  reading; the fd stays the caller's.
* accept: EMFILE/ENFILE/ENOBUFS/ENOMEM pause the listener (a pending connection stays in the
  backlog, so a level-triggered retry would spin) and resume it after 100 ms, doubling to 1 s.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import selectors
import socket
import time
from typing import Any

from relay.engines.constants import (
    ACCEPT_BACKOFF_FIRST_S,
    ACCEPT_BACKOFF_MAX_S,
    ACCEPT_PAUSE_ERRNOS,
    CLOSE_REASONS,
    EV_ACCEPT,
    EV_ACCEPT_ERROR,
    EV_DONE,
    EV_READABLE,
    EV_WATCH_TIMEOUT,
    LOOP_DEFAULTS,
    R_ABORTED,
    R_CONNECT_TIMEOUT,
    R_EOF,
    R_ERROR,
    R_HALF_CLOSE_TIMEOUT,
    R_IDLE_TIMEOUT,
    R_KILLED,
    R_RESET_CLIENT,
    R_RESET_ORIGIN,
    connect_failure_reason,
)
from relay.sock import arm_reset

__all__ = ["AioLoop"]

log = logging.getLogger("relay.engines.aio")

# Errors on an established socket that mean "the peer reset the connection".
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
_CLOSED_KEYS = tuple(f"closed_{name}" for name in CLOSE_REASONS)  # per-reason counters, as the core
_ACCEPT_BATCH = 64  # accepts per readiness callback: fairness with the established pairs
_MAX_CONNECT_BUCKETS = 32  # the core's MAX_CONNECT_BUCKETS (relay_ext/_core.pxd)
_SAMPLES_PER_TIMEOUT = 8  # write-buffer samples per idle/half-close timeout


class _PrivateEventLoop(asyncio.SelectorEventLoop):
    """The engine's own event loop; a thin, explicit window on two stdlib internals."""

    def has_ready_callbacks(self) -> bool:
        # BaseEventLoop._ready: callbacks queued with call_soon for the next iteration.
        return bool(self._ready)  # type: ignore[attr-defined]

    def attach_socket(self, sock: socket.socket, protocol: asyncio.Protocol) -> Any:
        """Wrap a connected non-blocking socket in a selector transport (no task, no future)."""
        return self._make_socket_transport(sock, protocol)  # type: ignore[attr-defined]


class _Half(asyncio.Protocol):
    """One socket of a pair; what it reads is written to the other half's transport."""

    __slots__ = ("pair", "is_client", "peer", "transport", "eof", "lost", "reading_paused")

    def __init__(self, pair: _Pair, is_client: bool) -> None:
        self.pair = pair
        self.is_client = is_client
        self.peer: _Half | None = None
        self.transport: Any = None
        self.eof = False  # read side hit EOF
        self.lost = False  # transport closed, socket released
        self.reading_paused = False

    def data_received(self, data: bytes) -> None:
        pair = self.pair
        pair.last_activity = time.monotonic()
        if self.is_client:
            pair.c2s += len(data)
        else:
            pair.s2c += len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.pair.engine._on_eof(self)
        return True  # keep the socket: only our read side is done

    def pause_writing(self) -> None:
        # Our write buffer is above high water: stop reading from the peer, like a full pipe.
        peer = self.peer
        if peer is not None and not peer.eof and not peer.reading_paused:
            peer.reading_paused = True
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        # The buffer drained below low water: bytes are moving, which counts as activity.
        self.pair.last_activity = time.monotonic()
        peer = self.peer
        if peer is not None and not peer.eof and peer.reading_paused:
            peer.reading_paused = False
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.engine._on_lost(self, exc)


class _Pair:
    __slots__ = (
        "cid", "tag", "engine", "client_sock", "upstream_sock", "client", "origin", "prefix",
        "started", "connect_started", "last_activity", "c2s", "s2c", "reason", "errno",
        "timer", "connecting", "finished", "pending_seen", "pending_at",
    )

    def __init__(self, engine: AioLoop, cid: int, tag: int, client_sock: socket.socket,
                 upstream_sock: socket.socket, prefix: bytes) -> None:
        self.cid = cid
        self.tag = tag
        self.engine = engine
        self.client_sock: socket.socket | None = client_sock
        self.upstream_sock: socket.socket | None = upstream_sock
        self.client = _Half(self, True)
        self.origin = _Half(self, False)
        self.client.peer = self.origin
        self.origin.peer = self.client
        self.prefix = prefix
        self.started = time.monotonic_ns()
        self.connect_started = self.started
        self.last_activity = time.monotonic()
        self.c2s = 0
        self.s2c = 0
        self.reason: int | None = None
        self.errno = 0
        self.timer: asyncio.TimerHandle | None = None
        self.connecting = False
        self.finished = False
        self.pending_seen = 0
        self.pending_at = 0.0  # when pending_seen was sampled


def _pair_tuple(pair: _Pair, now_ns: int, now: float) -> tuple[int, int, bool, int, int, int, int]:
    idle_us = max(0, int((now - pair.last_activity) * 1e6))
    return (pair.cid, pair.tag, pair.connecting, pair.c2s, pair.s2c,
            max(0, now_ns - pair.started) // 1000, idle_us)


def _reset_raw_sockets(pair: _Pair) -> None:
    """Before any transport exists: RST-close both raw sockets and mark both halves lost."""
    for sock in (pair.client_sock, pair.upstream_sock):
        if sock is not None:
            arm_reset(sock)
            sock.close()
    pair.client_sock = pair.upstream_sock = None
    pair.client.lost = pair.origin.lost = True


class _Listener:
    __slots__ = ("tag", "sock", "fd", "local_address", "user_paused", "error_paused", "backoff",
                 "resume_handle", "reading")

    def __init__(self, tag: int, sock: socket.socket, local_address: bool) -> None:
        self.tag = tag
        self.sock = sock
        self.fd = sock.fileno()
        self.local_address = local_address
        self.user_paused = False
        self.error_paused = False
        self.backoff = ACCEPT_BACKOFF_FIRST_S
        self.resume_handle: asyncio.TimerHandle | None = None
        self.reading = False


class AioLoop:
    """Pure-asyncio implementation of the core ``Loop`` (see the module docstring).

    Must be used from one thread only, like the core. ``fileno()`` is readable when ``run(0)``
    has I/O or queued callbacks to process; timer expiries (connect/idle/half-close timeouts,
    accept backoff) only fire while ``run()`` is called, so an embedder must call ``run(0)``
    periodically as well (``relay.embed`` does).
    """

    backend = "asyncio"

    def __init__(
        self,
        backend: str = "asyncio",
        pipe_size: int = LOOP_DEFAULTS["pipe_size"],
        max_pipes: int = LOOP_DEFAULTS["max_pipes"],
        max_conns: int = LOOP_DEFAULTS["max_conns"],
        splice_min: int = LOOP_DEFAULTS["splice_min"],
        connect_timeout_ms: int = LOOP_DEFAULTS["connect_timeout_ms"],
        idle_timeout_ms: int = LOOP_DEFAULTS["idle_timeout_ms"],
        half_close_timeout_ms: int = LOOP_DEFAULTS["half_close_timeout_ms"],
        pipes_keep_idle: int = LOOP_DEFAULTS["pipes_keep_idle"],
        pipe_release_ms: int = LOOP_DEFAULTS["pipe_release_ms"],
        socket_rcvbuf: int = LOOP_DEFAULTS["socket_rcvbuf"],
        socket_rcvlowat: int = LOOP_DEFAULTS["socket_rcvlowat"],
        rcvlowat_wait_us: int = LOOP_DEFAULTS["rcvlowat_wait_us"],
    ) -> None:
        if backend != "asyncio":
            raise ValueError(f"AioLoop: backend={backend!r}: this engine only provides 'asyncio'")
        for name, value in (("pipe_size", pipe_size), ("max_conns", max_conns)):
            if value <= 0:
                raise ValueError(f"AioLoop: {name}={value}: must be > 0")
        for name, value in (("max_pipes", max_pipes), ("splice_min", splice_min),
                            ("connect_timeout_ms", connect_timeout_ms),
                            ("idle_timeout_ms", idle_timeout_ms),
                            ("half_close_timeout_ms", half_close_timeout_ms),
                            ("pipes_keep_idle", pipes_keep_idle),
                            ("pipe_release_ms", pipe_release_ms),
                            ("socket_rcvbuf", socket_rcvbuf),
                            ("socket_rcvlowat", socket_rcvlowat),
                            ("rcvlowat_wait_us", rcvlowat_wait_us)):
            if value < 0:
                raise ValueError(f"AioLoop: {name}={value}: must be >= 0")
        # socket_rcvlowat is accepted and ignored, as the core's epoll backend does: without a
        # timeout linked to each poll a tail below the mark would wait for the next byte.
        # The write-buffer high-water mark stands in for the pipe: it bounds what one direction
        # holds in user space before reading from the source pauses.
        self._buffer_size = pipe_size
        self._socket_rcvbuf = socket_rcvbuf
        self._max_conns = max_conns
        self._connect_timeout = connect_timeout_ms / 1000.0
        self._idle_timeout = idle_timeout_ms / 1000.0
        self._half_close_timeout = half_close_timeout_ms / 1000.0
        self._selector = selectors.EpollSelector()
        self._loop = _PrivateEventLoop(self._selector)
        self._loop.set_exception_handler(self._on_loop_exception)
        # An eventfd in the private selector: written when callbacks are queued after run()
        # returns, so that the epoll fd handed out by fileno() becomes readable.
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._loop.add_reader(self._wakefd, self._drain_wakeup)
        self._listeners: dict[int, _Listener] = {}
        self._pairs: dict[int, _Pair] = {}
        self._watches: dict[int, tuple[int, int, asyncio.TimerHandle]] = {}  # id: fd, tag, timer
        self._events: list[tuple[Any, ...]] = []
        self._next_cid = 1
        self._closed = False
        self._stats = {
            "conns_total": 0,
            "bytes_spliced": 0,
            "bytes_copied": 0,
            "bytes_c2s": 0,
            "bytes_s2c": 0,
            "accepts": 0,
            "accept_errors": 0,
            "accept_paused": 0,
            "connect_failures": 0,
            "resets_sent": 0,
            "watches": 0,
            "watch_timeouts": 0,
        }
        self._stats.update(dict.fromkeys(_CLOSED_KEYS, 0))
        # The core's connect-time histogram: per-bucket counts (+Inf last), sum and count (us).
        self._connect_bounds_us: list[int] = []
        self._connect_counts = [0]
        self._connect_sum_us = 0
        self._connect_n = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def fileno(self) -> int:
        self._ensure_open()
        return self._selector.fileno()

    def close(self) -> None:
        """Reset every pair still open, forget the listeners (not owned), free the loop."""
        if self._closed:
            return
        for pair in list(self._pairs.values()):
            self._reset_pair(pair, R_ABORTED, 0)
        for tag in list(self._listeners):
            self.remove_listener(tag)
        for wid in list(self._watches):
            self.unwatch(wid)
        # Let the transports run their connection_lost callbacks, which close the sockets.
        for _ in range(100):
            if not self._pairs and not self._loop.has_ready_callbacks():
                break
            self._run_private(0.0)
        self._closed = True
        self._events.clear()
        self._loop.remove_reader(self._wakefd)
        os.close(self._wakefd)
        self._loop.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            import warnings

            warnings.warn(f"unclosed AioLoop with {len(self._pairs)} pairs", ResourceWarning,
                          stacklevel=1)

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("AioLoop is closed")

    # -- listeners -----------------------------------------------------------------------------

    def add_listener(self, fd: int, tag: int, local_address: bool = False) -> None:
        self._ensure_open()
        if tag in self._listeners:
            raise ValueError(f"add_listener: tag {tag} is already in use")
        # Borrow the fd: detach() on removal so the caller keeps ownership.
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        listener = _Listener(tag, sock, local_address)
        self._listeners[tag] = listener
        self._sync_listener(listener)

    def remove_listener(self, tag: int) -> None:
        listener = self._listeners.pop(tag, None)
        if listener is None:
            raise KeyError(f"remove_listener: no listener with tag {tag}")
        if listener.reading:
            self._loop.remove_reader(listener.fd)
        if listener.resume_handle is not None:
            listener.resume_handle.cancel()
        listener.sock.detach()

    def pause_accept(self, tag: int) -> None:
        listener = self._listener(tag)
        listener.user_paused = True
        self._sync_listener(listener)

    def resume_accept(self, tag: int) -> None:
        listener = self._listener(tag)
        listener.user_paused = False
        self._sync_listener(listener)

    def _listener(self, tag: int) -> _Listener:
        try:
            return self._listeners[tag]
        except KeyError:
            raise KeyError(f"no listener with tag {tag}") from None

    def _sync_listener(self, listener: _Listener) -> None:
        want = not listener.user_paused and not listener.error_paused
        if want and not listener.reading:
            self._loop.add_reader(listener.fd, self._accept_ready, listener)
            listener.reading = True
        elif not want and listener.reading:
            self._loop.remove_reader(listener.fd)
            listener.reading = False

    def _accept_ready(self, listener: _Listener) -> None:
        stats = self._stats
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                stats["accept_errors"] += 1
                if exc.errno in ACCEPT_PAUSE_ERRNOS:
                    self._pause_after_error(listener, exc.errno)
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall)...: that one connection is gone.
                continue
            listener.backoff = ACCEPT_BACKOFF_FIRST_S
            stats["accepts"] += 1
            conn.setblocking(False)
            # The core's shape: (ip, port) peer and local address, None for unix sockets.
            peer = local = None
            if conn.family != socket.AF_UNIX:
                peer = (addr[0], addr[1])
                if listener.local_address:
                    name = conn.getsockname()
                    local = (name[0], name[1])
            self._emit((EV_ACCEPT, listener.tag, conn.detach(), peer, local))

    def _pause_after_error(self, listener: _Listener, err: int) -> None:
        self._stats["accept_paused"] += 1
        listener.error_paused = True
        self._sync_listener(listener)
        delay = listener.backoff
        listener.backoff = min(delay * 2, ACCEPT_BACKOFF_MAX_S)
        listener.resume_handle = self._loop.call_later(delay, self._resume_after_error, listener)
        self._emit((EV_ACCEPT_ERROR, listener.tag, err))

    def _resume_after_error(self, listener: _Listener) -> None:
        listener.resume_handle = None
        listener.error_paused = False
        if self._listeners.get(listener.tag) is listener:
            self._sync_listener(listener)

    # -- pairs ---------------------------------------------------------------------------------

    def add_pair(self, client_fd: int, upstream_fd: int, tag: int = 0, connecting: bool = False,
                 prefix: bytes = b"", *, client_accepted: bool = False,
                 upstream_nonblocking: bool = False) -> int:
        """Take ownership of both fds and relay between them; returns the pair id.

        If this raises, ownership stays with the caller (the fds are not closed).
        client_accepted / upstream_nonblocking are the core's hints to skip redundant system
        calls; this engine's accepted sockets are blocking and unarmed, so it checks anyway.
        """
        self._ensure_open()
        if len(self._pairs) >= self._max_conns:
            raise OSError(errno.ENFILE, f"connection table full (max_conns={self._max_conns})")
        client_sock = socket.socket(fileno=client_fd)
        try:
            upstream_sock = socket.socket(fileno=upstream_fd)
        except OSError:
            client_sock.detach()
            raise
        client_sock.setblocking(False)
        upstream_sock.setblocking(False)
        arm_reset(client_sock)  # until the graceful close: a dead process resets
        arm_reset(upstream_sock)
        if self._socket_rcvbuf:  # as the core does (relay_ext/conn.pxi set_rcvbuf)
            for sock in (client_sock, upstream_sock):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._socket_rcvbuf)
        cid = self._next_cid
        self._next_cid += 1
        pair = _Pair(self, cid, tag, client_sock, upstream_sock, bytes(prefix))
        self._pairs[cid] = pair
        self._stats["conns_total"] += 1
        if connecting:
            pair.connecting = True
            self._loop.add_writer(upstream_fd, self._connect_ready, pair)
            if self._connect_timeout > 0:
                pair.timer = self._loop.call_later(self._connect_timeout, self._connect_expired,
                                                   pair)
        else:
            self._start_relay(pair)
        self._wakeup()
        return cid

    def abort(self, cid: int) -> None:
        pair = self._pairs.get(cid)
        if pair is None or (pair.client.lost and pair.origin.lost):
            return  # already closed: its EV_DONE is (or will be) reported
        if pair.reason is not None and pair.reason != R_EOF:
            return  # already being reset
        # Also when both EOFs were seen and the last bytes are still flushing (slow reader).
        self._reset_pair(pair, R_ABORTED, 0)
        self._wakeup()

    def kill(self, cid: int) -> bool:
        """abort() at an operator's request: reason "killed"; False if the pair is gone."""
        pair = self._pairs.get(cid)
        if pair is None or pair.finished or (pair.client.lost and pair.origin.lost):
            return False
        if pair.reason is not None and pair.reason != R_EOF:
            return False  # already being reset
        self._reset_pair(pair, R_KILLED, 0)
        self._wakeup()
        return True

    def pair_info(self, cid: int) -> tuple[int, int, bool, int, int, int, int] | None:
        """(cid, tag, connecting, c2s_bytes, s2c_bytes, age_us, idle_us), like the core's."""
        pair = self._pairs.get(cid)
        if pair is None or pair.finished:
            return None
        return _pair_tuple(pair, time.monotonic_ns(), time.monotonic())

    def pairs(self) -> list[tuple[int, int, bool, int, int, int, int]]:
        now_ns, now = time.monotonic_ns(), time.monotonic()
        return [_pair_tuple(p, now_ns, now) for p in self._pairs.values() if not p.finished]

    def _connect_ready(self, pair: _Pair) -> None:
        sock = pair.upstream_sock
        assert sock is not None
        self._loop.remove_writer(sock.fileno())
        pair.connecting = False
        if pair.timer is not None:
            pair.timer.cancel()
            pair.timer = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._stats["connect_failures"] += 1
            self._fail_connect(pair, connect_failure_reason(err), err)
            return
        connect_us = (time.monotonic_ns() - pair.connect_started) // 1000
        self._connect_counts[bisect.bisect_left(self._connect_bounds_us, connect_us)] += 1
        self._connect_sum_us += connect_us
        self._connect_n += 1
        self._start_relay(pair)

    def _connect_expired(self, pair: _Pair) -> None:
        pair.timer = None
        if not pair.connecting:
            return
        self._stats["connect_failures"] += 1
        sock = pair.upstream_sock
        assert sock is not None
        self._loop.remove_writer(sock.fileno())
        pair.connecting = False
        self._fail_connect(pair, R_CONNECT_TIMEOUT, errno.ETIMEDOUT)

    def _fail_connect(self, pair: _Pair, reason: int, err: int) -> None:
        # The upstream never carried a byte: close it; the client gets an RST, promptly.
        pair.reason = reason
        pair.errno = err
        _reset_raw_sockets(pair)
        self._finish(pair)

    def _start_relay(self, pair: _Pair) -> None:
        loop = self._loop
        high = self._buffer_size
        assert pair.client_sock is not None and pair.upstream_sock is not None
        origin_t = loop.attach_socket(pair.upstream_sock, pair.origin)
        client_t = loop.attach_socket(pair.client_sock, pair.client)
        pair.client_sock = pair.upstream_sock = None  # the transports own them now
        pair.origin.transport = origin_t
        pair.client.transport = client_t
        origin_t.set_write_buffer_limits(high=high)
        client_t.set_write_buffer_limits(high=high)
        if pair.prefix:
            origin_t.write(pair.prefix)
        pair.last_activity = time.monotonic()
        self._arm_timer(pair)

    def _on_eof(self, half: _Half) -> None:
        pair = half.pair
        half.eof = True
        half.reading_paused = False
        peer = half.peer
        assert peer is not None
        if pair.reason is not None:
            return
        if peer.eof:
            # Both read sides are done: close() flushes each write buffer, then closes (FIN).
            pair.reason = R_EOF
            self._cancel_timer(pair)
            for h in (half, peer):
                if (sock := h.transport.get_extra_info("socket")) is not None:
                    arm_reset(sock, armed=False)
                h.transport.close()
            return
        try:
            # asyncio shuts the write side down only once the buffer has drained.
            peer.transport.write_eof()
        except OSError as exc:
            self._reset_pair(pair, R_RESET_ORIGIN if half.is_client else R_RESET_CLIENT,
                             exc.errno or 0)
            return
        self._arm_timer(pair)  # the half-close timeout applies from now on

    def _on_lost(self, half: _Half, exc: Exception | None) -> None:
        pair = half.pair
        half.lost = True
        if exc is not None and (pair.reason is None or pair.reason == R_EOF):
            # A read/write error, possibly while flushing the last bytes after both EOFs: the
            # stream is truncated, so the other side must see a reset too.
            err = getattr(exc, "errno", None) or 0
            if err in _RESET_ERRNOS or isinstance(exc, ConnectionError):
                reason = R_RESET_CLIENT if half.is_client else R_RESET_ORIGIN
            else:
                reason = R_ERROR
            self._reset_pair(pair, reason, err)
        elif pair.reason is None:
            # We never close a transport without setting a reason first.
            self._reset_pair(pair, R_ERROR, 0)
        peer = half.peer
        assert peer is not None
        if peer.lost or peer.transport is None:
            # connection_lost runs just before asyncio closes the socket: report on the next
            # iteration so that the fd is really gone when EV_DONE is seen.
            self._loop.call_soon(self._finish, pair)

    def _reset_pair(self, pair: _Pair, reason: int, err: int) -> None:
        """Abort both sides with an RST (SO_LINGER 0); EV_DONE follows once both are closed."""
        if pair.reason is None or pair.reason == R_EOF:
            pair.reason = reason
            pair.errno = err
        self._cancel_timer(pair)
        if pair.connecting or pair.client.transport is None:
            if pair.connecting and pair.upstream_sock is not None:
                self._loop.remove_writer(pair.upstream_sock.fileno())
            pair.connecting = False
            _reset_raw_sockets(pair)
            self._loop.call_soon(self._finish, pair)
            return
        for h in (pair.client, pair.origin):
            if not h.lost:
                if arm_reset(h.transport.get_extra_info("socket")):
                    self._stats["resets_sent"] += 1
                h.transport.abort()

    def _finish(self, pair: _Pair) -> None:
        if pair.finished:
            return
        pair.finished = True
        self._cancel_timer(pair)
        del self._pairs[pair.cid]
        copied = pair.c2s + pair.s2c
        self._stats["bytes_copied"] += copied
        self._stats["bytes_c2s"] += pair.c2s
        self._stats["bytes_s2c"] += pair.s2c
        reason = R_ERROR if pair.reason is None else pair.reason
        self._stats[_CLOSED_KEYS[reason]] += 1
        duration_us = (time.monotonic_ns() - pair.started) // 1000
        self._emit((EV_DONE, pair.cid, pair.tag, reason, pair.c2s, pair.s2c, 0, copied,
                    duration_us, pair.errno))

    # -- watches -------------------------------------------------------------------------------

    def watch(self, fd: int, tag: int, timeout_ms: int) -> int:
        """Report once: (EV_READABLE, tag, fd) when ``fd`` turns readable, or
        (EV_WATCH_TIMEOUT, tag, fd) after ``timeout_ms``; nothing is read, the fd stays the
        caller's. Returns an id for ``unwatch``."""
        self._ensure_open()
        if fd < 0:
            raise ValueError(f"AioLoop: bad fd {fd}")
        if len(self._pairs) + len(self._watches) >= self._max_conns:
            raise OSError(errno.ENFILE, f"connection table full (max_conns={self._max_conns})")
        wid = self._next_cid
        self._next_cid += 1
        self._loop.add_reader(fd, self._watch_end, wid, EV_READABLE)
        timer = self._loop.call_later(max(timeout_ms, 0) / 1000.0, self._watch_end, wid,
                                      EV_WATCH_TIMEOUT)
        self._watches[wid] = (fd, tag, timer)
        self._stats["watches"] += 1
        self._wakeup()
        return wid

    def unwatch(self, wid: int) -> bool:
        """Cancel a watch without an event; False when it is already over."""
        entry = self._watches.pop(wid, None)
        if entry is None:
            return False
        fd, _tag, timer = entry
        timer.cancel()
        self._loop.remove_reader(fd)
        return True

    def _watch_end(self, wid: int, kind: int) -> None:
        entry = self._watches.get(wid)
        if entry is None:
            return
        fd, tag, _timer = entry
        self.unwatch(wid)
        if kind == EV_WATCH_TIMEOUT:
            self._stats["watch_timeouts"] += 1
        self._emit((kind, tag, fd))

    # -- timeouts ------------------------------------------------------------------------------

    def _arm_timer(self, pair: _Pair) -> None:
        limit = self._current_limit(pair)
        if pair.timer is not None:
            pair.timer.cancel()
            pair.timer = None
        if limit > 0:
            pair.timer = self._loop.call_later(limit / _SAMPLES_PER_TIMEOUT, self._timer_fired,
                                               pair)

    def _current_limit(self, pair: _Pair) -> float:
        if (pair.client.eof or pair.origin.eof) and self._half_close_timeout > 0:
            if self._idle_timeout > 0:
                return min(self._half_close_timeout, self._idle_timeout)
            return self._half_close_timeout
        return self._idle_timeout

    def _timer_fired(self, pair: _Pair) -> None:
        pair.timer = None
        if pair.reason is not None:
            return
        limit = self._current_limit(pair)
        if limit <= 0:
            return
        now = time.monotonic()
        # Bytes leaving a write buffer are activity too (a slow reader draining what we hold);
        # asyncio only reports that at low water, so also compare the buffered amounts.  Only
        # against a sample taken after the last byte was read (before it, the amount changed
        # because of that byte): the first sample after activity is the baseline.
        pending = (pair.client.transport.get_write_buffer_size()
                   + pair.origin.transport.get_write_buffer_size())
        if pair.pending_at >= pair.last_activity and pending != pair.pending_seen:
            pair.last_activity = now
        pair.pending_seen = pending
        pair.pending_at = now
        idle_for = now - pair.last_activity
        if idle_for >= limit:
            half_closed = pair.client.eof or pair.origin.eof
            hc_expired = half_closed and self._half_close_timeout > 0 and (
                self._idle_timeout <= 0 or self._half_close_timeout <= self._idle_timeout)
            self._reset_pair(pair, R_HALF_CLOSE_TIMEOUT if hc_expired else R_IDLE_TIMEOUT, 0)
            return
        pair.timer = self._loop.call_later(min(limit - idle_for, limit / _SAMPLES_PER_TIMEOUT),
                                           self._timer_fired, pair)

    @staticmethod
    def _cancel_timer(pair: _Pair) -> None:
        if pair.timer is not None:
            pair.timer.cancel()
            pair.timer = None

    # -- running -------------------------------------------------------------------------------

    def run(self, timeout_ms: int) -> list[tuple[Any, ...]]:
        """Process I/O for up to ``timeout_ms`` (0: poll once, <0: until an event) and return
        the events produced, as tuples identical to the core's."""
        self._ensure_open()
        if self._events or timeout_ms == 0:
            self._run_private(0.0)
        else:
            self._run_private(None if timeout_ms < 0 else timeout_ms / 1000.0)
        events = self._events
        self._events = []
        if self._loop.has_ready_callbacks():
            self._wakeup()
        return events

    def _run_private(self, timeout: float | None) -> None:
        loop = self._loop
        # The private loop may be driven from inside another running loop (relay.embed calls
        # run(0) from an add_reader callback): asyncio refuses to nest, so step out of the
        # outer loop's "running" slot for the duration and restore it afterwards.
        outer = asyncio.events._get_running_loop()
        if outer is not None:
            asyncio.events._set_running_loop(None)
        handle = None
        try:
            if timeout == 0.0:
                loop.stop()  # stop() before run_forever(): exactly one zero-timeout pass
            elif timeout is not None:
                handle = loop.call_later(timeout, loop.stop)
            loop.run_forever()
        finally:
            if handle is not None:
                handle.cancel()
            if outer is not None:
                asyncio.events._set_running_loop(outer)

    def _emit(self, event: tuple[Any, ...]) -> None:
        self._events.append(event)
        if self._loop.is_running():
            self._loop.stop()  # return from run() after this iteration

    def _wakeup(self) -> None:
        try:
            os.eventfd_write(self._wakefd, 1)
        except BlockingIOError:
            pass  # counter saturated: already readable

    def _drain_wakeup(self) -> None:
        try:
            os.eventfd_read(self._wakefd)
        except BlockingIOError:
            pass

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.error("asyncio engine: %s", context.get("message", "unexpected error"),
                  exc_info=exc if isinstance(exc, BaseException) else None)

    # -- introspection -------------------------------------------------------------------------

    def set_connect_buckets(self, bounds_us: tuple[int, ...] | list[int]) -> None:
        """As the core's: bounds (us, increasing, at most 32) of the connect-time histogram."""
        self._ensure_open()
        bounds = [int(b) for b in bounds_us]
        if len(bounds) > _MAX_CONNECT_BUCKETS:
            raise ValueError(f"AioLoop: set_connect_buckets: {len(bounds)} bounds: "
                             f"at most {_MAX_CONNECT_BUCKETS}")
        if any(b < 0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"AioLoop: set_connect_buckets: {bounds}: "
                             "must be >= 0 and strictly increasing")
        self._connect_bounds_us = bounds
        self._connect_counts = [0] * (len(bounds) + 1)
        self._connect_sum_us = 0
        self._connect_n = 0

    def connect_histogram(self) -> tuple[list[int], int, int]:
        """(per-bucket counts, +Inf last; sum of connect times in us; count), as the core's."""
        return list(self._connect_counts), self._connect_sum_us, self._connect_n

    def stats(self) -> dict[str, int]:
        s = dict(self._stats)
        s["conns_open"] = len(self._pairs)
        s["conn_slots_used"] = len(self._pairs)
        # The core's pipe and ring counters, all 0 here: same keys whatever the engine.
        s["watching"] = len(self._watches)
        for key in ("pipes_in_use", "pipes_free", "pipes_max", "pipes_created", "pipes_killed",
                    "pipes_released",
                    "pipe_refused", "pipe_resize_denied", "sqe_starved", "submit_errors",
                    "submit_last_errno", "reaps_cut", "multishot_ended", "cq_overflows",
                    "lowat_raised", "lowat_timeouts", "events_dropped", "signal_wakeups",
                    "accept_connects", "accept_yields"):
            s[key] = 0
        # No pipes here: the write-buffer high-water mark plays the pipe's role.
        s["pipe_size_granted"] = self._buffer_size
        s["pipe_size_requested"] = self._buffer_size
        s["listeners"] = len(self._listeners)
        return s
