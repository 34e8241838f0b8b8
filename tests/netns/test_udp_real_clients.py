"""Real UDP clients and servers through the relay (TPROXY UDP, soft-unicast slice): `dig`
against `dnsmasq` in the origin host, and an HTTP/3 GET with aioquic (client and server,
relay/lab/quic.py) over QUIC. Skips with the reason when a tool is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import require_netns, wait_for, wait_until

from relay.lab.netlab import Lab
from relay.lab.origins import split_hostport
from relay.lab.process import PYTHON, ReadyProcess
from relay.lab.quic import quic_unavailable_reason, self_signed
from relay.lab.udp import (
    UdpLabEnv,
    dnsmasq_argv,
    dnsmasq_queries,
    running_udp_lab,
    udp_lab_config,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

SLICE = (40000, 40007)
IDLE = 1.0
DNS4, DNS6 = Lab.dests4[0], Lab.dests6[0]
QUIC4, QUIC6 = (Lab.dests4[1], 443), (Lab.dests6[1], 443)
DNS_BACKEND = "192.0.2.1:5353"  # on the relay host: a UDP backend listener, udp_responses = 1
ANSWER4, ANSWER6 = "192.0.2.99", "2001:db8::99"


@dataclass
class RealLab:
    env: UdpLabEnv
    workdir: Path
    dnsmasq_log: Path

    def dig(self, *args: str) -> str:
        res = self.env.topo.run(self.env.lab.client, ["dig", "+short", "+tries=1", "+time=3",
                                                      *args], check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip()


def _dnsmasq(env: UdpLabEnv, log: Path) -> None:
    cmd = dnsmasq_argv([DNS4, DNS6], {"example.test": [ANSWER4, ANSWER6]})
    out = open(log, "wb")  # noqa: SIM115 - the process keeps it; closed with the topology
    env.topo.popen(env.lab.origin, cmd, stdout=out, stderr=subprocess.STDOUT)
    out.close()

    def answers() -> bool:
        res = env.topo.run(env.lab.origin, ["dig", "+short", "+tries=1", "+time=1",
                                            f"@{DNS4}", "example.test"], check=False)
        return res.stdout.strip() == ANSWER4

    assert wait_until(answers, 10, 0.1), log.read_text()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealLab]:
    require_netns()
    missing = [t for t in ("dig", "dnsmasq") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install "
                    "bind9-dnsutils dnsmasq-base)")
    workdir = tmp_path_factory.mktemp("udpreal")
    config = udp_lab_config(SLICE, idle_timeout=IDLE, backend=(DNS_BACKEND, f"{DNS4}:53", 1))
    with running_udp_lab(str(workdir), config, {}, SLICE) as env:
        log = workdir / "dnsmasq.log"
        _dnsmasq(env, log)
        yield RealLab(env, workdir, log)


def _records(env: UdpLabEnv, dest: str, reason: str, timeout: float) -> list[dict[str, Any]]:
    return env.relay.flows_where(
        lambda r: r.get("protocol") == "udp" and r["dest"] == dest and r["reason"] == reason,
        timeout)


def test_dig_against_dnsmasq_through_tproxy(real: RealLab) -> None:
    env = real.env
    before = env.counters()
    assert real.dig(f"@{DNS4}", "example.test", "A") == ANSWER4
    assert real.dig(f"@{DNS6}", "example.test", "AAAA") == ANSWER6
    # dnsmasq saw the soft-unicast addresses, from ports of the slice.
    (v4,) = _records(env, f"{DNS4}:53", "idle_timeout", IDLE * 4 + 5)
    (v6,) = _records(env, f"[{DNS6}]:53", "idle_timeout", IDLE * 4 + 5)
    for record, egress in ((v4, Lab.egress4), (v6, Lab.egress6)):
        address, port = split_hostport(record["egress"])
        assert address == egress and SLICE[0] <= port <= SLICE[1]
        assert record["c2s_dgrams"] == 1 and record["s2c_dgrams"] == 1
    queries = dnsmasq_queries(real.dnsmasq_log.read_text())
    assert ("A", "example.test", split_hostport(v4["egress"])) in queries
    assert ("AAAA", "example.test", split_hostport(v6["egress"])) in queries
    after = env.counters()
    assert after["in_slice"] - before["in_slice"] == 2 and after["outside"] == before["outside"]


def test_dig_through_a_backend_listener_with_one_response(real: RealLab) -> None:
    host, port = DNS_BACKEND.split(":")
    for _ in range(3):
        assert real.dig(f"@{host}", "-p", port, "example.test", "A") == ANSWER4

    def all_three() -> list[dict[str, Any]]:
        found = [r for r in real.env.relay.flows() if r.get("listener") == "udpbackend"]
        return found if len(found) >= 3 else []

    records = wait_for(all_three, 10, "the flow-log records of the 3 queries")
    assert len(records) == 3, records
    assert all(r["reason"] == "responses" and r["s2c_dgrams"] == 1 and r["duration"] < IDLE
               for r in records), records


@pytest.mark.parametrize("dest", [QUIC4, QUIC6], ids=["ipv4", "ipv6"])
def test_http3_get_through_the_relay(real: RealLab, dest: tuple[str, int]) -> None:
    reason = quic_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    env = real.env
    cert, key = self_signed(real.workdir)
    binds = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in (QUIC4, QUIC6)]
    server = ReadyProcess([PYTHON, "-m", "relay.lab.quic", "serve", "--cert", str(cert),
                           "--key", str(key), *binds], name="h3 server", netns=env.lab.origin)
    try:
        server.wait_ready(20)
        before = env.counters()
        target = f"[{dest[0]}]:{dest[1]}" if ":" in dest[0] else f"{dest[0]}:{dest[1]}"
        res = env.topo.run(env.lab.client, [PYTHON, "-m", "relay.lab.quic", "get", "--ca",
                                            str(cert), target, "/index.html"], check=False,
                           timeout=30)
        assert res.returncode == 0, res.stderr
        answer = json.loads(res.stdout)
        assert answer["status"] == 200
        words = answer["body"].split()
        assert words[0] == "SEEN" and words[2] == target and words[3] == "/index.html"
        address, port = split_hostport(words[1])
        assert address == (Lab.egress6 if ":" in dest[0] else Lab.egress4)
        assert SLICE[0] <= port <= SLICE[1]
        (record,) = _records(env, target, "idle_timeout", IDLE * 4 + 5)
        assert record["egress"] == words[1]
        assert record["c2s_dgrams"] >= 2 and record["s2c_dgrams"] >= 2  # a QUIC handshake
        after = env.counters()
        assert after["outside"] == before["outside"]
        assert after["in_slice"] - before["in_slice"] == record["c2s_dgrams"]
    finally:
        server.stop()
