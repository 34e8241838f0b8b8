"""The session table of a running relay: `relay sessions` lists the open connections of every
worker (ids, destinations, bytes delivered each way), filters them, and `relay kill` resets the
chosen ones (the client sees ECONNRESET, the flow log says reason=killed) while the others go
on; a filter that matches several sessions kills nothing without --all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from helpers import PYTHON, REPO_ROOT, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "relay", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30)


def _echo_exchange(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "the relay closed an open session"
        got += chunk
    assert got == payload


def _sessions(adm: str, *args: str) -> list[dict[str, Any]]:
    res = _cli("sessions", "--json", "--socket", adm, *args)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["missing"] == []
    sessions: list[dict[str, Any]] = data["sessions"]
    return sessions


@pytest.mark.timeout(90)
def test_sessions_list_filter_and_kill(origins: Any, relays: Any) -> None:
    first, second = origins(echo_handler), origins(echo_handler)
    extra = ('[[listener]]\nname = "second"\nbind = "127.0.0.1:0"\n'
             f'backend = "127.0.0.1:{second.port}"\n')
    rp = relays(lambda adm: relay_config(first.port, admin_socket=adm, drain=5.0, workers=2,
                                         settings={"log_format": "json"}, extra=extra))
    rp.wait_ready()
    wait_for(lambda: len(rp.workers()) == 2, 10, "2 serving workers")
    adm = rp.admin_socket
    clients: dict[int, tuple[socket.socket, str, int]] = {}  # client port -> (sock, listener, n)
    try:
        for i, listener in enumerate(("main", "main", "main", "second", "second")):
            sock = socket.create_connection(rp.address(listener), timeout=10)
            n = 1000 * (i + 1)
            _echo_exchange(sock, bytes([65 + i]) * n)
            clients[sock.getsockname()[1]] = (sock, listener, n)

        sessions = wait_for(lambda: len(s := _sessions(adm)) == 5 and s, 10, "5 sessions")
        by_port = {int(s["client"].rsplit(":", 1)[1]): s for s in sessions}
        assert set(by_port) == set(clients)
        workers = {w["pid"] for w in rp.workers()}
        for port, (_sock, listener, n) in clients.items():
            s = by_port[port]
            backend = first.port if listener == "main" else second.port
            assert s["listener"] == listener and s["dest"] == f"127.0.0.1:{backend}"
            assert (s["c2s_bytes"], s["s2c_bytes"]) == (n, n), s
            assert s["state"] == "relaying" and s["worker"] in workers and s["engine"]
            assert s["id"].startswith(f"{s['worker']}-") and s["age"] >= s["idle"] >= 0
        assert len({s["id"] for s in sessions}) == 5

        # Filters: listener, destination (host:port and CIDR), source.
        assert len(_sessions(adm, "--listener", "second")) == 2
        assert len(_sessions(adm, "--destination", f"127.0.0.1:{second.port}")) == 2
        assert len(_sessions(adm, "--destination", "127.0.0.0/8")) == 5
        assert _sessions(adm, "--destination", "10.0.0.0/8") == []
        port0 = next(iter(clients))
        only = _sessions(adm, "--source", f"127.0.0.1:{port0}")
        assert [s["id"] for s in only] == [by_port[port0]["id"]]
        bad = _cli("sessions", "--socket", adm, "--destination", "nonsense")
        assert bad.returncode == 1 and "--destination 'nonsense'" in bad.stderr

        text = _cli("sessions", "--socket", adm)
        assert text.returncode == 0 and text.stdout.startswith("ID ")
        assert all(s["id"] in text.stdout for s in sessions)

        # A filter matching two sessions kills nothing without --all.
        refused = _cli("kill", "--socket", adm, "--listener", "second")
        assert refused.returncode == 1 and "2 sessions match" in refused.stderr
        assert len(_sessions(adm)) == 5

        # Kill one by id: that client is reset, the others still relay.
        victim_port = next(p for p, c in clients.items() if c[1] == "main")
        victim = by_port[victim_port]
        killed = _cli("kill", "--socket", adm, victim["id"])
        assert killed.returncode == 0, killed.stderr
        assert f"killed {victim['id']}" in killed.stdout
        vsock = clients[victim_port][0]
        with pytest.raises(ConnectionResetError):
            vsock.recv(10)
        flow = rp.flows_where(lambda r: r.get("client") == victim["client"])
        assert flow[0]["reason"] == "killed", flow
        for port, (sock, _listener, _n) in clients.items():
            if port != victim_port:
                _echo_exchange(sock, b"after the kill")
        assert victim["id"] not in {s["id"] for s in _sessions(adm)}
        again = _cli("kill", "--socket", adm, victim["id"])
        assert again.returncode == 1 and "no such open session" in again.stderr

        # --all with a filter kills every match, and only those.
        both = _cli("kill", "--socket", adm, "--all", "--listener", "second", "--json")
        assert both.returncode == 0, both.stderr
        assert {s["listener"] for s in json.loads(both.stdout)["killed"]} == {"second"}
        assert len(json.loads(both.stdout)["killed"]) == 2
        left = wait_for(lambda: len(s := _sessions(adm)) == 2 and s, 10, "2 sessions left")
        assert {s["listener"] for s in left} == {"main"}
        wait_for(lambda: sum(w["stats"].get("closed", {}).get("killed", 0)
                             for w in rp.stats()["workers"]) == 3, 5, "closed killed == 3")
    finally:
        for sock, _listener, _n in clients.values():
            sock.close()


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_reported_not_waited_for(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, drain=5.0, workers=2))
    rp.wait_ready()
    workers = wait_for(lambda: len(w := rp.workers()) == 2 and w, 10, "2 serving workers")
    stopped = workers[0]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        res = _cli("sessions", "--json", "--socket", rp.admin_socket)
        took = time.monotonic() - started
        assert res.returncode == 0, res.stderr
        missing = json.loads(res.stdout)["missing"]
        assert [m["pid"] for m in missing] == [stopped] and "no answer" in missing[0]["error"]
        assert f"worker {stopped}" in res.stderr
        assert took < 5.0
        assert rp.stats()["pid"] == rp.pid  # the supervisor still answers
    finally:
        os.kill(stopped, signal.SIGCONT)
