"""Issue 12 with real `relay run` processes: a worker never waits for a PROXY v2 header (dribbling
trusted clients and silent health checks are parked, then reset at their deadline and counted),
and a worker killed mid-stream resets its connections instead of ending them with a clean FIN."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
from helpers import echo as echo_handler
from helpers import require_engine, wait_for

from relay.lab.origins import Seen
from relay.lab.process import relay_config
from relay.serve import proxyproto

ENGINES = ("uring", "epoll", "asyncio")
TRUSTED_LISTENER = 'trusted_proxies = ["127.0.0.0/8"]\n'


def _worker_stats(rp: Any) -> dict[str, Any]:
    [worker] = rp.workers()
    stats: dict[str, Any] = worker["stats"]
    return stats


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    start = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        assert data, "echo connection closed"
        got += data
    assert got == payload
    return time.monotonic() - start


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ENGINES)
def test_dribbling_proxy_headers_never_stall_the_worker(origins: Any, relays: Any, engine: str,
                                                        engine_availability: Any) -> None:
    require_engine(engine, engine_availability)
    header_timeout = 2.0
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(
        echo.port, engine=engine, admin_socket=adm, workers=1,
        settings={"proxy_header_timeout": header_timeout}, extra=TRUSTED_LISTENER))
    addr = rp.wait_ready()["main"]
    header = proxyproto.build(("198.51.100.7", 40000), ("203.0.113.1", 443))
    established = socket.create_connection(addr, timeout=5)
    stalled: list[socket.socket] = []
    try:
        established.sendall(header)
        _round_trip(established, b"warm up")
        started = time.monotonic()
        for _ in range(20):
            s = socket.create_connection(addr, timeout=5)
            s.sendall(header[:20])  # half a header, then nothing
            stalled.append(s)
        stalled.append(socket.create_connection(addr, timeout=5))  # a silent health check
        worst = max(_round_trip(established, b"ping %d" % i) for i in range(20))
        assert worst < 0.1, f"an established echo waited {worst * 1000:.0f} ms"
        wait_for(lambda: _worker_stats(rp).get("proxy_header_waiting") == 21, 5,
                 "21 connections parked")

        ended: list[float] = []
        for s in stalled:
            s.settimeout(header_timeout + 5)
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
            ended.append(time.monotonic() - started)
        assert min(ended) >= header_timeout - 0.2, f"closed after {min(ended):.2f}s"
        assert max(ended) < header_timeout + 1.5, f"closed after {max(ended):.2f}s"
        stats = wait_for(lambda: (lambda st: st if st["denied"].get("proxy_header_timeout")
                                  == 21 else None)(_worker_stats(rp)), 5, "21 timeouts counted")
        assert stats["proxy_header_waiting"] == 0
        assert _round_trip(established, b"still fine") < 0.1
    finally:
        established.close()
        for s in stalled:
            s.close()


@pytest.mark.timeout(60)
def test_header_waiters_beyond_the_cap_are_reset_and_counted(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(
        echo.port, admin_socket=adm, workers=1,
        settings={"proxy_header_timeout": 30.0, "proxy_header_max_waiting": 3},
        extra=TRUSTED_LISTENER))
    addr = rp.wait_ready()["main"]
    silent = [socket.create_connection(addr, timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: _worker_stats(rp).get("proxy_header_waiting") == 3, 5, "3 parked")
        try:
            # The reset may already have arrived when connect() returns.
            with socket.create_connection(addr, timeout=5) as extra:
                assert extra.recv(10) == b""
        except ConnectionResetError:
            pass
        wait_for(lambda: _worker_stats(rp)["denied"].get("proxy_header_overflow") == 1, 5,
                 "the overflow counted")
    finally:
        for s in silent:
            s.close()


def _endless_source(conn: socket.socket, seen: Seen) -> None:
    chunk = bytes(1 << 20)
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        seen.end = "reset"
    finally:
        conn.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ENGINES)
def test_sigkilled_worker_resets_its_downloads(origins: Any, relays: Any, engine: str,
                                               engine_availability: Any) -> None:
    """SIGKILL a worker in the middle of 5 downloads: every client sees a reset, none a FIN."""
    require_engine(engine, engine_availability)
    up = origins(_endless_source)
    rp = relays(lambda adm: relay_config(up.port, engine=engine, admin_socket=adm, workers=1))
    addr = rp.wait_ready()["main"]
    [worker] = rp.workers()
    clients = [socket.create_connection(addr, timeout=10) for _ in range(5)]
    ends: list[str] = [""] * len(clients)
    received = [0] * len(clients)
    four_mib = threading.Barrier(len(clients) + 1, timeout=30)

    def download(i: int) -> None:
        s = clients[i]
        passed = False
        try:
            while True:
                data = s.recv(1 << 16)
                if not data:
                    ends[i] = "eof"
                    break
                received[i] += len(data)
                if not passed and received[i] >= 4 << 20:
                    passed = True
                    four_mib.wait()
                    time.sleep(0.05)  # slow down: bytes stay in flight in the relay
        except ConnectionResetError:
            ends[i] = "reset"
        except OSError as exc:
            ends[i] = f"error {exc}"

    threads = [threading.Thread(target=download, args=(i,), daemon=True)
               for i in range(len(clients))]
    try:
        for t in threads:
            t.start()
        four_mib.wait()
        os.kill(worker["pid"], signal.SIGKILL)
        for t in threads:
            t.join(20)
        assert ends == ["reset"] * len(clients), f"clients saw {ends} after {received} bytes"
    finally:
        for s in clients:
            s.close()
