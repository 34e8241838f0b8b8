"""The wire format of a reload handoff: established flows from an old worker to a new one.

One SOCK_SEQPACKET socketpair per (old worker, new worker), made by the supervisor at reload.
The old worker first sends ``Hello`` (how many descriptors
are coming) and waits, still relaying, for the new worker's ``Ready`` (it has made room for
them: reserve_fds); then it sends ``Batch`` messages back to back, each carrying its flows' descriptors with SCM_RIGHTS
(client socket, upstream socket, then the pipe ends of each direction whose pipe still holds
bytes); inside the message a descriptor is named by its index in that message's descriptor
list. The new worker answers each batch with an ``Ack`` once every flow of it is adopted or
refused. A SEQPACKET message is delivered whole or not at all, so a batch never arrives with
half of its descriptors.

The kernel caps one message at SCM_MAX_FD (253) descriptors; a flow needs 2 to 6, so a batch
holds 42 to 126 flows, and fewer when their copy buffers are large (the message must fit the
socket's send buffer). Descriptors still in a socket's queue when the receiving process dies are
closed by the kernel: those flows end (and the sender counts them as lost, having no ack).
"""

from __future__ import annotations

import array
import fcntl
import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = [
    "FD_SIZE",
    "MAX_BATCH_BYTES",
    "MAX_FLOW_FDS",
    "SCM_MAX_FD",
    "Ack",
    "Batch",
    "FlowState",
    "HalfState",
    "HandoffError",
    "Hello",
    "Ready",
    "batches",
    "close_fd",
    "close_flow_fds",
    "core_state",
    "fds_of",
    "fits",
    "fits_totals",
    "flow_fds",
    "flow_state",
    "recv_message",
    "reserve_fds",
    "send_ack",
    "send_batch",
    "send_hello",
    "send_ready",
    "weight",
]

SCM_MAX_FD = 253  # include/net/scm.h: descriptors one SCM_RIGHTS message may carry
MAX_FLOW_FDS = 6  # two sockets and, per direction, a pipe holding bytes
MAX_BATCH_BYTES = 64 * 1024  # metadata per message; a single large flow may exceed it alone
RECV_BUFFER = 512 * 1024  # > two full 64 KiB copy buffers plus metadata
FD_SIZE = array.array("i").itemsize


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


class Hello(msgspec.Struct, tag="hello"):
    """Old -> new, before the first batch: at most `fds` descriptors are coming."""

    fds: int


class Ready(msgspec.Struct, tag="ready"):
    """New -> old, the answer to Hello: room is made, send the batches back to back."""


Message = Batch | Ack | Hello | Ready
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
    return fits_totals(sum(f.n_fds for f in batch) + flow.n_fds,
                       sum(weight(f) for f in batch) + weight(flow))


def fits_totals(fds: int, size: int) -> bool:
    """Is a batch of `fds` descriptors and `size` weight within one message's limits? (A
    sender that keeps running totals asks this in O(1) per flow; fits() re-sums the batch.)"""
    return fds <= SCM_MAX_FD and size <= MAX_BATCH_BYTES


def weight(flow: FlowState) -> int:
    """About what the flow adds to a message's metadata."""
    return 256 + flow.pending_bytes


def batches(flows: list[FlowState]) -> Iterator[list[FlowState]]:
    """Split flows into messages within SCM_MAX_FD descriptors and about MAX_BATCH_BYTES."""
    batch: list[FlowState] = []
    fds = size = 0
    for flow in flows:
        w = weight(flow)
        if batch and not fits_totals(fds + flow.n_fds, size + w):
            yield batch
            batch, fds, size = [], 0, 0
        batch.append(flow)
        fds += flow.n_fds
        size += w
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


def send_hello(sock: socket.socket, fds: int) -> None:
    sock.send(_encoder.encode(Hello(fds)))


def send_ready(sock: socket.socket) -> None:
    sock.send(_encoder.encode(Ready()))


def reserve_fds(n: int, fd: int) -> int:
    """Grow this process's descriptor table now, so that `n` more descriptors fit without
    growing it later; `fd` is any open descriptor (it is duplicated once and closed again).
    Returns the descriptor number reserved, or -1 (nothing to do, or the limit is too low).

    Why: recvmsg installs an SCM_RIGHTS message's descriptors at once, and when the table is
    full the kernel doubles it (fs/file.c, expand_fdtable). In a process with more than one
    thread each doubling first waits for an RCU grace period (synchronize_rcu): 7-14 ms each
    on the development machine, paid several times while 1,000 flows arrive, inside the pause
    of every flow queued behind that batch. Grown once before the first batch, the table
    stays grown (it never shrinks)."""
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    target = open_now + n
    if soft != resource.RLIM_INFINITY:
        target = min(target, soft - 1)
    if n <= 0 or target <= open_now:
        return -1
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target)
    except OSError:
        return -1
    os.close(high)
    return high


def recv_message(sock: socket.socket, flags: int = 0) -> Batch | Ack | Hello | Ready | None:
    """One message; a Batch comes back with real descriptor numbers (now the caller's).
    None at EOF. Raises BlockingIOError on a non-blocking socket with nothing queued, and
    HandoffError for a truncated or undecodable message (its descriptors are closed)."""
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        RECV_BUFFER, socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE), flags | socket.MSG_CMSG_CLOEXEC)
    received = fds_of(ancdata)
    if not data and not received:
        return None
    try:
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoffError(f"handoff message truncated (flags {msg_flags:#x})")
        try:
            msg = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise HandoffError(f"undecodable handoff message: {exc}") from exc
        if not isinstance(msg, Batch):
            if received:
                raise HandoffError(f"a {type(msg).__name__.lower()} message carried descriptors")
            return msg
        flows = [_renumber(f, received) for f in msg.flows]
        if sum(len(flow_fds(f)) for f in flows) != len(received):
            raise HandoffError("handoff batch: descriptor count does not match its flows")
    except (HandoffError, IndexError) as exc:
        for fd in received:
            close_fd(fd)
        if isinstance(exc, IndexError):
            raise HandoffError("handoff batch names a descriptor it did not carry") from exc
        raise
    return Batch(msg.seq, flows)


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (now the caller's)."""
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % FD_SIZE])
    return list(fds)


def close_flow_fds(flow: FlowState) -> None:
    for fd in flow_fds(flow):
        close_fd(fd)


def close_fd(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass
