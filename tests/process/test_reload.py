"""Reload (SIGHUP and `relay reload`) with real relay processes and real traffic."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ConnectionStream,
    Transfer,
    alive,
    echo_roundtrip,
    hash_reply,
    relay_cli,
    wait_for,
)
from helpers import echo as echo_handler

from relay.lab.process import RelayProcess, relay_config, write_config


def _two_origins(origins: Any) -> tuple[Any, Any]:
    return origins(echo_handler), origins(hash_reply)


def _config(echo_port: int, hash_port: int, adm: str, *, drain: float = 8.0,
            workers: int = 2, extra: str = "", relay_extra: str = "") -> str:
    return relay_config(echo_port, admin_socket=adm, workers=workers, drain=drain,
                        extra_relay=relay_extra, extra=f"""
[[listener]]
name = "bulk"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{hash_port}"
{extra}
""")


def _reload_cli(rp: Any) -> subprocess.CompletedProcess[str]:
    return relay_cli("reload", "--socket", rp.admin_socket)


@pytest.mark.timeout(90)
def test_reload_under_load_loses_nothing(origins: Any, relays: Any) -> None:
    echo, sink = _two_origins(origins)
    rp = relays(lambda adm: _config(echo.port, sink.port, adm, drain=8.0))
    rp.wait_ready()
    old = rp.children()
    assert len(old) == 2
    stream = ConnectionStream(rp.address("main"), interval=0.005)
    stream.start()
    transfers = [Transfer(rp.address("bulk"), 3 << 20, 3.0).begin() for _ in range(4)]
    time.sleep(0.5)
    hup_at = time.monotonic()
    rp.send_signal(signal.SIGHUP)
    # New generation serving, then the old workers drain their transfers and leave.
    wait_for(lambda: rp.stats()["generation"] == 2, 20, "generation 2 serving")
    new = {w["pid"] for w in rp.workers()}
    assert len(new) == 2 and not (new & old)
    wait_for(lambda: not any(alive(p) for p in old), 8.0 + 5, "old workers gone")
    gone_after = time.monotonic() - hup_at
    time.sleep(0.5)  # connections keep coming after the old generation left
    stream.stop()
    for t in transfers:
        t.join(20)
    assert stream.failed == 0, stream.errors[:5]
    assert stream.ok > 50, f"only {stream.ok} connections during the reload"
    assert all(t.ok for t in transfers), [t.error for t in transfers]
    assert gone_after < 8.0 + 2, f"old workers left after {gone_after:.1f}s"
    assert rp.children() == new
    assert "reload done: generation 2 serving" in rp.stderr()


@pytest.mark.timeout(60)
def test_old_workers_are_gone_by_the_drain_deadline(origins: Any, relays: Any) -> None:
    """A transfer longer than drain_timeout is cut at the deadline; the old worker leaves.
    (With relay.handoff off: with it on the transfer moves to the new worker, test_handoff.)"""
    echo, sink = _two_origins(origins)
    rp = relays(lambda adm: _config(echo.port, sink.port, adm, drain=1.5, workers=1,
                                    relay_extra="handoff = false"))
    rp.wait_ready()
    (old,) = rp.children()
    t = Transfer(rp.address("bulk"), 16 << 20, 8.0).begin()
    time.sleep(0.3)
    hup_at = time.monotonic()
    rp.send_signal(signal.SIGHUP)
    wait_for(lambda: not alive(old), 1.5 + 3, "the old worker gone")
    gone = time.monotonic() - hup_at
    t.join(15)
    assert t.ok is False, "the transfer outlived drain_timeout"
    assert 1.2 <= gone < 1.5 + 1.0, f"old worker left {gone:.1f}s after SIGHUP"
    assert "still running at its stop deadline" not in rp.stderr(), "it needed a SIGKILL"
    assert echo_roundtrip(rp.address("main"))


@pytest.mark.timeout(60)
def test_reload_command_reports_success(origins: Any, relays: Any) -> None:
    echo, sink = _two_origins(origins)
    rp = relays(lambda adm: _config(echo.port, sink.port, adm, workers=1))
    rp.wait_ready()
    (old,) = rp.children()
    rp.config_path.write_text(rp.config_path.read_text().replace("workers = 1", "workers = 2"))
    res = _reload_cli(rp)
    assert res.returncode == 0, res.stderr
    assert "generation 2 serving with 2 workers" in res.stdout
    assert rp.stats()["reloads"]["ok"] == 1
    wait_for(lambda: not alive(old), 10, "the old worker gone")
    assert len(rp.children()) == 2
    assert echo_roundtrip(rp.address("main"))


@pytest.mark.timeout(60)
def test_bad_config_on_reload_keeps_the_old_one(origins: Any, relays: Any) -> None:
    echo, sink = _two_origins(origins)
    rp = relays(lambda adm: _config(echo.port, sink.port, adm, workers=2))
    rp.wait_ready()
    before = {w["pid"] for w in rp.workers()}
    good = rp.config_path.read_text()
    rp.config_path.write_text(good.replace("workers = 2", "workers = -3\nmaxconnn = 5"))
    res = _reload_cli(rp)
    assert res.returncode == 1
    assert "relay.workers" in res.stderr and "maxconnn" in res.stderr, res.stderr
    rp.send_signal(signal.SIGHUP)
    wait_for(lambda: rp.stderr().count("reload refused") >= 2, 10, "the SIGHUP refusal logged")
    time.sleep(0.5)
    snap = rp.stats()
    assert snap["generation"] == 1
    assert {w["pid"] for w in snap["workers"]} == before == rp.children()
    assert snap["reloads"]["failed"] == 2
    assert echo_roundtrip(rp.address("main"))
    # Fixed again: the next reload goes through.
    rp.config_path.write_text(good)
    assert _reload_cli(rp).returncode == 0
    assert rp.stats()["generation"] == 2


@pytest.mark.timeout(60)
def test_reload_whose_workers_cannot_boot_is_aborted(origins: Any) -> None:
    """A config that validates but whose workers fail: the supervisor runs as nobody and the new
    config asks the workers to become root (their setuid fails). The reload is aborted, the old
    generation keeps serving. (A backend that is the listener itself no longer gets this far:
    `relay check` and the reload's validation refuse it.)"""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the supervisor as nobody")
    echo, sink = _two_origins(origins)
    directory = Path(tempfile.mkdtemp(prefix="relay-reload-"))
    os.chmod(directory, 0o777)
    rp = RelayProcess(write_config(directory, "relay",
                                   _config(echo.port, sink.port, str(directory / "a.sock"))),
                      prefix=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
    try:
        rp.wait_ready()
        before = rp.children()
        text = rp.config_path.read_text()
        rp.config_path.write_text(text.replace("[relay]\n", '[relay]\nuser = "root"\n', 1))
        stream = ConnectionStream(rp.address("main"), interval=0.01)
        stream.start()
        res = _reload_cli(rp)
        time.sleep(0.3)
        stream.stop()
        assert res.returncode == 1, res.stdout
        assert "failed to boot" in res.stderr, res.stderr
        assert "previous configuration keeps serving" in res.stderr
        wait_for(lambda: rp.children() == before, 10, "only the old workers left")
        assert rp.stats()["generation"] == 1
        assert stream.failed == 0, stream.errors[:5]
        assert echo_roundtrip(rp.address("main"))
    finally:
        rp.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(60)
def test_reload_adds_and_removes_listeners(origins: Any, relays: Any) -> None:
    echo, sink = _two_origins(origins)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, workers=1, drain=3.0))
    rp.wait_ready()
    base = rp.config_path.read_text()
    rp.config_path.write_text(base + f"""
[[listener]]
name = "extra"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{echo.port}"
""")
    assert _reload_cli(rp).returncode == 0
    listeners = rp.stats()["listeners"]
    assert set(listeners) == {"main", "extra"}
    host, _, port = listeners["extra"].rpartition(":")
    extra_addr = (host, int(port))
    assert echo_roundtrip(extra_addr)
    assert listeners["main"] == "{}:{}".format(*rp.address("main")), "main keeps its socket"
    rp.config_path.write_text(base)
    assert _reload_cli(rp).returncode == 0
    # Once generation 2's worker is gone the removed listener's socket is closed.
    wait_for(lambda: len(rp.children()) == 1, 10, "the old worker gone")
    wait_for(lambda: not _accepts(extra_addr), 5, "the removed listener closed")
    assert echo_roundtrip(rp.address("main"))


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=2):
            return True
    except OSError:
        return False
