"""The flow log of `relay run`: complete lines under churn, flushed on SIGTERM and SIGUSR1,
drops counted (never a stalled data path) when nobody reads the log destination."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import all_echoed, echo_once, wait_for
from helpers import echo as echo_handler

from relay.lab.process import flow_records, relay_config
from relay.serve.flowlog import TCP_FIELDS
from relay.serve.server import REJECT_REASONS

F_SETPIPE_SZ = 1031


def _churn(addr: tuple[str, int], n: int, what: str = "", threads: int = 8) -> list[int]:
    """n short connections through the relay, all echoed (asserted): their local ports."""
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _i: echo_once(addr, timeout=10), range(n)))
    return [r.port for r in all_echoed(results, what)]


def _check_record(rec: dict[str, Any]) -> None:
    assert list(rec)[5:] == list(TCP_FIELDS), rec
    assert rec["message"] == "flow" and rec["listener"] == "main"
    assert rec["dest"].startswith("127.0.0.1:") and rec["egress"] == ""
    assert rec["reason"] == "eof" and rec["errno"] == ""
    assert rec["c2s_bytes"] == 4 and rec["s2c_bytes"] == 4
    assert rec["spliced_bytes"] + rec["copied_bytes"] == 8
    assert isinstance(rec["duration"], float) and rec["duration"] >= 0


@pytest.mark.timeout(90)
def test_flow_lines_complete_under_churn(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, workers=2,
                                         settings={"log_format": "json"}))
    rp.wait_ready()
    ports = _churn(rp.address(), 600)
    records = rp.wait_flows(600, timeout=20)
    time.sleep(0.5)
    records = rp.flows()
    assert len(records) == 600, "one line per connection, no more"
    for rec in records:
        _check_record(rec)
    assert sorted(int(r["client"].rsplit(":", 1)[1]) for r in records) == sorted(ports)
    assert len({r["pid"] for r in records}) >= 1
    assert rp.stop() == 0


@pytest.mark.timeout(60)
def test_sigterm_flushes_the_buffer(origins: Any, relays: Any) -> None:
    """With a 30 s flush interval nothing is written while serving; SIGTERM writes it all."""
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, workers=1,
                                         settings={"log_format": "json", "flow_log_flush": 30}))
    rp.wait_ready()
    _churn(rp.address(), 40)
    time.sleep(0.5)
    assert rp.flows() == [], "written before the flush interval: the test proves nothing"
    rp.send_signal(signal.SIGTERM)
    assert rp.wait_exit(20) == 0
    time.sleep(0.3)  # the stderr pump reads the last lines
    records = rp.flows()
    assert len(records) == 40
    for rec in records:
        _check_record(rec)


@pytest.mark.timeout(60)
def test_sigusr1_writes_the_buffer_to_the_old_file_then_reopens(origins: Any,
                                                                relays: Any) -> None:
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-flowlog-"))
    log_file = directory / "relay.log"
    rotated = directory / "relay.log.1"
    rp = relays(lambda adm: relay_config(
        origin.port, admin_socket=adm, workers=2,
        settings={"log_format": "json", "flow_log_flush": 30, "log_file": str(log_file)}))
    rp.wait_ready()
    _churn(rp.address(), 30)
    log_file.rename(rotated)
    rp.send_signal(signal.SIGUSR1)
    wait_for(lambda: log_file.exists() and "log files reopened" in log_file.read_text(), 5,
             "the supervisor's reopen line")
    wait_for(lambda: len(flow_records(rotated.read_text().splitlines())) == 30, 5,
             "the buffered records in the rotated file")
    _churn(rp.address(), 12)
    assert rp.stop() == 0
    old = flow_records(rotated.read_text().splitlines())
    new = flow_records(log_file.read_text().splitlines())
    assert (len(old), len(new)) == (30, 12)
    for rec in old + new:
        _check_record(rec)


@pytest.mark.timeout(90)
def test_a_log_pipe_nobody_reads_drops_and_counts(origins: Any, relays: Any) -> None:
    """log_file is a FIFO whose reader stopped reading: the writer blocks, connections keep
    being served without a failure, records beyond flow_log_buffer are dropped and counted;
    once the pipe is read again a line says how many."""
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-fifo-"))
    fifo = directory / "relay.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
    except OSError:
        pass  # the default 64 KiB pipe only needs more connections
    chunks: list[bytes] = []
    try:
        rp = relays(lambda adm: relay_config(
            origin.port, admin_socket=adm, workers=1,
            settings={"log_format": "json", "flow_log_buffer": 50, "log_file": str(fifo)}))
        rp.wait_ready()

        def dropped() -> int:
            return sum(int(w["stats"].get("flowlog_dropped", 0)) for w in rp.workers())

        served = 0
        deadline = time.monotonic() + 40
        while dropped() == 0:
            assert time.monotonic() < deadline, "no record dropped"
            ports = _churn(rp.address(), 200, "while the log was blocked")
            served += len(ports)
            time.sleep(1.1)  # stats snapshots come once a second
        assert served - dropped() <= 50 + 4096 * 4  # a full buffer, a full pipe, one batch

        done = threading.Event()
        pump = threading.Thread(target=_read_until, args=(reader, chunks, done), daemon=True)
        pump.start()
        _churn(rp.address(), 20)  # a dropped-records line follows a write
        wait_for(lambda: b"records dropped so far" in b"".join(chunks), 15,
                 "the dropped-records line")
        rp.send_signal(signal.SIGTERM)
        assert rp.wait_exit(20) == 0
        done.set()
        pump.join(5)
    finally:
        os.close(reader)
    lines = b"".join(chunks).decode().splitlines()
    assert any("records dropped so far" in x and '"flowlog_dropped"' in x for x in lines)
    for rec in flow_records(lines):
        assert set(TCP_FIELDS) <= set(rec)  # whole lines only


def _read_until(fd: int, chunks: list[bytes], done: threading.Event) -> None:
    while not done.is_set():
        select.select([fd], [], [], 0.1)
        try:
            data = os.read(fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                continue
            return
        if data:
            chunks.append(data)
        else:
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_rejected_connections_get_a_flow_line(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, workers=1,
                                         settings={"log_format": "json", "maxconn": 1}))
    rp.wait_ready()
    held = socket.create_connection(rp.address(), timeout=5)
    try:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))
        port = refused.getsockname()[1]
        refused.settimeout(5)
        with pytest.raises(OSError):  # reset at connect or at the first read
            refused.connect(rp.address())
            refused.sendall(b"y")
            if not refused.recv(1):
                raise ConnectionResetError
        refused.close()
        [rec] = rp.flows_of_client_port(port)
    finally:
        held.close()
    assert rec["reason"] == "rejected_maxconn" and rec["reason"][len("rejected_"):] in \
        REJECT_REASONS
    assert rec["client"] == f"127.0.0.1:{port}" and rec["c2s_bytes"] == 0
    assert list(rec)[5:] == list(TCP_FIELDS)
    # The limit's own log line names the client as an address, never a Python tuple.
    wait_for(lambda: f"client 127.0.0.1:{port} reset" in rp.output(), 5, "the limit line")
    assert "('127.0.0.1'" not in rp.output()
    assert rp.stop() == 0
