"""pytest-benchmark micro-benchmarks of the core (relay_ext._core.Loop), per backend.

Not part of `make test` (it lives outside tests/); run with `python -m bench --micro`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

core = pytest.importorskip("relay_ext._core", reason="relay_ext._core is not built (make build)")

BACKENDS = ("uring", "epoll")
MESSAGE = b"m" * 64


def new_loop(backend: str) -> Any:
    try:
        return core.Loop(backend=backend, max_pipes=16, max_conns=1024)
    except OSError as exc:
        pytest.skip(f"backend {backend} unavailable: {exc}")


@pytest.fixture(params=BACKENDS)
def loop(request: pytest.FixtureRequest) -> Iterator[Any]:
    lp = new_loop(request.param)
    yield lp
    lp.close()


def pump_until(lp: Any, sock: socket.socket, size: int, timeout: float = 2.0) -> bytes:
    """Run the loop until `size` bytes are readable on `sock` (non-blocking); return them."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        lp.run(0)
        try:
            data += sock.recv(size - len(data))
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(data)} of {size} bytes arrived") from None
    return data


def relayed_pair(lp: Any) -> tuple[socket.socket, socket.socket]:
    """client <-> [loop pair] <-> origin over two socketpairs; returns (client, origin) ends."""
    client, client_inner = socket.socketpair()
    origin_inner, origin = socket.socketpair()
    for s in (client, origin):
        s.setblocking(False)
    lp.add_pair(client_inner.detach(), origin_inner.detach())
    return client, origin


@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_create_close(benchmark: Any, backend: str) -> None:
    new_loop(backend).close()  # skip early when the backend is unavailable
    benchmark(lambda: core.Loop(backend=backend, max_pipes=16, max_conns=1024).close())


def test_run0_idle(benchmark: Any, loop: Any) -> None:
    benchmark(loop.run, 0)


def test_add_pair_roundtrip_close(benchmark: Any, loop: Any) -> None:
    """add_pair + one 64-byte round trip + close both ends + collect EV_DONE."""

    def once() -> None:
        client, origin = relayed_pair(loop)
        client.send(MESSAGE)
        origin.send(pump_until(loop, origin, len(MESSAGE)))
        pump_until(loop, client, len(MESSAGE))
        client.close()
        origin.close()
        deadline = time.monotonic() + 2.0
        while loop.stats()["conns_open"] and time.monotonic() < deadline:
            loop.run(1)

    benchmark(once)


def test_roundtrip_64b(benchmark: Any, loop: Any) -> None:
    """One 64-byte request and response through an established pair."""
    client, origin = relayed_pair(loop)

    def once() -> None:
        client.send(MESSAGE)
        origin.send(pump_until(loop, origin, len(MESSAGE)))
        pump_until(loop, client, len(MESSAGE))

    try:
        benchmark(once)
    finally:
        client.close()
        origin.close()
        for _ in range(10):
            loop.run(1)
