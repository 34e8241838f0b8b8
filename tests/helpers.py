"""Test helpers: origin servers on threads (blocking sockets bound to port 0), clients, fd counts.

Every origin records what it saw in ``Origin.results`` (one ``Seen`` per connection) so a test
can assert on the far side of the relay: bytes and sha256 received, and how the stream ended
("eof" or "reset").
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

LINGER_RST = struct.pack("ii", 1, 0)
CHUNK = 256 * 1024


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def count_pipes() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                n += 1
        except OSError:
            pass  # closed between listdir and readlink
    return n


def describe_fds() -> list[str]:
    out = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:
            pass
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` pseudo-random bytes (fast: a random 1 MiB block repeated, shifted by seed)."""
    block = _BLOCK
    if n <= 0:
        return b""
    start = seed % len(block)
    reps = (n + start) // len(block) + 1
    return (block * reps)[start:start + n]


_BLOCK = os.urandom(1 << 20)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER {1, 0})."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    sock.close()


@dataclass
class Seen:
    """What one side read from one connection."""

    nbytes: int = 0
    sha256: str = ""
    end: str = ""  # "eof" | "reset" | "error:<name>"
    done: threading.Event = field(default_factory=threading.Event)


def read_all(sock: socket.socket, seen: Seen | None = None, chunk: int = CHUNK,
             pause: float = 0.0) -> Seen:
    """Read until EOF or error, hashing; ``pause`` seconds between reads (a slow reader)."""
    seen = seen or Seen()
    h = hashlib.sha256()
    try:
        while True:
            data = sock.recv(chunk)
            if not data:
                seen.end = "eof"
                break
            h.update(data)
            seen.nbytes += len(data)
            if pause:
                time.sleep(pause)
    except ConnectionResetError:
        seen.end = "reset"
    except OSError as exc:
        seen.end = f"error:{type(exc).__name__}"
    seen.sha256 = h.hexdigest()
    seen.done.set()
    return seen


class Origin:
    """A listening socket on 127.0.0.1:0 and a thread per accepted connection running
    ``handler(conn, seen)``. ``close()`` stops it and joins every thread."""

    def __init__(self, handler: Callable[[socket.socket, Seen], None], backlog: int = 4096,
                 unix_path: str | None = None) -> None:
        self.handler = handler
        self.unix_path = unix_path
        if unix_path is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
        self.sock.listen(backlog)
        self.address: Any = self.sock.getsockname()
        self.results: list[Seen] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="origin-accept",
                                          daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            seen = Seen()
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
            try:
                conn.close()
            except OSError:
                pass

    def wait_results(self, n: int, timeout: float = 10.0) -> list[Seen]:
        """The first ``n`` connections' results, once each handler finished."""
        assert wait_until(lambda: len(self.results) >= n, timeout), (
            f"origin saw {len(self.results)} connections, expected {n}")
        for seen in self.results[:n]:
            assert seen.done.wait(timeout), "origin handler did not finish"
        return self.results[:n]

    def close(self) -> None:
        self._closing = True
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.unix_path is not None:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass
        self._acceptor.join(5)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)


# -- origin behaviours: handler(conn, seen) ----------------------------------------------------

def echo(conn: socket.socket, seen: Seen) -> None:
    """Send back everything; at EOF, forward the FIN."""
    while True:
        data = conn.recv(CHUNK)
        if not data:
            seen.end = "eof"
            break
        seen.nbytes += len(data)
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def sink(conn: socket.socket, seen: Seen) -> None:
    """Read and hash until EOF or reset."""
    read_all(conn, seen)


def source(n: int, seed: int = 0) -> Callable[[socket.socket, Seen], None]:
    """Send ``n`` bytes, then close at once (right after the last write)."""
    data = pattern(n, seed)

    def handler(conn: socket.socket, seen: Seen) -> None:
        conn.sendall(data)
        conn.close()
        seen.end = "sent"

    return handler


def bidirectional(n: int, seed: int = 1) -> Callable[[socket.socket, Seen], None]:
    """Send ``n`` bytes (then FIN) while reading and hashing everything until EOF."""
    data = pattern(n, seed)

    def handler(conn: socket.socket, seen: Seen) -> None:
        def send() -> None:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        read_all(conn, seen)
        sender.join(60)

    return handler


def respond_after_eof(n: int, seed: int = 2) -> Callable[[socket.socket, Seen], None]:
    """Client-first half-close: read until EOF, then answer ``n`` bytes and close."""
    data = pattern(n, seed)

    def handler(conn: socket.socket, seen: Seen) -> None:
        read_all(conn, seen)
        if seen.end == "eof":
            conn.sendall(data)
        conn.close()

    return handler


