"""add_listener(connect_to=...): the core accepts, admits (set_limits) and connects each client
to an IP backend itself, and reports the pair once as (EV_PAIR, cid, tag, peer).

What relay run's server relies on when it lets the core do it: the pair relays both ways and
ends with its EV_DONE under the EV_PAIR's id; a client the shared counters do not admit, one
that does not fit the table, or one whose upstream socket() fails at once comes to Python as an
ordinary EV_ACCEPT (the fd open, no count held), so Python's own path decides; every admitted
pair holds exactly one count of this worker's slot, counted with the other workers'. Both
engines, real loopback sockets.
"""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest
from test_core import BACKENDS, Loop, core
from test_core_connect import _received, _run_until

from relay.sock import pack_sockaddr

limits_mod = pytest.importorskip("relay_ext._limits")


def _kinds(events: list, kind: int) -> list:
    return [e for e in events if e[0] == kind]


def _setup(opened: list, backend: str, max_conns: int = 8, limits=None, slot: int = 0,
           ) -> tuple[core.Loop, socket.socket, socket.socket]:
    origin = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener.setblocking(False)
    opened.extend([origin, listener])
    loop = Loop(backend, max_conns=max_conns)
    opened.append(loop)
    if limits is not None:
        loop.set_limits(limits, slot)
    connect_to = pack_sockaddr(socket.AF_INET, origin.getsockname())
    loop.add_listener(listener.fileno(), 5, connect_to=connect_to)
    return loop, origin, listener


def _connect(opened: list, listener: socket.socket) -> socket.socket:
    client = socket.create_connection(listener.getsockname())
    opened.append(client)
    return client


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepted_client_is_relayed_as_one_ev_pair(opened, backend: str) -> None:
    loop, origin, listener = _setup(opened, backend)
    client = _connect(opened, listener)
    events: list = []
    _run_until(loop, events, lambda: bool(_kinds(events, core.EV_PAIR)))
    [(_kind, cid, tag, peer)] = _kinds(events, core.EV_PAIR)
    assert tag == 5
    assert peer == client.getsockname()
    assert not _kinds(events, core.EV_ACCEPT)
    upstream, _ = origin.accept()
    opened.append(upstream)
    client.sendall(b"ping")
    _run_until(loop, events, _received(upstream, b"ping"))
    upstream.sendall(b"pong")
    _run_until(loop, events, _received(client, b"pong"))
    assert loop.pair_info(cid)[:2] == (cid, 5)
    client.shutdown(socket.SHUT_WR)
    upstream.shutdown(socket.SHUT_WR)
    _run_until(loop, events, lambda: bool(_kinds(events, core.EV_DONE)))
    [done] = _kinds(events, core.EV_DONE)
    assert done[1] == cid and done[2] == 5
    assert core.REASONS[done[3]] == "eof"
    assert done[4:6] == (4, 4)
    stats = loop.stats()
    assert stats["accept_connects"] == 1
    assert stats["accepts"] == 1 and stats["conns_total"] == 1
    assert stats["accept_yields"] == 0  # no sibling slots: never over its share


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_admit_exactly_and_the_rest_come_as_ev_accept(opened, backend: str) -> None:
    limits = limits_mod.SharedLimits(2, 3, 0)
    assert limits.acquire(0) == limits_mod.ADMITTED  # a sibling worker holds one of the three
    loop, _origin, listener = _setup(opened, backend, limits=limits, slot=1)
    clients = [_connect(opened, listener) for _ in range(3)]
    events: list = []
    _run_until(loop, events,
               lambda: len(_kinds(events, core.EV_PAIR)) + len(_kinds(events, core.EV_ACCEPT)) == 3)
    pairs = _kinds(events, core.EV_PAIR)
    [accept] = _kinds(events, core.EV_ACCEPT)
    assert len(pairs) == 2
    assert limits.stats()["open_by_slot"] == [1, 2]
    # Not admitted: the client is Python's, open, no count held for it.
    names = {c.getsockname() for c in clients}
    assert {p[3] for p in pairs} | {accept[3]} == names
    fd = accept[2]
    with socket.socket(fileno=fd) as rejected:
        assert rejected.getpeername() == accept[3]
    # A pair's count is given back by the caller (Server._forget): then the next one is admitted.
    limits.release(1)
    _connect(opened, listener)
    _run_until(loop, events, lambda: len(_kinds(events, core.EV_PAIR)) == 3)
    assert limits.stats()["open_by_slot"] == [1, 2]
    assert loop.stats()["accept_connects"] == 3


