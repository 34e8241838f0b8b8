"""The flow log writer: the same lines as the logging formatters, batches, drops, reopen."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

from relay.ops import log as relay_log
from relay.serve import flowlog
from relay.serve.flowlog import FLOW_LOGGER, FlowLog

F_SETPIPE_SZ = 1031

RECORDS: list[flowlog.Record] = [
    (1764612000.25, "main", ("127.0.0.1", 50408), ("10.0.0.1", 80), None, 5, 7, 0, 12, 1234,
     "eof", 0, "tcp", -1, -1),
    (1764612000.999, "v6 é\n", ("2001:db8::1", 443, 0, 0), ("unix:/run/x sock", 0),
     ("192.0.2.9", 40000), 0, 0, 0, 0, 12, "reset_origin", 104, "tcp", -1, -1),
    (1764612001.5, "main", "", None, None, 0, 0, 0, 0, 0, "rejected_maxconn", 0, "tcp", -1, -1),
    (1764612001.75, "dns", ("192.0.2.7", 5353), ("198.51.100.53", 53), ("203.0.113.7", 40001),
     40, 120, 0, 160, 3500, "responses", 0, "udp", 1, 1),
    (1764612002.0, 'q"\\', ("::1", 1), ("127.0.0.1", 2), None, 1 << 40, 3, 1 << 40, 3,
     10_000_000_000, "denied_policy", 9999, "tcp", -1, -1),
]


def _logging_lines(fmt: str, tmp_path: Path) -> list[str]:
    """The same records through `logging` with relay.ops.log's formatters (the reference)."""
    path = tmp_path / f"ref.{fmt}"
    relay_log.setup_logging(fmt, "info", str(path))
    try:
        for rec in RECORDS:
            flowlog._emit(rec)
    finally:
        relay_log.reset_logging()
    return path.read_text().splitlines()


def _writer_lines(fmt: str, tmp_path: Path) -> list[str]:
    path = tmp_path / f"fast.{fmt}"
    relay_log.setup_logging(fmt, "info", str(path))
    saved = logging.getLogger().handlers[:]
    try:
        # pytest's capture handlers would make the writer fall back to `logging`: hide them.
        logging.getLogger().handlers = [h for h in saved if h is relay_log._handler]
        assert relay_log.flow_destination(FLOW_LOGGER) is not None
        fl = FlowLog()
        fl.start()
        for rec in RECORDS:
            fl.add(rec)
        fl.close()
    finally:
        logging.getLogger().handlers = saved
        relay_log.reset_logging()
    return path.read_text().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_writer_lines_equal_the_logging_formatters(fmt: str, tmp_path: Path) -> None:
    reference = _logging_lines(fmt, tmp_path)
    # Format the same records the fast way, but the pid in the reference is this process too.
    fast = _writer_lines(fmt, tmp_path)
    assert len(fast) == len(RECORDS)
    assert fast == reference
    if fmt == "json":
        docs = [json.loads(line) for line in fast]
        assert docs[1]["listener"] == "v6 é\n" and docs[1]["client"] == "[2001:db8::1]:443"
        assert docs[1]["dest"] == "unix:/run/x sock" and docs[1]["errno"] == "ECONNRESET"
        assert list(docs[0])[5:] == list(flowlog.TCP_FIELDS)
        assert list(docs[3])[5:] == list(flowlog.FIELDS)
        assert docs[3]["protocol"] == "udp" and docs[3]["c2s_dgrams"] == 1
    else:
        assert "\n" not in "".join(fast)  # one record, one line: the escaped name
        assert ' listener="v6 é\\n" client=[2001:db8::1]:443 ' in fast[1]
        assert " client=127.0.0.1:50408 " in fast[0]


def test_fallback_hands_records_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    fl = FlowLog(interval=0.02)
    fl.start()
    with caplog.at_level("INFO", logger="relay.flow"):
        fl.add(RECORDS[0])
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if r.name == "relay.flow"]:
            assert time.monotonic() < deadline, "no flow record through logging"
            time.sleep(0.01)
    fl.close()
    [rec] = [r for r in caplog.records if r.name == "relay.flow"]
    assert rec.getMessage() == "flow" and rec.client == "127.0.0.1:50408"
    assert rec.created == RECORDS[0][0] and rec.duration == 0.001234


