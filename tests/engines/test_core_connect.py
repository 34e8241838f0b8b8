"""Loop.add_pair_connect: the core opens and connects the upstream itself (IP backends).

What relay run's server relied on when it made the upstream in Python must hold: a handshake
in flight is finished by the core (counted in connect_histogram) and the pair relays both ways; a refused port
ends as "refused" whether connect() says so at once (-errno returned, the client still the
caller's) or later (EV_DONE); a refused pair or a bad address leaves the client fd with the
caller and no upstream open. Both engines, on real loopback sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable

import pytest
from helpers import read_all, wait_until
from test_core import BACKENDS, Loop, core

from relay.sock import pack_sockaddr


def _run_until(loop: core.Loop, events: list, done: Callable[[], bool],
               timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out; events: {events}"
        events.extend(loop.run(10))


def _received(sock: socket.socket, want: bytes) -> Callable[[], bool]:
    """For _run_until: read what `sock` has (briefly), done once it got exactly `want`."""
    sock.settimeout(0.05)
    got = bytearray()

    def done() -> bool:
        try:
            got.extend(sock.recv(64))
        except TimeoutError:
            pass
        assert want.startswith(got), f"got {bytes(got)!r}, want {want!r}"
        return got == want
    return done


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _sockaddr(sock: socket.socket) -> bytes:
    packed = pack_sockaddr(sock.family, sock.getsockname())
    assert packed is not None
    return packed


def _client_fd(opened: list) -> tuple[socket.socket, int]:
    """A connected socket pair: (our end, the fd to hand to the loop as the client)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    opened.append(ours)
    return ours, theirs.detach()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_core_connected_upstream_relays_both_ways(opened, backend: str, family: str) -> None:
    host = "127.0.0.1" if family == "ipv4" else "::1"
    try:
        origin_srv = socket.create_server((host, 0), family=socket.AF_INET
                                          if family == "ipv4" else socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no {family} loopback: {exc}")
    opened.append(origin_srv)
    loop = Loop(backend, max_conns=8)
    opened.append(loop)
    client, fd = _client_fd(opened)
    cid = loop.add_pair_connect(fd, _sockaddr(origin_srv), 7, b"hdr:")
    assert cid >= 0
    origin, peer = origin_srv.accept()
    opened.append(origin)
    assert peer[0] == host
    events: list = []
    _run_until(loop, events, lambda: loop.connect_histogram()[2] == 1)
    assert loop.pair_info(cid)[:3] == (cid, 7, False)
    client.sendall(b"ping")
    _run_until(loop, events, _received(origin, b"hdr:ping"))
    origin.sendall(b"pong")
    _run_until(loop, events, _received(client, b"pong"))
    assert loop.pair_info(cid)[3:5] == (8, 4)
    client.shutdown(socket.SHUT_WR)
    origin.shutdown(socket.SHUT_WR)
    _run_until(loop, events, lambda: any(e[0] == core.EV_DONE for e in events))
    [done] = [e for e in events if e[0] == core.EV_DONE]
    assert core.REASONS[done[3]] == "eof"
    assert done[4:6] == (8, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_port_ends_as_refused(opened, backend: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, never listening: connect() is refused
    opened.append(holder)
    loop = Loop(backend, max_conns=8)
    opened.append(loop)
    client, fd = _client_fd(opened)
    before = _open_fds()
    cid = loop.add_pair_connect(fd, _sockaddr(holder), 1)
    if cid < 0:
        # connect() said so at once: nothing opened, the client is still ours.
        assert -cid == errno.ECONNREFUSED
        assert len(_open_fds()) == len(before)
        os.close(fd)
        return
    events: list = []
    _run_until(loop, events, lambda: any(e[0] == core.EV_DONE for e in events))
    [done] = [e for e in events if e[0] == core.EV_DONE]
    assert done[1] == cid
    assert core.REASONS[done[3]] == "refused"
    assert done[9] == errno.ECONNREFUSED
    client.settimeout(2)
    assert client.recv(1) == b"", "the client's end was closed"
    assert len(_open_fds()) == len(before) - 1, "both fds closed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_pair_and_bad_address_leave_the_client_with_the_caller(opened,
                                                                        backend: str) -> None:
    origin_srv = socket.create_server(("127.0.0.1", 0))
    opened.append(origin_srv)
    loop = Loop(backend, max_conns=1)
    opened.append(loop)
    _c1, fd1 = _client_fd(opened)
    assert loop.add_pair_connect(fd1, _sockaddr(origin_srv)) >= 0
    _c2, fd2 = _client_fd(opened)
    before = _open_fds()
    with pytest.raises(OSError, match="connection table full"):
        loop.add_pair_connect(fd2, _sockaddr(origin_srv))
    assert len(_open_fds()) == len(before), "the upstream opened for a refused pair was closed"
    with pytest.raises(ValueError, match="sockaddr"):
        loop.add_pair_connect(fd2, b"\x02\x00" + bytes(10))
    unix = socket.AF_UNIX.to_bytes(2, "little") + bytes(14)
    with pytest.raises(ValueError, match="sockaddr"):
        loop.add_pair_connect(fd2, unix)
    assert len(_open_fds()) == len(before)
    os.fstat(fd2)  # still open: ours
    os.close(fd2)


def test_pack_sockaddr_matches_the_kernels_view() -> None:
    """The packed address is what the kernel reports for the same address (getsockname
    through the raw sockaddr bytes of a bound socket)."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family)
            sock.bind((host, 0))
        except OSError:
            continue
        with sock:
            name = sock.getsockname()
            packed = pack_sockaddr(family, name)
            assert packed is not None
            size = 16 if family == socket.AF_INET else 28
            assert len(packed) == size
            # AF_INET in host order, then the port in network order
            assert int.from_bytes(packed[:2], "little") == family
            assert int.from_bytes(packed[2:4], "big") == name[1]
    assert pack_sockaddr(socket.AF_INET6, ("::1", 80, 5, 0)) is None  # a flow label: not taken


def test_server_upstream_failing_at_once_is_logged_as_before(relay_server, client,
                                                             caplog) -> None:
    """relay run's server on every engine (the core ones through add_pair_connect's -errno):
    a TCP connect() to a multicast address fails inside the call with ENETUNREACH, before any
    packet. The client is reset, the pair counted and logged "unreachable" with that errno."""
    relay = relay_server(("224.0.0.1", 80))
    with caplog.at_level("INFO", logger="relay.flow"):
        try:
            c = client(relay.address)
        except ConnectionResetError:
            end = "reset"
        else:
            end = read_all(c).end
        stats = relay.wait_closed("unreachable")
        assert wait_until(lambda: any(r.name == "relay.flow" for r in caplog.records), 2)
    assert end == "reset"
    assert stats["flows_open"] == 0 and stats["listener_total"] == {"main": 0}
    [rec] = [r for r in caplog.records if r.name == "relay.flow"]
    assert (rec.reason, rec.errno, rec.dest) == ("unreachable", "ENETUNREACH", "")
