"""The uring engine watches a relaying side with one multishot poll (relay_ext/uring.pxi).

A multishot poll only posts on a new wakeup, where the one-shot poll it replaced re-checked
readiness each time it was armed. Two paths exist only for it and are checked here, on both
backends so the epoll engine is held to the same behaviour:
- bytes left queued by the pump's fairness limit, with no new byte coming to wake anybody:
  the loop must come back for them by itself (a NOP re-runs the pump);
- a completion queue too small for the wakeups of an idle loop: the kernel ends those
  multishot polls (their last CQE goes to the overflow list), and the next messages on the
  same pairs must still be relayed (the poll is armed again).

Real loopback sockets; one core Loop driven from the test's thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from test_core import BACKENDS, backend_unavailable, core

from tests.helpers import pattern, sha

SO_SNDBUFFORCE = 32     # Linux: SO_SNDBUF/SO_RCVBUF past net.core.[rw]mem_max (CAP_NET_ADMIN)
SO_RCVBUFFORCE = 33


def tcp_pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair (outer end, relay end); rcvbuf: the relay end's buffer."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        if rcvbuf:      # inherited by the accepted socket, and sets the window it announces
            try:
                srv.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                pytest.skip("SO_RCVBUFFORCE needs CAP_NET_ADMIN")
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    if rcvbuf:
        outer.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, rcvbuf)
    return outer, inner


def recv_exactly(loop: core.Loop, sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    """Read n bytes from sock, running the loop meanwhile (it relays them)."""
    sock.setblocking(False)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < n:
        assert time.monotonic() < deadline, f"{len(data)} of {n} bytes after {timeout} s"
        loop.run(2)
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_left_by_the_fairness_limit_move_without_a_new_wakeup(backend: str) -> None:
    # One pump reads at most PUMP_ROUNDS x 64 KiB (1 MiB, copying) before it lets other pairs
    # run.  3 MiB are queued on the relay's client socket before the pair is added, and the
    # client sends nothing more: no wakeup will ever come for the rest.
    size = 3 << 20
    client, relay_c = tcp_pair(rcvbuf=4 * size)
    relay_u, origin = tcp_pair()
    payload = pattern(size, seed=7)
    client.settimeout(5)
    client.sendall(payload)
    time.sleep(0.05)        # loopback: every segment is in relay_c's receive queue by now
    with core.Loop(backend, splice=False, max_conns=4) as loop:
        try:
            loop.add_pair(relay_c.detach(), relay_u.detach())
            assert sha(recv_exactly(loop, origin, size)) == sha(payload)
            stats = loop.stats()
            assert stats["bytes_copied"] == size
            assert stats["conns_open"] == 1 and stats["submit_errors"] == 0
        finally:
            client.close()
            origin.close()


def relay_idle_pairs(loop: core.Loop, n: int, clients: list[socket.socket],
                     origins: list[socket.socket]) -> None:
    """n relayed pairs, nothing sent yet: their outer ends appended to clients / origins (so
    the caller's finally closes whatever was opened)."""
    for _ in range(n):
        client, relay_c = tcp_pair()
        relay_u, origin = tcp_pair()
        clients.append(client)
        origins.append(origin)
        loop.add_pair(relay_c.detach(), relay_u.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_polls_ended_by_a_full_completion_queue_are_armed_again(backend: str) -> None:
    # ring_entries=8: a completion queue of 64 entries.  200 relayed pairs sit idle with their
    # polls armed; all 200 clients send while the loop is not running, so the wakeups of 200
    # polls meet a queue of 64: the kernel ends the multishot polls it cannot post for.  Two
    # more messages per pair must still go through, each one only after the previous arrived.
    n = 200
    with core.Loop(backend, ring_entries=8, max_conns=4 * n) as loop:
        clients: list[socket.socket] = []
        origins: list[socket.socket] = []
        try:
            relay_idle_pairs(loop, n, clients, origins)
            for rnd in range(3):
                for i, client in enumerate(clients):
                    client.sendall(f"round {rnd} pair {i:04d}".encode())
                time.sleep(0.05)        # every wakeup happens before the loop runs again
                for i, origin in enumerate(origins):
                    want = f"round {rnd} pair {i:04d}".encode()
                    assert recv_exactly(loop, origin, len(want)) == want
            stats = loop.stats()
            if backend == "uring":
                assert stats["cq_overflows"] >= 1      # the overflow path was exercised
            assert stats["conns_open"] == n and stats["submit_errors"] == 0
            assert stats["sqe_starved"] == 0
        finally:
            for s in clients + origins:
                s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_and_fin_in_one_wakeup_end_the_stream(backend: str) -> None:
    # A multishot wakeup's short read stops without the recv() that would return EAGAIN; a
    # short read can eat the FIN queued behind its data, and no later wakeup announces it.
    # 20 idle relayed pairs; a child process sends each client's last bytes and FIN back to
    # back while this thread spins without a system call (task work waits for the next tick),
    # so the data and the FIN mostly reach the loop as one wakeup.  Every origin must see all
    # the bytes and then EOF.
    n = 20
    with core.Loop(backend, max_conns=4 * n) as loop:
        clients: list[socket.socket] = []
        origins: list[socket.socket] = []
        try:
            relay_idle_pairs(loop, n, clients, origins)
            loop.run(0)
            pid = os.fork()
            if pid == 0:        # the child: last words and FIN on every client
                try:
                    for i, client in enumerate(clients):
                        client.sendall(f"last words {i:02d}".encode())
                        client.shutdown(socket.SHUT_WR)
                finally:
                    os._exit(0)
            spin_until = time.perf_counter() + 0.1
            while time.perf_counter() < spin_until:
                pass
            os.waitpid(pid, 0)
            for i, origin in enumerate(origins):
                want = f"last words {i:02d}".encode()
                assert recv_exactly(loop, origin, len(want)) == want
                deadline = time.monotonic() + 5
                while True:         # then EOF, relayed by the loop
                    assert time.monotonic() < deadline, f"pair {i}: no EOF after its data"
                    loop.run(2)
                    try:
                        assert origin.recv(64) == b"", f"pair {i}: bytes after the last words"
                        break
                    except BlockingIOError:
                        continue
        finally:
            for s in clients + origins:
                s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_messages_and_a_fin_after_short_reads_are_relayed(backend: str) -> None:
    # The other side of stopping at a short read (both engines): nothing re-runs the pump but
    # the next readiness, so each later message, and a FIN that comes alone after them, must
    # wake the loop again (uring: the multishot poll; epoll: the level-triggered registration).
    with core.Loop(backend, max_conns=4) as loop:
        client, relay_c = tcp_pair()
        relay_u, origin = tcp_pair()
        try:
            loop.add_pair(relay_c.detach(), relay_u.detach())
            for i in range(20):
                msg = f"message {i:02d}".encode()
                client.sendall(msg)
                assert recv_exactly(loop, origin, len(msg)) == msg
                origin.sendall(msg[::-1])
                assert recv_exactly(loop, client, len(msg)) == msg[::-1]
            client.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 5
            while True:
                assert time.monotonic() < deadline, "no EOF after a FIN that came alone"
                loop.run(2)
                try:
                    assert origin.recv(64) == b""
                    break
                except BlockingIOError:
                    continue
        finally:
            client.close()
            origin.close()


@contextlib.contextmanager
def uring_pair() -> Iterator[tuple[core.Loop, socket.socket, socket.socket]]:
    """A uring loop relaying one pair: (loop, the client's end, the origin's end), all closed
    after."""
    with core.Loop("uring", max_conns=8) as loop:
        client, relay_c = tcp_pair()
        relay_u, origin = tcp_pair()
        try:
            loop.add_pair(relay_c.detach(), relay_u.detach())
            yield loop, client, origin
        finally:
            client.close()
            origin.close()


@pytest.mark.skipif(bool(backend_unavailable("uring")),
                    reason=f"uring: {backend_unavailable('uring')}")
def test_a_half_turning_bulk_gives_up_its_multishot_poll() -> None:
    # A multishot poll posts a CQE for every segment that lands, also while a bulk half waits
    # for its destination to drain the pipe: a half that turns bulk (splice) removes it and
    # goes on with one-shot polls.  A 64-byte exchange keeps its multishot poll.
    with uring_pair() as (loop, client, origin):
        for i in range(5):
            client.sendall(b"x" * 64)
            assert recv_exactly(loop, origin, 64) == b"x" * 64, i
        assert loop.stats()["multishot_ended"] == 0
        data = pattern(4 << 20)
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        got = recv_exactly(loop, origin, len(data))
        sender.join(10)
        assert sha(got) == sha(data)
        stats = loop.stats()
        assert stats["bytes_spliced"] > 0
        assert stats["multishot_ended"] >= 1
        client.sendall(b"after")            # the one-shot polls that followed still relay
        assert recv_exactly(loop, origin, 5) == b"after"


@pytest.mark.skipif(bool(backend_unavailable("uring")),
                    reason=f"uring: {backend_unavailable('uring')}")
def test_a_bulk_half_stays_on_one_shot_polls_after_a_small_read() -> None:
    # A bulk sender's queue is sometimes down to one small segment when the relay reads it (the
    # 106-byte tail of iperf3's 128 KiB write at loopback's 65,483-byte MSS): that splice is
    # shorter than splice_min and the half goes back to copying.  Had it gone back to a
    # multishot poll, the next burst would post a CQE per landed segment until the next read
    # turned it bulk again and removed the poll: 6.6x the CQEs and 1.7x the context switches
    # per GB on one iperf3 stream (docs/single-stream.md).  A half that has spliced keeps one-shot
    # polls; here each cycle reads a small message alone, then a burst.
    with uring_pair() as (loop, client, origin):
        for i in range(12):
            burst = pattern(256 << 10, seed=i)
            sender = threading.Thread(target=client.sendall, args=(burst,))
            sender.start()
            assert sha(recv_exactly(loop, origin, len(burst))) == sha(burst), i
            sender.join(10)
            client.sendall(b"t" * 100)      # alone in the queue: a splice of 100 bytes
            assert recv_exactly(loop, origin, 100) == b"t" * 100, i
        stats = loop.stats()
        assert stats["bytes_spliced"] > 12 * (256 << 10) // 2
        assert stats["multishot_ended"] <= 1    # the first turn to bulk only
        client.sendall(b"after")
        assert recv_exactly(loop, origin, 5) == b"after"
