"""Origins: the servers behind the relay, for the demo and the tests.

The lab's origin protocol (``serve_connection``): first ``SEEN <peer> <local>`` (what the
origin's kernel says the connection is: with a transparent relay, the soft-unicast source and
the original destination), then it reads to EOF and answers ``BYTES <n>``.

``Origin`` listens on one or more addresses (TCP or a unix socket, optionally inside a network
namespace) and runs ``handler(conn, seen)`` on a thread per connection; every connection is
recorded in ``Origin.results`` (one ``Seen``) so a caller can assert on the far side of the
relay. ``serve_origin`` is the same protocol as a process (`python -m relay.demo
--serve-origin`), for a namespace of its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.serve.flowlog import format_addr
from relay.sock import arm_reset

CHUNK = 1 << 20  # one recv_into() call of the origin protocol reads up to this much


def split_hostport(text: str) -> tuple[str, int]:
    """ "1.2.3.4:80" / "[2001:db8::1]:80" (the flow log's and the protocol's format) ->
    (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- the protocol -------------------------------------------------------------------------------


def serve_connection(conn: socket.socket, reset: bool = False) -> None:
    """The origin's side of one connection: greet with SEEN, read to EOF, answer BYTES."""
    with conn:
        peer, local = conn.getpeername(), conn.getsockname()
        conn.sendall(f"SEEN {format_addr(peer)} {format_addr(local)}\n".encode())
        buf = bytearray(CHUNK)
        if reset:  # read something, then abort: the relay must pass the RST on
            conn.recv_into(buf)
            arm_reset(conn)
            return
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(f"BYTES {total}\n".encode())


def read_line(sock: socket.socket) -> list[str]:
    """One line of the protocol, split in words."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed before a full line ({data!r})")
        data += chunk
    return data.decode().split()


def serve_origin(specs: Sequence[str]) -> None:
    """Listen on each "HOST:PORT" (port 0: any; suffix "/reset": abort every connection),
    print "READY addr..." and serve until killed."""
    bound = []
    for spec in specs:
        text, _, mode = spec.partition("/")
        host, port = split_hostport(text)
        lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(256)
        bound.append(format_addr(lsock.getsockname()))

        def accept_loop(lsock: socket.socket = lsock, reset: bool = mode == "reset") -> None:
            while True:
                conn, _ = lsock.accept()
                threading.Thread(target=serve_connection, args=(conn, reset), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()
    print("READY " + " ".join(bound), flush=True)
    threading.Event().wait()


# -- the threaded origin -----------------------------------------------------------------------


@dataclass
class Seen:
    """One connection as the origin saw it: its addresses (peer = the source), and what the
    handler recorded (bytes and sha256 read, how the stream ended: "eof", "reset",
    "error:<name>" ...)."""

    peer: Any = None
    local: Any = None
    nbytes: int = 0
    sha256: str = ""
    end: str = ""
    done: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


Handler = Callable[[socket.socket, Seen], None]


def lab_protocol(conn: socket.socket, seen: Seen) -> None:
    """``serve_connection`` as an ``Origin`` handler (a stuck client cannot hold it forever)."""
    conn.settimeout(20)
    serve_connection(conn)
    seen.end = "eof"


def _address(sockaddr: Any) -> Any:
    if isinstance(sockaddr, tuple):
        return str(sockaddr[0]), int(sockaddr[1])
    return sockaddr  # a unix socket's path ('' for an unnamed peer)


class Origin:
    """Listening sockets (``binds``: (host, port) pairs, port 0 for any; or one ``unix_path``),
    inside network namespace ``netns`` when given, and a thread per accepted connection running
    ``handler(conn, seen)``. ``address``/``port`` are the first listener's. ``close()`` stops it
    and joins every thread."""

    def __init__(self, handler: Handler = lab_protocol,
                 binds: Sequence[tuple[str, int]] = (("127.0.0.1", 0),), *,
                 backlog: int = 4096, unix_path: str | None = None,
                 netns: str | None = None) -> None:
        self.handler = handler
        self.unix_path = unix_path
        self.results: list[Seen] = []
        self._listeners: list[socket.socket] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = False
        try:
            if unix_path is not None:
                self._listen(socket.AF_UNIX, unix_path, backlog, netns)
            else:
                for host, port in binds:
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    self._listen(family, (host, port), backlog, netns)
        except BaseException:
            self.close()
            raise
        self.address: Any = self._listeners[0].getsockname()
        self.port: int = self.address[1] if isinstance(self.address, tuple) else 0

    def _listen(self, family: socket.AddressFamily, addr: Any, backlog: int,
                netns: str | None) -> None:
        if netns is None:
            lsock = socket.socket(family, socket.SOCK_STREAM)
        else:
            from relay.lab.netns import inside

            with inside(netns):  # the socket belongs to the namespace it was created in
                lsock = socket.socket(family, socket.SOCK_STREAM)
        self._listeners.append(lsock)
        if family != socket.AF_UNIX:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(addr)
        lsock.listen(backlog)
        t = threading.Thread(target=self._accept_loop, args=(lsock,), name="origin-accept",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # listener shut down by close()
            if self._closing:
                conn.close()
                return
            try:
                seen = Seen(_address(conn.getpeername()), _address(conn.getsockname()))
            except OSError:  # reset while it waited in the accept queue: nothing to serve
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn, seen), daemon=True)
            with self._lock:
                self.results.append(seen)
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, seen: Seen) -> None:
        try:
            self.handler(conn, seen)
        except OSError as exc:
            if not seen.end:
                seen.end = f"error:{type(exc).__name__}"
        finally:
            seen.done.set()
            with contextlib.suppress(OSError):
                conn.close()

    def wait_results(self, n: int, timeout: float = 10.0) -> list[Seen]:
        """The first ``n`` connections' results, once each handler finished."""
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"origin saw {len(self.results)} connections, expected {n}")
            time.sleep(0.01)
        for seen in self.results[:n]:
            if not seen.done.wait(timeout):
                raise AssertionError("origin handler did not finish")
        return self.results[:n]

    def close(self) -> None:
        self._closing = True
        for lsock in self._listeners:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)
            lsock.close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)
