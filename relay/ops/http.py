"""A tiny HTTP/1.x GET server driven by the supervisor's selector, that no client can hold.

The supervisor has one thread and one loop: signals, reaping workers, reloads and the admin
socket all wait on it. So the /metrics endpoint never blocks: every socket is non-blocking,
each client is read and answered through the selector, and

- a client has REQUEST_DEADLINE seconds for its whole exchange (request line, headers and the
  answer), whatever it does: a slowloris sending a byte every second is cut off like an idle
  one (no per-read timeout a trickle could renew);
- at most MAX_CLIENTS are served at once; one more is answered 503 and closed at once, without
  reading its request;
- requests are at most MAX_REQUEST bytes; only GET and HEAD are served; each answer closes the
  connection (no keep-alive: a scraper opens one connection per scrape).

`expire()` must be called from the loop at least every few hundred ms (it is, on every turn):
it closes the clients past their deadline.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_CLIENTS", "REQUEST_DEADLINE", "HTTPServer", "Response"]

REQUEST_DEADLINE = 2.0  # seconds for a client's whole request and answer
MAX_CLIENTS = 8  # clients served at once
MAX_REQUEST = 8192  # bytes of request line + headers
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Route = Callable[[], Response]


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None


def _render(response: Response, head_only: bool = False) -> bytes:
    reason = _REASONS.get(response.status, "")
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + response.body


def text(status: int, body: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", body.encode())


class HTTPServer:
    """GET `routes[path]()` over a listening socket, from `selector`'s loop."""

    def __init__(self, selector: selectors.BaseSelector, address: tuple[str, int],
                 routes: dict[str, Route]) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self._selector = selector
        self._routes = routes
        self._clients: dict[socket.socket, _Client] = {}
        self.refused = 0  # clients turned away over MAX_CLIENTS
        self.expired = 0  # clients cut off at their deadline
        selector.register(sock, selectors.EVENT_READ, self._accept)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.socket)
        self.socket.close()

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors only (the selector is the parent's)."""
        for client in self._clients.values():
            client.sock.close()
        self.socket.close()

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            self.expired += 1
            self._drop(client)

    # ------------------------------------------------------------------ events

    def _accept(self) -> None:
        for _ in range(64):  # bounded: the loop has other work
            try:
                conn, _peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE, ECONNABORTED...: the next readiness event retries
            conn.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                self.refused += 1
                with contextlib.suppress(OSError):  # a fresh socket's buffer takes it whole
                    conn.send(_render(text(503, "too many concurrent requests\n")))
                conn.close()
                continue
            client = _Client(conn, time.monotonic() + REQUEST_DEADLINE)
            self._clients[conn] = client
            self._selector.register(conn, selectors.EVENT_READ, lambda c=client: self._read(c))

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbox += data
        end = client.inbox.find(b"\r\n\r\n")
        if end < 0:
            end = client.inbox.find(b"\n\n")  # bare-LF clients (nc, old tools)
        if end < 0:
            if len(client.inbox) > MAX_REQUEST:
                self._answer(client, text(431, "request too large\n"))
            return
        self._answer(client, *self._respond(bytes(client.inbox[:end])))

    def _respond(self, head: bytes) -> tuple[Response, bool]:
        words = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return text(400, "bad request line\n"), False
        method, target = words[0], words[1]
        if method not in ("GET", "HEAD"):
            return text(405, "only GET and HEAD\n"), False
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return text(404, "not found: try " + ", ".join(sorted(self._routes)) + "\n"), False
        try:
            return route(), method == "HEAD"
        except Exception as exc:  # a bug in a collector must not take the supervisor down
            return text(500, f"error: {type(exc).__name__}: {exc}\n"), False

    def _answer(self, client: _Client, response: Response, head_only: bool = False) -> None:
        client.outbox = memoryview(_render(response, head_only))
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        self._write(client)
        if client.sock in self._clients:
            self._selector.register(client.sock, selectors.EVENT_WRITE,
                                    lambda c=client: self._write(c))

    def _write(self, client: _Client) -> None:
        assert client.outbox is not None
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.outbox = client.outbox[sent:]
        if not client.outbox:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
