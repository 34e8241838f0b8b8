"""The embedding API (``relay.splice``, ``relay.Relay``) under asyncio and uvloop, on every engine.

Origins are the thread helpers of ``helpers.py``; the client and the relayed sockets live on the
event loop. The ``fd_baseline`` fixture checks that nothing is left open after each test.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from helpers import echo, pattern, reset_after, run_on, sha, sink

import relay
from relay import Relay, SpliceResult

MiB = 1 << 20
CORE_ENGINES = ("uring", "epoll")

pytestmark = pytest.mark.timeout(60)


async def relayed_pair(upstream_address: tuple[str, int]
                       ) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(client, accepted, upstream): ``client`` talks to ``accepted``; ``upstream`` is connected
    to the origin. The relay is to splice ``accepted`` <-> ``upstream``."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.setblocking(False)
        upstream.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        accepted, _ = await accept
        await loop.sock_connect(upstream, upstream_address)
    except BaseException:
        client.close()
        upstream.close()
        raise
    finally:
        listener.close()
    return client, accepted, upstream


async def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    try:
        while True:
            data = await loop.sock_recv(sock, 1 << 18)
            if not data:
                return bytes(buf), "eof"
            buf += data
    except ConnectionResetError:
        return bytes(buf), "reset"


def _check_spliced(engine: str, result: SpliceResult, total: int) -> None:
    assert result.spliced_bytes + result.copied_bytes >= total
    if engine in CORE_ENGINES:
        assert result.spliced_bytes > 0, "core engine moved bulk data without splice"
    else:
        assert result.spliced_bytes == 0


def test_splice_moves_bytes_both_ways(flavor, engine, origin, fd_baseline) -> None:
    up = origin(echo)
    data = pattern(2 * MiB, seed=7)

    async def main() -> tuple[SpliceResult, bytes, str]:
        loop = asyncio.get_running_loop()
        client, accepted, upstream = await relayed_pair(up.address)
        try:
            async with Relay(engine) as r:
                assert r.engine == engine
                task = asyncio.ensure_future(r.splice(accepted, upstream))
                await asyncio.sleep(0)  # let splice() start: it takes the fds at once
                assert accepted.fileno() == -1, "the Relay must own the detached socket"

                async def write() -> None:
                    await loop.sock_sendall(client, data)
                    client.shutdown(socket.SHUT_WR)

                writer = asyncio.ensure_future(write())
                got, end = await read_until_end(client)
                await writer
                return await task, got, end
        finally:
            client.close()

    result, got, end = run_on(flavor, main)
    assert end == "eof"
    assert sha(got) == sha(data)
    assert (result.c2s_bytes, result.s2c_bytes, result.reason) == (len(data), len(data), "eof")
    assert result.duration >= 0
    _check_spliced(engine, result, 2 * len(data))


def test_cancel_resets_both_sides(flavor, engine, origin, fd_baseline) -> None:
    up = origin(sink)

    async def main() -> str:
        loop = asyncio.get_running_loop()
        client, accepted, upstream = await relayed_pair(up.address)
        try:
            async with Relay(engine) as r:
                task = asyncio.ensure_future(r.splice(accepted, upstream))
                await loop.sock_sendall(client, b"y" * 1000)
                while not (up.results and up.results[0].nbytes >= 1000):
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                _, end = await read_until_end(client)
                return end
        finally:
            client.close()

    client_end = run_on(flavor, main)
    assert client_end == "reset", f"client saw {client_end!r} after cancel, expected a reset"
    [seen] = up.wait_results(1)
    assert seen.end == "reset", f"origin saw {seen.end!r} after cancel, expected a reset"


def test_origin_reset_is_reported_and_propagated(flavor, engine, origin, fd_baseline) -> None:
    up = origin(reset_after(100))

    async def main() -> tuple[SpliceResult, str]:
        loop = asyncio.get_running_loop()
        client, accepted, upstream = await relayed_pair(up.address)
        try:
            async with Relay(engine) as r:
                task = asyncio.ensure_future(r.splice(accepted, upstream))
                await loop.sock_sendall(client, b"z" * 100)
                _, end = await read_until_end(client)
                return await task, end
        finally:
            client.close()

    result, end = run_on(flavor, main)
    assert end == "reset"
    assert result.reason == "reset_origin"
    assert result.c2s_bytes == 100


def test_idle_timeout_option(flavor, engine, origin, fd_baseline) -> None:
    up = origin(sink)

    async def main() -> tuple[SpliceResult, str, float]:
        loop = asyncio.get_running_loop()
        client, accepted, upstream = await relayed_pair(up.address)
        try:
            async with Relay(engine, idle_timeout_ms=300) as r:
                t0 = loop.time()
                task = asyncio.ensure_future(r.splice(accepted, upstream))
                _, end = await read_until_end(client)
                return await task, end, loop.time() - t0
        finally:
            client.close()

    result, end, elapsed = run_on(flavor, main)
    assert result.reason == "idle_timeout"
    assert end == "reset"
    assert 0.2 <= elapsed < 3.0, f"idle pair reset after {elapsed:.2f}s (idle_timeout 0.3s)"


def test_many_concurrent_splices_on_one_relay(flavor, engine, origin, fd_baseline) -> None:
    up = origin(echo)
    n = 50

    async def one(r: Relay, i: int) -> tuple[SpliceResult, bytes]:
        loop = asyncio.get_running_loop()
        client, accepted, upstream = await relayed_pair(up.address)
        try:
            task = asyncio.ensure_future(r.splice(accepted, upstream))
            await loop.sock_sendall(client, b"%06d" % i)
            client.shutdown(socket.SHUT_WR)
            got, _ = await read_until_end(client)
            return await task, got
        finally:
            client.close()

    async def main() -> list[tuple[SpliceResult, bytes]]:
        async with Relay(engine) as r:
            return await asyncio.gather(*(one(r, i) for i in range(n)))

    results = run_on(flavor, main)
    for i, (result, got) in enumerate(results):
        assert got == b"%06d" % i
        assert (result.c2s_bytes, result.s2c_bytes, result.reason) == (6, 6, "eof")


def test_module_level_splice_is_released_with_its_loop(flavor, origin, fd_baseline) -> None:
    """``relay.splice`` creates a default Relay per event loop (engine auto) and closes it when
    the loop shuts down: the fd_baseline check after asyncio.run/uvloop.run proves it."""
    up = origin(echo)

    async def main() -> tuple[tuple[SpliceResult, bytes, str], Relay]:
        loop = asyncio.get_running_loop()
        results = []
        for i in range(2):  # the second call reuses the same default Relay
            client, accepted, upstream = await relayed_pair(up.address)
            try:
                task = asyncio.ensure_future(relay.splice(accepted, upstream))
                await loop.sock_sendall(client, b"hello%d" % i)
                client.shutdown(socket.SHUT_WR)
                got, end = await read_until_end(client)
                results.append((await task, got, end))
            finally:
                client.close()
        default = relay.embed._defaults[loop]
        assert not default.closed
        return results[-1], default

    (result, got, end), default = run_on(flavor, main)
    assert (got, end, result.reason) == (b"hello1", "eof", "eof")
    assert default.closed, "the default Relay outlived its event loop"
    assert default not in relay.embed._defaults.values()


def test_relay_refuses_a_foreign_event_loop(flavor, engine, fd_baseline) -> None:
    async def main() -> None:
        async with Relay(engine) as r:
            other: dict[str, Any] = {}

            def elsewhere() -> None:
                async def attempt() -> None:
                    a, b = socket.socketpair()
                    try:
                        await r.splice(a, b)
                    finally:
                        a.close()
                        b.close()

                try:
                    asyncio.run(attempt())
                except RuntimeError as exc:
                    other["error"] = str(exc)

            await asyncio.get_running_loop().run_in_executor(None, elsewhere)
            assert "outside the event loop" in other.get("error", ""), other

    run_on(flavor, main)


def test_sockets_owned_by_an_asyncio_transport_are_refused(flavor, fd_baseline) -> None:
    """The socket of an asyncio stream (or the stream itself) would move nothing: its
    transport keeps reading it. splice() says so, and what to pass instead."""

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.set_result(writer)

        loop = asyncio.get_running_loop()
        served: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            accepted = await served
            try:
                for owned in (writer.get_extra_info("socket"), writer, reader,
                              writer.transport):
                    with pytest.raises(TypeError, match="loop.sock_accept") as info:
                        await relay.splice(owned, accepted.get_extra_info("socket"))
                    assert "belongs to an asyncio transport" in str(info.value)
                # nothing was taken: the streams still work
                writer.write(b"ping")
                await writer.drain()
                accepted.write(b"pong")
                assert await reader.readexactly(4) == b"pong"
            finally:
                writer.close()
                accepted.close()
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()

    run_on(flavor, main)
