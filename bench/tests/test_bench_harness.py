"""Fast self-tests of the harness (no proxies started): python -m pytest bench/tests"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import charts, procs, report, scale, summary
from bench.competitors import nginx, splice_floor
from bench.contenders import select
from bench.drivers import procstat, relay_stats, sockperf, udp, udp_sink, wrk
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
    assert json_path.exists()
    if charts.available() is None:
        png = f"{json_path.stem}-stream1.png"
        assert f"![single stream (iperf3)]({png})" in text
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "(LATEST-stream1.png)" in (tmp_path / "LATEST.md").read_text()
        assert (tmp_path / "LATEST-stream1.png").exists()
        assert charts.series(medians, "stream1")[1]["haproxy"][1] == pytest.approx(1.2)
    else:
        assert "Charts: not installed: matplotlib" in (tmp_path / "LATEST.md").read_text()
    assert "socat: skipped: socat not installed" in text
    assert "| relay-uring | 12 | 0.60x | 1.20x | 2.40x |" in text
    assert "1 failed runs: boom" in text


WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   267.31us  163.11us   1.33ms   58.19%
    Req/Sec    22.29k   538.25    22.72k    90.00%
  Latency Distribution
     50%  247.00us
     75%  388.00us
     90%    1.48ms
     99%    2.01s
  22180 requests in 1.00s, 3.62MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  22163.78
Transfer/sec:      3.61MB
"""


def test_wrk_parse() -> None:
    out = wrk.parse(WRK_OUTPUT)
    assert out["rps"] == pytest.approx(22163.78)
    assert out["requests"] == 22180 and out["seconds"] == pytest.approx(1.0)
    assert out["p50_us"] == pytest.approx(247.0)
    assert out["p90_us"] == pytest.approx(1480.0)
    assert out["p99_us"] == pytest.approx(2.01e6)
    assert (out["errors_read"], out["errors_write"], out["errors_timeout"], out["errors_http"]) == (12, 3, 1, 2)
    assert out["errors"] == 18
    clean = wrk.parse(WRK_OUTPUT.replace("  Socket errors: connect 0, read 12, write 3, timeout 1\n", "")
                      .replace("  Non-2xx or 3xx responses: 2\n", ""))
    assert clean["errors"] == 0
    with pytest.raises(ValueError):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_worker_shares() -> None:
    snap = {"workers": [{"pid": 10, "stats": {"conns_total": 100}}, {"pid": 11, "stats": {"conns_total": 40}}]}
    before = relay_stats.worker_totals(snap)
    assert before == {10: 100, 11: 40}
    after = {10: 400, 11: 140, 12: 100}  # pid 12: a worker started during the run
    assert relay_stats.shares(before, after) == pytest.approx([0.6, 0.2, 0.2])
    assert relay_stats.shares(before, before) == []


