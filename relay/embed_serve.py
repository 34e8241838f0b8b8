"""Embedding API, serving form: the core accepts, connects and relays; Python only routes.

(``relay.start_server``, after ``asyncio.start_server``: ``relay.serve`` is the package that
holds the relay's own server.)

    async def route(client, original_dst):          # or a plain (sync) function
        return ("10.0.0.7", 8080)                    # None: reset this client

    server = await relay.start_server(("127.0.0.1", 8080), route)
    ...
    server.close()                  # stop accepting; open pairs go on
    await server.wait_closed()      # every pair done (or aborted after `timeout`)

Per connection, Python runs once: the core's accept4() batch hands over the fd (EV_ACCEPT),
``route(client_addr, original_dst)`` picks the upstream, a non-blocking ``connect()`` starts it,
and ``add_pair(..., connecting=True)`` gives both fds to the core, which finishes the connect
(connect timeout, refusal: the client gets a reset) and moves the bytes. No future, task or
transport is made per connection unless ``route`` returns an awaitable.

``original_dst`` is the accepted socket's local address: the address the client connected to, its
original destination under TPROXY (``transparent=True``). When the listener is bound to one
address (not a wildcard) and not transparent, it is the same for every client and not asked again.

``route`` returns ``(host, port)``: an IP literal is connected at once; a name is resolved with
``loop.getaddrinfo`` first (off the event loop's thread, the slow path). ``None`` refuses the
client (reset). An exception in ``route`` resets that client only and is logged.

Drives the engine loop like ``relay.Relay`` (relay/embed.py): ``loop.add_reader(core.fileno())``
plus a periodic tick for the core's timers, all on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relay import engines
from relay.engines.constants import (
    CLOSE_REASONS,
    EV_ACCEPT,
    EV_ACCEPT_ERROR,
    EV_DONE,
    LOOP_DEFAULTS,
    connect_failure_reason,
)
from relay.sock import format_address, open_listener, pack_sockaddr, reset_and_close

__all__ = ["Route", "RouteResult", "Server", "start_server"]

log = logging.getLogger("relay.embed")

Address = tuple[Any, ...]
RouteResult = tuple[str, int] | None
Route = Callable[[Address, Address], "RouteResult | Awaitable[RouteResult]"]

_TAG = 1
_TICK_MAX_S = 1.0
_TICK_MIN_S = 0.01
_CONNECT_PENDING = (0, errno.EINPROGRESS)
_ROUTE_LOG_INTERVAL_S = 10.0
_FAMILY_CACHE_MAX = 4096
_WILDCARDS = ("", "0.0.0.0", "::")


class Server:
    """A listener served by one engine loop on the running event loop. Made by ``start_server()``."""

    def __init__(self, lsock: socket.socket, route: Route, engine: str,
                 transparent: bool, loop_options: dict[str, Any]) -> None:
        self._lsock = lsock
        self._route = route
        self._aloop = asyncio.get_running_loop()
        core, reason = engines.create(engine, **loop_options)
        self._core: Any = core
        self.engine: str = core.backend
        self.engine_reason: str = reason
        self._family = lsock.family
        local = lsock.getsockname()
        self.address: Address = tuple(local)
        # One original destination for every client unless a wildcard or TPROXY makes it vary.
        self._fixed_dst: Address | None = (
            None if transparent or local[0] in _WILDCARDS else (local[0], local[1]))
        self._families: dict[str, int] = {}
        self._sockaddrs: dict[tuple[str, int], bytes] = {}  # (ip, port) -> packed sockaddr
        self._core_connect = hasattr(core, "add_pair_connect")
        self._pending: set[asyncio.Task[None]] = set()
        self._open = 0
        self._accepting = True
        self._closed = False  # core released
        self._drained: asyncio.Future[None] = self._aloop.create_future()
        self._counts = {"accepted": 0, "relayed": 0, "refused": 0, "route_errors": 0,
                        "connect_errors": 0, "accept_errors": 0,
                        "connect_refused": 0, "connect_unreachable": 0, "connect_error": 0}
        self._last_route_log = 0.0
        self._routes_unlogged = 0
        timeouts = [loop_options.get(k, LOOP_DEFAULTS[k]) for k in (
            "connect_timeout_ms", "idle_timeout_ms", "half_close_timeout_ms")]
        shortest = min((t for t in timeouts if t > 0), default=10_000) / 1000.0
        self._tick_s = min(max(shortest / 10.0, _TICK_MIN_S), _TICK_MAX_S)
        self._tick_handle: asyncio.TimerHandle | None = None
        try:
            self._fd = core.fileno()
            core.add_listener(lsock.fileno(), _TAG, local_address=self._fixed_dst is None)
        except BaseException:
            core.close()
            raise
        self._aloop.add_reader(self._fd, self._drive)

    # -- public ----------------------------------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._lsock,) if self._accepting else ()

    @property
    def is_serving(self) -> bool:
        return self._accepting

    def close(self) -> None:
        """Stop accepting (the listening socket is closed); open pairs and routes in progress
        go on until they end. Idempotent."""
        if not self._accepting:
            return
        self._accepting = False
        if not self._closed:
            self._core.remove_listener(_TAG)
            self._drive()  # connections the core accepted before remove_listener are served
        self._lsock.close()
        self._check_drained()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """After close(): wait until every pair is done, then free the engine loop. Pairs still
        open after `timeout` seconds are aborted (both sides reset)."""
        if self._accepting:
            raise RuntimeError("Server.wait_closed: call close() first")
        if not self._drained.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                self._abort_all()
        self._release()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed(0.0 if exc_info[0] is not None else None)

    def stats(self) -> dict[str, int]:
        """The engine loop's counters plus: accepted, relayed (pairs handed to the core),
        refused (route returned None), route_errors, connect_errors (the connect failed before
        the core got the pair; connect_<reason> by reason, e.g. connect_refused), accept_errors,
        routing (awaiting route), open (pairs). How relayed pairs ended: the core's closed_*."""
        out: dict[str, int] = dict(self._core.stats())
        out.update(self._counts)
        out["routing"] = len(self._pending)
        out["open"] = self._open
        return out

    # -- driving the engine loop -----------------------------------------------------------------

    def _drive(self) -> None:
        if self._closed:
            return
        events = self._core.run(0)
        if events:
            self._dispatch(events)
        self._arm_tick()

    def _arm_tick(self) -> None:
        if self._tick_handle is None and (self._open or self._pending):
            self._tick_handle = self._aloop.call_later(self._tick_s, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_handle = None
        self._drive()

    def _dispatch(self, events: list[tuple[Any, ...]]) -> None:
        for ev in events:
            kind = ev[0]
            if kind == EV_ACCEPT:
                self._on_accept(ev[2], ev[3], ev[4])
            elif kind == EV_DONE:
                self._open -= 1
            elif kind == EV_ACCEPT_ERROR:
                self._counts["accept_errors"] += 1
                log.warning("serve %s: accept failed: %s; paused for a back-off",
                            format_address(self.address), errno.errorcode.get(ev[2], ev[2]))
        if not self._accepting:
            self._check_drained()

    def _on_accept(self, fd: int, peer: Address | None, local: Address | None) -> None:
        self._counts["accepted"] += 1
        # The core's accept gave the peer (and the local address, unless fixed): the client
        # stays a bare fd, a socket object only where one is closed (its constructor's
        # validating getsockname() is a system call).
        client: socket.socket | int = fd
        dst = self._fixed_dst or local
        if peer is None or dst is None:
            client = self._sock(fd)
            try:
                peer = peer or client.getpeername()
                dst = dst or client.getsockname()
            except OSError:
                client.close()  # reset before we got to it: nobody to tell
                return
        try:
            target = self._route(peer, dst)
        except Exception:
            self._route_failed(client, peer)
            return
        if target is not None and not isinstance(target, tuple) and inspect.isawaitable(target):
            # A socket object from here: a task cancelled before it ran still closes it.
            task = self._aloop.create_task(self._route_async(self._sock(client), peer, target))
            self._pending.add(task)
            task.add_done_callback(self._route_done)
            return
        self._connect(client, peer, target)

    async def _route_async(self, client: socket.socket | int, peer: Address,
                           pending: Awaitable[RouteResult]) -> None:
        try:
            target = await pending
        except Exception:
            self._route_failed(client, peer)
            return
        except asyncio.CancelledError:
            reset_and_close(self._sock(client))
            raise
        await self._resolve_and_connect(client, peer, target)

    async def _resolve_and_connect(self, client: socket.socket | int, peer: Address,
                                   target: Any) -> None:
        """Connect to `target`, resolving a name first (a failure resets the client)."""
        if (isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str)
                and self._family_of(target[0]) is None):
            try:
                target = await self._resolve(target)
            except OSError as exc:
                self._counts["connect_errors"] += 1
                reset_and_close(self._sock(client))
                log.warning("serve: cannot resolve %s for %s: %s", target[0],
                            format_address(peer), exc)
                return
            except asyncio.CancelledError:
                reset_and_close(self._sock(client))
                raise
        self._connect(client, peer, target)

    def _route_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._drive()  # the new pair may already have events; drains when closing
        if not self._accepting:
            self._check_drained()

    def _route_failed(self, client: socket.socket | int, peer: Address, bad: Any = None) -> None:
        """route() raised (called from its except clause) or returned `bad`: reset the client,
        log (at most once per interval, with the count of those not logged)."""
        self._counts["route_errors"] += 1
        reset_and_close(self._sock(client))
        now = time.monotonic()
        if now - self._last_route_log >= _ROUTE_LOG_INTERVAL_S:
            more = f" ({self._routes_unlogged} more since the last report)" \
                if self._routes_unlogged else ""
            what = "failed" if bad is None else \
                f"returned {bad!r}, not (host, port) or None"
            log.error("serve %s: route() %s for client %s: client reset%s",
                      format_address(self.address), what, format_address(peer), more,
                      exc_info=bad is None)
            self._last_route_log = now
            self._routes_unlogged = 0
        else:
            self._routes_unlogged += 1

    def _family_of(self, host: str) -> int | None:
        """AF_INET/AF_INET6 for an IP literal, None for a name (cached: routes repeat)."""
        family = self._families.get(host)
        if family is None:
            try:
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 \
                    else socket.AF_INET
            except ValueError:
                return None
            if len(self._families) >= _FAMILY_CACHE_MAX:
                self._families.clear()
            self._families[host] = family
        return family

    async def _resolve(self, target: tuple[str, int]) -> tuple[str, int]:
        infos = await self._aloop.getaddrinfo(target[0], target[1], type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(errno.ENOENT, "no address")
        return str(infos[0][4][0]), int(infos[0][4][1])

    def _sock(self, client: socket.socket | int) -> socket.socket:
        """The accepted client as a socket object (from its fd, as EV_ACCEPT gave it)."""
        if isinstance(client, socket.socket):
            return client
        # family/type given: socket() asks the kernel only its validating getsockname().
        return socket.socket(self._family, socket.SOCK_STREAM, 0, client)

    def _connect(self, client: socket.socket | int, peer: Address, target: Any) -> None:
        try:
            self._connect_to(client, peer, target)
        except (TypeError, ValueError, IndexError, OverflowError):
            # not (host, port) or None: the route's fault, reported like its exceptions
            self._route_failed(client, peer, target)

    def _connect_to(self, client: socket.socket | int, peer: Address, target: Any) -> None:
        if target is None:
            self._counts["refused"] += 1
            reset_and_close(self._sock(client))
            return
        if self._closed:
            reset_and_close(self._sock(client))
            return
        if not isinstance(target, tuple) or len(target) != 2:
            raise TypeError("not a tuple")
        family = self._family_of(target[0])
        if family is None:
            # A name from a sync route: resolve it off the hot path.
            task = self._aloop.create_task(
                self._resolve_and_connect(self._sock(client), peer, target))
            self._pending.add(task)
            task.add_done_callback(self._route_done)
            return
        sockaddr = self._sockaddr_of(target, family) if self._core_connect else None
        if sockaddr is not None:
            # The core opens and connects the upstream itself (Loop.add_pair_connect).
            client_fd = client.detach() if isinstance(client, socket.socket) else client
            try:
                cid = self._core.add_pair_connect(client_fd, sockaddr, _TAG,
                                                  client_accepted=True)
            except (OSError, ValueError) as exc:
                self._pair_refused(client_fd, None, family, peer, exc)
                return
            if cid < 0:
                self._connect_failed(client_fd, -cid)
                return
            self._open += 1
            self._counts["relayed"] += 1
            return
        up = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see relay/sock.py
        rc = up.connect_ex(target)
        if rc not in _CONNECT_PENDING:
            up.close()
            self._connect_failed(client, rc)
            return
        client_fd = client.detach() if isinstance(client, socket.socket) else client
        up_fd = up.detach()
        try:
            self._core.add_pair(client_fd, up_fd, _TAG, rc != 0, client_accepted=True,
                                upstream_nonblocking=True)
        except (OSError, ValueError) as exc:
            self._pair_refused(client_fd, up_fd, family, peer, exc)
            return
        self._open += 1
        self._counts["relayed"] += 1

    def _sockaddr_of(self, target: tuple[str, int], family: int) -> bytes | None:
        """`target` packed for the core (cached: routes repeat); None where the Python
        path connects (an IPv6 scope, which the core path does not take). A port that is not
        an int raises TypeError, out of range OverflowError, as connect_ex would."""
        sockaddr = self._sockaddrs.get(target)
        if sockaddr is None:
            host, port = target
            if not isinstance(port, int):
                raise TypeError("port must be an int")
            if "%" in host:
                return None
            sockaddr = pack_sockaddr(family, (host, port, 0, 0))
            if sockaddr is None:
                return None
            if len(self._sockaddrs) >= _FAMILY_CACHE_MAX:
                self._sockaddrs.clear()
            self._sockaddrs[target] = sockaddr
        return sockaddr

    def _connect_failed(self, client: socket.socket | int, err: int) -> None:
        self._counts["connect_errors"] += 1
        key = "connect_" + CLOSE_REASONS[connect_failure_reason(err)]
        self._counts[key] = self._counts.get(key, 0) + 1
        reset_and_close(self._sock(client))

    def _pair_refused(self, client_fd: int, up_fd: int | None, family: int, peer: Address,
                      exc: Exception) -> None:
        reset_and_close(socket.socket(self._family, socket.SOCK_STREAM, 0, client_fd))
        if up_fd is not None:
            reset_and_close(socket.socket(family, socket.SOCK_STREAM, 0, up_fd))
        self._counts["connect_errors"] += 1
        log.warning("serve: engine refused a pair: %s; client %s reset", exc,
                    format_address(peer))

    # -- closing -----------------------------------------------------------------------------------

    def _check_drained(self) -> None:
        if not self._open and not self._pending and not self._drained.done():
            self._drained.set_result(None)

    def _abort_all(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if not self._closed:
            for info in self._core.pairs():
                self._core.abort(info[0])
            self._dispatch(self._core.run(0))

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if not self._aloop.is_closed():
            self._aloop.remove_reader(self._fd)
        self._core.close()


async def start_server(listen: tuple[str, int] | socket.socket, route: Route, *,
                engine: str = "auto", transparent: bool = False, reuseport: bool = False,
                **loop_options: Any) -> Server:
    """Accept on `listen` and relay each client to ``route(client_addr, original_dst)``.

    `listen`: (IP literal, port) to bind (port 0: any; see ``Server.address``), or a listening
    socket.socket you made (the Server closes it on close()). `engine`: "auto" (uring, else
    epoll, else asyncio) or a name from ``relay.engines.ENGINES``; `loop_options` go to the
    engine (``connect_timeout_ms``, ``idle_timeout_ms`` ...). `transparent`: an IP_TRANSPARENT
    listener for TPROXY, where ``original_dst`` is where the client was going.
    """
    if isinstance(listen, socket.socket):
        lsock = listen
        lsock.setblocking(False)
    else:
        lsock = open_listener(listen, transparent=transparent, reuseport=reuseport)
    try:
        return Server(lsock, route, engine, transparent, loop_options)
    except BaseException:
        lsock.close()
        raise
