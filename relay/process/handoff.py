"""Handing established flows from an old worker to a new one: the wire format and the transfer.

One SOCK_SEQPACKET socketpair per (old worker, new worker), made by the supervisor at reload.
The old worker sends ``Batch`` messages, each carrying its flows' descriptors with SCM_RIGHTS
(client socket, upstream socket, then the pipe ends of each direction whose pipe still holds
bytes); inside the message a descriptor is named by its index in that message's descriptor
list. The new worker answers each batch with an ``Ack`` once every flow of it is adopted or
refused. A SEQPACKET message is delivered whole or not at all, so a batch never arrives with
half of its descriptors.

The kernel caps one message at SCM_MAX_FD (253) descriptors; a flow needs 2 to 6, so a batch
holds at most 42 flows, and fewer when their copy buffers are large (the message must fit the
socket's send buffer). Descriptors still in a socket's queue when the receiving process dies are
closed by the kernel: those flows end (and the sender counts them as lost, having no ack).
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = [
    "MAX_BATCH_BYTES",
    "Adopt",
    "HandOver",
    "apply_orders",
    "SCM_MAX_FD",
    "Ack",
    "Batch",
    "FlowState",
    "HalfState",
    "HandoffError",
    "batches",
    "close_flow_fds",
    "core_state",
    "flow_fds",
    "fits",
    "flow_state",
    "recv_message",
    "send_ack",
    "send_batch",
    "send_order",
    "take_orders",
]

SCM_MAX_FD = 253  # include/net/scm.h: descriptors one SCM_RIGHTS message may carry
MAX_BATCH_BYTES = 64 * 1024  # metadata per message; a single large flow may exceed it alone
RECV_BUFFER = 512 * 1024  # > two full 64 KiB copy buffers plus metadata
_FD_SIZE = array.array("i").itemsize


class HandoffError(OSError):
    """The handoff socket failed or carried something that is not a handoff message."""


class HalfState(msgspec.Struct, array_like=True, frozen=True):
    """One direction of a pair as the core exported it (relay_ext/handoff.pxi)."""

    pipe_r: int  # on the wire: index into the message's descriptors, -1 = none
    pipe_w: int
    pipe_len: int
    buf: bytes
    eof: bool
    shut: bool
    stream: bool
    no_splice: bool
    nbytes: int
    spliced: int
    copied: int


class FlowState(msgspec.Struct, array_like=True, frozen=True):
    """A pair plus what the server knows of it (listener, addresses, egress port)."""

    client_fd: int  # on the wire: descriptor indices
    upstream_fd: int
    start_ns: int  # CLOCK_MONOTONIC, shared by every process of the host
    last_ns: int
    connect_us: int
    export_ns: int
    halves: tuple[HalfState, HalfState]
    listener: str
    client: Any  # getpeername() of the client: a tuple, or a str for unix sockets
    dest: Any  # where the upstream connects: a tuple (host, port) or a str
    egress: Any  # getsockname() of the upstream when an egress slice chose it, else None
    egress_address: str | None
    source: bytes | None  # the per-source limit key, None when not limited

    @property
    def n_fds(self) -> int:
        return 2 + sum(2 for h in self.halves if h.pipe_len)

    @property
    def pending_bytes(self) -> int:
        return sum(h.pipe_len + len(h.buf) for h in self.halves)


class Batch(msgspec.Struct, tag="batch"):
    seq: int
    flows: list[FlowState]


class Ack(msgspec.Struct, tag="ack"):
    seq: int
    adopted: int
    refused: int


Message = Batch | Ack
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def flow_state(core: dict[str, Any], *, listener: str, client: Any, dest: Any, egress: Any,
               egress_address: str | None, source: bytes | None) -> FlowState:
    """A FlowState from ``Loop.export_pair()``'s dict (real descriptor numbers) and the
    server's metadata."""
    return FlowState(
        client_fd=core["client_fd"], upstream_fd=core["upstream_fd"],
        start_ns=core["start_ns"], last_ns=core["last_ns"], connect_us=core["connect_us"],
        export_ns=core["export_ns"],
        halves=(HalfState(**core["halves"][0]), HalfState(**core["halves"][1])),
        listener=listener, client=client, dest=dest, egress=egress,
        egress_address=egress_address, source=source,
    )


def core_state(flow: FlowState) -> dict[str, Any]:
    """The dict ``Loop.import_pair()`` takes (the flow must hold real descriptor numbers)."""
    return {
        "client_fd": flow.client_fd, "upstream_fd": flow.upstream_fd, "tag": 0,
        "start_ns": flow.start_ns, "last_ns": flow.last_ns, "connect_us": flow.connect_us,
        "halves": tuple(msgspec.structs.asdict(h) for h in flow.halves),
    }


