"""Supervisor lifecycle with real `relay run` processes: READY, stats, signals, crashes, hangs.

The relay-process harness is relay.lab.process (RelayProcess), with the `origins` and `relays`
fixtures of tests/fixtures/processes.py and the transfer clients of tests/helpers.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Transfer,
    alive,
    echo_roundtrip,
    hash_reply,
    relay_cli,
    wait_for,
)
from helpers import echo as echo_handler

from relay.lab.process import RelayProcess, relay_config, write_config

# --------------------------------------------------------------------------- tests


def _has_ring(pid: int) -> bool:
    """True when `pid` holds an io_uring instance (an anon inode named [io_uring])."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                return True
    return False


@pytest.mark.timeout(60)
def test_ready_line_workers_and_stats(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2))
    listeners = rp.wait_ready()
    assert set(listeners) == {"main"}
    assert echo_roundtrip(rp.address(), b"x" * 100_000)
    snap = wait_for(lambda: (s := rp.stats()) and len(s["workers"]) == 2 and s, 10, "2 workers")
    pids = {w["pid"] for w in snap["workers"]}
    assert pids == rp.children(), "the workers stats names are the supervisor's children"
    assert all(w["state"] == "serving" and w["engine"] for w in snap["workers"])
    assert snap["listeners"]["main"].endswith(f":{listeners['main'][1]}")
    # The supervisor never loads the core nor owns a ring; the workers do. (It does load
    # relay_ext._limits: it makes the counters its workers share.)
    assert not _has_ring(rp.pid) and "relay_ext/_core" not in Path(
        f"/proc/{rp.pid}/maps").read_text()
    if "uring" in {w["engine"] for w in snap["workers"]}:
        assert all(_has_ring(p) for p in pids)

    text = relay_cli("stats", "--socket", rp.admin_socket, timeout=20)
    assert text.returncode == 0, text.stderr
    assert "workers: 2" in text.stdout and "listeners: main=" in text.stdout
    js = relay_cli("stats", "--json", "--socket", rp.admin_socket, timeout=20)
    assert js.returncode == 0, js.stderr
    assert {w["pid"] for w in json.loads(js.stdout)["workers"]} == pids


@pytest.mark.timeout(90)
def test_worker_sigkill_during_transfers(origins: Any, relays: Any) -> None:
    origin = origins(hash_reply)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2))
    rp.wait_ready()
    transfers = [Transfer(rp.address(), 4 << 20, 3.0) for _ in range(8)]
    for t in transfers:
        t.start()
        time.sleep(0.02)

    def flows() -> list[dict[str, Any]] | None:
        ws = rp.workers()
        total = sum(w["stats"].get("flows_open", 0) for w in ws)
        return ws if len(ws) == 2 and total == len(transfers) else None

    workers = wait_for(flows, 10, "every transfer open in the workers' stats")
    busy = [w for w in workers if w["stats"]["flows_open"] > 0]
    # Kill a worker with transfers when both have some, else the idle one: either way the
    # transfers of the surviving worker must complete intact.
    victim = min(busy, key=lambda w: w["stats"]["flows_open"]) if len(busy) == 2 else next(
        w for w in workers if w["stats"]["flows_open"] == 0)
    lost = victim["stats"]["flows_open"]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in transfers:
        t.join(30)
    ok = [t for t in transfers if t.ok]
    failed = [t for t in transfers if not t.ok]
    assert len(ok) == len(transfers) - lost, [t.error for t in failed]
    assert not any("digest mismatch" in t.error for t in failed), [t.error for t in failed]
    # The slot comes back with a new process.
    new = wait_for(lambda: (ws := rp.workers()) and len(ws) == 2
                   and victim["pid"] not in {w["pid"] for w in ws} and ws, 15, "a replacement")
    assert victim["pid"] not in rp.children()
    assert rp.stats()["restarts"] >= 1
    assert len(new) == 2
    assert transfer_ok(rp.address())
    assert "killed by SIGKILL while serving" in rp.stderr()


