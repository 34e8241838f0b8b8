"""Unit tests of the Cython core's state machine (relay_ext._core.Loop), both backends.

Each test builds real TCP pairs on loopback, hands the relay-side ends to a Loop driven by a
thread, and checks what the peers see and what the loop reports.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from helpers import REPO_ROOT, count_fds, reset, unanswered_backend

import relay_ext._core as core  # built by `make test`: a missing core is a failure, not a skip

Loop = core.Loop
REASONS = core.REASONS


def backend_unavailable(name: str) -> str | None:
    try:
        Loop(name, max_conns=4).close()
    except OSError as exc:
        return str(exc)
    return None


BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(bool(backend_unavailable(name)),
                                                reason=f"{name}: {backend_unavailable(name)}"))
    for name in ("uring", "epoll")
]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (outer end, relay end)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    return outer, inner


@dataclass
class Driver:
    """Runs loop.run() on a thread; events land in `events`."""

    loop: object
    events: list[tuple[int, ...]] = field(default_factory=list)
    stop: bool = False
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[tuple] = field(default_factory=list)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            with self.lock:
                calls, self.pending = self.pending, []
            for fn, args, box in calls:
                box.append(fn(*args))
            for ev in self.loop.run(20):
                self.events.append(ev)

    def call(self, fn, *args):
        """Run fn on the loop thread (the loop is single-threaded) and return its result."""
        box: list = []
        with self.lock:
            self.pending.append((fn, args, box))
        deadline = time.monotonic() + 5
        while not box:
            assert time.monotonic() < deadline, "loop thread did not pick up the call"
            time.sleep(0.002)
        return box[0]

    def wait_done(self, count: int = 1, timeout: float = 10.0) -> list[tuple[int, ...]]:
        deadline = time.monotonic() + timeout
        while True:
            done = [e for e in self.events if e[0] == core.EV_DONE]
            if len(done) >= count:
                return done
            assert time.monotonic() < deadline, f"no EV_DONE after {timeout}s: {self.events}"
            time.sleep(0.01)

    def close(self) -> None:
        self.stop = True
        if self.thread:
            self.thread.join(5)
        self.loop.close()


@pytest.fixture
def make_loop() -> Iterator:
    drivers: list[Driver] = []
    base = count_fds()

    def factory(backend: str, **kw) -> Driver:
        d = Driver(Loop(backend, **kw))
        d.start()
        drivers.append(d)
        return d

    yield factory
    for d in drivers:
        d.close()
    # every fd the loops owned (ring, pipes, sockets) is gone
    deadline = time.monotonic() + 2
    while count_fds() > base and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count_fds() <= base


def relay_pair(drv: Driver, **kw) -> tuple[socket.socket, socket.socket, int]:
    client, relay_c = tcp_pair()
    relay_u, origin = tcp_pair()
    cid = drv.call(drv.loop.add_pair, relay_c.detach(), relay_u.detach(), 5, False,
                   kw.get("prefix", b""))
    return client, origin, cid


def relay_pairs(drv: Driver, count: int) -> list[tuple[socket.socket, socket.socket, int]]:
    """`count` pairs handed to the loop in one call (one loop-thread round trip)."""
    ends = [(tcp_pair(), tcp_pair()) for _ in range(count)]

    def add_all() -> list[int]:
        return [drv.loop.add_pair(rc.detach(), ru.detach(), 5, False, b"")
                for (_c, rc), (ru, _o) in ends]

    cids = drv.call(add_all)
    return [(c, o, cid) for ((c, _rc), (_ru, o)), cid in zip(ends, cids, strict=True)]


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splice", [True, False])
def test_bulk_both_ways_byte_exact(make_loop, backend: str, splice: bool) -> None:
    drv = make_loop(backend, splice=splice)
    client, origin, _ = relay_pair(drv)
    up, down = os.urandom(8 << 20), os.urandom(6 << 20)
    got: dict[str, bytes] = {}

    def side(sock: socket.socket, payload: bytes, key: str) -> None:
        t = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        t.start()
        got[key] = recv_all(sock)
        t.join()

    ts = [threading.Thread(target=side, args=(client, up, "client")),
          threading.Thread(target=side, args=(origin, down, "origin"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert hashlib.sha256(got["origin"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["client"]).digest() == hashlib.sha256(down).digest()
    done = drv.wait_done()
    ev = done[0]
    assert REASONS[ev[3]] == "eof"
    assert (ev[4], ev[5]) == (len(up), len(down))
    assert ev[6] + ev[7] >= len(up) + len(down)
    stats = drv.call(drv.loop.stats)
    if splice:
        assert stats["bytes_spliced"] > len(up)   # the bulk went zero-copy
    else:
        assert stats["bytes_spliced"] == 0 and stats["pipes_created"] == 0
    assert stats["pipes_in_use"] == 0
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_close_client_first_then_response(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv)
    request = os.urandom(300_000)
    client.sendall(request)
    client.shutdown(socket.SHUT_WR)
    assert recv_all(origin) == request          # EOF only after every byte
    response = os.urandom(2_000_000)
    origin.sendall(response)                    # the other direction still flows
    origin.close()
    assert recv_all(client) == response
    assert REASONS[drv.wait_done()[0][3]] == "eof"
    client.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_close_origin_first(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv)
    origin.sendall(b"banner\n")
    origin.shutdown(socket.SHUT_WR)
    assert recv_all(client) == b"banner\n"
    client.sendall(b"x" * 100_000)
    client.close()
    assert recv_all(origin) == b"x" * 100_000
    assert REASONS[drv.wait_done()[0][3]] == "eof"
    origin.close()


def sees_reset(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["client", "origin"])
def test_reset_reaches_the_other_side_as_reset(make_loop, backend: str, who: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv)
    resetter, other = (client, origin) if who == "client" else (origin, client)
    resetter.sendall(b"partial")
    assert other.recv(100) == b"partial"
    reset(resetter)
    assert sees_reset(other), "a truncated stream must not look like a clean close"
    assert REASONS[drv.wait_done()[0][3]] == f"reset_{who}"
    other.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_goes_first(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv, prefix=b"PROXY-HEADER|")
    client.sendall(b"payload")
    client.shutdown(socket.SHUT_WR)
    assert recv_all(origin) == b"PROXY-HEADER|payload"
    origin.close()
    client.close()
    drv.wait_done()


def refused_upstream() -> socket.socket:
    """A socket with a non-blocking connect to a loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    up = socket.socket()
    up.setblocking(False)
    assert up.connect_ex(("127.0.0.1", port)) in (errno.EINPROGRESS, errno.ECONNREFUSED)
    return up


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_upstream_resets_client(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, relay_c = tcp_pair()
    up = refused_upstream()
    drv.call(drv.loop.add_pair, relay_c.detach(), up.detach(), 9, True, b"")
    assert sees_reset(client)
    ev = drv.wait_done()[0]
    assert REASONS[ev[3]] == "refused" and ev[9] == errno.ECONNREFUSED and ev[2] == 9
    client.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_connect_timeout(make_loop, backend: str) -> None:
    drv = make_loop(backend, connect_timeout_ms=300)
    client, relay_c = tcp_pair()
    blackhole = unanswered_backend()
    if blackhole is None:
        pytest.skip("cannot make a loopback backend that drops SYNs (accept queue overflow)")
    listener, fillers = blackhole
    keep = [listener, *fillers]
    up = socket.socket()
    up.setblocking(False)
    up.connect_ex(listener.getsockname())
    t0 = time.monotonic()
    drv.call(drv.loop.add_pair, relay_c.detach(), up.detach(), 0, True, b"")
    ev = drv.wait_done(timeout=5)[0]
    assert REASONS[ev[3]] == "connect_timeout", REASONS[ev[3]]
    assert 0.25 < time.monotonic() - t0 < 3
    assert sees_reset(client)
    for s in keep:
        s.close()
    client.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_timeout_resets_both(make_loop, backend: str) -> None:
    drv = make_loop(backend, idle_timeout_ms=300)
    client, origin, _ = relay_pair(drv)
    client.sendall(b"ping")
    assert origin.recv(10) == b"ping"
    assert REASONS[drv.wait_done(timeout=5)[0][3]] == "idle_timeout"
    assert sees_reset(client) and sees_reset(origin)
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_close_timeout(make_loop, backend: str) -> None:
    drv = make_loop(backend, half_close_timeout_ms=300)
    client, origin, _ = relay_pair(drv)
    client.shutdown(socket.SHUT_WR)
    assert origin.recv(10) == b""                # FIN forwarded, origin never answers
    assert REASONS[drv.wait_done(timeout=5)[0][3]] == "half_close_timeout"
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_resets_both(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, cid = relay_pair(drv)
    assert drv.call(drv.loop.abort, cid) is True
    assert drv.call(drv.loop.abort, cid) is False        # already gone: ignored
    assert sees_reset(client) and sees_reset(origin)
    assert REASONS[drv.wait_done()[0][3]] == "aborted"
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_reader_gets_every_byte_before_eof(make_loop, backend: str) -> None:
    drv = make_loop(backend, half_close_timeout_ms=1500)
    client, relay_c = tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    relay_u, origin = tcp_pair()
    drv.call(drv.loop.add_pair, relay_c.detach(), relay_u.detach(), 0, False, b"")
    payload = os.urandom(3 << 20)
    origin.sendall(payload)
    origin.close()                               # FIN right after the last write
    got = bytearray()
    while True:
        try:
            data = client.recv(8192)
        except ConnectionResetError:
            raise AssertionError(f"reset after {len(got)} bytes: {drv.events}") from None
        if not data:
            break
        got += data
        if len(got) % (128 << 10) < 8192:
            time.sleep(0.05)     # paced reads: slower than the half-close timeout allows
    assert bytes(got) == payload
    client.close()
    assert REASONS[drv.wait_done()[0][3]] == "eof"


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_writes_arrive_promptly(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    origin.settimeout(2)
    for i in range(200):
        client.send(b"%04d" % i)
    want = b"".join(b"%04d" % i for i in range(200))
    got = b""
    t0 = time.monotonic()
    while len(got) < len(want):
        got += origin.recv(4096)
    assert got == want and time.monotonic() - t0 < 1.0
    client.close()
    origin.close()
    drv.wait_done()


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_pause_and_resume(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)
    srv.setblocking(False)
    drv.call(drv.loop.add_listener, srv.fileno(), 42)
    c1 = socket.create_connection(srv.getsockname())
    deadline = time.monotonic() + 5
    while not [e for e in drv.events if e[0] == core.EV_ACCEPT]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    acc = [e for e in drv.events if e[0] == core.EV_ACCEPT]
    assert acc[0][1] == 42
    drv.call(drv.loop.pause_accept, 42)
    time.sleep(0.1)
    drv.events.clear()
    c2 = socket.create_connection(srv.getsockname())   # completes in the kernel backlog
    time.sleep(0.3)
    assert not [e for e in drv.events if e[0] == core.EV_ACCEPT]
    drv.call(drv.loop.resume_accept, 42)
    deadline = time.monotonic() + 5
    while not [e for e in drv.events if e[0] == core.EV_ACCEPT]:
        assert time.monotonic() < deadline, "accept did not resume"
        time.sleep(0.01)
    drv.call(drv.loop.remove_listener, 42)
    for e in drv.events + acc:
        if e[0] == core.EV_ACCEPT:
            os.close(e[2])
    c1.close()
    c2.close()
    srv.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fileno_turns_readable_for_embedding(backend: str) -> None:
    with Loop(backend) as loop:
        srv = socket.create_server(("127.0.0.1", 0))
        srv.setblocking(False)
        loop.add_listener(srv.fileno(), 1)
        fd = loop.fileno()
        assert select.select([fd], [], [], 0.05)[0] == []
        c = socket.create_connection(srv.getsockname())
        assert select.select([fd], [], [], 2)[0] == [fd]
        events = []
        deadline = time.monotonic() + 2
        while not events and time.monotonic() < deadline:
            events = loop.run(0)
        assert events and events[0][0] == core.EV_ACCEPT
        os.close(events[0][2])
        loop.remove_listener(1)
        c.close()
        srv.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_pairs_and_table_reuse(make_loop, backend: str) -> None:
    drv = make_loop(backend, max_conns=64)
    for _round in range(3):
        pairs = relay_pairs(drv, 50)
        for client, origin, _ in pairs:
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            assert origin.recv(1) == b"x"
            origin.close()
            assert recv_all(client) == b""
            client.close()
    drv.wait_done(150)
    stats = drv.call(drv.loop.stats)
    assert stats["conns_open"] == 0 and stats["closed_eof"] == 150
    assert stats["conn_slots_used"] <= 64


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="backend"):
        Loop("kqueue")
    with pytest.raises(ValueError, match="max_conns"):
        Loop("epoll", max_conns=0)
    with Loop("epoll") as loop:
        with pytest.raises(ValueError, match="bad fds"):
            loop.add_pair(-1, 3)
        with pytest.raises(KeyError, match="no listener"):
            loop.pause_accept(99)
    with pytest.raises(RuntimeError, match="closed"):
        loop.run(0)


EMFILE_SCRIPT = textwrap.dedent(
    """
    import os, resource, socket, sys, time
    from relay_ext._core import Loop, EV_ACCEPT, EV_ACCEPT_ERROR
    loop = Loop(sys.argv[1])
    srv = socket.create_server(("127.0.0.1", 0), backlog=128)
    srv.setblocking(False)
    clients = [socket.create_connection(srv.getsockname()) for _ in range(10)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 3, hard))
    loop.add_listener(srv.fileno(), 1)      # 10 connections wait in the accept queue
    accepted, errors = [], []
    t0 = time.process_time()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for ev in loop.run(20):
            (accepted if ev[0] == EV_ACCEPT else errors).append(ev)
    cpu_paused = time.process_time() - t0
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 3
    while len(accepted) < len(clients) and time.monotonic() < deadline:
        for ev in loop.run(50):
            (accepted if ev[0] == EV_ACCEPT else errors).append(ev)
    st = loop.stats()
    print(len(clients), len(accepted), len(errors), st["accept_paused"], round(cpu_paused, 3))
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_emfile_pauses_accept_without_spinning(backend: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT, backend], capture_output=True, text=True,
        timeout=30, cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    clients, accepted, errors, paused, cpu = out.stdout.split()
    assert int(errors) >= 1 and int(paused) >= 1          # it noticed EMFILE and paused
    assert int(accepted) == int(clients)                  # and recovered by itself
    assert float(cpu) < 0.8                               # no accept spin while paused


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_pairs_hold_no_pipe_and_no_kernel_thread(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    client, origin, _ = relay_pair(drv)
    client.sendall(os.urandom(1 << 20))          # a bulk burst takes a pipe ...
    got = 0
    while got < 1 << 20:
        got += len(origin.recv(1 << 20))
    threads_before = len(os.listdir("/proc/self/task"))
    pairs = relay_pairs(drv, 300)
    for c, o, _ in pairs:
        c.sendall(b"hello")
        assert o.recv(5) == b"hello"
    time.sleep(0.3)
    stats = drv.call(drv.loop.stats)
    assert stats["pipes_in_use"] == 0            # ... and gives it back once idle
    assert stats["conns_open"] == 301
    # one-shot polls and multishot accept complete inline: no io-wq worker threads appear
    assert len(os.listdir("/proc/self/task")) == threads_before
    for c, o, _ in pairs + [(client, origin, 0)]:
        c.close()
        o.close()
    drv.wait_done(301)


# ---------------------------------------------------------------- workers sharing one listener

# A worker process: a Loop accepting on the inherited listening socket; each accepted client
# gets one byte ("accepted") and is closed, then the worker is busy for 2 ms (a worker with
# something to do: the case where the share matters).  On SIGTERM it prints its count.
WORKER = textwrap.dedent("""
    import os, signal, socket, struct, sys, time
    from relay_ext._core import EV_ACCEPT, Loop
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    n = 0
    with Loop(sys.argv[1]) as loop:
        loop.add_listener(int(sys.argv[2]), 1)
        print("ready", flush=True)
        while not stop:
            for ev in loop.run(100):
                if ev[0] == EV_ACCEPT:
                    n += 1
                    os.write(ev[2], b"a")
                    # SO_LINGER {1, 0} came with it from the listener: clear it for a FIN
                    s = socket.socket(fileno=ev[2])
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
                    s.close()
                    time.sleep(0.002)
    print(n, flush=True)
""")


@pytest.fixture
def shared_listener_workers() -> Iterator:
    procs: list[subprocess.Popen] = []
    lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    lsock.setblocking(False)

    def start(backend: str, count: int) -> list[subprocess.Popen]:
        for _ in range(count):
            p = subprocess.Popen([sys.executable, "-c", WORKER, backend, str(lsock.fileno())],
                                 pass_fds=[lsock.fileno()], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return procs

    yield lsock.getsockname(), start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # in case a test stopped it
            p.kill()
        p.wait()
    lsock.close()


def connect_and_wait_accepted(addr: tuple[str, int], timeout: float = 5.0) -> bool:
    """Open a connection and wait for a worker to accept it (its one byte)."""
    with socket.create_connection(addr, timeout=timeout) as c:
        try:
            return c.recv(1) == b"a"
        except TimeoutError:
            return False


def stop_workers(procs: list[subprocess.Popen]) -> list[int]:
    counts = []
    for p in procs:
        p.terminate()
        out, _ = p.communicate(timeout=10)
        counts.append(int(out.split()[-1]))
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_sharing_a_listener_each_take_a_share(shared_listener_workers, backend) -> None:
    # The uring accept used to be an exclusive waiter: one worker took every connection.
    addr, start = shared_listener_workers
    procs = start(backend, 2)
    n = 200
    # A burst.  (Between idle workers the race is won by whoever the scheduler runs first, often
    # the one that accepted last: its poll re-armed at the head of the socket's wait queue.
    # That costs nothing while the other has nothing to do; what matters is that a busy
    # worker's poll does not hold connections an idle one could take.)
    clients = [socket.create_connection(addr, timeout=5.0) for _ in range(n)]
    try:
        assert all(c.recv(1) == b"a" for c in clients)
    finally:
        for c in clients:
            c.close()
    counts = stop_workers(procs)
    assert sum(counts) == n
    assert min(counts) >= n // 4, counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_worker_swallows_no_connection(shared_listener_workers, backend) -> None:
    # A SIGSTOPped worker still has its poll on the socket: it must not take the wakeup that
    # the running worker needs (an exclusive waiter would, and the client would hang).
    addr, start = shared_listener_workers
    procs = start(backend, 2)
    procs[0].send_signal(signal.SIGSTOP)
    try:
        accepted = [connect_and_wait_accepted(addr, timeout=3.0) for _ in range(20)]
    finally:
        procs[0].send_signal(signal.SIGCONT)
    assert all(accepted), f"{accepted.count(False)} of 20 connections were never accepted"
    counts = stop_workers(procs)
    assert counts[1] == 20 and counts[0] == 0, counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splice", [True, False])
def test_byte_counters_count_delivered_bytes(make_loop, backend: str, splice: bool) -> None:
    """An origin that stops reading leaves bytes in the relay (copy buffer or pipe) when the
    pair is aborted: c2s_bytes, spliced_bytes and copied_bytes count only what reached it."""
    drv = make_loop(backend, splice=splice)
    client, relay_c = tcp_pair()
    relay_u, origin = tcp_pair()
    origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
    cid = drv.call(drv.loop.add_pair, relay_c.detach(), relay_u.detach(), 0, False, b"")
    client.setblocking(False)
    sent = 0
    chunk = os.urandom(256 << 10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the relay and both kernels are full
        try:
            sent += client.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                break
    time.sleep(0.2)
    drv.call(drv.loop.abort, cid)
    [done] = drv.wait_done()
    client.close()
    origin.close()
    c2s, s2c, spliced, copied = done[4:8]
    assert 0 < c2s < sent and s2c == 0
    assert spliced + copied == c2s, (spliced, copied, c2s)
    if not splice:
        assert spliced == 0
