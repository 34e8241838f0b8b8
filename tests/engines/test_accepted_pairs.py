"""Pairs whose client came from the core's own accept (add_pair client_accepted=True).

The core then skips the system calls the accept already made redundant: the client socket is
O_NONBLOCK from accept4() and inherited SO_LINGER {1, 0} from the listener add_listener armed.
These tests check that what those calls bought still holds: an aborted pair resets both peers
(what a killed worker does too), a finished one ends with a FIN each way, in either close order
(the last FIN is sent by close(), without a shutdown() before it).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest
from test_core import BACKENDS, Loop, core


def _run_until(loop: core.Loop, events: list, done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; events: {events}"
        events.extend(loop.run(10))


def _recv_ready(sock: socket.socket) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)     # bytes or EOF
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True     # a reset is an answer too

    return ready


def _linger(sock_or_fd: socket.socket | int) -> tuple[int, int]:
    if isinstance(sock_or_fd, int):
        sock = socket.socket(fileno=sock_or_fd)
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        finally:
            sock.detach()
    else:
        raw = sock_or_fd.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    return struct.unpack("ii", raw)


@pytest.fixture
def pair_setup(request: pytest.FixtureRequest) -> Iterator[Callable[[str], tuple]]:
    """make(backend) -> (loop, events, cid, client, origin): a relayed pair whose client was
    accepted by the loop and whose upstream is a SOCK_NONBLOCK socket, both handed over with
    the skip hints."""
    opened: list = []

    def make(backend: str) -> tuple:
        loop = Loop(backend, max_conns=16)
        opened.append(loop)
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)
        origin_srv = socket.create_server(("127.0.0.1", 0))
        opened.extend([srv, origin_srv])
        loop.add_listener(srv.fileno(), 1)
        assert _linger(srv) == (1, 0), "add_listener arms SO_LINGER {1, 0} on the listener"
        client = socket.create_connection(srv.getsockname())
        opened.append(client)
        events: list = []
        _run_until(loop, events, lambda: any(e[0] == core.EV_ACCEPT for e in events))
        [fd] = [e[2] for e in events if e[0] == core.EV_ACCEPT]
        assert _linger(fd) == (1, 0), "the accepted socket inherits the listener's linger"
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        rc = up.connect_ex(origin_srv.getsockname())
        origin, _ = origin_srv.accept()
        opened.append(origin)
        cid = loop.add_pair(fd, up.detach(), 1, rc != 0, client_accepted=True,
                            upstream_nonblocking=True)
        _run_until(loop, events, lambda: not loop.pair_info(cid)[2])  # connected
        return loop, events, cid, client, origin

    yield make
    for thing in reversed(opened):
        thing.close()


def _exchange(loop: core.Loop, events: list, client: socket.socket,
              origin: socket.socket) -> None:
    client.sendall(b"ping")
    _run_until(loop, events, _recv_ready(origin))
    assert origin.recv(16) == b"ping"
    origin.sendall(b"pong")
    _run_until(loop, events, _recv_ready(client))
    assert client.recv(16) == b"pong"


@pytest.mark.parametrize("backend", BACKENDS)
def test_aborted_accepted_pair_resets_both_peers(pair_setup, backend: str) -> None:
    loop, events, cid, client, origin = pair_setup(backend)
    _exchange(loop, events, client, origin)
    loop.abort(cid)
    for peer in (client, origin):
        peer.settimeout(2)
        with pytest.raises(ConnectionResetError):
            peer.recv(16)
    assert loop.stats()["resets_sent"] == 1


@pytest.mark.parametrize("first", ["client", "origin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_finished_accepted_pair_ends_with_fins(pair_setup, backend: str, first: str) -> None:
    loop, events, _cid, client, origin = pair_setup(backend)
    _exchange(loop, events, client, origin)
    a, b = (client, origin) if first == "client" else (origin, client)
    a.shutdown(socket.SHUT_WR)
    _run_until(loop, events, _recv_ready(b))
    assert b.recv(16) == b"", "the first FIN is forwarded as a FIN"
    # Half-closed: the other direction still carries bytes.
    b.sendall(b"tail")
    _run_until(loop, events, _recv_ready(a))
    assert a.recv(16) == b"tail"
    b.shutdown(socket.SHUT_WR)
    _run_until(loop, events, lambda: any(e[0] == core.EV_DONE for e in events))
    [done] = [e for e in events if e[0] == core.EV_DONE]
    assert core.REASONS[done[3]] == "eof"
    a.settimeout(2)
    assert a.recv(16) == b"", "the last FIN (sent by close()) arrives, not a reset"
    # Both relay sockets closed gracefully: writing to them now gets a reset at most after
    # the FIN, and the stats saw no reset sent.
    assert loop.stats()["resets_sent"] == 0