def transfer_ok(addr: tuple[str, int]) -> bool:
    """One short checked transfer, in this thread."""
    t = Transfer(addr, 1 << 20, 0.1)
    t.run()
    return bool(t.ok)


@pytest.mark.timeout(60)
def test_sigterm_drains_transfers_then_exits(origins: Any, relays: Any) -> None:
    origin = origins(hash_reply)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2))
    rp.wait_ready()
    workers = rp.children()
    transfers = [Transfer(rp.address(), 2 << 20, 2.0).begin() for _ in range(3)]
    time.sleep(0.3)
    started = time.monotonic()
    rp.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):  # stopped accepting, for every worker at once
        socket.create_connection(rp.address(), timeout=2).close()
    assert rp.wait_exit(20) == 0, rp.stderr()
    elapsed = time.monotonic() - started
    for t in transfers:
        t.join(10)
    assert all(t.ok for t in transfers), [t.error for t in transfers]
    assert elapsed < 10, f"drain took {elapsed:.1f}s for 2 s transfers"
    assert not any(alive(p) for p in workers)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_fast_stop(origins: Any, relays: Any, sig: int) -> None:
    origin = origins(hash_reply)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2))
    rp.wait_ready()
    workers = rp.children()
    t = Transfer(rp.address(), 8 << 20, 8.0).begin()
    time.sleep(0.3)
    started = time.monotonic()
    rp.send_signal(sig)
    assert rp.wait_exit(10) == 0, rp.stderr()
    assert time.monotonic() - started < 4
    t.join(10)
    assert t.ok is False, "a fast stop must cut the 8 s transfer"
    assert not any(alive(p) for p in workers)


@pytest.mark.timeout(60)
def test_default_is_one_worker_per_cpu(origins: Any, relays: Any) -> None:
    cpus = len(os.sched_getaffinity(0))
    if cpus > 16:
        pytest.skip(f"{cpus} CPUs: too many workers for a quick test")
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=0))
    rp.wait_ready()
    assert len(rp.children()) == cpus


@pytest.mark.timeout(60)
def test_hung_worker_is_replaced(origins: Any, relays: Any) -> None:
    heartbeat_timeout = 2.5
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2,
                                         extra_relay=f"heartbeat_timeout = {heartbeat_timeout}"))
    rp.wait_ready()
    victim = min(rp.children())
    t0 = time.monotonic()
    os.kill(victim, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    wait_for(lambda: not alive(victim), heartbeat_timeout + 10, "the hung worker to be killed")
    assert time.monotonic() - t0 >= heartbeat_timeout - 1.1   # not before its heartbeat lapsed
    wait_for(lambda: len(rp.children()) == 2, 10, "a replacement worker")
    assert "hung: no heartbeat" in rp.stderr()
    assert echo_roundtrip(rp.address())


@pytest.mark.timeout(60)
def test_crash_restarts_back_off(origins: Any, relays: Any) -> None:
    """A slot that keeps dying is restarted at once, then after 1 s, then 2 s."""
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=1))
    rp.wait_ready()
    times = []
    for _ in range(3):
        pid = wait_for(lambda: (ws := rp.workers()) and ws[0]["pid"], 10, "a serving worker")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda p=pid: (ws := rp.workers()) and ws[0]["pid"] != p, 15, "a restart")
        times.append(time.monotonic() - killed)
    assert times[0] < 1.0, times
    assert times[1] >= 0.9, times
    assert times[2] >= 1.9, times
    assert rp.stderr().count("restarting slot 0 of generation 1 in") == 2


