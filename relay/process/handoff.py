"""Reload handoff, the process side: the supervisor's orders to its workers and its plan.

The supervisor pairs old and new workers and gives each pair the two ends of a SOCK_SEQPACKET
socketpair: ``Adopt`` to the new worker, ``HandOver`` to the old one, each order carrying its
end by SCM_RIGHTS over the worker's channel. What then flows between the two workers is the wire
format of relay.serve.handoff_wire (the serving layer's, which this module builds on).
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from relay.serve.handoff_wire import FD_SIZE, close_fd, fds_of

__all__ = [
    "CAN_HAND_OVER",
    "Adopt",
    "HandOver",
    "apply_order",
    "apply_orders",
    "connect_generations",
    "recv_with_fds",
    "send_order",
    "take_orders",
]

_encoder = msgspec.msgpack.Encoder()

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


def _decode_order(data: bytes, fds: list[int]) -> tuple[Order, socket.socket] | None:
    """An order and the one socket it carries; anything else is dropped with its fds."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    try:
        order: Order | None = _order_decoder.decode(data)
    except msgspec.DecodeError:
        order = None
    if order is None or len(socks) != 1:
        for s in socks:
            s.close()
        return None
    return order, socks[0]


def take_orders(channel: socket.socket) -> list[tuple[Order, socket.socket]]:
    """The orders queued on a worker's channel (never blocks); each with its socket."""
    out: list[tuple[Order, socket.socket]] = []
    while True:
        try:
            # Not socket.recv_fds(): Python 3.11's ignores its flags argument (and blocks).
            data, ancdata, _flags, _addr = channel.recvmsg(
                4096, socket.CMSG_SPACE(4 * FD_SIZE), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return out
        fds = fds_of(ancdata)
        if not data:
            for fd in fds:
                close_fd(fd)
            return out
        taken = _decode_order(data, fds)
        if taken is not None:
            out.append(taken)


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
        4096, socket.CMSG_SPACE(4 * FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    return data, fds_of(ancdata)


def apply_order(data: bytes, fds: list[int], target: Any) -> None:
    """A HandOver/Adopt order with its socket, for a Server's Handoff (``target``); anything
    else carrying descriptors is dropped with them."""
    taken = _decode_order(data, fds)
    if taken is None:
        return
    order, sock = taken
    if isinstance(order, HandOver):
        target.hand_over_to(sock)
    else:
        target.adopt_from(sock)
