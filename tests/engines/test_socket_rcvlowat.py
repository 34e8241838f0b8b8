"""``socket_rcvlowat``: low-water mode for bulk sources (uring engine).

After one splice finds the mark queued, the core raises SO_RCVLOWAT on that source, so the
kernel wakes its poll only once the mark is queued; each such poll carries a linked timeout
(``rcvlowat_wait_us``) so a tail below the mark is moved anyway, and a timeout that finds
little queued drops the mark again. Real loopback sockets, one core Loop driven from the test's
main thread while helper threads play client and origin.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import termios
import threading
import time

import pytest
from test_core import BACKENDS, backend_unavailable, core

MARK = 256 << 10
BURST = 1 << 20     # queued before the pair is added: the first splice finds the whole mark


def tcp_pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair (outer end, relay end); rcvbuf on the relay end if given."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    if rcvbuf:
        inner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return outer, inner


class Origin(threading.Thread):
    """Reads everything the relay delivers; `arrived` is the byte count so far."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.eof = False

    @property
    def arrived(self) -> int:
        return len(self.data)

    def run(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.data += chunk
        self.eof = True


def run_until(loop: core.Loop, predicate, timeout: float, what: str) -> float:
    """Drive the loop until predicate(); returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what}: not after {timeout} s"
        loop.run(5)
    return time.monotonic() - start


def start_bulk_pair(loop: core.Loop) -> tuple[socket.socket, Origin, int]:
    """A pair whose client has queued BURST bytes on the relay's socket before add_pair."""
    client, relay_c = tcp_pair(rcvbuf=4 << 20)   # room for the burst before anyone reads
    relay_u, origin_sock = tcp_pair()
    client.sendall(os.urandom(BURST))
    deadline = time.monotonic() + 5
    while _inq(relay_c) < BURST:
        assert time.monotonic() < deadline, f"only {_inq(relay_c)} bytes queued"
        time.sleep(0.005)
    origin = Origin(origin_sock)
    origin.start()
    cid = loop.add_pair(relay_c.detach(), relay_u.detach())
    return client, origin, cid


def _inq(sock: socket.socket) -> int:
    return int.from_bytes(fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"), "little")


@pytest.mark.skipif(bool(backend_unavailable("uring")),
                    reason=f"uring: {backend_unavailable('uring')}")
def test_tail_after_a_bulk_burst_arrives_promptly_and_the_mark_is_dropped() -> None:
    # A long wait (300 ms instead of 1 ms) so the mark is still up when the tail comes.
    with core.Loop("uring", socket_rcvlowat=MARK, rcvlowat_wait_us=300_000) as loop:
        client, origin, _ = start_bulk_pair(loop)
        run_until(loop, lambda: origin.arrived >= BURST, 10, "the burst")
        assert loop.stats()["lowat_raised"] >= 1        # the mark is up on the client side
        # A tail far below the mark, the connection left open: only the poll's linked timeout
        # can move it (the kernel does not wake the poll for it).
        client.sendall(b"t" * 100)
        took = run_until(loop, lambda: origin.arrived >= BURST + 100, 5, "the tail")
        assert took < 0.5, f"a 100-byte tail waited {took:.3f} s behind the low-water mark"
        stats = loop.stats()
        assert stats["lowat_timeouts"] >= 1
        # The timeout found less than a quarter of the mark: interactive again, so the next
        # small message is woken by its own arrival, not by a timeout.
        timeouts = stats["lowat_timeouts"]
        client.sendall(b"q" * 10)
        run_until(loop, lambda: origin.arrived >= BURST + 110, 5, "the next message")
        assert loop.stats()["lowat_timeouts"] == timeouts
        client.close()
        run_until(loop, lambda: origin.eof, 5, "the EOF")
        origin.join(5)
        origin.sock.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bulk_in_low_water_mode_delivers_every_byte(backend: str) -> None:
    with core.Loop(backend, socket_rcvlowat=MARK) as loop:
        client, origin, _ = start_bulk_pair(loop)
        rest = os.urandom(32 << 20)
        sender = threading.Thread(target=lambda: (client.sendall(rest),
                                                  client.shutdown(socket.SHUT_WR)))
        sender.start()
        run_until(loop, lambda: origin.eof, 60, "the EOF after 33 MiB")
        sender.join(5)
        origin.join(5)
        assert len(origin.data) == BURST + len(rest)
        assert hashlib.sha256(origin.data[BURST:]).digest() == hashlib.sha256(rest).digest()
        raised = loop.stats()["lowat_raised"]
        if backend == "uring":
            assert raised >= 1
        else:
            assert raised == 0      # no timeout to link to an epoll wait: the mark stays at 1
        client.close()
        origin.sock.close()


def test_the_mark_is_validated() -> None:
    with pytest.raises(ValueError, match="socket_rcvlowat"):
        core.Loop("epoll", socket_rcvlowat=-1)
    with pytest.raises(ValueError, match="rcvlowat_wait_us"):
        core.Loop("epoll", rcvlowat_wait_us=0)
