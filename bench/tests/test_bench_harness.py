"""Fast self-tests of the harness (no proxies started): python -m pytest bench/tests"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from bench import procs, report, summary
from bench.contenders import select
from bench.drivers import procstat
from bench.machine import machine


def test_parse_ready_port() -> None:
    assert procs.parse_ready_port("READY 4242") == 4242
    assert procs.parse_ready_port("READY pid=7 listeners=listener0=127.0.0.1:38559") == 38559
    assert procs.parse_ready_port("READY pid=7 listeners=a=[::1]:7000,b=127.0.0.1:7001") == 7001
    with pytest.raises(procs.StartError):
        procs.parse_ready_port("READY")


def test_listening_ports_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert s.getsockname()[1] in procs.listening_ports()


def test_procstat_on_self() -> None:
    pid = os.getpid()
    assert procstat.process_cpu_seconds(pid) > 0
    assert procstat.rss_bytes(pid) > 1 << 20
    assert procstat.thread_count(pid) >= 1
    assert pid in procstat.descendants(pid)
    r, w = os.pipe()
    try:
        assert procstat.pipe_fds(pid) >= 2
    finally:
        os.close(r)
        os.close(w)


def test_select_aliases() -> None:
    names = [c.name for c in select(["uring", "uvloop", "streams", "direct"])]
    assert names == ["direct", "relay-uring", "uvloop-protocol", "asyncio-streams"]
    with pytest.raises(SystemExit):
        select(["nope"])


def _batch() -> dict[str, Any]:
    def row(gbit: float) -> dict[str, float]:
        return {"gbit_s": gbit, "cpu_s_per_gb": 0.2, "foreign_cpus": 0.1}

    rounds = [
        {"round": i, "order": {}, "results": {"stream1": {
            "direct": row(20.0 * f), "haproxy": row(10.0 * f), "asyncio-streams": row(5.0 * f),
            "relay-uring": row(12.0 * f) if i else {"error": "boom"}}}}
        for i, f in enumerate((1.0, 1.5, 0.5))
    ]
    status = {n: {"kind": k, "status": "ok", "reason": None} for n, k in
              (("direct", "baseline"), ("relay-uring", "relay"), ("haproxy", "competitor"),
               ("asyncio-streams", "competitor"))}
    status["socat"] = {"kind": "competitor", "status": "skipped", "reason": "socat not installed"}
    return {"options": {"rounds": 3, "duration": 1.0, "rr_conns": 16, "rr_size": 64, "idle_conns": 0,
                        "seed": 1}, "started": 0.0, "seconds": 3.0, "relay_mode": {"uring": "cli"},
            "contenders": status, "rounds": rounds, "idle": {}, "idle_connections": 0,
            "nofile_hard": 20000, "steal_pct": 0.0}


def test_summary_ratios_are_per_round_medians() -> None:
    result = summary.summarize(_batch())
    uring = result["stream1"]["relay-uring"]
    assert uring["errors"] == ["boom"]
    assert uring["gbit_s"]["median"] == pytest.approx(12.0)  # rounds 1.5x and 0.5x: 18 and 6
    assert uring["gbit_s"]["ratio"]["haproxy"]["rounds"] == pytest.approx([1.2, 1.2])
    assert result["stream1"]["haproxy"]["gbit_s"]["ratio"]["direct"]["median"] == pytest.approx(0.5)


def test_report_files(tmp_path: Path) -> None:
    batch = _batch()
    medians = summary.summarize(batch)
    doc = {"date": "today", "machine": machine(), "batch": batch, "summary": medians,
           "targets": summary.targets(medians, batch["idle"], batch["contenders"])}
    json_path, md_path = report.write(doc, tmp_path)
    text = md_path.read_text()
    assert json_path.exists() and (tmp_path / "LATEST.md").read_text() == text
    assert "socat: skipped: socat not installed" in text
    assert "| relay-uring | 12 | 0.60x | 1.20x | 2.40x |" in text
    assert "1 failed runs: boom" in text
