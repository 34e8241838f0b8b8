"""The server: glue between a config, the listeners' routers and one engine loop (one per worker).

    srv = Server(cfg, engine=None, sockets=None)   # sockets: inherited listeners by name
    srv.serve_forever()                             # or srv.start_thread()
    srv.request_stop(drain=True)                    # from a signal handler: only sets attributes
    srv.stop(drain_timeout=None)                    # from another thread: request, then join
    srv.stats(); srv.bound_addresses()
    srv.sessions(flt); srv.kill_sessions(flt)      # the session table (serving thread only)
    srv.set_control_hook(fn)                        # fn() between loop.run() calls, <= 20/s

On EV_ACCEPT the listener's router opens the upstream (backend / original destination through
the policy and the egress slice, optional PROXY v2 prefix) and the pair goes to the loop with
``connecting=True``; a listener that needs nothing per connection from Python (IP client to an
IP backend, no PROXY header, no per-source limit, shared counters) is accepted, admitted and
connected by the core itself, and arrives as EV_PAIR, only to be tracked. On EV_DONE the flow
is logged and counted. A trusted proxy's client whose
PROXY v2 header has not fully arrived is parked in the loop (relay.serve.proxywait), never
waited for. Limits are enforced here: the global maxconn and the per-source maxconn, exact over
the workers of a generation through the counters they share (relay.serve.limits; an embedded
Server without them enforces the configured numbers divided by the worker count, rounded up); a
connection over a limit is reset at once and counted. An admitted client that is not relayed
(denied, upstream error, header timeout, stopping) gives its count back at once.
"""

from __future__ import annotations

import bisect
import errno as errno_mod
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay import engines
from relay.config.model import Config
from relay.engines.constants import (
    ACCEPT_PAUSE_ERRNOS,
    CLOSE_REASONS,
    EV_ACCEPT,
    EV_ACCEPT_ERROR,
    EV_DONE,
    EV_PAIR,
    EV_READABLE,
    EV_WATCH_TIMEOUT,
    connect_failure_reason,
)
from relay.ops.log import log_every
from relay.ops.sessions import Session, SessionFilter, address_matcher
from relay.serve.flowlog import FlowLog, format_addr
from relay.serve.limits import VERDICT_REASONS, source_key
from relay.serve.proxyproto import ProxyInfo
from relay.serve.proxywait import HeaderWaits, Waiting
from relay.serve.routing import Denied, Router
from relay.serve.signalwake import SignalWakeup
from relay.serve.udp import UdpService
from relay.sock import (
    UNIX_PREFIX,
    format_address,
    open_listener,
    open_udp_listeners,
    reset_and_close,
)

__all__ = ["CONNECT_BUCKETS", "REJECT_REASONS", "Server"]

log = logging.getLogger("relay.server")

# Upper bounds (seconds) of the connect-latency histogram, Prometheus style (+Inf implied).
CONNECT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# ... as the engine loop counts them (set_connect_buckets): whole microseconds.
_CONNECT_BOUNDS_US: tuple[int, ...] = tuple(round(b * 1e6) for b in CONNECT_BUCKETS)
_POLL_MS = 100  # longest wait in loop.run(): bounds how late a stop request is noticed
_STATS_REFRESH_S = 0.25  # loop.stats() snapshot age limit for stats() from other threads
_ABORT_GRACE_S = 2.0  # after aborting the rest at the drain deadline, wait this long for EV_DONE
_LIMIT_LOG_INTERVAL_S = 10.0
# How long a stopping supervised worker waits for the supervisor's UdpRelease to reach its UDP
# service (the command reader thread) before it ends the UDP flows "closed" itself.
_UDP_RELEASE_ORDER_GRACE_S = 0.5
_CONTROL_POLL_S = 0.05  # the control hook (worker <- supervisor requests) runs at most this often

# Why a client over a connection limit was reset: stats()["rejected"] keys, and the flow log's
# "rejected_<why>" reasons.
REJECT_REASONS: tuple[str, ...] = ("maxconn", "maxconn_per_source")
_server_ids = itertools.count(1)  # rate-limited log keys per Server (id() values get reused)


@dataclass(slots=True, eq=False)
class _Listener:
    tag: int
    name: str
    sock: socket.socket
    owned: bool  # opened here (closed here) or inherited (left to the caller)
    router: Router | None = None  # set once every listener is bound (own addresses known)
    open: int = 0
    total: int = 0
    accept_errors: int = 0
    paused: bool = False  # inside an accept-error pause episode
    active: bool = True  # registered with the loop


@dataclass(slots=True, eq=False)
class _Flow:
    listener: _Listener
    client: Any
    source: bytes | None  # key of the per-source limit (relay.serve.limits), None when not limited
    dest: tuple
    egress: tuple | None
    egress_address: str | None
    serial: int = 0  # the n of the session id "<pid>-<n>"


@dataclass(slots=True)
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def snapshot(self) -> dict[str, Any]:
        return _histogram_snapshot(self.bounds, self.counts, self.total, self.n)