def test_nginx_configs(tmp_path: Path) -> None:
    origin = nginx.origin_config(tmp_path, 8080, 4096).read_text()
    assert "listen 127.0.0.1:8080" in origin and "return 200" in origin and "load_module" not in origin
    tcp = nginx.stream_config(tmp_path, 8081, ("127.0.0.1", 9000), 4096).read_text()
    assert "load_module /usr/lib/nginx/modules/ngx_stream_module.so;" in tcp
    assert "proxy_pass 127.0.0.1:9000;" in tcp and " udp;" not in tcp
    udp = nginx.stream_config(tmp_path, 8082, ("127.0.0.1", 9000), 4096, udp=True).read_text()
    assert "listen 127.0.0.1:8082 udp;" in udp and "proxy_responses 0;" in udp
    if nginx.stream_available() is None:
        for path in (tmp_path / "nginx-origin-8080.conf", tmp_path / "nginx-stream-udp-8082.conf"):
            done = subprocess.run(["nginx", "-t", *nginx.argv(path)[1:]], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr


SOCKPERF_OUTPUT = """\
sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m
sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=15318; ReceivedMessages=15317
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=8498; ReceivedMessages=8498
sockperf: \x1b[2;35m====> avg-latency=32.370 (std-dev=111.981)\x1b[0m
sockperf: # dropped messages = 2; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Latency is 32.370 usec
sockperf: ---> <MAX> observation = 2299.652
sockperf: ---> percentile 99.999 = 2299.652
sockperf: ---> percentile 99.900 = 1928.039
sockperf: ---> percentile 99.000 =  100.815
sockperf: ---> percentile 50.000 =   21.206
sockperf: ---> <MIN> observation =    5.568
"""


def test_sockperf_parse() -> None:
    out = sockperf.parse(SOCKPERF_OUTPUT)
    assert out["p50_us"] == pytest.approx(21.206)
    assert out["p99_us"] == pytest.approx(100.815)
    assert out["p99.9_us"] == pytest.approx(1928.039)
    assert out["avg_us"] == pytest.approx(32.37)
    assert (out["min_us"], out["max_us"]) == (pytest.approx(5.568), pytest.approx(2299.652))
    assert out["msgs"] == 8498 and out["msg_s"] == pytest.approx(8498 / 0.55)
    assert out["dropped"] == 2
    with pytest.raises(ValueError):
        sockperf.parse("sockperf: ERROR: connect failed\n")


def test_udp_result() -> None:
    blast = {"sent": 1000.0, "seconds": 2.0, "rate": 500.0, "send_errors": 3.0}
    out = udp.result(blast, {"datagrams": 50, "bytes": 3200}, {"datagrams": 950, "bytes": 60800}, 0.009, True)
    assert out["received"] == 900 and out["bytes"] == 57600
    assert out["dgram_s"] == pytest.approx(450.0) and out["offered_s"] == pytest.approx(500.0)
    assert out["loss_pct"] == pytest.approx(10.0)
    assert out["cpu_s_per_mdgram"] == pytest.approx(10.0)
    assert out["send_errors"] == 3
    direct = udp.result(blast, {"datagrams": 0, "bytes": 0}, {"datagrams": 1000, "bytes": 64000}, 0.0, False)
    assert direct["loss_pct"] == 0 and direct["cpu_s_per_mdgram"] != direct["cpu_s_per_mdgram"]  # NaN


def test_udp_sink_and_blaster_round_trip() -> None:
    """The real sink and blaster processes, a few hundred datagrams each way (about a second)."""
    root = str(Path(__file__).resolve().parents[2])
    sink = udp.start_sink(root)
    try:
        out = udp.run(sink.port, sink.control_port, 64, 0.2, 2000.0, False, list, root)
        assert 300 <= out["sent"] <= 500  # paced at 2,000/s for 0.2 s
        assert out["received"] == out["sent"] and out["loss_pct"] == 0
        flows = udp.run(sink.port, sink.control_port, 64, 0.2, 1000.0, True, list, root)
        assert flows["received"] == flows["sent"] > 100
    finally:
        sink.stop()
    assert udp_sink.control_port("READY 4000 control=4001") == 4001
    assert procs.parse_ready_port("READY 4000 control=4001") == 4000


def test_scaling_rows() -> None:
    batch = _batch()
    for i, r in enumerate(batch["rounds"]):
        r["results"]["connrate"] = {"relay-uring": {"conn_s": 1000.0 * (i + 1)},
                                    "relay-uring-w2": {"conn_s": 1800.0 * (i + 1)}}
    rows = summary.scaling(batch)
    assert list(rows) == ["connrate"]
    assert rows["connrate"]["ratio"]["median"] == pytest.approx(1.8)
    assert rows["connrate"]["one"] == pytest.approx(2000.0)
    batch["contenders"]["relay-uring-w2"] = {"kind": "relay", "status": "ok", "reason": None}
    medians = summary.summarize(batch)
    doc = {"date": "today", "machine": machine(), "batch": batch, "summary": medians,
           "targets": summary.targets(medians, batch["idle"], batch["contenders"])}
    text = report.markdown(doc)
    assert "## Scaling: `relay-uring-w2` (--workers 2) over `relay-uring` (--workers 1)" in text
    assert "| 2,000 | 3,600 | 1.80x |" in text


def test_embedded_goal_against_uvloop_protocol() -> None:
    batch = _batch()
    for r in batch["rounds"]:
        r["results"]["connrate"] = {"embedded": {"conn_s": 600.0}, "uvloop-protocol": {"conn_s": 1200.0}}
    for name in ("embedded", "uvloop-protocol"):
        batch["contenders"][name] = {"kind": "competitor", "status": "ok", "reason": None}
    medians = summary.summarize(batch)
    goal = [t for t in summary.targets(medians, {}, batch["contenders"]) if t["contender"] == "embedded"]
    assert [(g["goal"], g["value"], g["ok"]) for g in goal] == [("conn/s x uvloop-protocol", 0.5, False)]


def test_embedded_serve_has_the_same_goal() -> None:
    batch = _batch()
    for r in batch["rounds"]:
        r["results"]["connrate"] = {"embedded-serve": {"conn_s": 1500.0},
                                    "uvloop-protocol": {"conn_s": 1200.0}}
    for name in ("embedded-serve", "uvloop-protocol"):
        batch["contenders"][name] = {"kind": "competitor", "status": "ok", "reason": None}
    medians = summary.summarize(batch)
    goal = [t for t in summary.targets(medians, {}, batch["contenders"])
            if t["contender"] == "embedded-serve"]
    assert [(g["goal"], g["value"], g["ok"]) for g in goal] == [("conn/s x uvloop-protocol", 1.25, True)]
    assert [c.name for c in select(["embedded-serve"])] == ["embedded-serve"]


def test_scale_levels_are_capped_by_the_fd_limit(tmp_path: Path) -> None:
    levels, notes = scale.plan_levels([1, 10, 10_000, 20_000], 9_700, 20_000)
    assert levels == [1, 10, 9_700]
    assert len(notes) == 2 and notes[0].startswith("10,000 lowered to 9,700")
    row = {"rps": 100.0, "gbit_s": 0.05, "p99_us": 900.0, "cpu_s_per_gb": 0.5, "cpu_us_per_req": 30.0,
           "cpu_us_per_conn_s": 40.0, "rss_mb": 60.0, "errors": 0.0, "foreign_cpus": 0.1}
    args = scale.argparse.Namespace(rounds=2, duration=3.0)
    scale.write({"relay-uring": {1: [row, {**row, "rps": 300.0}]}}, levels, notes, {"haproxy": "not installed"},
                args, tmp_path)
    md = next(tmp_path.glob("*-scale.md")).read_text()
    assert "| 1 | relay-uring | 200 |" in md
    assert "10,000 lowered to 9,700" in md and "haproxy: skipped: not installed" in md


def test_shares_without_an_admin_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_stats, "REPORT_LAG_S", 0.0)
    result, shares, why = relay_stats.shares_around(str(tmp_path / "missing.sock"), lambda: 7)
    assert (result, shares) == (7, []) and why.startswith("stats json before the run:")


