"""One worker's UDP service: a UdpLoop driven by its own thread, next to the TCP loop.

    svc = UdpService(cfg, listeners, own_addresses, slot=0, nworkers=1, flow_log=True)
    svc.start()              # creates the UdpLoop in the new thread and reads the listeners
    svc.release("reload")    # from any thread: stop reading, close every flow now, close the loop
    svc.wait_released(t)     # True once released (``on_released`` was called)
    svc.stats()              # the udp_* keys of Server.stats() (docs/udp.md), any thread

The core releases the GIL while it waits and moves datagrams, so this thread costs the TCP loop
nothing but the Python work of flow decisions. ``listeners`` are (tag, Listener, socket) of the
UDP listeners; the sockets stay the caller's (the loop keeps its own dup while it needs one).

A backend listener's flows are opened by the core itself (a socket connected to the backend:
the same decision for every client), so Python sees them only when they end. On UEV_NEW_FLOW
(tproxy listeners, or a backend flow the core could not open) the listener's UdpRouter opens
the flow's sockets (policy, loop guard, egress slice port from this worker's allocator);
refused flows are held in C for a moment (refuse_flow) so a client that keeps sending costs no
Python work. On UEV_FLOW_DONE the slice port goes back to the allocator and the flow is logged. A release ends every flow with the given
reason (``reload`` when the supervisor hands UDP over to a new generation, ``closed`` at stop).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.config.model import Config, Listener
from relay.ops.log import log_every
from relay.serve.egress import EgressTable
from relay.serve.flowlog import FlowLog
from relay.serve.routing import Denied
from relay.serve.udp_ports import PortAllocator
from relay.serve.udp_routing import UdpFlow, UdpRouter
from relay.sock import format_address

__all__ = ["DROP_REASONS", "REFUSE_HOLD_MS", "UDP_CLOSE_REASONS", "UdpService", "udp_listeners_of"]

log = logging.getLogger("relay.udp")

_POLL_MS = 100  # longest wait in loop.run(): bounds how late a release is noticed
_STATS_REFRESH_S = 0.25
_LOG_INTERVAL_S = 10.0
# A refused key's later datagrams are dropped in C for this long (no event, no Python work):
# a client retrying a denied destination, or a flood of new keys, cannot keep Python busy.
REFUSE_HOLD_MS = 1000
# Slice exhaustion is a transient state (a flow towards that destination ends): hold shorter.
EXHAUSTED_HOLD_MS = 250
# After a release, flows keep relaying this long before they are closed: a request sent just
# before a reload still gets its answer (a DNS or QUIC handshake round trip), while the
# hand-over to the next generation stays short (the supervisor waits UDP_RELEASE_TIMEOUT).
RELEASE_GRACE_S = 0.25
# How a UDP flow ended: the flow log's reason for a "udp" line and the udp_closed keys. The first
# four are the UDP core's, in its order (relay_ext._udp.UDP_REASONS, indexed by UEV_FLOW_DONE's
# reason int; tests/engines/test_core_constants.py pins them); "reload": ended by a release
# because the supervisor handed UDP over to a new generation. A flow refused before it started is
# logged "denied_<relay.serve.routing.DENY_REASONS>", "slice_exhausted" or "error" (_refuse).
UDP_CLOSE_REASONS: tuple[str, ...] = ("idle_timeout", "responses", "closed", "error", "reload")
# UdpLoop.stats() drop counters -> the udp_drops label.
DROP_REASONS = ("pending_full", "no_flow_slot", "truncated", "refused", "send", "no_origdst",
                "pending_expired")
_CORE_COUNTERS = ("flows_open", "flows_total", "pending_flows", "pending_bytes", "holds",
                  "dgrams_c2s", "bytes_c2s", "dgrams_s2c", "bytes_s2c", "errors",
                  "recv_calls", "recv_dgrams", "send_calls", "send_dgrams", "events_dropped")


def udp_listeners_of(cfg: Config) -> list[tuple[int, Listener]]:
    """(tag, listener) of the config's UDP listeners; the tag is the listener's index."""
    return [(tag, lst) for tag, lst in enumerate(cfg.listener) if lst.is_udp]


@dataclass(slots=True, eq=False)
class _Open:
    listener: str
    router: UdpRouter
    client: tuple[str, int]
    flow: UdpFlow


class UdpService:
    """See the module docstring. The UdpLoop exists only inside the service's thread."""

    def __init__(self, cfg: Config, listeners: Sequence[tuple[int, Listener, socket.socket]],
                 own_addresses: set[str], *, slot: int = 0, nworkers: int = 1,
                 flow_log: FlowLog | None = None,
                 on_released: Callable[[], None] | None = None) -> None:
        self._options = cfg.relay.udp_loop_options()
        egress = EgressTable(cfg.egress)
        self.ports = PortAllocator(egress.entries, slot, nworkers)
        self._listeners = [(tag, lst, sock) for tag, lst, sock in listeners]
        self._routers = {tag: UdpRouter(lst, cfg, own_addresses, self.ports, egress)
                         for tag, lst, _sock in self._listeners}
        self._names = {tag: lst.name for tag, lst, _sock in self._listeners}
        self._flow_log = flow_log
        self._on_released = on_released
        self._flows: dict[int, _Open] = {}
        self._release_reason: str | None = None
        self._released = threading.Event()
        self._release_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start vs release from different threads
        self._closed: dict[str, int] = dict.fromkeys(UDP_CLOSE_REASONS, 0)
        self._denied: dict[str, int] = {}
        self._core: dict[str, int] = {}
        self._running = False

    # -- control (any thread) ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start reading the UDP listeners (once); ignored after a release."""
        with self._lock:
            if self._thread is not None or self._release_reason is not None:
                return
            self._thread = threading.Thread(target=self._run, name="relay-udp", daemon=True)
            self._thread.start()

    def release(self, reason: str = "closed") -> None:
        """Stop reading, end every flow with ``reason`` and close the loop (in its thread);
        a service that never started is released at once."""
        with self._lock:
            if self._release_reason is not None:
                return
            self._release_reason = reason
            never_started = self._thread is None
        self._release_requested.set()
        if never_started:
            self._finish_release()

    def wait_release_requested(self, timeout: float | None = None) -> bool:
        """True once ``release`` was called (by any thread), False after `timeout`."""
        return self._release_requested.wait(timeout)

    def wait_released(self, timeout: float | None = None) -> bool:
        return self._released.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        core = self._core
        s: dict[str, Any] = {f"udp_{k}": core.get(k, 0) for k in _CORE_COUNTERS}
        s["udp_drops"] = {r: core.get("drop_" + r, 0) for r in DROP_REASONS}
        # Other clients' datagrams caught by a flow socket before its connect() (udp_routing).
        s["udp_drops"]["foreign"] = sum(r.foreign_dropped for r in self._routers.values())
        s["udp_closed"] = dict(self._closed)
        s["udp_denied"] = dict(self._denied)
        s["udp_max_flows"] = self._options["max_flows"]
        s["udp_started"] = int(self._running)
        s["udp_egress_ports_in_use"] = self.ports.in_use()
        return s

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        from relay_ext._udp import UdpLoop

        try:
            loop = UdpLoop(**self._options)
        except (OSError, MemoryError, ValueError) as exc:
            log.error("UDP loop cannot start: %s; UDP listeners are not served", exc)
            self._finish_release()
            return
        try:
            self._serve(loop)
        except Exception:
            log.exception("UDP loop crashed; UDP flows closed")
            self._release_reason = self._release_reason or "error"
        finally:
            self._running = False
            try:
                self._close_all(loop, self._release_reason or "closed")
            except Exception:
                log.exception("UDP loop: closing its flows failed")
            for fid in list(self._flows):
                self._forget(fid)
            loop.close()
            self._core = loop.stats()
            self._finish_release()

    def _serve(self, loop: Any) -> None:
        from relay_ext._udp import UEV_FLOW_DONE, UEV_NEW_FLOW

        for tag, lst, sock in self._listeners:
            router = self._routers[tag]
            loop.add_listener(sock.fileno(), tag, lst.transparent, backend=router.core_backend,
                              responses=router.responses, oneway=router.oneway)
        self._running = True
        log.info("UDP: serving %s (this worker's slice ports: %s)",
                 ", ".join(lst.name for _t, lst, _s in self._listeners),
                 self.ports.describe() or "no slices")
        refreshed = 0.0
        while self._release_reason is None:
            for ev in loop.run(_POLL_MS):
                if ev[0] == UEV_NEW_FLOW:
                    self._on_new(loop, ev)
                elif ev[0] == UEV_FLOW_DONE:
                    self._on_done(ev, None)
            now = time.monotonic()
            if now - refreshed >= _STATS_REFRESH_S:
                self._core = loop.stats()
                refreshed = now
        # Released: stop reading the listeners (new datagrams wait in their buffers for the
        # next generation), let replies already on their way reach the flows that just sent a
        # request (RELEASE_GRACE_S), then end every flow and log it with the release's reason.
        reason = self._release_reason
        for tag, _lst, _sock in self._listeners:
            loop.remove_listener(tag)
        grace_end = time.monotonic() + RELEASE_GRACE_S
        while loop.stats()["flows_open"] and time.monotonic() < grace_end:
            for ev in loop.run(10):
                if ev[0] == UEV_NEW_FLOW:
                    self._on_new(loop, ev)  # read before the release: decided as usual
                elif ev[0] == UEV_FLOW_DONE:
                    self._on_done(ev, None)
        self._close_all(loop, reason)

    def _close_all(self, loop: Any, reason: str | None) -> None:
        """End every open flow (also those the core opened) and log each with ``reason``."""
        from relay_ext._udp import UEV_FLOW_DONE

        loop.close_flows()
        for ev in loop.run(0):
            if ev[0] == UEV_FLOW_DONE:
                self._on_done(ev, reason)

    def _on_new(self, loop: Any, ev: tuple[Any, ...]) -> None:
        _kind, tag, pending, client, orig_dst = ev
        router = self._routers[tag]
        name = self._names[tag]
        try:
            flow = router.open_flow(client, orig_dst)
        except Denied as exc:
            hold = EXHAUSTED_HOLD_MS if exc.reason == "slice_exhausted" else REFUSE_HOLD_MS
            self._refuse(loop, pending, name, client, orig_dst, exc.reason, hold, 0, str(exc))
            return
        except OSError as exc:
            self._refuse(loop, pending, name, client, orig_dst, "error", REFUSE_HOLD_MS,
                         exc.errno or 0, str(exc))
            return
        try:
            fid = loop.add_flow(pending, flow.upstream_fd, flow.reply_fd, router.responses, tag)
        except LookupError:
            router.close_unused(flow)  # the pending flow expired meanwhile: nothing to relay
            return
        self._flows[fid] = _Open(name, router, client, flow)

    def _refuse(self, loop: Any, pending: int, listener: str, client: Any, dest: Any,
                reason: str, hold_ms: int, err: int, detail: str) -> None:
        self._denied[reason] = self._denied.get(reason, 0) + 1
        try:
            loop.refuse_flow(pending, hold_ms)
        except LookupError:
            pass
        logged = "slice_exhausted" if reason == "slice_exhausted" else (
            "error" if reason == "error" else "denied_" + reason)
        log_every(log, f"udp refused {reason}", _LOG_INTERVAL_S,
                  "UDP listener %s: flow from %s refused (%s): %s", listener,
                  format_address(client), logged, detail, listener=listener)
        if self._flow_log is not None:
            self._flow_log.add((time.time(), listener, client, dest, None, 0, 0, 0, 0, 0, logged,
                                err, "udp", 0, 0))

    def _on_done(self, ev: tuple[Any, ...], override: str | None) -> None:
        (_kind, fid, tag, reason_i, d_c2s, b_c2s, d_s2c, b_s2c, duration_us, err, client) = ev
        reason = UDP_CLOSE_REASONS[reason_i]
        if override is not None and reason == "closed":
            reason = override
        self._closed[reason] = self._closed.get(reason, 0) + 1
        rec = self._flows.pop(fid, None)
        if rec is None:
            # A flow the core opened itself (backend listener): no port, nothing to release.
            if self._flow_log is not None:
                router = self._routers[tag]
                self._flow_log.add((time.time(), router.name, client, router.core_dest, None,
                                    b_c2s, b_s2c, 0, b_c2s + b_s2c, duration_us, reason, err,
                                    "udp", d_c2s, d_s2c))
            return
        rec.router.release(rec.flow)
        if self._flow_log is not None:
            self._flow_log.add((time.time(), rec.listener, rec.client, rec.flow.dest,
                                rec.flow.egress, b_c2s, b_s2c, 0, b_c2s + b_s2c, duration_us,
                                reason, err, "udp", d_c2s, d_s2c))

    def _forget(self, fid: int) -> None:
        """A flow whose end was not reported (the loop closes at once): count and free it."""
        rec = self._flows.pop(fid)
        reason = self._release_reason or "closed"
        self._closed[reason] = self._closed.get(reason, 0) + 1
        rec.router.release(rec.flow)
        if self._flow_log is not None:
            self._flow_log.add((time.time(), rec.listener, rec.client, rec.flow.dest,
                                rec.flow.egress, 0, 0, 0, 0, 0, reason, 0, "udp", 0, 0))

    def _finish_release(self) -> None:
        if self._released.is_set():
            return
        self._released.set()
        if self._on_released is not None:
            try:
                self._on_released()
            except Exception as exc:  # reporting must not take the worker down
                log.warning("UDP release report failed: %s", exc)

