"""Binary upgrade (`relay upgrade`, SIGUSR2; relay.process.upgrade) with real processes: the
listening sockets and the established flows move to a freshly started relay tree; a new
version that fails to start leaves the old tree serving, and it says why."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import PYTHON, REPO_ROOT, UdpOrigin, alive, echo_roundtrip, wait_for
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


def _udp_listener(origin_port: int, extra: str = "") -> str:
    """A UDP listener "dns" on a fresh loopback port, in backend mode to the origin."""
    return ('\n[[listener]]\nname = "dns"\nprotocol = "udp"\nbind = "127.0.0.1:0"\n'
            f'backend = "127.0.0.1:{origin_port}"\n{extra}')


@pytest.mark.timeout(90)
def test_upgrade_carries_udp_listeners_and_the_old_tree_releases_udp_first(
        origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    origin = UdpOrigin()
    udp = _udp_listener(origin.port)
    rp = relays(lambda adm: _config(echo.port, adm, extra=udp,
                                    settings={"udp_idle_timeout": 30.0}))
    rp.wait_ready()
    old_workers = rp.children()
    dns = rp.address("dns")
    old = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # a UDP flow of the old tree
    old.bind(("127.0.0.1", 0))
    old.settimeout(3.0)
    new_pid = 0
    try:
        old.sendto(b"before", dns)
        assert old.recvfrom(100)[0] == b"before"
        result = _upgrade_cli(rp)
        assert result.returncode == 0, result.stderr
        new_pid = int(result.stdout.split("relay pid ")[1].split()[0])
        # Sent at once: it waits in the listener socket's buffer until the new tree starts UDP
        # (after the old one released its UDP ports), then gets its reply.
        old.sendto(b"after", dns)
        assert old.recvfrom(100)[0] == b"after"
        assert rp.proc.wait(10) == 0                 # the old supervisor left, cleanly
        assert not any(alive(p) for p in old_workers)
        snap = rp.stats()
        assert snap["pid"] == new_pid
        assert snap["listeners"]["dns"] == f"{dns[0]}:{dns[1]}"    # the same UDP socket group
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(3.0)
            c.sendto(b"fresh", dns)
            assert c.recvfrom(100)[0] == b"fresh"
            fresh_port = c.getsockname()[1]
        assert echo_roundtrip(rp.address())          # and TCP
        os.kill(new_pid, signal.SIGINT)              # its UDP flows end (flow log lines)
        wait_for(lambda: not alive(new_pid), 10, "the new relay stopped")
        port = old.getsockname()[1]

        def udp_flows() -> list[dict[str, Any]] | None:
            mine = [r for r in rp.flows() if r.get("protocol") == "udp"]
            ports = {int(str(r["client"]).rsplit(":", 1)[1]) for r in mine}
            dgrams = sum(r["c2s_dgrams"] for r in mine
                         if int(str(r["client"]).rsplit(":", 1)[1]) == port)
            return mine if fresh_port in ports and dgrams == 2 else None

        logged = wait_for(udp_flows, 10, f"the UDP flows of ports {port} and {fresh_port} "
                                         f"logged; log: {rp.flows()}")
        old_tree = [r for r in logged if r["pid"] in old_workers]
        new_tree = [r for r in logged if r["pid"] not in old_workers]
        # "after" went to whichever tree read the shared listener socket first: the old tree
        # until its workers released UDP, the new one after; either way nothing was lost.
        assert [r["reason"] for r in old_tree] == ["reload"], logged
        assert old_tree[0]["c2s_dgrams"] == old_tree[0]["s2c_dgrams"] >= 1
        assert new_tree and all(r["c2s_dgrams"] == r["s2c_dgrams"] == 1 for r in new_tree)
        # The old tree's flow ended before the new tree's first flow started (ms resolution).
        first_start = min(_end(r) - r["duration"] for r in new_tree)
        assert _end(old_tree[0]) <= first_start + 0.002, logged
    finally:
        old.close()
        origin.close()
        if new_pid and alive(new_pid):
            os.kill(new_pid, signal.SIGINT)
            wait_for(lambda: not alive(new_pid), 10, "the new relay stopped")


def _end(record: dict[str, Any]) -> float:
    """A flow log line's end time ("time", UTC, ms resolution) in seconds since the epoch."""
    return datetime.strptime(str(record["time"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_upgrade_to_a_config_with_another_worker_count_serves_every_udp_flow(
        origins: Any, relays: Any, before: int, after: int) -> None:
    """More workers: the inherited group grows on the same port; fewer: the sockets no worker
    reads any more are closed (the kernel hashes flows over the rest), none loses datagrams."""
    echo = origins(echo_handler)
    origin = UdpOrigin()
    udp = _udp_listener(origin.port, "udp_responses = 1\n")
    rp = relays(lambda adm: _config(echo.port, adm, workers=before, extra=udp))
    rp.wait_ready()
    dns = rp.address("dns")
    rp.config_path.write_text(rp.config_path.read_text().replace(
        f"workers = {before}", f"workers = {after}"))
    new_pid = 0
    try:
        result = _upgrade_cli(rp)
        assert result.returncode == 0, result.stderr
        new_pid = int(result.stdout.split("relay pid ")[1].split()[0])
        assert rp.proc.wait(10) == 0
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(24)]
        try:
            lost = []
            for i, c in enumerate(clients):
                c.settimeout(3.0)
                c.sendto(b"q%d" % i, dns)
                try:
                    assert c.recvfrom(100)[0] == b"q%d" % i
                except TimeoutError:
                    lost.append(c.getsockname()[1])
        finally:
            for c in clients:
                c.close()
        assert lost == [], f"no reply to the clients from ports {lost}"

        def udp_flows_by_worker() -> list[int] | None:
            snap = rp.stats()
            counts = [w["stats"].get("udp_flows_total", 0) for w in snap["workers"]]
            return counts if snap["pid"] == new_pid and sum(counts) == 24 else None

        counts = wait_for(udp_flows_by_worker, 10, "the new workers' UDP counts")
        assert len(counts) == after and all(counts), counts   # every new worker carries flows
    finally:
        origin.close()
        if new_pid and alive(new_pid):
            os.kill(new_pid, signal.SIGINT)
            wait_for(lambda: not alive(new_pid), 10, "the new relay stopped")
