"""Reload handoff (docs/handoff.md) with real relay processes, real signals and real traffic:
established flows move to the new generation's workers instead of draining."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import threading
import time
import urllib.request
from typing import Any

import pytest
from helpers import alive, relay_totals, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config
from relay.serve.handoff import READY_TIMEOUT


class Conversation(threading.Thread):
    """An echo conversation: random messages, each read back whole and compared, until told
    to stop; then a clean close."""

    def __init__(self, addr: tuple[str, int], seed: int, gap: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.addr, self.gap = addr, gap
        self.rng = random.Random(seed)
        self.sent = 0
        self.error = ""
        self.done = False
        self.stop_event = threading.Event()
        self.sock = socket.create_connection(addr, timeout=10)
        self.local_port = self.sock.getsockname()[1]

    def run(self) -> None:
        try:
            with self.sock as s:
                while not self.stop_event.is_set():
                    msg = self.rng.randbytes(self.rng.randint(1, 16384))
                    s.sendall(msg)
                    got = bytearray()
                    while len(got) < len(msg):
                        data = s.recv(len(msg) - len(got))
                        if not data:
                            raise ConnectionError(f"EOF after {self.sent} bytes")
                        got += data
                    if got != msg:
                        raise AssertionError(f"echo differs after {self.sent} bytes")
                    self.sent += len(msg)
                    time.sleep(self.gap)
                s.shutdown(socket.SHUT_WR)
                if s.recv(1) != b"":
                    raise AssertionError("bytes after the last echo")
            self.done = True
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"


def _config(echo_port: int, adm: str, *, workers: int = 2, drain: float = 3.0,
            extra: str = "", settings: dict[str, Any] | None = None) -> str:
    return relay_config(echo_port, admin_socket=adm, workers=workers, drain=drain,
                        settings={"log_format": "json", **(settings or {})}, extra=extra)


def _generation_pids(rp: Any, number: int) -> set[int]:
    return {w["pid"] for w in rp.stats()["workers"] if w["generation"] == number}


def _reload_and_check(rp: Any, number: int, old: set[int]) -> set[int]:
    """SIGHUP; generation `number` serves; 2 s later only its workers are alive."""
    hup = time.monotonic()
    rp.send_signal(signal.SIGHUP)
    wait_for(lambda: rp.stats()["generation"] == number, 15, f"generation {number} serving")
    new = _generation_pids(rp, number)
    time.sleep(max(0.0, hup + 2.0 - time.monotonic()))
    left = {p for p in old if alive(p)}
    assert not left, f"old workers {left} still alive 2 s after reload {number}"
    assert rp.children() == new
    return new


@pytest.mark.timeout(120)
def test_conversations_survive_four_reloads(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: _config(echo.port, adm,
                                    settings={"metrics_listen": "127.0.0.1:0"}))
    rp.wait_ready()
    workers = _generation_pids(rp, 1)
    talks = [Conversation(rp.address(), seed) for seed in range(40)]
    for t in talks:
        t.start()
    time.sleep(0.5)
    for number in range(2, 6):
        workers = _reload_and_check(rp, number, workers)
        time.sleep(1.0)                              # reloads 3 s apart
        assert not [t.error for t in talks if t.error], [t.error for t in talks if t.error][:3]
    for t in talks:
        t.stop_event.set()
    for t in talks:
        t.join(10)
    assert all(t.done for t in talks), [t.error for t in talks if not t.done][:5]
    assert all(t.sent > 0 for t in talks)
    t = relay_totals(rp)
    assert t["handoff_lost"] == 0 and sum(t["handoff_refused"].values()) == 0
    assert t["handoff_adopted"] >= 40 * 4 and t["handoff_handed_over"] == t["handoff_adopted"]
    # One flow-log line per connection across the five generations, with all its bytes.
    by_port = {t.local_port: t for t in talks}
    records = rp.wait_flows(40)
    mine = [r for r in records if int(str(r["client"]).rsplit(":", 1)[1]) in by_port]
    assert len(mine) == 40, f"{len(mine)} flow lines for 40 connections"
    for r in mine:
        talk = by_port[int(str(r["client"]).rsplit(":", 1)[1])]
        assert r["reason"] == "eof"
        assert r["c2s_bytes"] == r["s2c_bytes"] == talk.sent
    # Observability: the pause per flow in /metrics and in `relay stats`.
    text = rp.admin("stats")
    assert f"adopted {t['handoff_adopted']}" in text and "handoff pause: p50" in text, text
    url = f"http://{rp.stats()['admin']['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        metrics = resp.read().decode()
    count = [line for line in metrics.splitlines()
             if line.startswith("relay_handoff_pause_seconds_count")]
    assert count and float(count[0].split()[-1]) == t["handoff_adopted"], count
    assert f"relay_handoff_adopted_total {float(t['handoff_adopted'])}" in metrics


def _bulk_origin(down_total: int, duration: float):
    """Origin: sends `down_total` seeded bytes paced over `duration` s while it reads the
    client's bytes to EOF; records their sha256; closes after both."""

    def handler(conn: socket.socket, seen: Any) -> None:
        def send() -> None:
            rng = random.Random(down_total)
            chunk = 64 * 1024
            for i in range(0, down_total, chunk):
                conn.sendall(rng.randbytes(min(chunk, down_total - i)))
                time.sleep(duration * chunk / down_total)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        h = hashlib.sha256()
        while data := conn.recv(256 * 1024):
            h.update(data)
            seen.nbytes += len(data)
        seen.sha256 = h.hexdigest()
        seen.end = "eof"
        sender.join()

    return handler


