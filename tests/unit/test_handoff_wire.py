"""relay.serve.handoff_wire: batches within SCM_MAX_FD, descriptors renumbered across a real
SCM_RIGHTS transfer, bad messages refused with their fds closed; relay.process.handoff: orders on
a worker channel."""

from __future__ import annotations

import array
import os
import socket

import pytest

from relay.process import handoff as orders
from relay.serve import handoff_wire as wire


def _half(pipe: tuple[int, int] | None = None, buf: bytes = b"") -> wire.HalfState:
    r, w = pipe if pipe else (-1, -1)
    return wire.HalfState(pipe_r=r, pipe_w=w, pipe_len=5 if pipe else 0, buf=buf, eof=False,
                          shut=False, stream=bool(pipe), no_splice=False, nbytes=1,
                          spliced=2, copied=3)


def _flow(c: int, u: int, halves: tuple[wire.HalfState, wire.HalfState]) -> wire.FlowState:
    return wire.FlowState(client_fd=c, upstream_fd=u, start_ns=1, last_ns=2, connect_us=3,
                          export_ns=4, halves=halves, listener="main",
                          client=("192.0.2.1", 5555), dest=("198.51.100.1", 80),
                          egress=("203.0.113.7", 40001), egress_address="203.0.113.7",
                          source=None)


def test_batches_stay_within_scm_max_fd_and_the_byte_budget() -> None:
    six = [_flow(0, 1, (_half((2, 3)), _half((4, 5)))) for _ in range(100)]
    sizes = [sum(f.n_fds for f in b) for b in wire.batches(six)]
    assert max(sizes) <= wire.SCM_MAX_FD and sum(sizes) == 600 and sizes[0] == 252
    big = [_flow(0, 1, (_half(buf=b"x" * 60000), _half())) for _ in range(3)]
    assert [len(b) for b in wire.batches(big)] == [1, 1, 1]


def test_a_batch_crosses_a_socketpair_with_its_descriptors() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c1, c2 = socket.socketpair()
    pr, pw = os.pipe()
    os.write(pw, b"hello")
    flow = _flow(c1.fileno(), c2.fileno(), (_half((pr, pw)), _half(buf=b"pending")))
    wire.send_batch(ours, 7, [flow])
    wire.close_flow_fds(flow)                        # the receiver has its own references
    c1.detach()
    c2.detach()
    got = wire.recv_message(theirs)
    assert isinstance(got, wire.Batch) and got.seq == 7
    (f,) = got.flows
    assert os.read(f.halves[0].pipe_r, 5) == b"hello"      # the pipe's bytes came along
    assert f.halves[1].buf == b"pending" and f.halves[1].pipe_r == -1
    assert f.client == ["192.0.2.1", 5555] and f.egress_address == "203.0.113.7"
    a = socket.socket(fileno=f.client_fd)
    b = socket.socket(fileno=f.upstream_fd)
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    for s in (a, b):
        s.close()
    for fd in (f.halves[0].pipe_r, f.halves[0].pipe_w):
        os.close(fd)
    wire.send_ack(theirs, 7, 1, 0)
    assert wire.recv_message(ours) == wire.Ack(7, 1, 0)
    theirs.close()
    assert wire.recv_message(ours) is None
    ours.close()


def test_garbage_is_refused_and_its_descriptors_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    ours.sendmsg([b"\xc1not msgpack"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [r]))])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(wire.HandoffError):
        wire.recv_message(theirs)
    assert set(os.listdir("/proc/self/fd")) <= before   # the received copy is closed
    with pytest.raises(BlockingIOError):
        wire.recv_message(theirs, socket.MSG_DONTWAIT)
    for fd in (r, w):
        os.close(fd)
    ours.close()
    theirs.close()


def test_orders_travel_on_a_channel_without_blocking() -> None:
    sup, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert orders.take_orders(worker) == []            # nothing queued: returns at once
    orders.send_order(sup, orders.Adopt(123), b)
    orders.send_order(sup, orders.HandOver(456), a)
    got = orders.take_orders(worker)
    assert [o for o, _s in got] == [orders.Adopt(123), orders.HandOver(456)]
    got[0][1].send(b"x")                             # the passed end works
    assert a.recv(1) == b"x"
    for s in (sup, worker, a, b, *(s for _o, s in got)):
        s.close()


def test_hello_and_ready_cross_a_socketpair_and_refuse_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        wire.send_hello(a, 1234)
        assert wire.recv_message(b) == wire.Hello(1234)
        wire.send_ready(b)
        assert isinstance(wire.recv_message(a), wire.Ready)
        r, w = os.pipe()
        a.sendmsg([wire._encoder.encode(wire.Ready())],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        os.close(r)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(wire.HandoffError, match="ready message carried descriptors"):
            wire.recv_message(b)
        assert len(os.listdir("/proc/self/fd")) == before  # the received copy was closed
        os.close(w)


def _fd_table_size() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("FDSize:"))


def test_reserve_fds_grows_the_descriptor_table_once_and_leaks_nothing() -> None:
    import resource

    size = _fd_table_size()
    want = 2 * size + 100
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= len(os.listdir("/proc/self/fd")) + want:
        pytest.skip("RLIMIT_NOFILE too low to grow the table here")
    opened = len(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        high = wire.reserve_fds(want, r)
        assert high >= opened + want
        assert _fd_table_size() > high
        assert len(os.listdir("/proc/self/fd")) == opened + 2  # only the pipe is left
        assert wire.reserve_fds(0, r) == -1
    finally:
        os.close(r)
        os.close(w)
