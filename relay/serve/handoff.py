"""A Server's side of a reload handoff (docs/handoff.md): hand its flows over, or adopt them.

Old worker (``Handoff.hand_over_to(sock)``, then the drain): once it stops accepting, every
established pair is exported from the core (``Loop.export_pair``), forgotten by the server
without a flow-log line (the adopting worker writes the one line of that connection) and sent
in batches over the handoff socket (relay.serve.handoff_wire). Pairs still connecting are retried
on the next loop iterations, once connected. A batch that cannot be sent is imported back and
drains here like before. The worker waits for an ack per batch; batches never acked (the
adopting worker died) are counted ``handoff_lost``: their connections are gone.

New worker (``Handoff.adopt_from(sock)``): each flow of a batch is re-checked against this
worker's configuration, then imported into the core and relayed on as if it had been accepted
here; or refused, closed the way a drain deadline closes (reset both sides) and flow-logged with
reason ``handoff_refused_<why>``:

* ``listener_removed``: no listener of that name any more;
* ``destination_denied``: tproxy/redirect listener, the policy now denies the destination;
* ``egress_slice``: the flow left through an egress slice that no longer holds its address and
  port for that destination;
* ``table_full``: the core's connection table is full;
* ``stopping``: this worker closed its loop (it is stopping itself).

The handoff pause of a flow is the time from its export by the old worker to its import here
(both CLOCK_MONOTONIC): no byte of it moves in between.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from relay.ops.log import log_every
from relay.serve import handoff_wire as wire
from relay.serve.limits import VERDICT_REASONS
from relay.sock import reset_and_close

if TYPE_CHECKING:
    from relay.serve.server import Server, _Listener

__all__ = ["HANDOFF_REFUSALS", "PAUSE_BUCKETS", "Handoff"]

log = logging.getLogger("relay.handoff")

# Upper bounds (seconds) of the handoff pause histogram (+Inf implied).
PAUSE_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# Why an adopting worker refused a flow (the docstring above): stats' "handoff_refused" keys and
# the flow log's "handoff_refused_<why>" reasons.
HANDOFF_REFUSALS: tuple[str, ...] = (
    "listener_removed", "destination_denied", "egress_slice", "table_full", "stopping",
    "maxconn", "maxconn_per_source",
)
SEND_TIMEOUT = 2.0  # seconds one batch may wait for room in the handoff socket
# Seconds the old worker waits (relaying on meanwhile) for the adopting worker's Ready before it
# sends anyway: a peer that predates Hello/Ready (relay upgrade from an older version) never
# answers it, and adopts the batches as they come.
READY_TIMEOUT = 0.5
# Flows per batch, and batches sent but not yet acknowledged (_send_exportable).
BATCH_FLOWS = 64
SEND_WINDOW = 2
FDS_PER_FLOW = 3  # Hello's estimate: 2 sockets, plus a pipe pair for about one flow in two
ACTIVE_POLL_MS = 1  # loop.run() timeout while a handoff is under way


class Handoff:
    """The handoff state of one Server; driven from its serve_forever thread."""

    def __init__(self, server: Server) -> None:
        from relay.serve.server import _Histogram

        self._srv = server
        self._out: socket.socket | None = None
        self._out_requested: socket.socket | None = None
        self._inboxes: list[socket.socket] = []
        self._inbox_requested: list[socket.socket] = []
        self._seq = 0
        self._unacked: dict[int, int] = {}  # batch seq -> flows in it
        self._exported_all = False
        self._more = False  # an inbox may hold another batch: loop.run(0), then take it
        self._ready_by = 0.0  # sent Hello: monotonic deadline for the Ready; 0 = go
        self.handed_over = 0  # flows sent and acked
        self.lost = 0  # flows sent, never acked: the adopting worker died
        self.kept = 0  # flows that could not be sent and drain here
        self.pending_bytes = 0  # bytes read but not yet written (pipes, buffers) when sent
        self.adopted = 0
        self.refused: dict[str, int] = dict.fromkeys(HANDOFF_REFUSALS, 0)
        self.pause = _Histogram(PAUSE_BUCKETS)
        self.pause_max = 0.0

    # -- requests (safe from a signal handler: they only store the socket) -------------------

    def hand_over_to(self, sock: socket.socket) -> None:
        self._out_requested = sock

    def adopt_from(self, sock: socket.socket) -> None:
        self._inbox_requested.append(sock)

    @property
    def _core(self) -> Any:
        """The engine loop, with the core's export_pair/import_pair (not in EngineLoop: the
        asyncio engine has neither)."""
        return self._srv._loop

    # -- state ---------------------------------------------------------------------------------

    @property
    def sending(self) -> bool:
        """The old side still has flows to send or acks to wait for."""
        return self._out is not None or self._out_requested is not None

    @property
    def active(self) -> bool:
        return self.sending or bool(self._inboxes) or bool(self._inbox_requested)

    def poll_ms(self, default: int) -> int:
        if self._more:
            return 0
        return ACTIVE_POLL_MS if self.active else default

    def stats(self) -> dict[str, Any]:
        return {
            "handoff_handed_over": self.handed_over,
            "handoff_lost": self.lost,
            "handoff_kept": self.kept,
            "handoff_pending_bytes": self.pending_bytes,
            "handoff_adopted": self.adopted,
            "handoff_refused": dict(self.refused),
            "handoff_pause_seconds": self.pause.snapshot(),
            "handoff_pause_max_seconds": self.pause_max,
        }

    # -- the loop's step -----------------------------------------------------------------------

    def step(self) -> None:
        """Run from serve_forever after each loop.run(): receive, adopt, send, collect acks."""
        while self._inbox_requested:
            sock = self._inbox_requested.pop(0)
            sock.setblocking(False)
            self._inboxes.append(sock)
        self._more = False
        for sock in list(self._inboxes):
            self._receive(sock)
        if self._out_requested is not None and self._srv._draining:
            self._start_sending(self._out_requested)
            self._out_requested = None
        if self._out is not None and self._unacked:
            self._collect_acks()  # first: each ack opens the window for the next batch
        if self._out is not None:
            if not self._exported_all and not self._awaiting_ready():
                self._send_exportable()
            if self._out is not None:
                self._collect_acks()

    def give_up(self) -> None:
        """Drain deadline: stop waiting; batches still unacked are counted lost."""
        if self._out_requested is not None:
            self._out_requested.close()
            self._out_requested = None
        if self._out is not None:
            self._finish_sending(lost=True)

    def close(self) -> None:
        self.give_up()
        for sock in self._inboxes + self._inbox_requested:
            sock.close()
        self._inboxes.clear()
        self._inbox_requested.clear()

    # -- old side ------------------------------------------------------------------------------

    def _start_sending(self, sock: socket.socket) -> None:
        loop = self._srv._loop
        if not hasattr(loop, "export_pair"):
            log.warning("engine %s cannot hand flows over: %d flows drain instead",
                        self._srv.engine_name, len(self._srv._flows))
            sock.close()
            return
        sock.settimeout(SEND_TIMEOUT)
        self._out = sock
        # No flow leaves before the adopting worker has made room for its descriptors: it
        # answers Hello with Ready, and then every batch goes out back to back.
        self._ready_by = time.monotonic() + READY_TIMEOUT
        try:
            wire.send_hello(sock, FDS_PER_FLOW * len(self._srv._flows) + 64)
        except OSError:
            self._ready_by = 0.0  # sending fails too, and the flows drain here
        if not self._awaiting_ready():
            self._send_exportable()

    def _awaiting_ready(self) -> bool:
        """Still waiting for the adopting worker's Ready (meanwhile this worker relays on)?"""
        if not self._ready_by:
            return False
        assert self._out is not None
        while True:
            try:
                msg = _recv_now(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                msg = None  # gone: the first send fails, and its flows drain here
            if msg is None or isinstance(msg, wire.Ready):
                self._ready_by = 0.0
                return False
        if time.monotonic() >= self._ready_by:
            log.warning("handoff: no Ready from the adopting worker within %.1fs; sending "
                        "anyway", READY_TIMEOUT)
            self._ready_by = 0.0
            return False
        return True

    def _send_exportable(self) -> None:
        """Export established pairs and send them in batches of up to BATCH_FLOWS, keeping at
        most SEND_WINDOW batches unacknowledged: the new worker imports one batch while the
        next waits in the socket. A flow's pause runs from its export, so a flow is exported
        only when the new worker will take it soon; until then this worker relays it. (Sent
        all at once, the last batch waited behind every import before it: under CPU
        contention, tens of milliseconds.) The rest goes out as acks come in (step)."""
        srv = self._srv
        batch: list[wire.FlowState] = []
        fds = size = 0  # the batch's running totals (re-summing it per flow was quadratic)
        connecting = 0
        window_full = False
        for cid, flow in list(srv._flows.items()):
            if len(batch) >= BATCH_FLOWS or fds + wire.MAX_FLOW_FDS > wire.SCM_MAX_FD:
                self._send(batch)
                batch, fds, size = [], 0, 0
            if not batch and len(self._unacked) >= SEND_WINDOW and self._out is not None:
                window_full = True
                break
            try:
                state = self._core.export_pair(cid)
            except ValueError:
                connecting += 1  # still connecting: retried on the next step
                continue
            except KeyError:
                continue  # finished meanwhile: its EV_DONE is queued
            del srv._flows[cid]
            srv._forget(flow)
            f = wire.flow_state(
                state, listener=flow.listener.name, client=flow.client, dest=flow.dest,
                egress=flow.egress, egress_address=flow.egress_address, source=flow.source)
            n_fds, weight = f.n_fds, wire.weight(f)
            if batch and not wire.fits_totals(fds + n_fds, size + weight):
                self._send(batch)
                batch, fds, size = [], 0, 0
            batch.append(f)
            fds += n_fds
            size += weight
        if batch:
            self._send(batch)
        self._exported_all = connecting == 0 and not window_full

    def _send(self, batch: list[wire.FlowState]) -> None:
        if self._out is None:
            self._take_back(batch)
            return
        self._seq += 1
        try:
            wire.send_batch(self._out, self._seq, batch)
        except OSError as exc:
            log_every(log, "handoff send", 10.0, "handoff: cannot send %d flows (%s); "
                      "they drain here", len(batch), exc)
            self._take_back(batch)
            self._finish_sending(lost=True)
            return
        self._unacked[self._seq] = len(batch)
        self.pending_bytes += sum(f.pending_bytes for f in batch)
        for f in batch:
            wire.close_flow_fds(f)  # the adopting worker holds its own copies now

    def _take_back(self, batch: list[wire.FlowState]) -> None:
        """A batch that never left: import it into our own loop again; it drains here."""
        from relay.serve.server import _Flow

        srv = self._srv
        by_name = {lst.name: lst for lst in srv._listeners}
        for f in batch:
            lst = by_name[f.listener]
            cid = self._core.import_pair(wire.core_state(f), lst.tag)
            if srv._shared is not None:
                # _forget released it at export; it stays here after all (the counters
                # clamp at zero, so a refused re-acquire costs at most one count).
                srv._shared.acquire(srv._slot, f.source)
            srv._track(cid, _Flow(lst, _tuple(f.client), f.source, _tuple(f.dest),
                                   _tuple(f.egress), f.egress_address))
            self.kept += 1

    def _collect_acks(self) -> None:
        sock = self._out
        assert sock is not None
        while self._unacked:
            try:
                msg = _recv_now(sock)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("handoff: the adopting worker is gone (%s)", exc)
                self._finish_sending(lost=True)
                return
            if msg is None:
                log.warning("handoff: the adopting worker closed the socket with %d batches "
                            "unacknowledged", len(self._unacked))
                self._finish_sending(lost=True)
                return
            if isinstance(msg, wire.Ack):
                self.handed_over += self._unacked.pop(msg.seq, 0)
        if not self._unacked and self._exported_all:
            self._finish_sending(lost=False)

    def _finish_sending(self, lost: bool) -> None:
        if lost and self._unacked:
            n = sum(self._unacked.values())
            self.lost += n
            log.error("handoff: %d flows sent but never adopted: lost", n)
        self._unacked.clear()
        self._exported_all = True
        if self._out is not None:
            self._out.close()
            self._out = None
        log.info("handoff done: %d flows handed over, %d lost, %d kept here",
                 self.handed_over, self.lost, self.kept)

    # -- new side ------------------------------------------------------------------------------

    def _receive(self, sock: socket.socket) -> None:
        """Take the queued messages up to the first batch. One batch per loop iteration: an
        adopted flow moves its first byte in the next loop.run(), which comes right after this
        batch (poll 0), not after every batch queued behind it."""
        while True:
            try:
                msg = wire.recv_message(sock, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except wire.HandoffError as exc:
                log.error("handoff: %s", exc)
                continue
            except OSError as exc:
                if exc.errno != errno.ECONNRESET:
                    log.warning("handoff: receive failed: %s", exc)
                msg = None
            if msg is None:
                sock.close()
                self._inboxes.remove(sock)
                return
            if isinstance(msg, wire.Hello):
                wire.reserve_fds(msg.fds, sock.fileno())
                try:
                    wire.send_ready(sock)
                except OSError:
                    pass  # the old worker is gone already
            elif isinstance(msg, wire.Batch):
                adopted = refused = 0
                for flow in msg.flows:
                    if self._adopt(flow):
                        adopted += 1
                    else:
                        refused += 1
                try:
                    wire.send_ack(sock, msg.seq, adopted, refused)
                except OSError:
                    pass  # the old worker is gone already; the flows are ours anyway
                self._more = True
                return

    def _adopt(self, f: wire.FlowState) -> bool:
        from relay.serve.server import _Flow

        srv = self._srv
        lst = next((x for x in srv._listeners if x.name == f.listener), None)
        why = "stopping" if srv._loop_closed else _refusal(lst, f)
        cid = -1
        admitted = False
        if why is None and srv._shared is not None:
            # This generation's shared counters (relay.serve.limits) must count the flow too;
            # a reload that lowered maxconn does not adopt what no longer fits.
            verdict = srv._shared.acquire(srv._slot, f.source)
            if verdict:
                why = VERDICT_REASONS.get(verdict, "maxconn")
            else:
                admitted = True
        if why is None:
            assert lst is not None
            try:
                cid = self._core.import_pair(wire.core_state(f), lst.tag)
            except (OSError, ValueError) as exc:
                log_every(log, "handoff import", 10.0, "handoff: cannot adopt a flow: %s", exc)
                why = "table_full"
        if why is not None and admitted:
            srv._release(f.source)
        if why is not None:
            self._refuse(f, why)
            return False
        assert lst is not None
        pause = max(0.0, (time.monotonic_ns() - f.export_ns) / 1e9)
        self.pause.observe(pause)
        self.pause_max = max(self.pause_max, pause)
        self.adopted += 1
        srv._track(cid, _Flow(lst, _tuple(f.client), f.source, _tuple(f.dest),
                               _tuple(f.egress), f.egress_address))
        return True

    def _refuse(self, f: wire.FlowState, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        for fd in (f.client_fd, f.upstream_fd):
            reset_and_close(socket.socket(fileno=fd))
        for h in f.halves:
            if h.pipe_len:
                for fd in (h.pipe_r, h.pipe_w):
                    socket.close(fd)
        srv = self._srv
        srv._closed_by_reason["aborted"] += 1
        if srv._flowlog is not None:
            srv._flowlog.add((time.time(), f.listener, _tuple(f.client), _tuple(f.dest),
                              _tuple(f.egress), f.halves[0].nbytes, f.halves[1].nbytes,
                              f.halves[0].spliced + f.halves[1].spliced,
                              f.halves[0].copied + f.halves[1].copied,
                              max(0, (time.monotonic_ns() - f.start_ns) // 1000),
                              "handoff_refused_" + why, 0, "tcp", -1, -1))


def _refusal(lst: _Listener | None, f: wire.FlowState) -> str | None:
    """Why this worker's configuration would not have relayed the flow, or None."""
    if lst is None or lst.router is None:
        return "listener_removed"
    router = lst.router
    dest = _tuple(f.dest)
    if router.mode == "backend" or not isinstance(dest, tuple) or len(dest) < 2:
        return None
    ip, port = str(dest[0]), int(dest[1])
    if router.policy.check(ip, port) is not None:
        return "destination_denied"
    if f.egress_address is not None:
        egress = router.egress.lookup(ip)
        local = _tuple(f.egress)
        if (egress is None or egress.address != f.egress_address
                or not isinstance(local, tuple) or local[1] not in egress):
            return "egress_slice"
    return None


def _recv_now(sock: socket.socket) -> wire.Batch | wire.Ack | wire.Hello | wire.Ready | None:
    """One queued message, or BlockingIOError. The sending side keeps a timeout on its socket
    (for sends), and Python then polls for up to that timeout before any recvmsg, whatever
    MSG_DONTWAIT says: the wait on an ack blocked the loop, and a late ack (a TimeoutError, an
    OSError) read as a dead peer. So the receive runs with the socket non-blocking."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return wire.recv_message(sock, socket.MSG_DONTWAIT)
    finally:
        sock.settimeout(timeout)


def _tuple(value: Any) -> Any:
    """msgspec hands sequences back as lists; addresses are tuples everywhere else."""
    return tuple(value) if isinstance(value, list) else value

