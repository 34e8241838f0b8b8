"""The session table's view of the engine loop, on every engine: `pairs()` / `pair_info(cid)`
report the open pairs with bytes delivered each way, age and idle time; `kill(cid)` resets a
pair with reason "killed" (the peers see a reset) and leaves the others relaying."""

from __future__ import annotations

import socket
import time

import pytest

from relay import engines
from relay.engines.constants import CLOSE_REASONS, EV_DONE


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


def _run_until(loop, predicate, timeout: float = 5.0) -> list[tuple]:
    events: list[tuple] = []
    deadline = time.monotonic() + timeout
    while not predicate(events):
        assert time.monotonic() < deadline, f"timed out; events so far {events}"
        events += loop.run(20)
    return events


def _read_exactly(sock: socket.socket, n: int, loop) -> bytes:
    sock.setblocking(False)
    got = b""
    deadline = time.monotonic() + 5
    while len(got) < n:
        assert time.monotonic() < deadline, f"got {len(got)} of {n} bytes"
        loop.run(10)
        try:
            got += sock.recv(n - len(got))
        except BlockingIOError:
            pass
    return got


@pytest.mark.timeout(30)
def test_pairs_report_bytes_age_idle_and_kill_resets_one(engine: str) -> None:
    loop, _ = engines.create(engine, max_conns=16, max_pipes=4, idle_timeout_ms=60_000)
    clients, origins, cids = [], [], []
    try:
        for tag in (7, 8):
            client, client_peer = _tcp_pair()
            origin, origin_peer = _tcp_pair()
            cids.append(loop.add_pair(client_peer.detach(), origin_peer.detach(), tag))
            clients.append(client)
            origins.append(origin)
        clients[0].sendall(b"a" * 3000)
        assert _read_exactly(origins[0], 3000, loop) == b"a" * 3000
        origins[0].sendall(b"b" * 500)
        assert _read_exactly(clients[0], 500, loop) == b"b" * 500
        time.sleep(0.2)

        info = {p[0]: p for p in loop.pairs()}
        assert set(info) == set(cids)
        cid, tag, connecting, c2s, s2c, age_us, idle_us = info[cids[0]]
        assert (tag, connecting, c2s, s2c) == (7, False, 3000, 500)
        assert age_us >= 200_000 and 150_000 <= idle_us <= age_us
        assert info[cids[1]][1:5] == (8, False, 0, 0)
        assert loop.pair_info(cids[1]) is not None and loop.pair_info(cids[1])[0] == cids[1]

        assert loop.kill(cids[0]) is True
        events = _run_until(loop, lambda evs: any(e[0] == EV_DONE for e in evs))
        done = [e for e in events if e[0] == EV_DONE]
        assert [(e[1], CLOSE_REASONS[e[3]]) for e in done] == [(cids[0], "killed")]
        assert loop.pair_info(cids[0]) is None and loop.kill(cids[0]) is False
        assert [p[0] for p in loop.pairs()] == [cids[1]]
        for sock in (clients[0], origins[0]):
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
        # The other pair still relays.
        clients[1].sendall(b"still here")
        assert _read_exactly(origins[1], 10, loop) == b"still here"
    finally:
        loop.close()
        for s in clients + origins:
            s.close()


@pytest.mark.timeout(30)
def test_a_watch_is_not_a_pair(engine: str) -> None:
    """A watched fd (Loop.watch, PROXY header parking) is the caller's: the session table does
    not list it, and kill()/abort() by its id neither close it nor count a pair."""
    loop, _ = engines.create(engine, max_conns=16, max_pipes=4)
    a, b = _tcp_pair()
    try:
        wid = loop.watch(b.fileno(), 5, 10_000)
        assert loop.pairs() == []
        assert loop.pair_info(wid) is None
        assert loop.kill(wid) is False
        assert not loop.abort(wid)
        assert b.fileno() >= 0 and b.getsockname()  # still open, still ours
        assert loop.stats()["conns_open"] == 0
        assert loop.unwatch(wid) is True
    finally:
        loop.close()
        a.close()
        b.close()
