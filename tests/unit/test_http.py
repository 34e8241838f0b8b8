"""relay.ops.http and the admin routes on it: answers, HEAD, 404/405/400, /ready and /live,
driven by hand through a selector as the supervisor's loop drives it."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any

from relay import config
from relay.ops.admin import AdminServer
from relay.ops.metrics import Aggregator


def _exchange(sel: selectors.BaseSelector, server: AdminServer, address: tuple[str, int],
              request: bytes) -> bytes:
    with socket.create_connection(address, 2) as client:
        client.sendall(request)
        client.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                key.data()
            server.tick()
            try:
                data = client.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return answer
            answer += data
    raise AssertionError(f"no complete answer: {answer!r}")


def test_routes_and_readiness() -> None:
    state: dict[str, Any] = {"ready": False, "stopping": "", "generation": 1, "workers": [],
                             "engine": "auto", "engines": []}
    sel = selectors.DefaultSelector()
    server = AdminServer(sel, lambda: dict(state), lambda _reply: None, Aggregator())
    cfg = config.loads('[relay]\nmetrics_listen = "127.0.0.1:0"\n', require_listener=False)
    server.open(cfg)
    try:
        host, port = server.addresses()["metrics"].rsplit(":", 1)
        address = (host, int(port))

        def get(path: str, method: str = "GET") -> bytes:
            return _exchange(sel, server, address, f"{method} {path} HTTP/1.1\r\n\r\n".encode())

        assert get("/ready").startswith(b"HTTP/1.1 503 ")
        state["ready"] = True
        assert get("/ready").endswith(b"\r\n\r\nready: generation 1 serving\n")
        state["stopping"] = "drain"
        assert b"503 Service Unavailable" in get("/ready")
        assert get("/live").startswith(b"HTTP/1.1 200 ")
        head = get("/metrics", "HEAD")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        body = get("/metrics?x=1")
        assert b"relay_build_info{" in body and b"process_cpu_seconds_total" in body
        assert get("/nope").startswith(b"HTTP/1.1 404 ")
        assert get("/metrics", "POST").startswith(b"HTTP/1.1 405 ")
        assert _exchange(sel, server, address, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    finally:
        server.close()
        sel.close()