class Bulk(threading.Thread):
    """Sends `up_total` seeded bytes paced over `duration` s and reads the origin's bytes
    slowly (the relay's pipe toward us fills), checking them against the seed."""

    def __init__(self, addr: tuple[str, int], up_total: int, down_total: int,
                 duration: float) -> None:
        super().__init__(daemon=True)
        self.up_total, self.down_total, self.duration = up_total, down_total, duration
        self.sock = socket.create_connection(addr, timeout=20)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.up_sha = ""
        self.error = ""
        self.ok = False

    def run(self) -> None:
        try:
            rng = random.Random(7 + self.up_total)
            up = rng.randbytes(self.up_total)
            self.up_sha = hashlib.sha256(up).hexdigest()

            def send() -> None:
                chunk = 64 * 1024
                for i in range(0, len(up), chunk):
                    self.sock.sendall(up[i:i + chunk])
                    time.sleep(self.duration * chunk / len(up))
                self.sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            want = hashlib.sha256(random.Random(self.down_total).randbytes(self.down_total))
            got = hashlib.sha256()
            n = 0
            while data := self.sock.recv(32 * 1024):
                got.update(data)
                n += len(data)
                time.sleep(0.004)                    # a slow reader: bytes wait in the relay
            sender.join()
            if n != self.down_total or got.hexdigest() != want.hexdigest():
                raise AssertionError(f"down stream differs: {n} of {self.down_total} bytes")
            self.ok = True
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.sock.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_bulk_both_ways_and_half_closed_flows_move(origins: Any, relays: Any,
                                                   splice: bool) -> None:
    sink = origins(_bulk_origin(12 << 20, 3.0))
    rp = relays(lambda adm: _config(sink.port, adm, settings={"splice": splice}))
    rp.wait_ready()
    old = _generation_pids(rp, 1)
    # Half-closed: the client's direction is finished before the reload, the origin's not;
    # nobody reads the origin's answer until after the reload, so the relay holds bytes.
    half = socket.socket()
    half.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    half.settimeout(20)
    half.connect(rp.address())
    half.shutdown(socket.SHUT_WR)
    bulks = [Bulk(rp.address(), 6 << 20, 12 << 20, 3.0) for _ in range(4)]
    for b in bulks:
        b.start()
    time.sleep(1.5)
    _reload_and_check(rp, 2, old)
    for b in bulks:
        b.join(30)
    assert all(b.ok for b in bulks), [b.error for b in bulks]
    want_down = hashlib.sha256(random.Random(12 << 20).randbytes(12 << 20)).hexdigest()
    got = hashlib.sha256()
    while data := half.recv(1 << 20):
        got.update(data)
    half.close()
    assert got.hexdigest() == want_down, "the half-closed flow's answer differs"
    ups = sorted(s.sha256 for s in sink.results if s.nbytes)
    assert ups == sorted(b.up_sha for b in bulks), "an upload differs at the origin"
    t = relay_totals(rp)
    assert t["handoff_adopted"] == 5 and t["handoff_lost"] == 0
    assert t["handoff_pending_bytes"] > 0, {k: v for k, v in t.items() if "handoff" in k}
    if not splice:
        assert t["bytes_spliced"] == 0


def _two_listener_config(port: int, adm: str, *, with_extra: bool) -> str:
    extra = f"""
[[listener]]
name = "extra"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{port}"
""" if with_extra else ""
    return _config(port, adm, extra=extra)


