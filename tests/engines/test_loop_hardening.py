"""The Loop contract's hardening (issue 12), on every engine: watching an fd without reading it,
timeouts that fire on time while bytes sit queued to a stalled peer, SO_LINGER {1, 0} armed on
relayed sockets until the graceful close, and (core engines) a pipe pool that shrinks after a
burst. Each test drives the loop directly from the test thread with real loopback sockets.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from helpers import count_pipes, wait_until

from relay import engines
from relay.engines import CLOSE_REASONS, EV_DONE, EV_READABLE, EV_WATCH_TIMEOUT

pytestmark = pytest.mark.timeout(60)

CORE_ENGINES = ("uring", "epoll")


def _tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(outer end, relay end) of a loopback TCP connection; `rcvbuf` set on the outer end
    before connecting (so the window stays small)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            outer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        outer.connect(srv.getsockname())
        inner, _ = srv.accept()
    return outer, inner


@pytest.fixture
def make_loop(engine: str, fd_baseline: None) -> Iterator:
    loops = []

    def make(**options):
        loop, _reason = engines.create(engine, **options)
        loops.append(loop)
        return loop

    try:
        yield make
    finally:
        for loop in loops:
            loop.close()


def _events_until(loop, predicate, timeout: float) -> list[tuple]:
    events: list[tuple] = []
    deadline = time.monotonic() + timeout
    while not predicate(events) and time.monotonic() < deadline:
        events.extend(loop.run(20))
    return events


def test_watch_reports_readable_without_reading_then_times_out(make_loop) -> None:
    loop = make_loop()
    a, b = socket.socketpair()
    try:
        wid = loop.watch(b.fileno(), 9, 5000)
        assert loop.stats()["watching"] == 1
        assert not _events_until(loop, bool, 0.2), "fired before anything was sent"
        a.send(b"x")
        events = _events_until(loop, bool, 5)
        assert events == [(EV_READABLE, 9, b.fileno())]
        assert b.recv(10, socket.MSG_DONTWAIT) == b"x", "the watch must not read"
        assert loop.unwatch(wid) is False, "a watch reports once"

        start = time.monotonic()
        loop.watch(b.fileno(), 10, 300)
        events = _events_until(loop, bool, 5)
        waited = time.monotonic() - start
        assert events == [(EV_WATCH_TIMEOUT, 10, b.fileno())]
        assert 0.3 <= waited < 1.0, f"watch timeout after {waited:.2f}s (asked 0.3 s)"

        wid = loop.watch(b.fileno(), 11, 300)
        assert loop.unwatch(wid) is True
        a.send(b"y")
        assert not _events_until(loop, bool, 0.5), "an unwatched fd reported"
        stats = loop.stats()
        assert stats["watching"] == 0 and stats["watch_timeouts"] == 1
        assert stats["conns_open"] == 0, "a watch is not a pair"
        loop.watch(b.fileno(), 12, 5000)  # left open: close() drops it, the fd stays ours
        loop.close()
        b.send(b"still mine")
        assert a.recv(100) == b"still mine"
    finally:
        a.close()
        b.close()


def test_watch_reports_a_hangup(make_loop) -> None:
    loop = make_loop()
    a, b = socket.socketpair()
    try:
        loop.watch(b.fileno(), 1, 5000)
        a.close()
        assert _events_until(loop, bool, 5) == [(EV_READABLE, 1, b.fileno())]
        assert b.recv(10) == b""
    finally:
        b.close()


@pytest.mark.parametrize("which", ["idle", "half_close"])
def test_timeout_on_time_with_bytes_queued_to_a_stalled_reader(make_loop, which: str) -> None:
    """The client never reads (small receive buffer): bytes stay queued towards it and nothing
    moves. The pair must be reset between the timeout and the timeout + 1 s after the last byte
    moved, not about twice the timeout (the first expiry taken for progress)."""
    timeout_ms = 2000
    if which == "idle":
        loop = make_loop(idle_timeout_ms=timeout_ms, pipe_size=65536)
    else:
        loop = make_loop(idle_timeout_ms=60_000, half_close_timeout_ms=timeout_ms,
                         pipe_size=65536)
    client, relay_c = _tcp_pair(rcvbuf=4096)
    relay_u, origin = _tcp_pair()
    try:
        start = time.monotonic()
        loop.add_pair(relay_c.detach(), relay_u.detach())
        if which == "half_close":
            client.shutdown(socket.SHUT_WR)  # client -> origin is finished from the start
        origin.setblocking(False)
        chunk = b"z" * 65536
        last_sent = time.monotonic()
        done: list[tuple] = []
        while not done and time.monotonic() - start < 15:
            try:
                while origin.send(chunk):
                    last_sent = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:
                pass  # reset: the pair is over
            done = [e for e in loop.run(20) if e[0] == EV_DONE]
        ended = time.monotonic()
        assert done, "never timed out"
        assert CLOSE_REASONS[done[0][3]] == f"{which}_timeout"
        assert ended - start >= timeout_ms / 1000
        late = ended - last_sent - timeout_ms / 1000
        assert late < 1.0, f"reset {late:.2f}s after the {which} timeout (stalled reader)"
    finally:
        client.close()
        origin.close()


def test_linger_armed_while_relaying_cleared_for_graceful_close(make_loop) -> None:
    """SO_LINGER {1, 0} on both relayed sockets: if the process died now, the kernel would reset
    them. A clean end of both directions still closes with FIN (the peers see EOF)."""
    loop = make_loop()
    client, relay_c = _tcp_pair()
    relay_u, origin = _tcp_pair()
    fds = (relay_c.fileno(), relay_u.fileno())
    try:
        loop.add_pair(relay_c.detach(), relay_u.detach())
        loop.run(0)
        for fd in fds:
            probe = socket.socket(fileno=os.dup(fd))
            try:
                onoff, seconds = struct.unpack(
                    "ii", probe.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
            finally:
                probe.close()
            assert (onoff, seconds) == (1, 0), f"fd {fd}: SO_LINGER {{{onoff}, {seconds}}}"
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        origin.settimeout(5)
        got = b""
        while len(got) < 7:
            loop.run(20)
            try:
                got += origin.recv(100, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        origin.sendall(b"x" * 300_000)
        origin.shutdown(socket.SHUT_WR)
        events = _events_until(loop, lambda evs: any(e[0] == EV_DONE for e in evs), 10)
        assert [CLOSE_REASONS[e[3]] for e in events if e[0] == EV_DONE] == ["eof"]
        client.settimeout(5)
        received = 0
        while True:
            data = client.recv(1 << 16)  # a reset here would raise ConnectionResetError
            if not data:
                break
            received += len(data)
        assert received == 300_000
        assert origin.recv(10) == b""
    finally:
        client.close()
        origin.close()


def test_pipe_pool_shrinks_after_a_burst(make_loop, engine: str) -> None:
    """200 spliced pairs at once, then idle: the idle pipes above the low-water mark are closed
    once idle for pipe_release_ms (here 300 ms), and counted in pipes_released."""
    if engine not in CORE_ENGINES:
        pytest.skip("the asyncio engine has no pipes")
    release_ms = 300
    loop = make_loop(max_pipes=512, pipe_size=65536, pipes_keep_idle=8,
                     pipe_release_ms=release_ms)
    pairs = []
    try:
        for _ in range(200):
            client, relay_c = _tcp_pair(rcvbuf=65536)
            relay_u, origin = _tcp_pair()
            loop.add_pair(relay_c.detach(), relay_u.detach())
            client.setblocking(False)
            origin.setblocking(False)
            pairs.append((client, origin))
        chunk = b"p" * 65536
        got = [0] * len(pairs)
        peak = 0
        deadline = time.monotonic() + 20
        # Each client reads its first 128 KiB (the flow turns into a spliced stream), then stops:
        # its pipe then holds bytes it cannot deliver, so all 200 hold a pipe at once.
        while peak < 150 and time.monotonic() < deadline:
            for i, (client, origin) in enumerate(pairs):
                try:
                    origin.send(chunk)
                except BlockingIOError:
                    pass
                if got[i] < 131072:
                    try:
                        got[i] += len(client.recv(65536))
                    except BlockingIOError:
                        pass
            loop.run(0)
            peak = max(peak, loop.stats()["pipes_in_use"])
        assert peak >= 150, f"only {peak} pipes in use at once: the burst did not happen"
        for _client, origin in pairs:
            origin.shutdown(socket.SHUT_WR)
        open_clients = {i for i in range(len(pairs))}
        while open_clients and time.monotonic() < deadline + 20:
            for i in list(open_clients):
                try:
                    if not pairs[i][0].recv(1 << 16):
                        open_clients.discard(i)
                except BlockingIOError:
                    pass
            loop.run(0)
        assert not open_clients, f"{len(open_clients)} downloads did not finish"
        for client, _origin in pairs:
            client.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: (loop.run(10) or True) and loop.stats()["conns_open"] == 0, 10)
        # On a loaded machine the drain above can outlast release_ms, so some pipes may already
        # be released: count those with the idle ones.
        st = loop.stats()
        released_before = st["pipes_released"]
        idle_at_peak = st["pipes_free"] + released_before
        assert idle_at_peak >= 100, f"{idle_at_peak} idle pipes after the burst"
        pipes_then = count_pipes() + 2 * released_before
        assert wait_until(lambda: (loop.run(20) or True) and loop.stats()["pipes_free"] <= 8,
                          release_ms / 1000 + 3), f"still {loop.stats()['pipes_free']} idle"
        stats = loop.stats()
        assert stats["pipes_free"] == 8, "the low-water mark is kept"
        assert stats["pipes_released"] == idle_at_peak - 8
        assert count_pipes() == pipes_then - 2 * (idle_at_peak - 8), "pipe fds not closed"
    finally:
        for client, origin in pairs:
            client.close()
            origin.close()