def test_floor_table(tmp_path: Path) -> None:
    batch = _batch()
    for i, r in enumerate(batch["rounds"]):
        r["results"]["stream1"]["splice-floor"] = {"gbit_s": 10.0, "cpu_s_per_gb": 0.25 if i else 0.1,
                                                    "foreign_cpus": 0.0}
    batch["contenders"]["splice-floor"] = {"kind": "baseline", "status": "ok", "reason": None}
    medians = summary.summarize(batch)
    rows = summary.floor_rows(medians)["stream1"]
    assert set(rows) == {"relay-uring", "haproxy", "asyncio-streams"}  # not direct, not the floor
    assert rows["relay-uring"]["cpu"]["rounds"] == pytest.approx([0.8, 0.8])  # the failed round 0 is out
    doc = {"date": "today", "machine": machine(), "batch": batch, "summary": medians, "targets": []}
    text = report.markdown(doc)
    assert "## The splice floor, single stream (iperf3)" in text
    assert "| relay-uring | 0.2 | 0.80x | 1.20x (0.60-1.80) |" in text  # no range when the rounds agree


def test_splice_floor_relays_both_ways(tmp_path: Path) -> None:
    if splice_floor.available() is not None:
        pytest.skip(str(splice_floor.available()))
    exe = splice_floor.build(tmp_path)
    with socket.socket() as origin:
        origin.bind(("127.0.0.1", 0))
        origin.listen()
        svc = procs.start_reporting_port("splice-floor", splice_floor.argv(exe, origin.getsockname()[1]))
        try:
            with socket.create_connection(("127.0.0.1", svc.port), timeout=5) as client:
                origin.settimeout(5)
                upstream, _ = origin.accept()
                with upstream:
                    payload = os.urandom(3 << 20)
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := upstream.recv(1 << 16):  # ends at the FIN the floor passed on
                        got += chunk
                    assert got == payload
                    upstream.sendall(b"answer")
                    upstream.shutdown(socket.SHUT_WR)
                    client.settimeout(5)
                    assert client.recv(64) == b"answer"
                    assert client.recv(64) == b""
        finally:
            svc.stop()
