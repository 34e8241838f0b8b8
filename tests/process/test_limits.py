"""Connection limits and fd exhaustion with real relay processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from helpers import Transfer, cpu_seconds, echo_roundtrip, hash_reply, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config


def _open_relayed(addr: tuple[str, int], source: str | None = None) -> socket.socket:
    """A connection that went through the relay to the echo origin (proved by a round trip)."""
    s = socket.create_connection(addr, timeout=5, source_address=(source, 0) if source else None)
    s.sendall(b"hello")
    got = b""
    while len(got) < 5:
        data = s.recv(16)
        if not data:
            s.close()
            raise ConnectionError("closed before the echo")
        got += data
    return s


def _is_refused_at_once(addr: tuple[str, int], source: str | None = None) -> bool:
    """True when the relay accepts and resets/closes the client without relaying a byte."""
    try:
        s = socket.create_connection(addr, timeout=5,
                                     source_address=(source, 0) if source else None)
    except ConnectionError:
        return True
    with s:
        s.settimeout(3)
        try:
            s.sendall(b"hello")
            return s.recv(16) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def _rejected(rp: Any, limit: str) -> int:
    return sum(w["stats"].get("rejected", {}).get(limit, 0) for w in rp.workers())


@pytest.mark.timeout(60)
def test_global_maxconn_admits_exactly_the_limit(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=1,
                                         extra_relay="maxconn = 5"))
    addr = rp.wait_ready()["main"]
    held = [_open_relayed(addr) for _ in range(5)]
    try:
        assert _is_refused_at_once(addr)
        assert _is_refused_at_once(addr)
        wait_for(lambda: _rejected(rp, "maxconn") == 2, 5, "2 rejections counted")
        held.pop().close()
        wait_for(lambda: rp.workers()[0]["stats"]["flows_open"] == 4, 5, "one slot free")
        held.append(_open_relayed(addr))  # exactly one fits again
        assert _is_refused_at_once(addr)
        wait_for(lambda: _rejected(rp, "maxconn") == 3, 5, "3 rejections counted")
        # An IP backend without per-source limits: the core admitted and connected the six
        # relayed ones itself (accept-and-connect); the three over the limit took Python's path.
        wait_for(lambda: rp.workers()[0]["stats"]["accept_connects"] == 6, 5,
                 "6 pairs accepted and connected by the core")
    finally:
        for s in held:
            s.close()


@pytest.mark.timeout(60)
def test_per_source_maxconn_admits_exactly_the_limit(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=1,
                                         extra_relay="maxconn_per_source = 3"))
    addr = rp.wait_ready()["main"]
    held = []
    try:
        for source in ("127.0.0.1", "127.0.0.2"):
            held += [_open_relayed(addr, source) for _ in range(3)]
            assert _is_refused_at_once(addr, source), f"4th connection from {source} admitted"
        wait_for(lambda: _rejected(rp, "maxconn_per_source") == 2, 5, "2 rejections counted")
        assert _rejected(rp, "maxconn") == 0
        held.pop(0).close()  # one from 127.0.0.1 leaves: one more from it fits
        wait_for(lambda: rp.workers()[0]["stats"]["flows_open"] == 5, 5, "one slot free")
        held.append(_open_relayed(addr, "127.0.0.1"))
    finally:
        for s in held:
            s.close()


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    n = 0
    while n in used:
        n += 1
    return n


def _prlimit_nofile(pid: int, soft: int, hard: int) -> None:
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True,
                   timeout=10)


def _engines() -> list[str]:
    from relay.engines import available

    return [name for name in ("uring", "epoll") if available().get(name) is None] or ["asyncio"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", _engines())
def test_emfile_in_a_worker_recovers_without_spinning(origins: Any, relays: Any,
                                                      engine: str) -> None:
    """prlimit drops a worker's RLIMIT_NOFILE below the fds it holds.

    epoll: accept(2) fails with EMFILE, the listener pauses (one log line), the client waits in
    the accept queue and is served once the limit is back. io_uring: a multishot accept keeps the
    RLIMIT_NOFILE it read when it was armed (io_accept_prep), so the accept succeeds and the
    upstream socket(2) fails instead: the client is reset at once and the close counted. Either
    way the running transfer completes, the worker does not spin and recovers by itself.
    """
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    echo, sink = origins(echo_handler), origins(hash_reply)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0,
                                         workers=1, engine=engine, extra=f"""