def _histogram_snapshot(bounds: tuple[float, ...], counts: list[int], total: float,
                        n: int) -> dict[str, Any]:
    """Per-bucket counts (+Inf last), their sum and number in the cumulative shape stats()
    documents (a Prometheus HistogramMetricFamily's)."""
    buckets: list[tuple[str, int]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        buckets.append((repr(bound), running))
    buckets.append(("+Inf", n))
    return {"buckets": buckets, "sum": total, "count": n}


class Server:
    """One worker's relay: listeners -> routers -> engine loop. See the module docstring.

    The engine loop is created in the constructor and must then be driven by one thread only:
    the one running ``serve_forever()``. ``stats()``, ``request_stop()``, ``stop()`` and
    ``bound_addresses()`` are safe from any thread (``request_stop`` from a signal handler).
    """

    def __init__(self, cfg: Config, engine: str | None = None,
                 sockets: dict[str, socket.socket] | None = None, *,
                 udp_slot: tuple[int, int] = (0, 1), udp_supervised: bool = False,
                 udp_on_released: Any = None, limits: tuple[Any, int] | None = None) -> None:
        """``udp_slot``: (worker slot, workers) whose share of each egress slice UDP flows use
        (docs/udp.md); ``udp_supervised``: UDP starts on ``start_udp()`` and ends on
        ``release_udp()`` or at the end of ``serve_forever`` (the supervisor sequences it across
        generations), else it starts with ``serve_forever`` and ends on any stop request.
        ``limits``: (relay_ext._limits.SharedLimits, this worker's slot) when the workers of a
        generation share their counters (relay.process.worker)."""
        self.cfg = cfg
        self._id = next(_server_ids)
        settings = cfg.relay
        workers = settings.resolved_workers
        self._maxconn: int = settings.maxconn_per_worker(workers)
        per_source = int(settings.maxconn_per_source)
        self._shared: Any = limits[0] if limits is not None else None
        self._slot: int = limits[1] if limits is not None else 0
        self._source_prefix = int(settings.ipv6_source_prefix)
        if self._shared is not None:
            self._maxconn_per_source = per_source  # exact over all workers
        else:
            self._maxconn_per_source = -(-per_source // workers) if per_source else 0
        self._flowlog: FlowLog | None = (
            FlowLog(capacity=int(settings.flow_log_buffer),
                    interval=float(settings.flow_log_flush)) if settings.flow_log else None)
        self._drain_timeout = float(settings.drain_timeout)

        self._listeners: list[_Listener] = []
        self._flows: dict[int, _Flow] = {}
        self._per_source: dict[bytes, int] = {}
        self._egress_in_use: dict[str, int] = {}
        self._closed_by_reason: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self._denied: dict[str, int] = {}
        self._rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._accepted = 0
        self._open = 0
        self._serials = itertools.count(1)
        self._control: Callable[[], None] | None = None
        self._control_at = 0.0

        self._stop_requested = False
        self._stop_drain = True
        self._stop_timeout: float | None = None
        self._draining = False
        self._finished = threading.Event()
        self._serving = False
        self._serve_thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self._loop_closed = False
        self._udp: UdpService | None = None
        self._udp_supervised = udp_supervised
        self._udp_on_released_direct = udp_on_released  # no UDP listener: answer at once
        self._udp_sockets: list[tuple[int, Any, socket.socket, bool]] = []  # tag, cfg, sock, owned

        sockets = dict(sockets or {})
        tcp_cfgs = [lcfg for lcfg in cfg.listener if not lcfg.is_udp]
        try:
            for tag, lcfg in enumerate(cfg.listener):
                inherited = sockets.pop(lcfg.name, None)
                if lcfg.is_udp:
                    if inherited is None:
                        inherited_udp = open_udp_listeners(
                            lcfg.bind_address, 1, transparent=lcfg.transparent)[0]
                        self._udp_sockets.append((tag, lcfg, inherited_udp, True))
                    else:
                        inherited.setblocking(False)
                        self._udp_sockets.append((tag, lcfg, inherited, False))
                    continue
                if inherited is None:
                    sock = open_listener(lcfg.bind_address, transparent=lcfg.transparent)
                else:
                    sock = inherited
                sock.setblocking(False)
                self._listeners.append(
                    _Listener(len(self._listeners), lcfg.name, sock, inherited is None))
            own = self._own_addresses()
            for lst, lcfg in zip(self._listeners, tcp_cfgs, strict=True):
                lst.router = Router(lcfg, cfg, own)
            if self._udp_sockets:
                self._udp = UdpService(
                    cfg, [(tag, lcfg, sock) for tag, lcfg, sock, _o in self._udp_sockets], own,
                    slot=udp_slot[0], nworkers=udp_slot[1], flow_log=self._flowlog,
                    on_released=udp_on_released)
            name = engine or settings.engine
            options = settings.loop_options(workers)
            if self._shared is not None:
                # The kernel may give one worker more than its share: admission is counted
                # over all workers, so each table can hold them all (calloc: untouched
                # entries cost address space only).
                options["max_conns"] = settings.maxconn
            self._loop, self.engine_reason = engines.create(name, **options)
            self.engine_name: str = self._loop.backend
            self._loop.set_connect_buckets(_CONNECT_BOUNDS_US)
            # The core engines open and connect an IP backend's upstream themselves.
            self._add_pair_connect: Callable[..., int] | None = getattr(
                self._loop, "add_pair_connect", None)
            core_admits = self._let_core_admit()
            # connect_to: the core engines only (_let_core_admit), not in EngineLoop
            add_listener: Callable[..., None] = self._loop.add_listener
            for lst in self._listeners:
                if core_admits and self._accepts_in_core(lst):
                    assert lst.router is not None
                    add_listener(lst.sock.fileno(), lst.tag,
                                 connect_to=lst.router.backend_sockaddr)
                else:
                    add_listener(lst.sock.fileno(), lst.tag, local_address=(
                        lst.router is not None and lst.router.wants_local))
            self._header_waits = HeaderWaits(self._loop, float(settings.proxy_header_timeout),
                                             int(settings.proxy_header_max_waiting))
        except BaseException:
            self._close_listeners()
            self._close_udp_sockets()
            loop = getattr(self, "_loop", None)
            if loop is not None:
                loop.close()
            raise
        if sockets:
            log.warning("inherited sockets for unknown listeners ignored: %s",
                        ", ".join(sorted(sockets)))
        self._loop_stats: dict[str, int] = self._loop.stats()
        self._connect_hist: tuple[list[int], int, int] = self._loop.connect_histogram()
        self._loop_stats_at = time.monotonic()
        from relay.serve.handoff import Handoff

        self.handoff = Handoff(self)  # reload handoff: hand_over_to() / adopt_from()
        log.info("server: engine %s (%s); listeners: %s", self.engine_name, self.engine_reason,
                 ", ".join([f"{lst.name}={format_address(lst.sock.getsockname())}"
                            for lst in self._listeners]
                           + [f"{lcfg.name}=udp:{format_address(sock.getsockname())}"
                              for _t, lcfg, sock, _o in self._udp_sockets]))

    def _let_core_admit(self) -> bool:
        """Hand the workers' shared counters to the core when it can admit clients exactly as
        _on_accept would (no per-source limit: a source key is Python's policy; the global
        count is one acquire the core makes under the same lock, Loop.set_limits). True when
        it did."""
        set_limits = getattr(self._loop, "set_limits", None)
        if set_limits is None or self._shared is None or self._maxconn_per_source:
            return False
        set_limits(self._shared, self._slot)
        return True

    def _accepts_in_core(self, lst: _Listener) -> bool:
        """Does this listener need nothing per connection from Python before its pair starts
        (an IP client relayed to an IP backend: no PROXY header read or sent, no socket
        object, no local address)? Then the core accepts and connects it (add_listener's
        connect_to), and Python hears of it once, as EV_PAIR."""
        router = lst.router
        return (router is not None and router.backend_sockaddr is not None
                and self._add_pair_connect is not None
                and lst.sock.family in (socket.AF_INET, socket.AF_INET6)
                and not (router.proxy_v2 or router.any_trusted or router.needs_socket
                         or router.wants_local))

    def _own_addresses(self) -> set[str]:
        own: set[str] = {e.address for e in self.cfg.egress}
        for lst in self._listeners:
            if lst.sock.family in (socket.AF_INET, socket.AF_INET6):
                host = lst.sock.getsockname()[0]
                if host not in ("0.0.0.0", "::"):
                    own.add(host)
        for _tag, _lcfg, sock, _owned in self._udp_sockets:
            host = sock.getsockname()[0]
            if host not in ("0.0.0.0", "::"):
                own.add(host)
        return own

    # -- public API ----------------------------------------------------------------------------

    def bound_addresses(self) -> dict[str, tuple]:
        """Listener name -> ``getsockname()`` (a path str for unix listeners)."""
        out = {lst.name: lst.sock.getsockname() for lst in self._listeners}
        out.update({lcfg.name: sock.getsockname() for _t, lcfg, sock, _o in self._udp_sockets})
        return out

    def start_udp(self) -> None:
        """Start reading the UDP listeners (supervised workers: when the supervisor says)."""
        if self._udp is not None and not self._loop_closed:
            self._udp.start()

    def release_udp(self, reason: str = "closed") -> None:
        """Stop UDP now: every UDP flow ends with ``reason``; ``udp_on_released`` is called
        once done (from the UDP thread, or from here if UDP never started). Any thread."""
        if self._udp is not None:
            self._udp.release(reason)
        elif self._udp_on_released_direct is not None:
            self._udp_on_released_direct()

    def request_stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Ask ``serve_forever`` to stop: ``drain`` lets open pairs finish until ``timeout``
        (default ``relay.drain_timeout``) then aborts them; ``drain=False`` aborts at once.
        Only sets attributes, so it is safe from a signal handler; a later call may shorten a
        drain (TERM then INT) but never lengthen it."""
        if self._udp is not None and not self._udp_supervised:
            self._udp.release("closed")
        if self._stop_requested and not drain:
            self._stop_drain = False
        elif not self._stop_requested:
            self._stop_drain = drain
            self._stop_timeout = timeout
        self._stop_requested = True

    def start_thread(self) -> threading.Thread:
        """Run ``serve_forever`` in a daemon thread; returns the thread."""
        if self._thread is not None:
            raise RuntimeError("server already started in a thread")
        self._thread = threading.Thread(target=self._serve_in_thread, name="relay-server",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let pairs finish until ``drain_timeout`` seconds (default
        ``relay.drain_timeout``), abort the rest, release everything; waits for the serving
        thread when called from another one."""
        self.request_stop(drain=True, timeout=drain_timeout)
        if self._serve_thread_id == threading.get_ident():
            return  # called from inside serve_forever: it returns at its next iteration
        if self._serving or self._thread is not None:
            self._finished.wait()
            if self._thread is not None:
                self._thread.join()
        else:
            self._shutdown()  # never served: nothing else touches the loop

    def serve_forever(self, *, wake_on_signals: bool = False) -> None:
        """Accept and relay until a stop is requested and the drain is over.

        ``wake_on_signals`` (main thread only: ``relay run``'s workers): any signal ends the
        loop's wait at once, whichever thread took it (relay.serve.signalwake)."""
        if self._serving or self._loop_closed:
            raise RuntimeError("serve_forever: server already running or stopped")
        self._serving = True
        self._serve_thread_id = threading.get_ident()
        if not self._udp_supervised:
            self.start_udp()
        if self._flowlog is not None:
            self._flowlog.start()
        loop = self._loop
        run = loop.run
        dispatch = self._dispatch
        deadline = 0.0
        aborted_at = 0.0
        wakeup: SignalWakeup | None = None
        try:
            if wake_on_signals:
                wakeup = SignalWakeup(loop)
            while True:
                if self._stop_requested:
                    if not self._draining:
                        deadline = self._begin_drain()
                    elif not self._stop_drain and deadline > time.monotonic():
                        deadline = time.monotonic()  # a fast stop after a drain request
                    if not self._flows and not self._header_waits and not self.handoff.sending:
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        if not aborted_at:
                            self.handoff.give_up()
                            self._abort_all()
                            aborted_at = now
                        elif now - aborted_at > _ABORT_GRACE_S:
                            log.error("server: %d pairs still open %.1fs after abort; "
                                      "closing the loop", len(self._flows), _ABORT_GRACE_S)
                            break
                events = run(self.handoff.poll_ms(_POLL_MS))
                if events:
                    dispatch(events)
                if self.handoff.active:
                    self.handoff.step()
                now = time.monotonic()
                if now - self._loop_stats_at >= _STATS_REFRESH_S:
                    self._refresh_loop_stats()
                if self._control is not None and now >= self._control_at:
                    self._control_at = now + _CONTROL_POLL_S
                    self._control()
        finally:
            if wakeup is not None:
                wakeup.close()  # before the loop closes the pipe
            self._shutdown()
            self._finished.set()

    def stats(self) -> dict[str, Any]:
        """Counters of this worker: the loop's stats merged with the server's.

        Flat ints (everything the engine loop reports, e.g. ``conns_open``, ``conns_total``,
        ``bytes_spliced``, ``bytes_copied``, ``pipes_in_use``, ``pipes_free``, ``pipes_created``,
        ``pipe_size_granted``, ``pipe_refused``, ``accepts``, ``accept_errors``,
        ``accept_paused``; the loop part is a snapshot at most 0.25 s old when read from another
        thread), plus the server's own:

        * ``flows_open``: pairs handed to the loop and not finished (gauge)
        * ``flows_accepted``: accepted connections, including the ones refused below (counter)
        * ``maxconn``, ``maxconn_per_source``: this worker's limits (0 = unlimited)
        * ``draining``: 1 while stopping
        * ``accept_paused_listeners``: listeners inside an accept-error pause episode (gauge)
        * ``flowlog_dropped``: flow log records dropped, the log destination did not keep up
          (counter)

        Labelled families are nested ``{label: int}`` dicts:

        * ``closed``: ``{reason: count}`` for every ``relay.engines.CLOSE_REASONS`` (all present, 0
          included): how relayed pairs ended, plus upstreams that failed before relaying
          (``refused``, ``unreachable``, ``error``) (counter)
        * ``denied``: ``{router reason: count}`` (``relay.serve.routing.DENY_REASONS``: policy reasons,
          ``loop``, ``slice_exhausted``...), clients reset before any upstream (counter)
        * ``rejected``: ``{limit: n}`` for every ``REJECT_REASONS``: over-limit clients (counter)
        * ``listener_open`` / ``listener_total``: ``{listener name: n}`` (gauge / counter)
        * ``egress_ports_in_use``: ``{egress address: slice ports held}`` (gauge)

        ``connect_seconds`` is a histogram of upstream connect latency, counted by the engine
        loop (``connect_histogram()``, as fresh as the loop's counters):
        ``{"buckets": [(upper bound as str, cumulative count), ..., ("+Inf", count)],
        "sum": seconds (float), "count": n}`` (ready for a Prometheus HistogramMetricFamily).
        """
        if self._serve_thread_id == threading.get_ident() and not self._loop_closed:
            self._refresh_loop_stats()
        s: dict[str, Any] = dict(self._loop_stats)
        s["flows_open"] = self._open
        s["proxy_header_waiting"] = len(self._header_waits)
        s["flows_accepted"] = self._accepted
        s["maxconn"] = self._maxconn
        s["maxconn_per_source"] = self._maxconn_per_source
        s["draining"] = int(self._draining)
        s["accept_paused_listeners"] = sum(1 for lst in self._listeners if lst.paused)
        s["closed"] = dict(self._closed_by_reason)
        s["denied"] = dict(self._denied)
        s["rejected"] = dict(self._rejected)
        s["listener_open"] = {lst.name: lst.open for lst in self._listeners}
        s["listener_total"] = {lst.name: lst.total for lst in self._listeners}
        s["egress_ports_in_use"] = dict(self._egress_in_use)
        counts, sum_us, n = self._connect_hist  # the loop counts connect times (us)
        s["connect_seconds"] = _histogram_snapshot(CONNECT_BUCKETS, counts, sum_us / 1e6, n)
        s.update(self.handoff.stats())
        if self._udp is not None:
            s.update(self._udp.stats())
        s["flowlog_dropped"] = self._flowlog.dropped if self._flowlog is not None else 0
        return s

    def set_control_hook(self, fn: Callable[[], None] | None) -> None:
        """Run ``fn()`` in the serving thread between two ``loop.run()`` calls, at most every
        50 ms: the one place another process may get answers that need the loop (the worker's
        session requests). ``fn`` must not block."""
        self._control = fn

    def sessions(self, flt: SessionFilter | None = None) -> list[Session]:
        """The open connections that ``flt`` matches (all without one). Reads the engine loop:
        call it from the serving thread (the control hook), or before/without serving."""
        return [self._session(flow, info) for flow, info in self._matching(flt)]

    def kill_sessions(self, flt: SessionFilter) -> list[Session]:
        """Reset the sessions ``flt`` matches (close reason "killed"); returns them as they
        were. Same thread rule as ``sessions()``."""
        killed = []
        for flow, info in self._matching(flt):
            if self._loop.kill(info[0]):
                killed.append(self._session(flow, info))
        return killed

    def _matching(self, flt: SessionFilter | None) -> list[tuple[_Flow, tuple]]:
        if self._loop_closed:
            return []
        flt = flt or SessionFilter()
        ids = set(flt.ids)
        pid = os.getpid()
        dest = address_matcher(flt.destination) if flt.destination else None
        source = address_matcher(flt.source) if flt.source else None
        out = []
        for info in self._loop.pairs():
            flow = self._flows.get(info[0])
            if flow is None:
                continue  # finished in the core, its EV_DONE not read yet
            if ((flt.listener and flow.listener.name != flt.listener)
                    or (ids and f"{pid}-{flow.serial}" not in ids)
                    or (dest is not None and not dest(flow.dest))
                    or (source is not None and not source(flow.client))):
                continue
            out.append((flow, info))
        return out

    def _session(self, flow: _Flow, info: tuple) -> Session:
        _cid, _tag, connecting, c2s, s2c, age_us, idle_us = info
        pid = os.getpid()
        return Session(id=f"{pid}-{flow.serial}", worker=pid, listener=flow.listener.name,
                       client=format_addr(flow.client), dest=format_addr(flow.dest),
                       egress=format_addr(flow.egress),
                       state="connecting" if connecting else "relaying", c2s_bytes=c2s,
                       s2c_bytes=s2c, age=age_us / 1e6, idle=idle_us / 1e6,
                       engine=self.engine_name)

    def reopen_flow_log(self) -> None:
        """After ``relay.ops.log.reopen()``: the flow log writer writes what waits to the old
        file, then continues in the new one. Only sets a flag: safe in a signal handler."""
        if self._flowlog is not None:
            self._flowlog.request_reopen()

    # -- event handling ------------------------------------------------------------------------

    def _dispatch(self, events: list[tuple[Any, ...]]) -> None:
        # Every connection is two events (accept, done; its connect time is counted in the
        # loop): handlers bound once.
        on_pair = self._on_pair
        on_accept = self._on_accept
        on_done = self._on_done
        for ev in events:
            kind = ev[0]
            if kind == EV_PAIR:
                on_pair(ev[1], ev[2], ev[3])
            elif kind == EV_ACCEPT:
                on_accept(ev[1], ev[2], ev[3], ev[4])
            elif kind == EV_DONE:
                on_done(ev)
            elif kind == EV_READABLE or kind == EV_WATCH_TIMEOUT:
                self._on_header_wait_over(ev[2], kind == EV_WATCH_TIMEOUT)
            elif kind == EV_ACCEPT_ERROR:
                self._on_accept_error(ev[1], ev[2])

    def _accepted_on(self, tag: int) -> _Listener:
        """Count a client the listener `tag` accepted; an accept that works ends a pause."""
        lst = self._listeners[tag]
        self._accepted += 1
        if lst.paused:
            lst.paused = False
            log.info("listener %s: accepting again (%d accept errors during the pause)",
                     lst.name, lst.accept_errors)
        return lst

    def _on_accept(self, tag: int, fd: int, peer: tuple | None, local: tuple | None) -> None:
        lst = self._accepted_on(tag)
        router = lst.router
        assert router is not None
        # The engine's accept gave the peer (and the local address the router wants): a socket
        # object is built only where one is used (its constructor's validating getsockname()
        # is a system call): unix clients, redirect's conntrack lookup, rejects, PROXY headers.
        client = None
        if peer is None or router.needs_socket or (local is None and router.wants_local):
            client = _client_socket(lst, fd)
            if peer is None:
                try:
                    peer = client.getpeername()
                except OSError:
                    client.close()  # reset before we got to it: nothing to relay, nobody to tell
                    return
        source = None
        if self._maxconn_per_source and lst.sock.family != socket.AF_UNIX:
            assert peer is not None
            source = source_key(peer[0], self._source_prefix)
        if self._shared is not None:
            # Admitted here, counted until _on_done, or until _release on any path where the
            # client is not relayed after all.
            verdict = self._shared.acquire(self._slot, source)
            if verdict:
                self._reject(client or _client_socket(lst, fd), lst,
                             VERDICT_REASONS.get(verdict, "maxconn"), peer)
                return
        else:
            if self._open + len(self._header_waits) >= self._maxconn:
                self._reject(client or _client_socket(lst, fd), lst, "maxconn", peer)
                return
            if source is not None and self._per_source.get(source, 0) >= self._maxconn_per_source:
                self._reject(client or _client_socket(lst, fd), lst, "maxconn_per_source", peer)
                return
        if router.any_trusted and router.needs_header(client, peer):
            if client is None:
                client = _client_socket(lst, fd)
            waiting = Waiting(lst, tag, client, peer, source)
            try:
                info = self._header_waits.begin(waiting)
            except (Denied, OSError) as exc:
                self._header_failed(waiting, exc)
                return
            if info is not None:
                self._relay(lst, tag, client, peer, source, info)
            return
        if client is None and router.backend_sockaddr is not None and self._add_pair_connect:
            self._relay_to_backend(lst, tag, None, fd, peer, source, None, local)
            return
        self._relay(lst, tag, client if client is not None else fd, peer, source, None, local)

    def _on_pair(self, cid: int, tag: int, peer: tuple | None) -> None:
        """A connect_to listener's client, admitted (its count held in the shared counters),
        connected and relayed by the core: what _on_accept -> _relay_to_backend would have
        done is done; track it."""
        lst = self._accepted_on(tag)
        router = lst.router
        assert router is not None and router.backend_dest is not None
        self._track(cid, _Flow(lst, peer, None, router.backend_dest, None, None))
        lst.total += 1

    def _on_header_wait_over(self, fd: int, timed_out: bool) -> None:
        waiting = self._header_waits.pop(fd)
        if waiting is None:
            return
        try:
            info = self._header_waits.resume(waiting, timed_out)
        except (Denied, OSError) as exc:
            self._header_failed(waiting, exc)
            return
        if info is not None:
            self._relay(waiting.listener, waiting.tag, waiting.client, waiting.peer,
                        waiting.source, info)

    def _header_failed(self, waiting: Waiting, exc: Denied | OSError) -> None:
        if isinstance(exc, Denied):
            self._deny(waiting.listener, waiting.client, waiting.peer, waiting.source, exc)
            return
        # The client reset (or broke) its connection before its header was complete.
        self._release(waiting.source)
        self._closed_by_reason["reset_client"] += 1
        reset_and_close(waiting.client)
        self._log_unrelayed(waiting.listener, waiting.peer, None, "reset_client",
                            exc.errno or 0)

    def _deny(self, lst: _Listener, client: socket.socket, peer: Any, source: bytes | None,
              exc: Denied) -> None:
        self._release(source)
        self._denied[exc.reason] = self._denied.get(exc.reason, 0) + 1
        # In tproxy mode the local address is where the client was going: log it.
        router = lst.router
        dest = _local_address(client) if router is not None and router.mode == "tproxy" else None
        reset_and_close(client)
        self._log_unrelayed(lst, peer, dest, "denied_" + exc.reason, 0)

    def _relay(self, lst: _Listener, tag: int, client: socket.socket | int, peer: Any,
               source: bytes | None, header: ProxyInfo | None,
               local: tuple | None = None) -> None:
        """Open the upstream (the client's header, if any, already read) and hand the pair to
        the loop. `client`: the accepted socket, or its bare fd when the router needs no socket
        (peer and `local` came with the accept)."""
        router = lst.router
        assert router is not None
        sock = client if isinstance(client, socket.socket) else None
        if router.backend_sockaddr is not None and self._add_pair_connect is not None:
            self._relay_to_backend(lst, tag, sock, client, peer, source, header, local)
            return
        try:
            up = router.open_upstream(sock, peer, header, header_read=True, local=local)
        except Denied as exc:
            self._deny(lst, sock or _client_socket(lst, client), peer, source, exc)
            return
        except OSError as exc:
            self._upstream_failed(lst, sock or _client_socket(lst, client), peer, source,
                                  exc.errno or 0)
            return
        client_fd = sock.detach() if sock is not None else client
        assert isinstance(client_fd, int)
        try:
            # The client fd is as EV_ACCEPT gave it; every upstream is made SOCK_NONBLOCK
            # (routing.py): the core skips re-checking them.
            cid = self._loop.add_pair(client_fd, up.fd, tag, up.connecting, up.prefix,
                                      client_accepted=True, upstream_nonblocking=True)
        except (OSError, ValueError) as exc:
            # The pair was refused (table full...): the fds are still ours.
            reset_and_close(socket.socket(fileno=up.fd))
            self._pair_refused(lst, client_fd, source, exc)
            return
        self._track(cid, _Flow(lst, peer, source, up.dest, up.egress, up.egress_address))
        lst.total += 1

    def _relay_to_backend(self, lst: _Listener, tag: int, sock: socket.socket | None,
                          client: socket.socket | int, peer: Any, source: bytes | None,
                          header: ProxyInfo | None, local: tuple | None) -> None:
        """_relay for an IP backend: the core opens and connects the upstream itself
        (Loop.add_pair_connect, to the address the router packed once), same outcomes."""
        router = lst.router
        assert router is not None
        prefix = b""
        if router.proxy_v2:
            try:
                prefix = router.backend_prefix(sock, peer, header, local)
            except OSError as exc:
                self._upstream_failed(lst, sock or _client_socket(lst, client), peer, source,
                                      exc.errno or 0)
                return
        client_fd = sock.detach() if sock is not None else client
        assert isinstance(client_fd, int) and self._add_pair_connect is not None
        try:
            cid = self._add_pair_connect(client_fd, router.backend_sockaddr, tag, prefix,
                                         client_accepted=True)
        except (OSError, ValueError) as exc:
            self._pair_refused(lst, client_fd, source, exc)
            return
        if cid < 0:  # socket() or connect() failed at once: -errno
            self._upstream_failed(lst, _client_socket(lst, client_fd), peer, source, -cid)
            return
        dest = router.backend_dest
        assert dest is not None  # set with backend_sockaddr
        self._track(cid, _Flow(lst, peer, source, dest, None, None))
        lst.total += 1

    def _upstream_failed(self, lst: _Listener, client: socket.socket, peer: Any,
                         source: bytes | None, err: int) -> None:
        """No upstream (socket or connect failed at once): reset the client, count, log."""
        self._release(source)
        reason = CLOSE_REASONS[connect_failure_reason(err)]
        self._closed_by_reason[reason] += 1
        reset_and_close(client)
        if err in ACCEPT_PAUSE_ERRNOS:
            # Out of descriptors/memory after accept() worked (io_uring's accept keeps the
            # RLIMIT_NOFILE it read when armed): new clients are refused fast, logged once.
            log_every(log, f"upstream resources {self._id}", _LIMIT_LOG_INTERVAL_S,
                      "listener %s: cannot open an upstream socket: %s; clients are reset "
                      "until resources are back", lst.name, _strerror(err),
                      listener=lst.name, errno=err)
        self._log_unrelayed(lst, peer, None, reason, err)

    def _pair_refused(self, lst: _Listener, client_fd: int, source: bytes | None,
                      exc: Exception) -> None:
        """The engine refused the pair (table full...): the client fd is still ours."""
        self._release(source)
        reset_and_close(socket.socket(fileno=client_fd))
        log_every(log, "add_pair failed", _LIMIT_LOG_INTERVAL_S,
                  "listener %s: engine refused a pair: %s; client reset", lst.name, exc)
        self._closed_by_reason["error"] += 1

    def _track(self, cid: int, flow: _Flow) -> None:
        """Count a pair the loop relays from now on: accepted here, or adopted in a handoff
        (relay.serve.handoff). It gets the next session serial."""
        flow.serial = next(self._serials)
        self._flows[cid] = flow
        self._open += 1
        flow.listener.open += 1
        if flow.source is not None and self._shared is None:
            self._per_source[flow.source] = self._per_source.get(flow.source, 0) + 1
        if flow.egress_address is not None:
            self._egress_in_use[flow.egress_address] = (
                self._egress_in_use.get(flow.egress_address, 0) + 1)

    def _forget(self, flow: _Flow) -> None:
        """Uncount a pair that left the loop (closed, or exported in a handoff); no log line."""
        self._open -= 1
        flow.listener.open -= 1
        if self._shared is not None:
            self._shared.release(self._slot, flow.source)
        elif flow.source is not None:
            left = self._per_source[flow.source] - 1
            if left:
                self._per_source[flow.source] = left
            else:
                del self._per_source[flow.source]
        if flow.egress_address is not None:
            self._egress_in_use[flow.egress_address] -= 1

    def _reject(self, client: socket.socket, lst: _Listener, limit: str, peer: Any) -> None:
        self._rejected[limit] += 1
        assert lst.router is not None
        dest = _local_address(client) if lst.router.mode == "tproxy" else None
        reset_and_close(client)
        log_every(log, f"rejected {limit}", _LIMIT_LOG_INTERVAL_S,
                  "listener %s: %s reached (%d); client %s reset", lst.name, limit,
                  (self.cfg.relay.maxconn if self._shared is not None else self._maxconn)
                  if limit == "maxconn" else self._maxconn_per_source, format_address(peer))
        self._log_unrelayed(lst, peer, dest, "rejected_" + limit, 0)

    def _release(self, source: bytes | None) -> None:
        """Give back an admitted client's count (shared limits only: without them the local
        counters only ever count relayed pairs)."""
        if self._shared is not None:
            self._shared.release(self._slot, source)

    def _log_unrelayed(self, lst: _Listener, peer: Any, dest: tuple | None, reason: str,
                       err: int) -> None:
        if self._flowlog is not None:
            self._flowlog.add((time.time(), lst.name, peer, dest, None, 0, 0, 0, 0, 0, reason,
                               err, "tcp", -1, -1))

    def _on_done(self, ev: tuple[Any, ...]) -> None:
        (_kind, cid, _tag, reason, c2s, s2c, spliced, copied, duration_us, err) = ev
        name = CLOSE_REASONS[reason]
        self._closed_by_reason[name] += 1
        flow = self._flows.pop(cid, None)
        if flow is None:
            return
        self._forget(flow)
        if self._flowlog is not None:
            self._flowlog.add((time.time(), flow.listener.name, flow.client, flow.dest,
                               flow.egress, c2s, s2c, spliced, copied, duration_us, name, err,
                               "tcp", -1, -1))

    def _on_accept_error(self, tag: int, err: int) -> None:
        lst = self._listeners[tag]
        lst.accept_errors += 1
        if lst.paused:
            return
        lst.paused = True
        # One line per pause episode, and episodes themselves at most one line per interval.
        log_every(log, f"accept paused {self._id} {lst.name}", _LIMIT_LOG_INTERVAL_S,
                  "listener %s: accept failed: %s; accepting paused, the engine resumes it "
                  "after a backoff (100 ms to 1 s)", lst.name, _strerror(err),
                  listener=lst.name, errno=err)

    # -- stopping ------------------------------------------------------------------------------

    def _begin_drain(self) -> float:
        self._draining = True
        for lst in self._listeners:
            self._deactivate_listener(lst)
        self._close_listeners(owned_only=True)
        timeout = self._stop_timeout if self._stop_timeout is not None else self._drain_timeout
        if not self._stop_drain:
            timeout = 0.0
        if self._flows:
            log.info("server: stopping; %d pairs open, draining for up to %.1fs",
                     len(self._flows), timeout)
        return time.monotonic() + timeout

    def _abort_all(self) -> None:
        if self._flows:
            log.warning("server: drain deadline reached; aborting %d pairs", len(self._flows))
        for cid in list(self._flows):
            self._loop.abort(cid)
        self._reset_header_waits()

    def _reset_header_waits(self) -> None:
        """Reset every client still waiting for its header (stopping)."""
        for waiting in self._header_waits:
            self._header_waits.discard(waiting)
            self._release(waiting.source)
            self._closed_by_reason["aborted"] += 1
            reset_and_close(waiting.client)

    def _deactivate_listener(self, lst: _Listener) -> None:
        if lst.active and not self._loop_closed:
            lst.active = False
            try:
                self._loop.remove_listener(lst.tag)
            except (KeyError, ValueError, OSError) as exc:
                log.warning("listener %s: remove_listener: %s", lst.name, exc)

    def _close_listeners(self, owned_only: bool = False) -> None:
        for lst in self._listeners:
            if lst.owned and lst.sock.fileno() >= 0:
                path = lst.sock.getsockname() if lst.sock.family == socket.AF_UNIX else None
                lst.sock.close()
                if path:
                    _unlink_unix_listener(str(path))
        if not owned_only:
            for lst in self._listeners:
                if lst.router is not None:
                    lst.router.close()

    def _shutdown(self) -> None:
        if self._loop_closed:
            return
        if self._udp is not None:
            if self._udp_supervised and self._udp.started:
                # The supervisor says how UDP flows end (UdpRelease "reload" or "closed")
                # before it signals a worker to stop, but the command reader thread may not
                # have passed it on yet when the signal (which wakes the loop at once) ends
                # serve_forever: give it a moment, or every flow of a reload ends "closed".
                self._udp.wait_release_requested(_UDP_RELEASE_ORDER_GRACE_S)
            self._udp.release("closed")
            if not self._udp.wait_released(5.0):
                log.error("server: the UDP loop did not stop within 5s")
            self._udp.join(1.0)
        self._close_udp_sockets()
        self._draining = True
        for lst in self._listeners:
            self._deactivate_listener(lst)
        self._refresh_loop_stats()
        self.handoff.close()
        self._reset_header_waits()
        # close() resets whatever is still open; their EV_DONE will never be read.
        self._loop.close()
        self._loop_closed = True
        for _cid, flow in list(self._flows.items()):
            self._closed_by_reason["aborted"] += 1
            flow.listener.open -= 1
            self._release(flow.source)
        self._flows.clear()
        self._per_source.clear()
        self._open = 0
        self._egress_in_use = dict.fromkeys(self._egress_in_use, 0)
        self._close_listeners()
        self._loop_stats["conns_open"] = 0
        if self._flowlog is not None:
            self._flowlog.close()

    def _close_udp_sockets(self) -> None:
        for _tag, _lcfg, sock, owned in self._udp_sockets:
            if owned:
                sock.close()

    def _refresh_loop_stats(self) -> None:
        self._loop_stats = self._loop.stats()
        self._connect_hist = self._loop.connect_histogram()
        self._loop_stats_at = time.monotonic()

    def _serve_in_thread(self) -> None:
        try:
            self.serve_forever()
        except BaseException:
            log.exception("server thread crashed")
            raise
        finally:
            self._finished.set()  # even if serve_forever refused to start: stop() must return


def _strerror(err: int) -> str:
    return f"{errno_mod.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _unlink_unix_listener(path: str) -> None:
    if path.startswith(UNIX_PREFIX):
        path = path[len(UNIX_PREFIX):]
    try:
        os.unlink(path)
    except OSError:
        pass


def _client_socket(lst: _Listener, client: socket.socket | int) -> socket.socket:
    """The accepted client as a socket object (from its fd, as EV_ACCEPT gave it)."""
    if isinstance(client, socket.socket):
        return client
    # type and proto given: socket(fileno=) would ask the kernel for them (SO_TYPE and
    # SO_PROTOCOL, two system calls; its validating getsockname() stays).
    return socket.socket(lst.sock.family, socket.SOCK_STREAM, 0, client)


def _local_address(sock: socket.socket) -> tuple | None:
    try:
        return tuple(sock.getsockname())
    except OSError:
        return None