@pytest.mark.timeout(60)
def test_a_removed_listener_closes_exactly_its_flows(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: _two_listener_config(echo.port, adm, with_extra=True))
    rp.wait_ready()
    old = _generation_pids(rp, 1)
    kept = [Conversation(rp.address("main"), s) for s in range(6)]
    cut = [Conversation(rp.address("extra"), 100 + s) for s in range(4)]
    for t in kept + cut:
        t.start()
    time.sleep(0.5)
    rp.config_path.write_text(_two_listener_config(echo.port, rp.admin_socket,
                                                   with_extra=False))
    _reload_and_check(rp, 2, old)
    time.sleep(0.5)
    for t in kept + cut:
        t.stop_event.set()
    for t in kept + cut:
        t.join(10)
    assert all(t.done for t in kept), [t.error for t in kept]
    assert all(not t.done and "reset" in t.error.lower() for t in cut), [t.error for t in cut]
    t = relay_totals(rp)
    assert t["handoff_refused"]["listener_removed"] == 4 and t["handoff_adopted"] == 6
    refused = rp.flows_where(lambda r: r["reason"] == "handoff_refused_listener_removed")
    assert sorted(int(str(r["client"]).rsplit(":", 1)[1]) for r in refused) == sorted(
        c.local_port for c in cut)


@pytest.mark.timeout(90)
def test_sigkill_of_an_adopting_worker_loses_only_its_flows(origins: Any,
                                                            relays: Any) -> None:
    """Old workers frozen across the reload, the new slot-0 worker frozen before they send:
    it never answers the old slot-0 worker's Hello, which sends its batches anyway once
    READY_TIMEOUT is over; they wait unread in the handoff socket when it is SIGKILLed.
    Exactly the flows of the old slot-0 worker are lost, counted as handoff_lost; the others
    move on."""
    echo = origins(echo_handler)
    rp = relays(lambda adm: _config(echo.port, adm))
    rp.wait_ready()
    old = {w["slot"]: w["pid"] for w in rp.workers()}
    # 7 flows in old slot 0, 5 in old slot 1: the other one is frozen while they connect.
    talks: list[Conversation] = []
    for slot, count in ((0, 7), (1, 5)):
        other = old[1 - slot]
        os.kill(other, signal.SIGSTOP)
        try:
            batch = [Conversation(rp.address(), 200 + len(talks) + s) for s in range(count)]
            for t in batch:
                t.start()
            talks += batch
            wait_for(lambda b=batch: all(t.sent for t in b), 5, "the conversations under way")
        finally:
            os.kill(other, signal.SIGCONT)
    opened = {0: 7, 1: 5}
    for pid in old.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        rp.send_signal(signal.SIGHUP)
        wait_for(lambda: rp.stats()["generation"] == 2, 15, "generation 2 serving")
        new = {w["slot"]: w["pid"] for w in rp.stats()["workers"] if w["generation"] == 2}
        time.sleep(0.3)                              # the new workers took their Adopt orders
        os.kill(new[0], signal.SIGSTOP)
    finally:
        for pid in old.values():
            os.kill(pid, signal.SIGCONT)
    time.sleep(READY_TIMEOUT + 0.5)                  # old slot 1 handed over, slot 0 sent
    os.kill(new[0], signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in old.values()), 5, "old workers gone")
    time.sleep(0.5)
    for t in talks:
        t.stop_event.set()
    for t in talks:
        t.join(10)
    failed = [t for t in talks if not t.done]
    assert len(failed) == opened[0], [t.error for t in talks]
    t = relay_totals(rp)
    assert t["handoff_lost"] == opened[0]
    assert t["handoff_handed_over"] == opened[1] == 12 - opened[0]


@pytest.mark.timeout(60)
def test_more_flows_than_the_send_window_all_move(origins: Any, relays: Any) -> None:
    """More flows than SEND_WINDOW batches of BATCH_FLOWS hold: the old worker sends the rest
    as acks come in, and every connection answers through the new worker."""
    from relay.serve.handoff import BATCH_FLOWS, SEND_WINDOW

    n = BATCH_FLOWS * (SEND_WINDOW + 2) + 7
    echo = origins(echo_handler)
    rp = relays(lambda adm: _config(echo.port, adm, workers=1))
    rp.wait_ready()
    old = _generation_pids(rp, 1)
    conns = [socket.create_connection(rp.address(), timeout=10) for _ in range(n)]
    try:
        for i, s in enumerate(conns):
            s.sendall(b"%06d" % i)
        for i, s in enumerate(conns):
            assert s.recv(6, socket.MSG_WAITALL) == b"%06d" % i
        _reload_and_check(rp, 2, old)
        for i, s in enumerate(conns):
            s.sendall(b"%06d" % (i + n))
        for i, s in enumerate(conns):
            assert s.recv(6, socket.MSG_WAITALL) == b"%06d" % (i + n)
    finally:
        for s in conns:
            s.close()
    wait_for(lambda: relay_totals(rp)["handoff_adopted"] == n, 5, "the new worker's stats")
    t = relay_totals(rp)
    assert t["handoff_handed_over"] == n and t["handoff_lost"] == 0 and t["handoff_kept"] == 0
