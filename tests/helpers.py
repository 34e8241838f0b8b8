"""Test-only helpers (the harness shared with the demo is relay.lab): origin behaviours
(``handler(conn, seen)`` for ``relay.lab.origins.Origin``), clients, fd counts, the in-process
relay, and the skip helpers that wrap relay.lab's "why can't this run here" probes.

Every origin records what it saw in ``Origin.results`` (one ``Seen`` per connection) so a test
can assert on the far side of the relay: bytes and sha256 received, and how the stream ended
("eof" or "reset").
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from relay.lab.netns import netns_unavailable_reason
from relay.lab.origins import Origin, Seen
from relay.lab.process import PYTHON, SOURCE_ROOT, alive

__all__ = ["PYTHON", "REPO_ROOT", "Origin", "Seen", "alive"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
assert os.path.samefile(REPO_ROOT, SOURCE_ROOT), (
    f"tests of {REPO_ROOT} import relay from {SOURCE_ROOT}: set PYTHONPATH to this tree")
ENGINES = ("uring", "epoll", "asyncio")
CORE_ENGINES = ("uring", "epoll")
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


def hash_reply(conn: socket.socket, seen: Seen) -> None:
    """Read to EOF, answer with the SHA-256 (32 raw bytes) of everything read."""
    h = hashlib.sha256()
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        h.update(data)
        seen.nbytes += len(data)
    seen.end = "eof"
    conn.sendall(h.digest())


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
# does not import, or crashed while starting (probe_engines in tests/fixtures/engines.py,
# relay.engines.available).
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


# -- network namespaces --------------------------------------------------------------------------

def require_netns() -> None:
    """Skip the calling test with the reason when network-namespace tests cannot run here."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


# -- clients of relay processes ------------------------------------------------------------


@dataclass(frozen=True)
class Echoed:
    """One short connection that got its payload back."""
    port: int  # its local port (the client port the relay saw)
    seconds: float  # from before connect() to the last byte back


def echo_once(addr: tuple[str, int], payload: bytes = b"ping", timeout: float = 5.0,
              source: str | None = None) -> Echoed | None:
    """One short connection to an echo: connect, send `payload`, read it back whole, close.
    None on any failure."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(addr, timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            port = s.getsockname()[1]
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = s.recv(65536)
                if not data:
                    return None
                got += data
            return Echoed(port, time.monotonic() - t0) if got == payload else None
    except OSError:
        return None


def echo_roundtrip(addr: tuple[str, int], payload: bytes = b"ping", timeout: float = 5.0,
                   source: str | None = None) -> bool:
    """Connect, send `payload`, read it back whole; False on any failure."""
    return echo_once(addr, payload, timeout, source) is not None


def all_echoed(results: list[Echoed | None], what: str = "") -> list[Echoed]:
    """`results` of echo_once, asserting that none failed."""
    failed = results.count(None)
    assert not failed, f"{failed} of {len(results)} connections failed{what and ': ' + what}"
    return [r for r in results if r is not None]


class Transfer(threading.Thread):
    """Send `total` random bytes paced over `duration` s to a hash origin; check its digest."""

    def __init__(self, addr: tuple[str, int], total: int, duration: float) -> None:
        super().__init__(daemon=True)
        self.addr, self.total, self.duration = addr, total, duration
        self.connected = threading.Event()
        self.ok: bool | None = None
        self.error = ""

    def begin(self, timeout: float = 5.0) -> Transfer:
        """Start, and wait (up to `timeout` s) until connected; returns self."""
        self.start()
        self.connected.wait(timeout)
        return self

    def run(self) -> None:
        chunk_count = max(1, int(self.duration / 0.05))
        chunk = max(1, self.total // chunk_count)
        want = hashlib.sha256()
        try:
            with socket.create_connection(self.addr, timeout=30) as s:
                self.connected.set()
                sent = 0
                start = time.monotonic()
                i = 0
                while sent < self.total:
                    n = min(chunk, self.total - sent)
                    data = os.urandom(n)
                    s.sendall(data)
                    want.update(data)
                    sent += n
                    i += 1
                    delay = start + i * self.duration / chunk_count - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < 32:
                    data = s.recv(64)
                    if not data:
                        break
                    got += data
            self.ok = got == want.digest()
            if not self.ok:
                self.error = f"digest mismatch: got {len(got)} bytes"
        except OSError as exc:
            self.connected.set()
            self.ok = False
            self.error = f"{type(exc).__name__}: {exc}"


class ConnectionStream(threading.Thread):
    """New connections one after another (echo round trips) until stopped; counts failures."""

    def __init__(self, addr: tuple[str, int], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.addr, self.interval = addr, interval
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            n += 1
            payload = f"hello {n}".encode()
            try:
                with socket.create_connection(self.addr, timeout=5) as s:
                    s.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError("closed before the echo")
                        got += data
                    if got != payload:
                        raise ConnectionError("wrong echo")
                self.ok += 1
            except OSError as exc:
                self.failed += 1
                self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


def relay_cli(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`relay ARGS` run as its own process from this tree (PYTHONPATH first), without the
    caller's RELAY_* variables, output captured as text. `kw`: more subprocess.run arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([PYTHON, "-m", "relay", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def relay_totals(rp: Any) -> dict[str, Any]:
    """A running relay's counters added up over its workers, retired ones included."""
    from relay.ops.metrics import totals

    snap = rp.stats()
    return totals(snap["workers"], snap.get("retired"))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- seccomp -------------------------------------------------------------------------------------

