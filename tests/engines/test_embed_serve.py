"""The serving embedding API (``relay.start_server``): the core accepts and connects, Python only
routes. Real sockets on asyncio and uvloop, every engine; origins are ``helpers.py`` threads.
The ``fd_baseline`` fixture (through ``origin``) checks that nothing is left open."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from helpers import echo, pattern, run_on, sha, sink

import relay

MiB = 1 << 20

pytestmark = pytest.mark.timeout(60)


async def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def exchange(address: tuple[str, int], data: bytes) -> tuple[bytes, str]:
    """Send `data`, half-close, read to the end: (bytes read, "eof" | "reset"). A reset can
    come at any step, even before the connect is reported done (SO_ERROR)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    try:
        sock = await connect(address)
    except ConnectionResetError:
        return b"", "reset"
    try:
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        while True:
            chunk = await loop.sock_recv(sock, 1 << 18)
            if not chunk:
                return bytes(buf), "eof"
            buf += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(buf), "reset"
    finally:
        sock.close()


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_sync_route_relays_both_ways(engine, origin) -> None:
    up = origin(echo)
    data = pattern(2 * MiB, seed=11)
    calls: list[tuple[Any, Any]] = []

    def route(client: Any, original_dst: Any) -> tuple[str, int]:
        calls.append((client, original_dst))
        return up.address

    async def main() -> tuple[bytes, str, socket.socket, dict[str, int], tuple[Any, ...]]:
        server = await relay.start_server(("127.0.0.1", 0), route, engine=engine)
        assert server.engine == engine and server.is_serving
        got, end = await exchange(server.address, data)
        await wait_for(lambda: server.stats()["open"] == 0, "the pair to end")
        stats = server.stats()
        server.close()
        await server.wait_closed()
        return got, end, server.sockets, stats, server.address

    got, end, sockets, stats, address = run_on("asyncio", main)
    assert end == "eof"
    assert sha(got) == sha(data)
    assert len(calls) == 1
    client_addr, original_dst = calls[0]
    assert client_addr[0] == "127.0.0.1" and client_addr[1] > 0
    assert tuple(original_dst) == tuple(address)
    assert sockets == ()
    assert stats["accepted"] == stats["relayed"] == 1
    assert stats["refused"] == stats["route_errors"] == stats["connect_errors"] == 0
    assert stats["closed_eof"] == 1
    assert stats["bytes_c2s"] == stats["bytes_s2c"] == len(data)


def test_async_route_and_wildcard_original_dst(flavor, origin) -> None:
    up = origin(echo)
    seen: list[Any] = []

    async def route(client: Any, original_dst: Any) -> tuple[str, int]:
        await asyncio.sleep(0.01)  # a real await: the pair is made after the callback resumes
        seen.append(original_dst)
        return up.address

    async def main() -> list[tuple[bytes, str]]:
        server = await relay.start_server(("0.0.0.0", 0), route)
        target = ("127.0.0.1", server.address[1])
        try:
            results = await asyncio.gather(*(exchange(target, b"ping %d" % i)
                                              for i in range(20)))
            await wait_for(lambda: server.stats()["open"] == 0, "the pairs to end")
            assert server.stats()["relayed"] == 20
        finally:
            server.close()
            await server.wait_closed()
        return results

    results = run_on(flavor, main)
    assert sorted(results) == sorted((b"ping %d" % i, "eof") for i in range(20))
    # a wildcard listener asks the accepted socket where the client was going
    assert len(seen) == 20 and all(dst[0] == "127.0.0.1" for dst in seen)


def test_none_resets_that_client(flavor, origin) -> None:
    up = origin(echo)

    def route(client: Any, original_dst: Any) -> tuple[str, int] | None:
        return None

    async def main() -> tuple[str, dict[str, int]]:
        async with await relay.start_server(("127.0.0.1", 0), route) as server:
            _, end = await exchange(server.address, b"hello")
            stats = server.stats()
        return end, stats

    end, stats = run_on(flavor, main)
    assert end == "reset"
    assert stats["refused"] == 1 and stats["relayed"] == 0
    assert up.results == []


