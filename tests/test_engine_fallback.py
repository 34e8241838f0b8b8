"""io_uring unavailable (a seccomp filter returning EPERM, as Docker's default profile does):
`engine = "auto"` names the cause and the epoll engine takes over with the same guarantees;
`engine = "uring"` refuses to start with a clear error (TEST_MATRIX F)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Origin, pattern, read_all, respond_after_eof, sha
from test_doctor import _block_io_uring

REPO = Path(__file__).resolve().parent.parent


def start_relay(tmp_path: Path, backend: tuple[str, int], engine: str) -> subprocess.Popen[str]:
    conf = tmp_path / "relay.toml"
    conf.write_text(
        f'[relay]\nengine = "{engine}"\nworkers = 1\nflow_log = true\n\n'
        f'[[listener]]\nname = "main"\nbind = "127.0.0.1:0"\n'
        f'backend = "{backend[0]}:{backend[1]}"\n'
    )
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "run", "-c", str(conf)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp_path / "stderr", "w"),  # noqa: SIM115
            text=True, preexec_fn=_block_io_uring, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot install a seccomp filter here: {exc}")


def ready_address(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[str, int] | None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        m = re.match(r"READY pid=\d+ listeners=main=([\d.]+):(\d+)", line)
        if m:
            return m.group(1), int(m.group(2))
    return None


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


@pytest.mark.timeout(90)
def test_auto_falls_back_to_epoll_with_the_same_guarantees(tmp_path: Path) -> None:
    origin = Origin(respond_after_eof(3 << 20))
    proc = start_relay(tmp_path, origin.address, "auto")
    try:
        address = ready_address(proc)
        log = (tmp_path / "stderr").read_text()
        assert address is not None, log
        assert "epoll" in log and ("EPERM" in log or "not permitted" in log.lower()), log
        # half-close client-first, then a 3 MiB answer: byte-exact through the epoll engine
        request = pattern(1 << 20, seed=9)
        with socket.create_connection(address, timeout=20) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answer = read_all(client)
        assert answer.end == "eof" and answer.nbytes == 3 << 20
        assert answer.sha256 == sha(pattern(3 << 20, seed=2))
        deadline = time.monotonic() + 10
        while not origin.results and time.monotonic() < deadline:
            time.sleep(0.02)
        assert origin.results and origin.results[0].sha256 == sha(request)
    finally:
        stop(proc)
        origin.close()
    log = (tmp_path / "stderr").read_text()
    assert re.search(r"flow .*reason=eof", log), log


@pytest.mark.timeout(60)
def test_uring_requested_but_blocked_fails_clearly(tmp_path: Path) -> None:
    origin = Origin(respond_after_eof(10))
    proc = start_relay(tmp_path, origin.address, "uring")
    try:
        assert ready_address(proc) is None          # never READY
        assert proc.wait(30) != 0
    finally:
        stop(proc)
        origin.close()
    log = (tmp_path / "stderr").read_text()
    assert "io_uring" in log and ("EPERM" in log or "not permitted" in log.lower()), log
    assert "seccomp" in log or "epoll" in log, log
