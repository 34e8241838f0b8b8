"""The connect-time histogram is counted in the engine loop (no per-connection event to Python).

Every engine (uring, epoll, asyncio) counts each pair it sees connect once into the buckets given
by set_connect_buckets; connect_histogram() reads (per-bucket counts, sum_us, count), also after
close(). A pair handed over (export_pair / import_pair) was counted by the loop that connected it
and is not counted again by the one that adopts it. Real loopback sockets.
"""

from __future__ import annotations

import socket
import time

import pytest
from test_core import BACKENDS, Loop

from relay import engines

N_PAIRS = 6
# Nothing connects on loopback in 0 us for certain, nor takes 100 s: bucket 0 may hold any part
# of them, bucket 1 must hold the rest, +Inf none.
BOUNDS_US = (0, 100_000_000)


def _connect_pairs(loop, n: int) -> tuple[list[socket.socket], list[int]]:
    """n client/upstream pairs through ``loop``, upstream connect in flight when added."""
    kept: list[socket.socket] = []
    cids = []
    with socket.create_server(("127.0.0.1", 0), backlog=n) as origin_srv:
        for _ in range(n):
            outer_srv = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(outer_srv.getsockname())
            inner, _ = outer_srv.accept()
            outer_srv.close()
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            rc = up.connect_ex(origin_srv.getsockname())
            origin, _ = origin_srv.accept()
            kept += [client, origin]
            cids.append(loop.add_pair(inner.detach(), up.detach(), 1, rc != 0))
    return kept, cids


def _run_until(loop, done, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"histogram so far: {loop.connect_histogram()}"
        loop.run(10)


@pytest.mark.parametrize("engine", ["uring", "epoll", "asyncio"])
def test_loop_counts_each_connect_once(engine: str, engine_availability) -> None:
    if engine_availability.get(engine):
        pytest.skip(f"{engine}: {engine_availability[engine]}")
    loop, _reason = engines.create(engine, max_conns=16)
    kept: list[socket.socket] = []
    try:
        loop.set_connect_buckets(BOUNDS_US)
        assert loop.connect_histogram() == ([0, 0, 0], 0, 0)
        kept, cids = _connect_pairs(loop, N_PAIRS)
        _run_until(loop, lambda: all(not loop.pair_info(cid)[2] for cid in cids))
        for _ in range(5):
            loop.run(10)  # nothing more to count: each pair once
        counts, sum_us, n = loop.connect_histogram()
        assert n == N_PAIRS and sum(counts) == N_PAIRS and counts[2] == 0
        assert sum_us >= counts[1]  # every pair in bucket 1 took at least 1 us
        assert not any(e for e in loop.run(0) if e[0] not in (engines.EV_ACCEPT,
                                                              engines.EV_DONE)), "no event kind 3"
    finally:
        loop.close()
        for s in kept:
            s.close()
    assert loop.connect_histogram()[2] == N_PAIRS, "readable after close()"


@pytest.mark.parametrize("engine", ["uring", "epoll", "asyncio"])
def test_bad_bounds_are_refused(engine: str, engine_availability) -> None:
    if engine_availability.get(engine):
        pytest.skip(f"{engine}: {engine_availability[engine]}")
    loop, _reason = engines.create(engine, max_conns=4)
    try:
        for bad in ((5, 5), (10, 1), (-1,), tuple(range(33))):
            with pytest.raises(ValueError, match="set_connect_buckets"):
                loop.set_connect_buckets(bad)
        loop.set_connect_buckets(tuple(range(32)))
        assert loop.connect_histogram() == ([0] * 33, 0, 0)
    finally:
        loop.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_handed_over_pair_is_counted_by_the_loop_that_connected_it(backend: str) -> None:
    first = Loop(backend, max_conns=4)
    second = Loop(backend, max_conns=4)
    kept: list[socket.socket] = []
    try:
        first.set_connect_buckets(BOUNDS_US)
        second.set_connect_buckets(BOUNDS_US)
        kept, [cid] = _connect_pairs(first, 1)
        _run_until(first, lambda: not first.pair_info(cid)[2])
        new_cid = second.import_pair(first.export_pair(cid))
        client, origin = kept
        client.sendall(b"ping")
        origin.settimeout(0.05)
        deadline = time.monotonic() + 5
        got = b""
        while got != b"ping":
            assert time.monotonic() < deadline, f"origin got {got!r}"
            second.run(10)
            try:
                got += origin.recv(16)
            except TimeoutError:
                pass
        assert second.pair_info(new_cid) is not None
        assert first.connect_histogram()[2] == 1
        assert second.connect_histogram() == ([0, 0, 0], 0, 0)
    finally:
        first.close()
        second.close()
        for s in kept:
            s.close()
