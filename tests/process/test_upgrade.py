"""Binary upgrade (`relay upgrade`, SIGUSR2; relay.process.upgrade) with real processes: the
listening sockets and the established flows move to a freshly started relay tree; a new
version that fails to start leaves the old tree serving, and it says why."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from helpers import PYTHON, REPO_ROOT, alive, echo_roundtrip, wait_for
from helpers import echo as echo_handler
from test_handoff import Conversation, _config


def _upgrade_cli(rp: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "relay", "upgrade", "--socket", rp.admin_socket],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(60)
def test_a_new_version_that_fails_to_start_leaves_the_old_tree_serving(
        origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    broken = "/bin/sh -c 'echo relay 99: cannot start >&2; exit 3'"
    rp = relays(lambda adm: _config(echo.port, adm),
                env={"RELAY_UPGRADE_COMMAND": broken})
    rp.wait_ready()
    workers = rp.children()
    talks = [Conversation(rp.address(), 300 + s) for s in range(4)]
    for t in talks:
        t.start()
    result = _upgrade_cli(rp)
    assert result.returncode == 1
    assert "exited with code 3 before serving" in result.stderr, result.stderr
    assert "keeps serving" in result.stderr
    rp.send_signal(signal.SIGUSR2)                   # the same through the signal
    wait_for(lambda: rp.stderr().count("upgrade failed") == 2, 10, "the second failure")
    assert rp.proc.poll() is None and rp.children() == workers
    assert rp.stats()["pid"] == rp.pid
    assert echo_roundtrip(rp.address())
    for t in talks:
        t.stop_event.set()
    for t in talks:
        t.join(10)
    assert all(t.done for t in talks), [t.error for t in talks]


@pytest.mark.timeout(60)
def test_upgrade_moves_listeners_and_established_flows_to_a_new_tree(
        origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: _config(echo.port, adm))
    rp.wait_ready()
    old_workers = rp.children()
    talks = [Conversation(rp.address(), 400 + s) for s in range(8)]
    for t in talks:
        t.start()
    time.sleep(0.3)
    new_pid = 0
    try:
        result = _upgrade_cli(rp)
        assert result.returncode == 0, result.stderr
        new_pid = int(result.stdout.split("relay pid ")[1].split()[0])
        assert new_pid != rp.pid
        assert rp.proc.wait(10) == 0                 # the old supervisor left, cleanly
        assert not any(alive(p) for p in old_workers)
        time.sleep(0.5)
        snap = rp.stats()                            # the same admin socket, the new tree
        assert snap["pid"] == new_pid
        assert not {w["pid"] for w in snap["workers"]} & old_workers
        assert echo_roundtrip(rp.address())          # the same listening socket
        for t in talks:
            t.stop_event.set()
        for t in talks:
            t.join(10)
        assert all(t.done for t in talks), [t.error for t in talks]
        lines = rp.wait_flows(9)
        ports = {t.local_port for t in talks}
        mine = [r for r in lines if int(str(r["client"]).rsplit(":", 1)[1]) in ports]
        assert len(mine) == 8 and all(r["reason"] == "eof" for r in mine)
        assert all(r["c2s_bytes"] == t.sent for r in mine for t in talks
                   if str(r["client"]).endswith(f":{t.local_port}"))
    finally:
        if new_pid and alive(new_pid):
            os.kill(new_pid, signal.SIGINT)
            wait_for(lambda: not alive(new_pid), 10, "the new relay stopped")