[[listener]]
name = "bulk"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{sink.port}"
"""))
    rp.wait_ready()
    worker = rp.workers()[0]["pid"]
    transfer = Transfer(rp.address("bulk"), 4 << 20, 3.0)
    transfer.start()
    transfer.connected.wait(5)
    time.sleep(0.3)
    with open(f"/proc/{worker}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files")).split()
        soft, hard = int(line[3]), int(line[4])
    # Every fd number below the new limit is taken: the next new fd gets EMFILE.
    _prlimit_nofile(worker, _lowest_free_fd(worker), hard)
    cpu0, t0 = cpu_seconds(worker), time.monotonic()
    pending = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pending.settimeout(10)
    try:
        try:
            # io_uring: accept works and the upstream socket fails, so the RST can arrive
            # before connect() even returns here.
            pending.connect(rp.address("main"))
            pending.settimeout(2.0)
            pending.sendall(b"waiting")
            early = pending.recv(16)
        except (ConnectionResetError, BrokenPipeError):
            early = b""  # reset at once (io_uring: the upstream socket got EMFILE)
        except TimeoutError:
            early = None  # still queued
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
        cpu = cpu_seconds(worker) - cpu0
        assert cpu < 0.5 * (time.monotonic() - t0), f"worker spun: {cpu:.2f} CPU-s in 2 s"
        stats = wait_for(lambda: (s := rp.workers()[0]["stats"])["accept_errors"]
                         + s["closed"]["error"] > 0 and s, 5, "the failure counted")
        _prlimit_nofile(worker, soft, hard)
        if early is None:
            # Queued in the kernel while accepting was paused: served once fds are back.
            assert stats["accept_paused"] >= 1
            pending.settimeout(5)
            assert pending.recv(16) == b"waiting", "the queued client is served after recovery"
            lines = [x for x in rp.stderr().splitlines() if "accept failed" in x]
            assert 1 <= len(lines) <= 2, lines
            assert "EMFILE" in lines[0]
        else:
            assert early == b"", f"a client was relayed without fds: {early!r}"
            assert stats["closed"]["error"] >= 1
    finally:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _prlimit_nofile(worker, soft, hard)
        pending.close()
    transfer.join(20)
    assert transfer.ok, f"the transfer running during EMFILE failed: {transfer.error}"
    assert echo_roundtrip(rp.address("main"))
    assert rp.workers()[0]["pid"] == worker, "the worker recovered by itself, no restart"


@pytest.mark.timeout(60)
def test_fd_and_pipe_budgets_are_reported(origins: Any, relays: Any) -> None:
    from relay.config import load
    from relay.process.budgets import nofile_needed_for

    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=2,
                                         extra_relay="maxconn = 1000"))
    rp.wait_ready()
    cfg = load(rp.config_path)
    needed = nofile_needed_for(cfg.relay, len(cfg.listener), 2)
    budget = rp.stats()["budget"]
    assert f"{needed} needed per worker" in budget, budget
    per_worker_pipes = cfg.relay.pipes_per_worker(2)
    assert f"pipes: {per_worker_pipes} pipes of" in budget, budget
    text = rp.stderr()
    assert "budget: fds:" in text


def _serving_pids(rp: Any) -> list[int]:
    return [w["pid"] for w in rp.workers()]


def _open_count(rp: Any) -> int:
    return sum(w["stats"].get("flows_open", 0) for w in rp.workers())


@pytest.mark.timeout(90)
def test_limits_are_exact_across_two_workers(origins: Any, relays: Any) -> None:
    """Issue 12 item 9: with 2 workers each used to enforce limit / 2. One worker stopped, the
    other must admit the whole per-source limit; the limits then hold over both."""
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=2,
                                         engine="epoll", settings={"heartbeat_timeout": 60.0},
                                         extra_relay="maxconn = 150\nmaxconn_per_source = 100"))
    addr = rp.wait_ready()["main"]
    a, b = wait_for(lambda: _serving_pids(rp) if len(_serving_pids(rp)) == 2 else None, 10,
                    "two serving workers")
    held: list[socket.socket] = []
    os.kill(b, signal.SIGSTOP)  # every connection goes to worker a
    try:
        held += [_open_relayed(addr, "127.0.0.1") for _ in range(100)]
        assert _is_refused_at_once(addr, "127.0.0.1"), "101st connection from one source"
    finally:
        os.kill(b, signal.SIGCONT)
    for _ in range(10):  # both workers accept now: still none from 127.0.0.1
        assert _is_refused_at_once(addr, "127.0.0.1")
    held += [_open_relayed(addr, "127.0.0.2") for _ in range(50)]  # 150 = maxconn
    refused = [_is_refused_at_once(addr, "127.0.0.3") for _ in range(10)]
    assert all(refused), refused
    wait_for(lambda: _rejected(rp, "maxconn_per_source") >= 11, 5, "per-source rejections")
    wait_for(lambda: _rejected(rp, "maxconn") >= 10, 5, "maxconn rejections")
    assert _open_count(rp) == 150
    held.pop(0).close()  # one from 127.0.0.1 leaves: exactly one more fits, from anyone
    wait_for(lambda: _open_count(rp) == 149, 5, "one slot free")
    held.append(_open_relayed(addr, "127.0.0.3"))
    assert _is_refused_at_once(addr, "127.0.0.3")
    for s in held:
        s.close()


@pytest.mark.timeout(60)
def test_a_killed_workers_connections_leave_the_shared_count(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=2,
                                         engine="epoll", extra_relay="maxconn_per_source = 4"))
    addr = rp.wait_ready()["main"]
    a, b = wait_for(lambda: _serving_pids(rp) if len(_serving_pids(rp)) == 2 else None, 10,
                    "two serving workers")
    os.kill(b, signal.SIGSTOP)
    held = [_open_relayed(addr) for _ in range(4)]  # all on worker a
    os.kill(b, signal.SIGCONT)
    assert _is_refused_at_once(addr)
    os.kill(a, signal.SIGKILL)  # its four connections die with it
    for s in held:
        s.close()
    wait_for(lambda: a not in _serving_pids(rp) and len(_serving_pids(rp)) == 2, 20,
             "worker a replaced")
    again = [_open_relayed(addr) for _ in range(4)]  # the dead worker's share was freed
    for s in again:
        s.close()



_HEADER = b""  # set on first use (relay.serve.proxyproto is imported lazily)


def _with_header(addr: tuple[str, int]) -> socket.socket | None:
    """A trusted-proxy connection: a PROXY v2 header and b"hello"; the socket once the echo
    came back through the relay, None when the relay reset or closed it instead."""
    from relay.serve import proxyproto

    try:
        s = socket.create_connection(addr, timeout=5)
    except ConnectionError:
        return None  # reset so fast that connect() itself saw it (loopback)
    try:
        s.sendall(proxyproto.build(("198.51.100.7", 40000), ("203.0.113.1", 443)) + b"hello")
        got = b""
        while len(got) < 5:
            data = s.recv(16)
            if not data:
                s.close()
                return None
            got += data
    except (ConnectionResetError, BrokenPipeError):
        s.close()
        return None
    return s


def _overflow(addr: tuple[str, int]) -> None:
    """A client that sends nothing and is reset at once (the header waiters are full)."""
    try:
        s = socket.create_connection(addr, timeout=5)
    except ConnectionError:
        return  # reset so fast that connect() itself saw it (loopback)
    _reset_by_relay(s, 3)


def _reset_by_relay(s: socket.socket, timeout: float) -> None:
    s.settimeout(timeout)
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_clients_never_relayed_give_their_shared_count_back(origins: Any, relays: Any) -> None:
    """Shared limits count a client from accept on, a parked PROXY-header client included:
    an invalid header, the header overflow and the header timeout each give the count back,
    or maxconn would shrink for good. (A header client is never made while two wait: it
    could be accepted before its bytes arrive and overflow itself.)"""
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(
        echo.port, admin_socket=adm, workers=1,
        settings={"maxconn": 4, "proxy_header_timeout": 4.0, "proxy_header_max_waiting": 2},
        extra='trusted_proxies = ["127.0.0.0/8"]\n'))
    addr = rp.wait_ready()["main"]

    def stats() -> dict[str, Any]:
        return dict(rp.workers()[0]["stats"])

    def denied(reason: str) -> int:
        return int(stats()["denied"].get(reason, 0))

    held: list[socket.socket] = []
    try:
        bad = socket.create_connection(addr, timeout=5)
        bad.sendall(b"\r\n\r\n\x00\r\nQUIT\n" + b"\xff" * 8)  # the signature, a bad version
        _reset_by_relay(bad, 3)
        first = _with_header(addr)
        assert first is not None
        held.append(first)
        held += [socket.create_connection(addr, timeout=5) for _ in range(2)]  # silent
        wait_for(lambda: stats().get("proxy_header_waiting") == 2, 3, "2 parked")
        _overflow(addr)  # a third waiter: 1 relayed + 2 parked + it = 4, within maxconn
        _overflow(addr)  # again: admitted (the first gave its count back), then overflowed
        wait_for(lambda: denied("proxy_header_overflow") == 2, 5, "2 overflows counted")
        assert denied("proxy_header_invalid") == 1 and _rejected(rp, "maxconn") == 0
        for s in held[1:]:
            _reset_by_relay(s, 8)  # the header timeout resets them
        del held[1:]
        wait_for(lambda: denied("proxy_header_timeout") == 2, 5, "timeouts counted")
        for _ in range(3):  # 1 + 3 = maxconn: every refused client gave its count back
            more = _with_header(addr)
            assert more is not None
            held.append(more)
        assert _with_header(addr) is None
        wait_for(lambda: _rejected(rp, "maxconn") == 1, 5, "the fifth rejected for maxconn")
    finally:
        for s in held:
            s.close()