@pytest.mark.parametrize("kind", ["sync", "async", "bad value", "bad port"])
def test_route_failure_resets_only_that_client(kind, origin, caplog) -> None:
    up = origin(echo)

    async def route_async(client: Any, original_dst: Any) -> Any:
        await asyncio.sleep(0)
        return route_sync(client, original_dst)

    def route_sync(client: Any, original_dst: Any) -> Any:
        if client[1] == bad_port[0]:
            if kind == "bad value":
                return "not an address"
            if kind == "bad port":  # refused before any socket, as connect_ex would
                return (up.address[0], str(up.address[1]))
            raise RuntimeError("routing table on fire")
        return up.address

    bad_port = [0]

    async def main() -> tuple[str, bytes, str, dict[str, int]]:
        route = route_async if kind == "async" else route_sync
        async with await relay.start_server(("127.0.0.1", 0), route) as server:
            loop = asyncio.get_running_loop()
            bad = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            bad.setblocking(False)
            bad.bind(("127.0.0.1", 0))
            bad_port[0] = bad.getsockname()[1]
            try:
                await loop.sock_connect(bad, server.address)
                bad_end = "eof" if not await loop.sock_recv(bad, 10) else "data"
            except ConnectionResetError:
                bad_end = "reset"
            finally:
                bad.close()
            got, end = await exchange(server.address, b"still served")
            await wait_for(lambda: server.stats()["open"] == 0, "the good pair to end")
            stats = server.stats()
        return bad_end, got, end, stats

    with caplog.at_level(logging.ERROR, logger="relay.embed"):
        bad_end, got, end, stats = run_on("asyncio", main)
    assert bad_end == "reset"
    assert (got, end) == (b"still served", "eof")
    assert stats["route_errors"] == 1 and stats["relayed"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.embed"]
    assert len(messages) == 1 and "route()" in messages[0]
    if kind == "bad value":
        assert "'not an address'" in messages[0]
    elif kind == "bad port":
        assert f"'{up.address[1]}')" in messages[0]
    else:
        assert caplog.records[-1].exc_info is not None
        assert "routing table on fire" in caplog.text


def test_close_stops_accepting_and_drains(flavor, origin) -> None:
    up = origin(sink)
    data = pattern(256 * 1024, seed=5)

    async def main() -> tuple[str, bool, dict[str, int]]:
        loop = asyncio.get_running_loop()
        server = await relay.start_server(("127.0.0.1", 0), lambda c, d: up.address)
        client = await connect(server.address)
        try:
            await loop.sock_sendall(client, b"x")
            await wait_for(lambda: server.stats()["open"] == 1, "the pair")
            server.close()
            assert not server.is_serving
            # no new connection is accepted ...
            with pytest.raises(ConnectionRefusedError):
                late = await connect(server.address)
                late.close()
            # ... while the open pair still moves bytes, and wait_closed waits for it
            closing = asyncio.ensure_future(server.wait_closed())
            await loop.sock_sendall(client, data)
            await asyncio.sleep(0.2)
            waited = not closing.done()
            client.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(closing, 10)
        finally:
            client.close()
        return "ok", waited, server.stats()

    _, waited, stats = run_on(flavor, main)
    assert waited, "wait_closed() returned while a pair was still open"
    assert stats["closed_eof"] == 1 and stats["open"] == 0
    assert stats["bytes_c2s"] == 1 + len(data)
    assert up.results and up.results[0].nbytes == 1 + len(data)


def test_wait_closed_timeout_aborts(origin) -> None:
    up = origin(sink)

    async def main() -> tuple[str, dict[str, int]]:
        loop = asyncio.get_running_loop()
        server = await relay.start_server(("127.0.0.1", 0), lambda c, d: up.address)
        client = await connect(server.address)
        try:
            await wait_for(lambda: server.stats()["open"] == 1, "the pair")
            server.close()
            await server.wait_closed(timeout=0.1)
            try:
                end = "eof" if not await asyncio.wait_for(loop.sock_recv(client, 10), 5) \
                    else "data"
            except ConnectionResetError:
                end = "reset"
        finally:
            client.close()
        return end, server.stats()

    end, stats = run_on("asyncio", main)
    assert end == "reset"
    assert stats["closed_aborted"] == 1


def test_refused_upstream_resets_client(engine, origin) -> None:
    origin(echo)  # for the fd baseline
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    dead = spare.getsockname()  # bound, not listening: connecting is refused
    try:
        async def main() -> tuple[str, dict[str, int]]:
            async with await relay.start_server(("127.0.0.1", 0), lambda c, d: dead,
                                                engine=engine) as server:
                _, end = await exchange(server.address, b"hello")
                await wait_for(lambda: server.stats()["open"] == 0, "the pair to end")
                stats = server.stats()
            return end, stats

        end, stats = run_on("asyncio", main)
    finally:
        spare.close()
    assert end == "reset"
    assert stats["closed_refused"] + stats["connect_refused"] == 1


def test_wait_closed_needs_close(origin) -> None:
    origin(echo)

    async def main() -> None:
        server = await relay.start_server(("127.0.0.1", 0), lambda c, d: None)
        try:
            with pytest.raises(RuntimeError, match="close"):
                await server.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run_on("asyncio", main)


def test_route_to_a_name_is_resolved_off_the_hot_path(origin, caplog) -> None:
    first = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0][4][0]
    if first != "127.0.0.1":
        pytest.skip(f"localhost resolves to {first} first here, the origin listens on 127.0.0.1")
    up = origin(echo)
    names = iter([("localhost", up.port), ("no-such-host.invalid", up.port)])

    async def main() -> tuple[list[tuple[bytes, str]], dict[str, int]]:
        async with await relay.start_server(("127.0.0.1", 0), lambda c, d: next(names)) as server:
            results = [await exchange(server.address, b"by name"),
                       await exchange(server.address, b"nowhere")]
            stats = server.stats()
        return results, stats

    with caplog.at_level(logging.WARNING, logger="relay.embed"):
        results, stats = run_on("asyncio", main)
    assert results == [(b"by name", "eof"), (b"", "reset")]
    assert stats["relayed"] == 1 and stats["connect_errors"] == 1
    assert "cannot resolve no-such-host.invalid" in caplog.text