def flow_fds(flow: FlowState) -> list[int]:
    """The flow's descriptors, in wire order: client, upstream, then each held pipe r, w."""
    fds = [flow.client_fd, flow.upstream_fd]
    for h in flow.halves:
        if h.pipe_len:
            fds += [h.pipe_r, h.pipe_w]
    return fds


def fits(batch: list[FlowState], flow: FlowState) -> bool:
    """May `flow` join `batch` within SCM_MAX_FD descriptors and about MAX_BATCH_BYTES?"""
    fds = sum(f.n_fds for f in batch) + flow.n_fds
    size = sum(_weight(f) for f in batch) + _weight(flow)
    return fds <= SCM_MAX_FD and size <= MAX_BATCH_BYTES


def _weight(flow: FlowState) -> int:
    return 256 + flow.pending_bytes


def batches(flows: list[FlowState]) -> Iterator[list[FlowState]]:
    """Split flows into messages within SCM_MAX_FD descriptors and about MAX_BATCH_BYTES."""
    batch: list[FlowState] = []
    fds = size = 0
    for flow in flows:
        weight = _weight(flow)
        if batch and (fds + flow.n_fds > SCM_MAX_FD or size + weight > MAX_BATCH_BYTES):
            yield batch
            batch, fds, size = [], 0, 0
        batch.append(flow)
        fds += flow.n_fds
        size += weight
    if batch:
        yield batch


def _renumber(flow: FlowState, mapping: dict[int, int] | list[int]) -> FlowState:
    def num(fd: int) -> int:
        return -1 if fd < 0 else mapping[fd]

    halves = tuple(
        msgspec.structs.replace(h, pipe_r=num(h.pipe_r), pipe_w=num(h.pipe_w)) if h.pipe_len
        else msgspec.structs.replace(h, pipe_r=-1, pipe_w=-1)
        for h in flow.halves
    )
    return msgspec.structs.replace(flow, client_fd=num(flow.client_fd),
                                   upstream_fd=num(flow.upstream_fd),
                                   halves=halves)


def send_batch(sock: socket.socket, seq: int, flows: list[FlowState]) -> None:
    """Send one batch (descriptors by SCM_RIGHTS). The caller still owns and must close its
    descriptors afterwards: the receiver got its own copies. Raises OSError on failure, in
    which case nothing was delivered."""
    fds: list[int] = []
    wire = []
    for flow in flows:
        own = flow_fds(flow)
        index = {fd: len(fds) + i for i, fd in enumerate(own)}
        fds += own
        wire.append(_renumber(flow, index))
    if len(fds) > SCM_MAX_FD:
        raise ValueError(f"handoff batch of {len(fds)} descriptors > SCM_MAX_FD")
    payload = _encoder.encode(Batch(seq, wire))
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def send_ack(sock: socket.socket, seq: int, adopted: int, refused: int) -> None:
    sock.send(_encoder.encode(Ack(seq, adopted, refused)))