def send_then_read(n: int, seed: int = 3) -> Callable[[socket.socket, Seen], None]:
    """Origin-first half-close: send ``n`` bytes and FIN at once, then read until EOF."""
    data = pattern(n, seed)

    def handler(conn: socket.socket, seen: Seen) -> None:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        read_all(conn, seen)

    return handler


def reset_after(n: int) -> Callable[[socket.socket, Seen], None]:
    """Read ``n`` bytes, then reset the connection (RST, not FIN)."""

    def handler(conn: socket.socket, seen: Seen) -> None:
        while seen.nbytes < n:
            data = conn.recv(min(CHUNK, n - seen.nbytes))
            if not data:
                seen.end = "eof"
                return
            seen.nbytes += len(data)
        seen.end = "reset_sent"
        reset(conn)

    return handler


# -- clients -------------------------------------------------------------------------------------

def connect(address: tuple[str, int], rcvbuf: int | None = None, nodelay: bool = False,
            timeout: float = 10.0, source_ip: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source_ip is not None:
            sock.bind((source_ip, 0))  # any 127/8 address is local on loopback
        if rcvbuf is not None:
            # Before connect(): the window scale is negotiated in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def send_in_thread(sock: socket.socket, data: bytes, shut: bool = True) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reading side of the test reports what went wrong

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def unanswered_backend() -> tuple[socket.socket, list[socket.socket]] | None:
    """A listening socket whose accept queue is full, so the kernel drops new SYNs (a
    blackhole on loopback). Returns (listener, fillers) or None if SYNs still get answered."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)  # sk_max_ack_backlog 0: one queued connection, then the queue is full
    fillers = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(lst.getsockname())
        fillers.append(s)
    time.sleep(0.05)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(0.3)
    try:
        probe.connect(lst.getsockname())
    except TimeoutError:
        return lst, fillers
    except OSError:
        pass
    finally:
        probe.close()
    for s in fillers:
        s.close()
    lst.close()
    return None


# -- the relay under test ------------------------------------------------------------------------

@dataclass
class RunningRelay:
    """A Server serving in a thread; ``address`` is its listener."""

    server: Any
    address: tuple[str, int]
    engine: str

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.server.stats()
        return stats

    def wait_closed(self, reason: str, count: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until ``count`` pairs ended with ``reason``; returns the stats then."""
        ok = wait_until(lambda: self.stats()["closed"][reason] >= count, timeout)
        stats = self.stats()
        assert ok, (f"expected {count} pairs closed with {reason!r}, "
                    f"closed counters: {stats['closed']}")
        return stats

    def wait_loop_stat(self, key: str, predicate: Callable[[int], bool],
                       timeout: float = 5.0) -> int:
        """The loop half of stats() is a snapshot refreshed every 0.25 s: poll it."""
        wait_until(lambda: predicate(self.stats().get(key, 0)), timeout)
        value: int = self.stats().get(key, 0)
        return value


def relay_config(engine: str, backend: tuple[str, int] | str, **relay_settings: Any) -> Any:
    from relay import config

    backend_text = backend if isinstance(backend, str) else f"{backend[0]}:{backend[1]}"
    settings: dict[str, Any] = {"engine": engine, "workers": 1}
    settings.update(relay_settings)
    return config.from_dict({
        "relay": settings,
        "listener": [{"name": "main", "bind": "127.0.0.1:0", "backend": backend_text}],
    }, "<test>")


def lowest_free_fd() -> int:
    """The fd number the next open() would get (fstat allocates nothing, unlike listdir)."""
    fd = 0
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1


# -- engines -------------------------------------------------------------------------------------

# Reasons that mean our own build is broken, not that this kernel lacks a feature: the core
# does not import, or crashed while starting (conftest.probe_engines, relay.engines.available).
_BROKEN_CORE = ("relay_ext._core is not importable", "failed in a child process")


def require_engine(name: str, availability: dict[str, str | None]) -> str:
    """``name`` if that engine runs here; skip when the kernel lacks what it needs (io_uring
    disabled, seccomp), fail when the core itself is broken: that is a bug, not a host limit."""
    reason = availability.get(name, "unknown engine")
    if reason is None:
        return name
    if core_broken(reason):
        pytest.fail(f"engine {name} is broken: {reason}")
    pytest.skip(f"engine {name} not available: {reason}")


def core_broken(reason: str | None) -> bool:
    return reason is not None and any(marker in reason for marker in _BROKEN_CORE)