@pytest.mark.timeout(60)
def test_worker_boot_failure_stops_the_service(origins: Any) -> None:
    """Workers that cannot boot stop the service with the reason, after one attempt each."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the supervisor as nobody")
    origin = origins(echo_handler)
    # Supervisor as `nobody`, config asking workers to become root: the worker's setuid fails.
    directory = Path(tempfile.mkdtemp(prefix="relay-boot-"))
    try:
        os.chmod(directory, 0o755)
        config = relay_config(origin.port, workers=2, extra_relay='user = "root"')
        rp = RelayProcess(write_config(directory, "relay", config),
                          prefix=["setpriv", "--reuid=nobody", "--regid=nogroup",
                                  "--clear-groups"])
        try:
            code = rp.wait_exit(30)
            err = rp.stderr()
            assert code == 1, err
            assert "worker failed to boot" in err and "cannot switch to user 'root'" in err, err
            assert 1 <= err.count("started (generation 1") <= 2, err
            assert "READY" not in "".join(iter_lines(rp))
        finally:
            rp.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def iter_lines(rp: RelayProcess) -> Iterator[str]:
    while True:
        try:
            yield rp.lines.get_nowait()
        except queue.Empty:
            return


@pytest.mark.timeout(60)
def test_sd_notify_ready_and_stopping(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-notify-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        path = str(directory / "notify")
        notify.bind(path)
        notify.settimeout(20)
        rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=1),
                    env={"NOTIFY_SOCKET": path})
        rp.wait_ready()
        first = notify.recv(4096).decode()
        assert "READY=1" in first and f"MAINPID={rp.pid}" in first
        rp.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert rp.wait_exit(20) == 0
    finally:
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(60)
def test_sigusr1_reopens_log_file(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-logs-"))
    try:
        log_file = directory / "relay.log"
        rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=1,
                                             extra_relay=f'log_file = "{log_file}"'))
        rp.wait_ready()
        assert echo_roundtrip(rp.address())
        wait_for(lambda: "flow" in log_file.read_text(), 5, "a flow line in the log file")
        rotated = directory / "relay.log.1"
        log_file.rename(rotated)
        rp.send_signal(signal.SIGUSR1)
        wait_for(log_file.exists, 5, "the log file to be reopened")
        wait_for(lambda: "log files reopened" in log_file.read_text(), 5, "supervisor line")
        time.sleep(0.3)  # the workers got their SIGUSR1 with the supervisor's
        assert echo_roundtrip(rp.address())
        wait_for(lambda: "flow" in log_file.read_text(), 5, "a worker's flow line, new file")
        assert "log files reopened" not in rotated.read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(30)
def test_gen_systemd_unit_is_hardened_and_allows_io_uring(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(9, admin_socket="/run/relay/admin.sock", workers=2,
                                drain=10.0))
    out = relay_cli("gen", "systemd", "-c", str(cfg), timeout=20)
    assert out.returncode == 0, out.stderr
    unit = out.stdout
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert f"relay run --config {cfg}" in settings["ExecStart"][0]
    assert "-m relay" not in settings["ExecStart"][0] or " -P -m relay" in settings["ExecStart"][0]
    assert settings["ExecReload"][0].endswith("relay reload --socket /run/relay/admin.sock")
    filters = " ".join(settings["SystemCallFilter"]).split()
    assert not any(f.startswith("~") and "io_uring" in f for f in filters)
    assert {"io_uring_setup", "io_uring_enter", "io_uring_register"} <= set(filters)
    assert "ProtectSystem" in settings and "CapabilityBoundingSet" in settings
    assert settings["TimeoutStopSec"] == [str(int(10.0) + 15)]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing (Debian package systemd): unit not verified")
    unit_path = tmp_path / "relay.service"
    unit_path.write_text(unit)
    res = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True,
                         text=True, timeout=30)
    # verify exits 0 on unknown keys too: any line it prints about the unit is a problem.
    assert res.returncode == 0 and str(unit_path) not in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_workers_leave_when_the_supervisor_is_killed(origins: Any, relays: Any) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed supervisor leaves no orphan worker serving forever."""
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=10.0, workers=2))
    rp.wait_ready()
    workers = rp.children()
    assert len(workers) == 2
    rp.send_signal(signal.SIGKILL)
    rp.wait_exit(10)
    wait_for(lambda: not any(alive(p) for p in workers), 10, "the orphaned workers to exit")
