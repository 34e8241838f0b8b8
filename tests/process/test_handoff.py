"""Reload handoff (docs/handoff.md) with real relay processes, real signals and real traffic:
established flows move to the new generation's workers instead of draining."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from typing import Any

import pytest
from helpers import alive, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config


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


def _totals(rp: Any) -> dict[str, Any]:
    from relay.ops.metrics import totals

    snap = rp.stats()
    return totals(snap["workers"], snap.get("retired"))


@pytest.mark.timeout(120)
def test_conversations_survive_four_reloads(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: _config(echo.port, adm))
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
    t = _totals(rp)
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
