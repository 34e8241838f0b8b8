"""No /metrics client can hold the supervisor: idle connections and a slowloris on the metrics
port do not delay `relay stats`, reload, worker replacement or SIGTERM; /ready, /live,
process_* and relay_build_info are served."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from helpers import echo as echo_handler
from helpers import echo_roundtrip, relay_cli, wait_for

from relay.lab.process import alive, relay_config
from relay.ops.http import MAX_CLIENTS, REQUEST_DEADLINE


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class Stallers:
    """`idle` connections that send nothing, plus one slowloris sending a byte every 2 s; each
    reconnects when the server cuts it off, until stop(). Counts the cut-offs."""

    def __init__(self, address: tuple[str, int], idle: int = 5) -> None:
        self.address = address
        self.stopping = threading.Event()
        self.cut = 0
        self.threads = [threading.Thread(target=self._idle, daemon=True) for _ in range(idle)]
        self.threads.append(threading.Thread(target=self._slowloris, daemon=True))

    def start(self) -> Stallers:
        for t in self.threads:
            t.start()
        time.sleep(0.3)  # connected before the measurements start
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(5)

    def _idle(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(OSError), socket.create_connection(self.address, 2) as s:
                s.settimeout(0.2)
                while not self.stopping.is_set():
                    try:
                        if s.recv(1024) == b"":
                            self.cut += 1
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break

    def _slowloris(self) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        while not self.stopping.is_set():
            try:
                with socket.create_connection(self.address, 2) as s:
                    for byte in request:
                        s.send(bytes([byte]))  # fails once the server has cut it off
                        if self.stopping.wait(2.0):
                            return
            except OSError:
                self.cut += 1


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.monotonic()
    result = fn()
    return time.monotonic() - start, result


@pytest.mark.timeout(120)
def test_stalling_metrics_clients_hold_nothing(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=5.0, workers=2,
                                         extra_relay='metrics_listen = "127.0.0.1:0"'))
    rp.wait_ready()
    address = rp.stats()["admin"]["metrics"]
    stallers = Stallers(_split(address)).start()
    try:
        # relay stats answers at once, again and again (each used to wait out a 5 s read).
        for _ in range(5):
            took, text = _timed(lambda: relay_cli("stats", "--socket", rp.admin_socket,
                                                  timeout=30))
            assert text.returncode == 0 and "workers: 2" in text.stdout, text.stderr
            assert took < 1.5, f"relay stats took {took:.2f}s"
            time.sleep(0.3)

        # A scrape still works beside the stallers, with process and build metrics.
        status, body = _get(address, "/metrics")
        assert status == 200
        for name in ("process_cpu_seconds_total", "process_open_fds",
                     "relay_worker_process_cpu_seconds", "relay_worker_process_open_fds",
                     "relay_build_info{"):
            assert name in body, name
        assert _get(address, "/ready") == (200, "ready: generation 1 serving\n")
        assert _get(address, "/live")[0] == 200

        # A killed worker is reaped and replaced within ~2 s.
        victim = rp.workers()[0]["pid"]
        killed = time.monotonic()
        rp.children()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not alive(victim) and len(rp.workers()) == 2
                 and victim not in {w["pid"] for w in rp.workers()}, 10, "the replacement")
        assert time.monotonic() - killed < 3.0

        # Reload goes through at once.
        took, res = _timed(lambda: relay_cli("reload", "--socket", rp.admin_socket))
        assert res.returncode == 0, res.stderr
        assert took < 10.0, f"reload took {took:.2f}s"
        assert echo_roundtrip(rp.address())

        # The deadline cut the stallers off (and they came back): nobody kept a slot.
        assert stallers.cut >= 5, stallers.cut

        # SIGTERM is handled at once: drained and gone well before drain_timeout + grace.
        stop_at = time.monotonic()
        rp.send_signal(signal.SIGTERM)
        assert rp.wait_exit(20) == 0
        assert time.monotonic() - stop_at < 5.0
    finally:
        stallers.stop()


@pytest.mark.timeout(60)
def test_concurrent_scrapes_are_capped(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm,
                                         extra_relay='metrics_listen = "127.0.0.1:0"'))
    rp.wait_ready()
    address = _split(rp.stats()["admin"]["metrics"])
    held = [socket.create_connection(address, 2) for _ in range(MAX_CLIENTS)]
    try:
        time.sleep(0.3)
        with socket.create_connection(address, 2) as extra:
            extra.settimeout(5)
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        # The held ones are cut at their deadline; then scrapes are served again.
        time.sleep(REQUEST_DEADLINE + 1.0)
        for s in held:
            s.settimeout(2)
            assert s.recv(10) == b""
        status, _ = _get(f"{address[0]}:{address[1]}", "/ready")
        assert status == 200
    finally:
        for s in held:
            s.close()