def block_io_uring() -> None:
    """preexec_fn: a seccomp filter that fails io_uring_setup (425 on every architecture) with
    EPERM, as Docker's default profile does. Inherited across exec (no_new_privs)."""
    import ctypes

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    program = b"".join(
        [
            insn(0x20, 0, 0, 0),  # BPF_LD|BPF_W|BPF_ABS: seccomp_data.nr
            insn(0x15, 0, 1, 425),  # BPF_JMP|BPF_JEQ|BPF_K: io_uring_setup?
            insn(0x06, 0, 0, 0x00050000 | errno.EPERM),  # BPF_RET: SECCOMP_RET_ERRNO | EPERM
            insn(0x06, 0, 0, 0x7FFF0000),  # BPF_RET: SECCOMP_RET_ALLOW
        ]
    )
    buf = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


# Two configs whose nft plans tests/unit/test_nft.py renders and tests/netns/test_nft_apply.py
# applies: TCP tproxy listeners of both families and a backend listener; a backend listener alone.
TPROXY_CONFIG = """
[[listener]]
name = "in4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[listener]]
name = "in6"
bind = "[::]:7001"
mode = "tproxy"

[[listener]]
name = "plain"
bind = "127.0.0.1:8000"
backend = "127.0.0.1:9000"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"

[[egress]]
address = "2001:db8:7::7"
ports = "40000-40007"
"""

BACKEND_ONLY = """
[[listener]]
bind = "127.0.0.1:8000"
backend = "127.0.0.1:9000"
"""


def run_on(flavor: str, main: Callable[[], Awaitable[Any]]) -> Any:
    """Run the coroutine function `main` on asyncio or uvloop (the `flavor` fixture)."""
    if flavor == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


class UdpOrigin:
    """A UDP origin on a thread: answers each datagram with `reply(payload)` (a list of
    datagrams, possibly empty); `received` keeps (payload, peer) of every datagram."""

    def __init__(self, host: str = "127.0.0.1",
                 reply: Callable[[bytes], list[bytes]] = lambda b: [b]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.05)
        self.addr = self.sock.getsockname()[:2]
        self.reply = reply
        self.received: list[tuple[bytes, tuple[Any, ...]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((data, peer))
            for out in self.reply(data):
                try:
                    self.sock.sendto(out, peer)
                except OSError:
                    pass

    @property
    def port(self) -> int:
        return int(self.addr[1])

    @property
    def peers(self) -> list[tuple[Any, ...]]:
        return [peer for _data, peer in self.received]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