def test_a_blocked_destination_drops_and_counts(tmp_path: Path) -> None:
    """A pipe nobody reads: the writer blocks, add() never does; beyond the buffer, records
    are dropped and counted; once the pipe is read again, everything kept arrives and a line
    says how many were dropped."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    relay_log.setup_logging("text", "info", None)
    handler = relay_log._handler
    assert isinstance(handler, logging.StreamHandler)
    stream = os.fdopen(os.dup(w), "w")
    handler.setStream(stream)
    saved = logging.getLogger().handlers[:]
    logging.getLogger().handlers = [handler]
    got: list[bytes] = []
    try:
        fl = FlowLog(capacity=100, batch=10, interval=0.02)
        fl.start()
        t0 = time.monotonic()
        for i in range(2000):
            fl.add((time.time(), "main", ("127.0.0.1", i), None, None, 0, 0, 0, 0, 0, "eof", 0, "tcp", -1, -1))
        assert time.monotonic() - t0 < 1.0, "add() waited for the writer"
        assert fl.dropped >= 2000 - 100 - 4096 // 100 * 4
        reader = threading.Thread(target=lambda: got.append(_read_all(r)), daemon=True)
        reader.start()
        fl.close()
        kept = 2000 - fl.dropped
        assert fl.written == kept
    finally:
        logging.getLogger().handlers = saved
        relay_log.reset_logging()
        os.close(w)
        stream.close()
    reader.join(5)
    text = b"".join(got).decode()
    assert text.count(" relay.flow[") == kept
    assert f"{fl.dropped} records dropped" in text


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_reopen_finishes_the_old_file_first(tmp_path: Path) -> None:
    path = tmp_path / "relay.log"
    relay_log.setup_logging("json", "info", str(path))
    saved = logging.getLogger().handlers[:]
    logging.getLogger().handlers = [relay_log._handler]  # type: ignore[list-item]
    try:
        fl = FlowLog(interval=0.05)
        fl.start()
        fl.add(RECORDS[0])
        time.sleep(0.3)
        path.rename(tmp_path / "relay.log.1")
        fl.add(RECORDS[1])  # waits in the buffer while the file is rotated
        relay_log.reopen()
        fl.request_reopen()
        time.sleep(0.3)
        fl.add(RECORDS[2])
        fl.close()
    finally:
        logging.getLogger().handlers = saved
        relay_log.reset_logging()
    old = [json.loads(x)["reason"] for x in (tmp_path / "relay.log.1").read_text().splitlines()]
    new = [json.loads(x)["reason"] for x in path.read_text().splitlines()]
    assert (old, new) == (["eof", "reset_origin"], ["rejected_maxconn"])


def test_duration_text_is_the_rounded_seconds() -> None:
    """The writer prints repr(us / 1e6) where the record's meaning is round(us / 1e6, 6): the
    same text for every integer duration (microseconds) up to ~2**33 seconds, both notations."""
    rng = random.Random(8)
    samples = [*range(0, 2000), *(10**k + d for k in range(2, 16) for d in (-1, 0, 1)),
               *(rng.randrange(10**n) for n in range(3, 16) for _ in range(2000))]
    for us in samples:
        assert repr(us / 1e6) == repr(round(us / 1e6, 6)), us


def test_without_the_extension_the_lines_go_through_logging(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without relay_ext._flowfmt still writes every line, the same ones, through
    `logging` (and says once why)."""
    reference = _logging_lines("text", tmp_path)
    monkeypatch.setattr(flowlog, "_flowfmt", None)
    monkeypatch.setattr(flowlog, "_FLOWFMT_MISSING", "relay_ext._flowfmt is not importable (test)",
                        raising=False)
    lines = _writer_lines("text", tmp_path)
    assert [line for line in lines if " relay.flow[" in line] == reference
    [why] = [line for line in lines if "relay.flowlog" in line]
    assert "relay_ext._flowfmt is not importable (test)" in why and "through logging" in why
