"""One behavioural suite, run against every engine (uring, epoll, asyncio).

Each test drives a real ``relay.serve.server.Server`` (backend mode, loopback) with real client and
origin sockets, checks the bytes at both ends, how each side saw the stream end (EOF vs reset),
the server's per-reason close counters, and (through the fixtures) that file descriptors and
pipes are back to their baseline once the server stopped. Engines that cannot run here are
skipped with the reason ``relay.engines.available()`` gives.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import pytest
from helpers import (
    bidirectional,
    core_broken,
    echo,
    lowest_free_fd,
    pattern,
    read_all,
    reset,
    reset_after,
    respond_after_eof,
    send_in_thread,
    send_then_read,
    sha,
    sink,
    source,
    unanswered_backend,
    wait_until,
)

MiB = 1 << 20
CORE_ENGINES = ("uring", "epoll")

pytestmark = pytest.mark.timeout(120)


def _assert_spliced(relay, at_least: int) -> None:
    """On the core engines the zero-copy path must have carried bulk data."""
    if relay.engine not in CORE_ENGINES:
        return
    spliced = relay.wait_loop_stat("bytes_spliced", lambda v: v >= at_least)
    assert spliced >= at_least, f"bytes_spliced {spliced} < {at_least}: bulk data was copied"


@pytest.mark.parametrize("size_name", ["0", "1", "pipe-1", "pipe", "pipe+1"])
def test_exact_sizes_both_directions(relay_server, origin, client, size_name: str) -> None:
    up = origin(echo)
    relay = relay_server(up.address)
    pipe = relay.stats()["pipe_size_granted"]
    assert pipe > 0
    size = {"0": 0, "1": 1, "pipe-1": pipe - 1, "pipe": pipe, "pipe+1": pipe + 1}[size_name]
    data = pattern(size, seed=size)

    c = client(relay.address)
    writer = send_in_thread(c, data)
    got = read_all(c)
    writer.join(30)

    assert got.end == "eof"
    assert got.nbytes == size
    assert got.sha256 == sha(data)
    [seen] = up.wait_results(1)
    assert (seen.nbytes, seen.end) == (size, "eof")
    stats = relay.wait_closed("eof")
    assert stats["closed"]["reset_client"] == stats["closed"]["reset_origin"] == 0
    assert stats["listener_total"]["main"] == 1


def test_64mib_both_directions_at_once(relay_server, origin, client) -> None:
    n = 64 * MiB
    up = origin(bidirectional(n, seed=11))
    relay = relay_server(up.address)
    data = pattern(n, seed=5)

    c = client(relay.address, timeout=60)
    writer = send_in_thread(c, data)
    got = read_all(c)
    writer.join(60)

    assert (got.end, got.nbytes) == ("eof", n)
    assert got.sha256 == sha(pattern(n, seed=11)), "origin -> client bytes differ"
    [seen] = up.wait_results(1, timeout=60)
    assert (seen.end, seen.nbytes) == ("eof", n)
    assert seen.sha256 == sha(data), "client -> origin bytes differ"
    relay.wait_closed("eof")
    _assert_spliced(relay, n)  # 128 MiB moved: at least half of it without a copy


def test_half_close_client_first(relay_server, origin, client) -> None:
    request, response = 100_000, 4 * MiB
    up = origin(respond_after_eof(response, seed=21))
    relay = relay_server(up.address)
    c = client(relay.address)
    c.sendall(pattern(request, seed=20))
    c.shutdown(socket.SHUT_WR)  # our FIN: the origin must see it only after every byte
    got = read_all(c)  # ...and the other direction keeps flowing after it

    [seen] = up.wait_results(1)
    assert (seen.end, seen.nbytes) == ("eof", request)
    assert seen.sha256 == sha(pattern(request, seed=20))
    assert (got.end, got.nbytes) == ("eof", response)
    assert got.sha256 == sha(pattern(response, seed=21))
    relay.wait_closed("eof")


def test_half_close_origin_first(relay_server, origin, client) -> None:
    response, request = 3 * MiB, 2 * MiB
    up = origin(send_then_read(response, seed=31))
    relay = relay_server(up.address)
    c = client(relay.address)
    got = read_all(c)  # origin sent and half-closed at once: all bytes, then EOF
    assert (got.end, got.nbytes) == ("eof", response)
    assert got.sha256 == sha(pattern(response, seed=31))

    # The client -> origin direction still works after the origin's FIN.
    c.sendall(pattern(request, seed=30))
    c.shutdown(socket.SHUT_WR)
    [seen] = up.wait_results(1)
    assert (seen.end, seen.nbytes) == ("eof", request)
    assert seen.sha256 == sha(pattern(request, seed=30))
    relay.wait_closed("eof")


def test_origin_reset_reaches_client_as_reset(relay_server, origin, client) -> None:
    up = origin(reset_after(1000))
    relay = relay_server(up.address)
    c = client(relay.address)
    c.sendall(pattern(1000))
    got = read_all(c)
    assert got.end == "reset", f"client saw {got.end!r}: a truncated stream looked clean"
    stats = relay.wait_closed("reset_origin")
    assert stats["closed"]["eof"] == 0


def test_client_reset_reaches_origin_as_reset(relay_server, origin, client) -> None:
    up = origin(sink)
    relay = relay_server(up.address)
    c = client(relay.address)
    c.sendall(pattern(5000))
    assert wait_until(lambda: bool(up.results) and up.results[0].nbytes >= 5000, 5)
    reset(c)
    [seen] = up.wait_results(1)
    assert seen.end == "reset", f"origin saw {seen.end!r}: a truncated stream looked clean"
    assert seen.nbytes == 5000
    stats = relay.wait_closed("reset_client")
    assert stats["closed"]["eof"] == 0


def test_refused_upstream_resets_client_promptly(relay_server, client) -> None:
    # A bound but not listening socket holds a port nobody answers: the SYN gets an RST.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        relay = relay_server(holder.getsockname())
        t0 = time.monotonic()
        try:
            c = client(relay.address)
        except ConnectionResetError:
            # The relay's RST can beat connect() returning (its SO_ERROR check): as prompt as
            # it gets.
            end = "reset"
        else:
            end = read_all(c).end
        elapsed = time.monotonic() - t0
    finally:
        holder.close()
    assert end == "reset", f"client saw {end!r}, expected a reset"
    assert elapsed < 2.0, f"client reset after {elapsed:.2f}s, not promptly"
    relay.wait_closed("refused")


def test_slow_reader_gets_every_byte_after_origin_closed(relay_server, origin, client) -> None:
    n = 4 * MiB
    up = origin(source(n, seed=41))  # closes right after its last write
    relay = relay_server(up.address)
    c = client(relay.address, rcvbuf=4096)
    # Wait until the origin is gone: its FIN reached the relay while the bytes still sit in the
    # relay's pipe/buffer because we have not read them.
    [seen] = up.wait_results(1)
    assert seen.end == "sent"
    got = read_all(c, chunk=4096, pause=0.0002)
    assert (got.end, got.nbytes) == ("eof", n)
    assert got.sha256 == sha(pattern(n, seed=41))
    c.close()
    relay.wait_closed("eof")


@pytest.mark.timeout(180)
def test_1000_concurrent_connections(relay_server, origin, client) -> None:
    n = 1000
    up = origin(echo)
    relay = relay_server(up.address)
    socks = [client(relay.address) for _ in range(n)]
    for i, s in enumerate(socks):
        s.sendall(i.to_bytes(4, "big") * 2)
    assert wait_until(lambda: relay.stats()["flows_open"] == n, 20), relay.stats()["flows_open"]
    for i, s in enumerate(socks):
        want = i.to_bytes(4, "big") * 2
        got = b""
        while len(got) < len(want):
            chunk = s.recv(len(want) - len(got))
            assert chunk, f"connection {i}: EOF after {len(got)} bytes"
            got += chunk
        assert got == want, f"connection {i}: bytes crossed between connections"
    for s in socks:
        s.close()
    stats = relay.wait_closed("eof", n, timeout=30)
    assert stats["listener_total"]["main"] == n
    assert sum(stats["closed"].values()) == n
    assert wait_until(lambda: relay.stats()["flows_open"] == 0, 10)


def test_connect_timeout_resets_client(relay_server, client) -> None:
    blackhole = unanswered_backend()
    if blackhole is None:
        pytest.skip("cannot make a loopback backend that drops SYNs (accept queue overflow)")
    lst, fillers = blackhole
    try:
        relay = relay_server(lst.getsockname(), connect_timeout=0.5)
        c = client(relay.address)
        t0 = time.monotonic()
        got = read_all(c)
        elapsed = time.monotonic() - t0
        relay.wait_closed("connect_timeout")
    finally:
        for s in fillers:
            s.close()
        lst.close()
    assert got.end == "reset", f"client saw {got.end!r}, expected a reset"
    assert 0.3 <= elapsed < 3.0, f"reset after {elapsed:.2f}s with connect_timeout 0.5s"


def test_idle_timeout_resets_both(relay_server, origin, client) -> None:
    up = origin(sink)
    relay = relay_server(up.address, idle_timeout=0.5)
    c = client(relay.address)
    c.sendall(b"x")
    t0 = time.monotonic()
    got = read_all(c)  # no byte either way from now on
    elapsed = time.monotonic() - t0
    assert got.end == "reset", f"client saw {got.end!r}, expected a reset"
    assert 0.3 <= elapsed < 3.0, f"reset after {elapsed:.2f}s with idle_timeout 0.5s"
    [seen] = up.wait_results(1)
    assert seen.end == "reset" and seen.nbytes == 1
    relay.wait_closed("idle_timeout")


def test_half_close_timeout_reaps_a_half_closed_pair(relay_server, origin, client) -> None:
    up = origin(send_then_read(1000, seed=61))  # sends, half-closes, then waits for our FIN
    relay = relay_server(up.address, half_close_timeout=0.5, idle_timeout=30.0)
    c = client(relay.address)
    got = read_all(c)  # the origin's bytes and FIN; we never send ours
    assert (got.end, got.nbytes) == ("eof", 1000)
    t0 = time.monotonic()
    [seen] = up.wait_results(1)
    elapsed = time.monotonic() - t0
    # Nothing may stay in FIN-WAIT-2 / CLOSE-WAIT forever: the relay resets the idle half.
    assert seen.end == "reset", f"origin saw {seen.end!r}, expected a reset"
    assert elapsed < 3.0, f"half-closed pair reaped after {elapsed:.2f}s (timeout 0.5s)"
    relay.wait_closed("half_close_timeout")


def test_many_small_writes_then_silence(relay_server, origin, client) -> None:
    up = origin(echo)
    relay = relay_server(up.address, idle_timeout=30.0)
    c = client(relay.address, nodelay=True)
    writes = 300
    total = 0
    received = bytearray()
    reader_done = threading.Event()

    def reader() -> None:
        while len(received) < writes * 7:
            data = c.recv(65536)
            if not data:
                break
            received.extend(data)
        reader_done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(writes):
        c.send(b"%07d" % i)  # tiny segments, below splice_min: copied, and EAGAIN galore
        total += 7
    last_write = time.monotonic()
    # Silence from now on: the last byte must arrive promptly, not at the idle timeout.
    assert reader_done.wait(5.0), f"only {len(received)}/{total} bytes echoed"
    assert time.monotonic() - last_write < 1.0
    t.join(1)
    assert bytes(received) == b"".join(b"%07d" % i for i in range(writes))
    c.shutdown(socket.SHUT_WR)
    assert read_all(c).end == "eof"
    relay.wait_closed("eof")


# -- server duties, on every engine ---------------------------------------------------------------

def _is_reset_soon(client, address: tuple[str, int], timeout: float = 2.0, **kwargs) -> bool:
    """Connect and expect an RST (which may even beat connect() returning)."""
    try:
        sock = client(address, **kwargs)
    except ConnectionResetError:
        return True
    sock.settimeout(timeout)
    try:
        sock.recv(1)  # b"" would be a clean close: not what a refused client must see
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


def test_unix_backend(relay_server, origin, client, tmp_path) -> None:
    up = origin(echo, unix_path=str(tmp_path / "origin.sock"))
    relay = relay_server("unix:" + up.address)
    n = 1 * MiB + 1
    data = pattern(n, seed=51)
    c = client(relay.address)
    writer = send_in_thread(c, data)
    got = read_all(c)
    writer.join(30)
    assert (got.end, got.nbytes, got.sha256) == ("eof", n, sha(data))
    relay.wait_closed("eof")


def test_global_maxconn_admits_exactly_the_limit(relay_server, origin, client) -> None:
    up = origin(sink)
    relay = relay_server(up.address, maxconn=3)
    held = [client(relay.address) for _ in range(3)]
    for s in held:
        s.sendall(b"a")
    assert wait_until(lambda: relay.stats()["flows_open"] == 3, 5)
    assert _is_reset_soon(client, relay.address), "connection over maxconn was not reset"
    assert relay.stats()["rejected"]["maxconn"] == 1
    held[0].close()
    assert wait_until(lambda: relay.stats()["flows_open"] == 2, 5)
    again = client(relay.address)
    again.sendall(b"b")
    assert wait_until(lambda: relay.stats()["flows_open"] == 3, 5), "freed slot not reused"
    assert relay.stats()["rejected"]["maxconn"] == 1


def test_per_source_maxconn(relay_server, origin, client) -> None:
    up = origin(sink)
    relay = relay_server(up.address, maxconn_per_source=2)
    a = [client(relay.address, source_ip="127.0.0.1") for _ in range(2)]
    for s in a:
        s.sendall(b"a")
    assert wait_until(lambda: relay.stats()["flows_open"] == 2, 5)
    assert _is_reset_soon(client, relay.address, source_ip="127.0.0.1"), (
        "third connection from one source was not reset")
    other = client(relay.address, source_ip="127.0.0.2")
    other.sendall(b"b")
    assert wait_until(lambda: relay.stats()["flows_open"] == 3, 5), "another source was refused"
    stats = relay.stats()
    assert stats["rejected"] == {"maxconn": 0, "maxconn_per_source": 1}


def test_stop_drains_then_aborts(relay_server, origin, client) -> None:
    up = origin(echo)
    relay = relay_server(up.address)
    c = client(relay.address)
    c.sendall(b"before")
    assert c.recv(100) == b"before"
    stopper = threading.Thread(target=relay.server.stop, kwargs={"drain_timeout": 1.0})
    t0 = time.monotonic()
    stopper.start()
    try:
        # Listener gone at once: new clients are refused, the open pair keeps working.
        assert wait_until(lambda: relay.stats()["draining"] == 1, 2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(relay.address, timeout=2).close()
        c.sendall(b"during")
        assert c.recv(100) == b"during"
        got = read_all(c)  # until the drain deadline aborts the pair
    finally:
        stopper.join(15)
    elapsed = time.monotonic() - t0
    assert got.end == "reset"
    assert 0.8 <= elapsed < 5.0, f"drain ended after {elapsed:.2f}s with drain_timeout 1s"
    assert relay.stats()["closed"]["aborted"] == 1


def test_flow_log_record(relay_server, origin, client, caplog) -> None:
    up = origin(echo)
    relay = relay_server(up.address)
    with caplog.at_level("INFO", logger="relay.flow"):
        c = client(relay.address)
        c.sendall(b"12345")
        c.shutdown(socket.SHUT_WR)
        assert read_all(c).nbytes == 5
        relay.wait_closed("eof")
        assert wait_until(lambda: any(r.name == "relay.flow" for r in caplog.records), 2)
    [rec] = [r for r in caplog.records if r.name == "relay.flow"]
    assert rec.client == "{}:{}".format(*c.getsockname())
    assert rec.dest == "{}:{}".format(*up.address)
    assert (rec.c2s_bytes, rec.s2c_bytes, rec.reason, rec.listener) == (5, 5, "eof", "main")
    assert rec.spliced_bytes + rec.copied_bytes == 10
    assert rec.duration >= 0 and rec.egress == "" and rec.errno == ""
    # The loop counted the connect (connect_histogram): read with the loop's counters, at most
    # 0.25 s old from another thread.
    assert wait_until(lambda: relay.stats()["connect_seconds"]["count"] == 1, 2)
    hist = relay.stats()["connect_seconds"]
    assert hist["buckets"][-1] == ("+Inf", 1) and hist["sum"] >= 0


def test_emfile_pauses_accept_without_spinning(relay_server, origin, client, caplog) -> None:
    up = origin(echo)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    waiting: socket.socket | None = None
    try:
        # A low limit set before the relay starts (io_uring snapshots RLIMIT_NOFILE when an
        # accept is prepared), then every descriptor left taken: accept() really gets EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + 64, hard))
        relay = relay_server(up.address)
        waiting = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        waiting.settimeout(5)
        with caplog.at_level("INFO", logger="relay.server"):
            while True:
                try:
                    fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
                except OSError:
                    break
            waiting.connect(relay.address)  # the kernel completes the handshake
            assert wait_until(lambda: relay.stats()["accept_paused_listeners"] == 1, 5)
            cpu0 = time.process_time()
            time.sleep(1.0)
            paused_cpu = time.process_time() - cpu0
            errors = relay.stats()["accept_errors"]
            for fd in fillers:
                os.close(fd)
            fillers.clear()
            # Descriptors are back: accepting resumes by itself and the waiting client is served.
            waiting.sendall(b"ping")
            assert waiting.recv(10) == b"ping"
            assert wait_until(lambda: relay.stats()["accept_paused_listeners"] == 0, 5)
        pause_lines = [r for r in caplog.records
                       if r.name == "relay.server" and "accept failed" in r.getMessage()]
    finally:
        for fd in fillers:
            os.close(fd)
        if waiting is not None:
            waiting.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert paused_cpu < 0.5, f"{paused_cpu:.2f}s CPU in 1s of EMFILE: accept loop spins"
    assert 1 <= errors <= 20, f"{errors} accept errors in ~1s: no backoff"
    assert len(pause_lines) == 1, [r.getMessage() for r in pause_lines]


# -- the Loop contract itself (docs/architecture.md), driven directly ------------------------------

def _run_until(loop, predicate, timeout: float = 5.0) -> list[tuple]:
    """Collect events from loop.run() until predicate(events) holds."""
    events: list[tuple] = []
    deadline = time.monotonic() + timeout
    while not predicate(events):
        assert time.monotonic() < deadline, f"events so far: {events}"
        events.extend(loop.run(50))
    return events


@pytest.fixture
def engine_loop(engine, fd_baseline):
    from relay import engines

    loop, reason = engines.create(engine, connect_timeout_ms=2000, idle_timeout_ms=10_000)
    assert loop.backend == engine and reason
    try:
        yield loop
    finally:
        loop.close()
        loop.close()  # idempotent


def test_loop_events_prefix_and_accept_pause(engine_loop, origin) -> None:
    from relay.engines import CLOSE_REASONS, EV_ACCEPT, EV_DONE

    loop = engine_loop
    up = origin(sink)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    c = upstream = None
    try:
        loop.add_listener(listener.fileno(), 7)
        loop.pause_accept(7)
        c = socket.create_connection(listener.getsockname(), timeout=5)
        assert not [e for e in loop.run(300) if e[0] == EV_ACCEPT], "accepted while paused"
        loop.resume_accept(7)
        events = _run_until(loop, lambda evs: any(e[0] == EV_ACCEPT for e in evs))
        [(kind, tag, fd, peer, local)] = [e for e in events if e[0] == EV_ACCEPT]
        assert (kind, tag) == (EV_ACCEPT, 7) and fd >= 0
        # The peer as accept() saw it; no local address unless the listener asked for it.
        assert (peer, local) == (c.getsockname(), None)

        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.connect_ex(up.address)
        cid = loop.add_pair(fd, upstream.detach(), tag=3, connecting=True, prefix=b"HEADER\n")
        c.sendall(b"payload")
        c.shutdown(socket.SHUT_WR)
        events = _run_until(loop, lambda evs: any(e[0] == EV_DONE for e in evs))
        counts, sum_us, n = loop.connect_histogram()  # no event: counted in the loop
        assert (counts, n) == ([1], 1) and sum_us >= 0
        [done] = [e for e in events if e[0] == EV_DONE]
        assert len(done) == 10 and done[:3] == (EV_DONE, cid, 3)
        assert CLOSE_REASONS[done[3]] == "eof"
        assert done[4] >= len(b"payload") and done[5] == 0
        [seen] = up.wait_results(1)
        assert seen.sha256 == sha(b"HEADER\npayload"), "prefix must precede the client's bytes"
        assert c.recv(10) == b""  # the origin's FIN came through after ours
        loop.remove_listener(7)
        stats = loop.stats()
        assert stats["conns_open"] == 0 and stats["pipes_in_use"] == 0
    finally:
        if c is not None:
            c.close()
        if upstream is not None:
            upstream.close()
        listener.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accept_event_carries_peer_and_local_address(engine_loop, host: str) -> None:
    """EV_ACCEPT's (ip, port) peer and, with local_address=True, local address: the same
    values getpeername()/getsockname() give, from every engine."""
    from relay.engines import EV_ACCEPT

    loop = engine_loop
    try:
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host
                                        else socket.AF_INET)
    except OSError as exc:
        pytest.skip(f"no {host}: {exc}")
    listener.setblocking(False)
    c = None
    try:
        loop.add_listener(listener.fileno(), 3, local_address=True)
        c = socket.create_connection(listener.getsockname()[:2], timeout=5)
        events = _run_until(loop, lambda evs: any(e[0] == EV_ACCEPT for e in evs))
        [(_kind, tag, fd, peer, local)] = [e for e in events if e[0] == EV_ACCEPT]
        accepted = socket.socket(fileno=fd)
        try:
            assert tag == 3
            assert peer == tuple(accepted.getpeername()[:2]) == tuple(c.getsockname()[:2])
            assert local == tuple(accepted.getsockname()[:2]) == tuple(c.getpeername()[:2])
        finally:
            accepted.close()
        loop.remove_listener(3)
    finally:
        if c is not None:
            c.close()
        listener.close()


def test_loop_abort_resets_both(engine_loop, origin) -> None:
    from relay.engines import CLOSE_REASONS, EV_DONE

    loop = engine_loop
    up = origin(sink)
    a, b = socket.socketpair()  # unix stream pair as the client side: any stream socket works
    upstream = socket.create_connection(up.address, timeout=5)
    try:
        cid = loop.add_pair(b.detach(), upstream.detach())
        a.sendall(b"x" * 100)
        assert wait_until(lambda: (loop.run(10) or True) and bool(up.results)
                          and up.results[0].nbytes == 100, 5)
        loop.abort(cid)
        events = _run_until(loop, lambda evs: any(e[0] == EV_DONE for e in evs))
        [done] = [e for e in events if e[0] == EV_DONE]
        assert CLOSE_REASONS[done[3]] == "aborted" and done[4] == 100
        [seen] = up.wait_results(1)
        assert seen.end == "reset", f"origin saw {seen.end!r} after abort"
    finally:
        a.close()
        upstream.close()


# -- engine selection ---------------------------------------------------------------------------

def test_available_names_every_engine(engine_availability) -> None:
    assert set(engine_availability) == {"uring", "epoll", "asyncio"}
    assert engine_availability["asyncio"] is None
    for name, reason in engine_availability.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_auto_prefers_uring_then_epoll_and_says_why(engine_availability, caplog,
                                                    fd_baseline) -> None:
    from relay import engines

    broken = {n: r for n, r in engine_availability.items() if core_broken(r)}
    assert not broken, f"the core is broken, not missing: {broken}"
    expected = next(n for n in ("uring", "epoll", "asyncio") if engine_availability[n] is None)
    with caplog.at_level("INFO", logger="relay.engines"):
        loop, reason = engines.create("auto", max_conns=16)
    try:
        assert loop.backend == expected
        assert reason.startswith("auto: ") and expected in reason
        assert any(reason in r.getMessage() for r in caplog.records), "auto did not log why"
    finally:
        loop.close()


def test_unknown_engine_is_named_in_the_error() -> None:
    from relay import engines

    with pytest.raises(ValueError, match=r"engine 'iouring'.*auto, uring, epoll, asyncio"):
        engines.create("iouring")