def recv_message(sock: socket.socket, flags: int = 0) -> Batch | Ack | None:
    """One message; a Batch comes back with real descriptor numbers (now the caller's).
    None at EOF. Raises BlockingIOError on a non-blocking socket with nothing queued, and
    HandoffError for a truncated or undecodable message (its descriptors are closed)."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        RECV_BUFFER, socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE), flags | socket.MSG_CMSG_CLOEXEC)
    received = _fds_of(ancdata)
    if not data and not received:
        return None
    try:
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoffError(f"handoff message truncated (flags {msg_flags:#x})")
        try:
            msg = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise HandoffError(f"undecodable handoff message: {exc}") from exc
        if isinstance(msg, Ack):
            if received:
                raise HandoffError("an ack carried descriptors")
            return msg
        flows = [_renumber(f, received) for f in msg.flows]
        if sum(len(flow_fds(f)) for f in flows) != len(received):
            raise HandoffError("handoff batch: descriptor count does not match its flows")
    except (HandoffError, IndexError) as exc:
        for fd in received:
            _close(fd)
        if isinstance(exc, IndexError):
            raise HandoffError("handoff batch names a descriptor it did not carry") from exc
        raise
    return Batch(msg.seq, flows)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
    return list(fds)


def close_flow_fds(flow: FlowState) -> None:
    for fd in flow_fds(flow):
        _close(fd)


def _close(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------- supervisor -> worker orders

class HandOver(msgspec.Struct, tag="hand_over"):
    """To an old worker, with one end of a handoff socketpair: send your flows there."""

    peer_pid: int


class Adopt(msgspec.Struct, tag="adopt"):
    """To a new worker, with the other end: adopt the flows that arrive there."""

    peer_pid: int


Order = HandOver | Adopt
_order_decoder = msgspec.msgpack.Decoder(Order)


def send_order(channel: socket.socket, order: Order, sock: socket.socket) -> None:
    """Pass `sock` (a handoff socketpair end) to a worker over its channel. Raises OSError."""
    socket.send_fds(channel, [_encoder.encode(order)], [sock.fileno()])


def take_orders(channel: socket.socket) -> list[tuple[Order, socket.socket]]:
    """The orders queued on a worker's channel (never blocks); each with its socket."""
    out: list[tuple[Order, socket.socket]] = []
    while True:
        try:
            # Not socket.recv_fds(): Python 3.11's ignores its flags argument (and blocks).
            data, ancdata, _flags, _addr = channel.recvmsg(
                4096, socket.CMSG_SPACE(4 * _FD_SIZE), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return out
        fds = _fds_of(ancdata)
        if not data:
            for fd in fds:
                _close(fd)
            return out
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            order = _order_decoder.decode(data)
        except msgspec.DecodeError:
            order = None
        if order is None or len(socks) != 1:
            for s in socks:
                s.close()
            continue
        out.append((order, socks[0]))


def apply_orders(channel: socket.socket, target: Any) -> None:
    """Hand the queued orders to a Server's Handoff (``target``); safe in a signal handler:
    the target only stores the sockets, its serve loop does the work."""
    for order, sock in take_orders(channel):
        if isinstance(order, HandOver):
            target.hand_over_to(sock)
        else:
            target.adopt_from(sock)


# ---------------------------------------------------------------- the supervisor's plan

# Engines whose core has export_pair/import_pair (the asyncio engine drains instead).
CAN_HAND_OVER = frozenset({"uring", "epoll"})


def connect_generations(old: list[Any], new: list[Any]) -> list[tuple[int, int]]:
    """Pair each serving old worker with a serving new one (old slot i -> new slot i mod N)
    and give both ends of a fresh handoff socketpair: Adopt (plus SIGUSR2) to the new worker
    first, then HandOver to the old one; the caller's SIGTERM starts the old one's drain,
    which sends. Workers are the supervisor's records (pid, slot, state, engine, channel).
    Returns the (old pid, new pid) links made; an old worker without one simply drains."""
    import logging
    import os
    import signal

    log = logging.getLogger("relay.supervisor")
    targets = sorted((w for w in new if w.state == "serving" and w.engine in CAN_HAND_OVER),
                     key=lambda w: w.slot)
    links: list[tuple[int, int]] = []
    if not targets:
        return links
    for w in sorted(old, key=lambda w: w.slot):
        if w.state != "serving":
            continue
        if w.engine not in CAN_HAND_OVER:
            log.info("worker %d (engine %s) cannot hand its flows over: they drain", w.pid,
                     w.engine)
            continue
        target = targets[w.slot % len(targets)]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                send_order(target.channel, Adopt(w.pid), theirs)
                os.kill(target.pid, signal.SIGUSR2)
            except OSError as exc:
                log.warning("handoff %d -> %d not set up (%s): worker %d drains", w.pid,
                            target.pid, exc, w.pid)
                continue
            try:
                send_order(w.channel, HandOver(target.pid), ours)
            except OSError as exc:
                log.warning("handoff %d -> %d not set up (%s): worker %d drains", w.pid,
                            target.pid, exc, w.pid)
                continue
            links.append((w.pid, target.pid))
        finally:
            ours.close()
            theirs.close()
    if links:
        log.info("handoff: %s", ", ".join(f"{a} -> {b}" for a, b in links))
    return links


def recv_with_fds(channel: socket.socket) -> tuple[bytes, list[int]]:
    """One message of a worker channel (blocking) with the descriptors it carries."""
    data, ancdata, _flags, _addr = channel.recvmsg(
        4096, socket.CMSG_SPACE(4 * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    return data, _fds_of(ancdata)


def apply_order(data: bytes, fds: list[int], target: Any) -> None:
    """A HandOver/Adopt order with its socket, for a Server's Handoff (``target``); anything
    else carrying descriptors is dropped with them."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        order = _order_decoder.decode(data)
    except msgspec.DecodeError:
        order = None
    if order is None or len(socks) != 1:
        for s in socks:
            s.close()
        return
    if isinstance(order, HandOver):
        target.hand_over_to(socks[0])
    else:
        target.adopt_from(socks[0])