def _over_its_share(limits, slot: int, n: int) -> None:
    for _ in range(n):
        assert limits.acquire(slot) == limits_mod.ADMITTED


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_over_its_share_leaves_the_connection_to_its_sibling(opened, backend: str) -> None:
    limits = limits_mod.SharedLimits(2, 100, 0)
    _over_its_share(limits, 1, 3)  # slot 1 holds 3, slot 0 none: 3 > 1.5 + 1
    heavy, _origin, listener = _setup(opened, backend, limits=limits, slot=1)
    light = Loop(backend, max_conns=8)  # a sibling worker on the same listening socket
    opened.append(light)
    light.set_limits(limits, 0)
    light.add_listener(listener.fileno(), 6, connect_to=_another_origin(opened))
    client = _connect(opened, listener)
    events: list = []
    deadline = time.monotonic() + 5
    while heavy.stats()["accept_yields"] == 0:  # run(0): never waits out the 1 ms pause
        assert time.monotonic() < deadline, "the heavy loop never saw the connection"
        events.extend(heavy.run(0))
    assert not events, events  # it stopped watching the listener instead of accepting
    light_events: list = []
    _run_until(light, light_events, lambda: bool(_kinds(light_events, core.EV_PAIR)))
    [pair] = _kinds(light_events, core.EV_PAIR)
    assert pair[2] == 6 and pair[3] == client.getsockname()
    # The heavy worker watches again after its pause, and there is nothing left for it.
    for _ in range(5):
        events.extend(heavy.run(5))
    assert not events and heavy.stats()["accepts"] == 0
    assert limits.stats()["open_by_slot"] == [1, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_over_its_share_still_accepts_what_nobody_else_takes(opened, backend: str) -> None:
    limits = limits_mod.SharedLimits(2, 100, 0)
    _over_its_share(limits, 1, 3)  # the sibling of slot 0 never runs (stopped, busy)
    loop, _origin, listener = _setup(opened, backend, limits=limits, slot=1)
    clients = [_connect(opened, listener) for _ in range(2)]
    events: list = []
    _run_until(loop, events, lambda: len(_kinds(events, core.EV_PAIR)) == 2)
    assert {p[3] for p in _kinds(events, core.EV_PAIR)} == {c.getsockname() for c in clients}
    stats = loop.stats()
    assert stats["accept_connects"] == 2
    # It sat out one wakeup, then took what was queued whatever the shares.
    assert stats["accept_yields"] >= 1
    assert limits.stats()["open_by_slot"] == [0, 5]


def _another_origin(opened: list) -> bytes:
    """A second origin (packed, for connect_to): the sibling loop's pairs go to an origin of its own."""
    origin = socket.create_server(("127.0.0.1", 0), backlog=16)
    opened.append(origin)
    return pack_sockaddr(socket.AF_INET, origin.getsockname())


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_table_hands_the_client_to_python(opened, backend: str) -> None:
    limits = limits_mod.SharedLimits(1, 100, 0)
    loop, _origin, listener = _setup(opened, backend, max_conns=1, limits=limits)
    _connect(opened, listener)
    _connect(opened, listener)
    events: list = []
    _run_until(loop, events,
               lambda: len(_kinds(events, core.EV_PAIR)) + len(_kinds(events, core.EV_ACCEPT)) == 2)
    assert len(_kinds(events, core.EV_PAIR)) == 1
    [accept] = _kinds(events, core.EV_ACCEPT)
    os.close(accept[2])
    assert limits.stats()["open"] == 1  # the refused one holds nothing


def _limit_fds_to_one_free(fillers: list[int]) -> int:
    """Fill every hole in the descriptor table (`fillers`: the caller closes them), then lower
    RLIMIT_NOFILE so that exactly one descriptor number is free: accept4() takes it and the
    upstream's socket() gets EMFILE. Returns the old soft limit."""
    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    while True:
        fd = os.open("/dev/null", os.O_RDONLY)
        if fd > top:
            os.close(fd)
            break
        fillers.append(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, hard))
    return soft


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_socket_failure_hands_the_client_to_python(opened, backend: str) -> None:
    limits = limits_mod.SharedLimits(1, 100, 0)
    loop, _origin, listener = _setup(opened, backend, limits=limits)
    client = _connect(opened, listener)
    fillers: list[int] = []
    soft = _limit_fds_to_one_free(fillers)
    events: list = []
    try:
        _run_until(loop, events, lambda: bool(events))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        for fd in fillers:
            os.close(fd)
    assert not _kinds(events, core.EV_PAIR), events
    [accept] = _kinds(events, core.EV_ACCEPT)
    assert accept[3] == client.getsockname()
    os.close(accept[2])
    assert limits.stats()["open"] == 0  # admitted, then given back when socket() failed
    assert loop.stats()["accept_connects"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_connect_to_and_limits_slot_are_refused(opened, backend: str) -> None:
    loop = Loop(backend, max_conns=4)
    opened.append(loop)
    listener = socket.create_server(("127.0.0.1", 0))
    opened.append(listener)
    with pytest.raises(ValueError):
        loop.add_listener(listener.fileno(), 1, connect_to=b"\x02\x00short")
    with pytest.raises(ValueError):
        loop.set_limits(limits_mod.SharedLimits(2, 1, 0), 2)
    loop.set_limits(None)
