"""Prometheus /metrics of a real relay: parses as exposition text, counters follow the traffic."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from typing import Any

import pytest
from helpers import echo as echo_handler
from helpers import echo_roundtrip, wait_for
from prometheus_client.parser import text_string_to_metric_families

from relay.lab.process import relay_config


def scrape(address: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics -> {sample name: {sorted labels: value}} (strict Prometheus text parser)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict[str, Any], name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def _metrics_relay(relays: Any, port: int, workers: int = 2) -> tuple[Any, str]:
    rp = relays(lambda adm: relay_config(port, admin_socket=adm, drain=10.0, workers=workers,
                                         extra_relay='metrics_listen = "127.0.0.1:0"'))
    rp.wait_ready()
    address = rp.stats()["admin"]["metrics"]
    return rp, address


@pytest.mark.timeout(60)
def test_metrics_parse_and_move_with_traffic(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp, address = _metrics_relay(relays, echo.port)
    before = scrape(address)
    assert value(before, "relay_workers", state="serving") == 2
    engines = before["relay_engine"]
    assert sum(engines.values()) == 2 and all(dict(k)["engine"] for k in engines)
    assert value(before, "relay_generation") == 1

    n, size = 12, 200_000
    for _ in range(n):
        assert echo_roundtrip(rp.address(), os.urandom(size))

    def moved() -> dict[str, Any] | None:
        m = scrape(address)
        done = value(m, "relay_closes_total", reason="eof") - value(
            before, "relay_closes_total", reason="eof")
        return m if done >= n else None

    after = wait_for(moved, 10, "the closes to reach /metrics", step=0.3)
    assert value(after, "relay_connections_total", listener="main") - value(
        before, "relay_connections_total", listener="main") == n
    relayed = sum(value(after, "relay_bytes_total", method=m) - value(
        before, "relay_bytes_total", method=m) for m in ("splice", "copy"))
    assert relayed >= 2 * n * size, f"{relayed} bytes counted for {2 * n * size} relayed"
    assert value(after, "relay_connect_seconds_count") - value(
        before, "relay_connect_seconds_count") == n
    assert value(after, "relay_connect_seconds_bucket", le="+Inf") == value(
        after, "relay_connect_seconds_count")
    assert value(after, "relay_connections_open", listener="main") == 0
    assert value(after, "relay_accepts_total") >= n
    for name in ("relay_pipes", "relay_iowq_threads", "relay_accept_pauses_total",
                 "relay_slice_exhausted_total", "relay_rejected_total"):
        assert name in after, f"{name} missing from /metrics"

    # The admin socket's JSON agrees with /metrics.
    snap = json.loads(rp.admin("stats json"))
    total = sum(w["stats"]["listener_total"]["main"] for w in snap["workers"])
    assert total == value(after, "relay_connections_total", listener="main")


@pytest.mark.timeout(60)
def test_open_connections_gauge_and_counters_survive_a_worker_restart(
        origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp, address = _metrics_relay(relays, echo.port)
    held = []
    for _ in range(4):
        s = socket.create_connection(rp.address(), timeout=5)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        held.append(s)
    m = wait_for(lambda: (x := scrape(address)) and value(
        x, "relay_connections_open", listener="main") == 4 and x, 10, "4 open", step=0.3)
    total = value(m, "relay_connections_total", listener="main")
    for s in held:
        s.close()
    wait_for(lambda: value(scrape(address), "relay_connections_open", listener="main") == 0,
             10, "0 open", step=0.3)
    victim = rp.workers()[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (ws := rp.workers()) and len(ws) == 2
             and victim not in {w["pid"] for w in ws}, 15, "the worker replaced")
    after = scrape(address)
    assert value(after, "relay_connections_total", listener="main") >= total, \
        "a counter went backwards when its worker died"
    assert value(after, "relay_worker_restarts_total") == 1
    assert echo_roundtrip(rp.address())


@pytest.mark.timeout(30)
def test_metrics_endpoint_answers_404_elsewhere(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp, address = _metrics_relay(relays, echo.port, workers=1)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{address}/nope", timeout=5)
    assert err.value.code == 404
    err.value.close()   # the error holds the response's socket: close it, don't leave it to GC
    assert "relay_workers" in scrape(address)
