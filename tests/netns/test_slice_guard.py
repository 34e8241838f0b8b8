"""Fail closed in the kernel (issue 12, item 1): the slice stops fitting ip_local_port_range
while the relay runs. The workers refuse before connect() (no SYN leaves), and the nft output
guard of `relay nft` drops and counts a packet from the egress address and a port outside the
slice when one is forced out anyway. The origin counts SYNs from the slice vs anything else."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import relay_totals, require_netns, wait_for

from relay.lab.netlab import (
    Lab,
    LabEnv,
    connect_refused,
    open_flow,
    running_lab,
    syn_counters,
)
from relay.lab.process import PYTHON, SOURCE_ROOT, relay_config
from relay.sock import IP_TRANSPARENT

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

SLICE = (40000, 40007)
DEST = (Lab.dests4[0], 80)
RANGE = "net.ipv4.ip_local_port_range"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    require_netns()
    work = tmp_path_factory.mktemp("guard")
    config = relay_config(
        engine="epoll", tproxy_port=7000, egress=[(Lab.egress4, f"{SLICE[0]}-{SLICE[1]}")],
        allow=["198.51.100.0/24"], admin_socket=str(Path(work) / "admin.sock"),
        settings={"connect_timeout": 1.0, "log_format": "json", "flow_log": True,
                  "metrics_listen": "127.0.0.1:0"})
    counters = syn_counters([(Lab.egress4, *SLICE)])
    with running_lab(str(work), config, [DEST], counters) as lab_env:
        yield lab_env


def _origin_counters(env: LabEnv) -> tuple[int, int]:
    topo, origin = env.topo, env.lab.origin
    return (topo.nft_counter(origin, "inet", "origin", "in_slice")[0],
            topo.nft_counter(origin, "inet", "origin", "outside")[0])


def _denied(env: LabEnv) -> dict[str, int]:
    return dict(relay_totals(env.relay).get("denied", {}))


def test_refused_before_connect_while_the_slice_is_outside_the_port_range(env: LabEnv) -> None:
    lab, topo = env.lab, env.topo
    flow = open_flow(topo, lab.client, DEST)
    assert SLICE[0] <= flow.seen.peer[1] <= SLICE[1]
    assert flow.finish(b"a" * 100) == 100
    inside_before, outside_before = _origin_counters(env)
    assert outside_before == 0

    topo.sysctl(lab.relay, RANGE, "50000 60999")  # another daemon moved the range
    try:
        time.sleep(1.2)  # the workers re-read the sysctls at most once a second
        for _ in range(3):
            end = connect_refused(topo, lab.client, lab.client_address, DEST)
            assert end.outcome == "reset", end
            reasons = [r["reason"] for r in env.relay.flows_of_client_port(end.client_port, DEST)]
            assert reasons == ["denied_slice_unusable"]
        # Not one SYN left the relay host: neither from the slice nor from anywhere else.
        assert _origin_counters(env) == (inside_before, 0)
        assert wait_for(lambda: _denied(env).get("slice_unusable", 0) >= 3, 5,
                        "slice_unusable counted in relay stats")
    finally:
        topo.sysctl(lab.relay, RANGE, "32768 60999")
    time.sleep(1.2)
    again = open_flow(topo, lab.client, DEST)
    assert SLICE[0] <= again.seen.peer[1] <= SLICE[1]
    assert again.finish(b"b") == 1
    assert _origin_counters(env)[1] == 0


def test_the_guard_drops_and_counts_a_packet_from_outside_the_slice(env: LabEnv) -> None:
    lab, topo = env.lab, env.topo
    before = topo.nft_counter(lab.relay, "inet", "relay", "slice_guard")[0]
    for port in (SLICE[0] - 1, SLICE[1] + 1, 50062):
        with topo.new_socket(lab.relay) as raw:
            raw.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            raw.bind((lab.egress4, port))
            raw.settimeout(1.0)
            # The output hook drops the SYN: connect() fails (EPERM) or never completes.
            with pytest.raises(OSError):
                raw.connect(DEST)
    dropped = topo.nft_counter(lab.relay, "inet", "relay", "slice_guard")[0] - before
    assert dropped >= 3
    assert _origin_counters(env)[1] == 0  # the origin never saw them
    # A port inside the slice still passes the guard (any one the relay is not using, nor
    # holding in TIME_WAIT towards DEST).
    passed = []
    for port in range(SLICE[1], SLICE[0] - 1, -1):
        with topo.new_socket(lab.relay) as ok:
            ok.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            ok.settimeout(3.0)
            try:
                ok.bind((lab.egress4, port))
                ok.connect(DEST)
            except OSError:
                continue
            passed.append(port)
            break
    assert passed, "no slice port could connect"
    # The supervisor reads the counter (cached for a few seconds) into stats and /metrics.
    seen = wait_for(lambda: (env.relay.stats().get("guard_dropped_packets") or 0) >= 3, 10,
                    "guard_dropped_packets in relay stats")
    assert seen
    assert "slice guard: dropped" in env.relay.admin("stats")
    host, _, port = env.relay.stats()["admin"]["metrics"].rpartition(":")
    with topo.connect(lab.relay, (host, int(port))) as http:
        http.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b""
        while chunk := http.recv(65536):
            body += chunk
    line = [x for x in body.decode().splitlines()
            if x.startswith("relay_guard_dropped_packets_total ")]
    assert line and float(line[0].split()[1]) >= 3, line


def _doctor_egress_nat(env: LabEnv) -> dict[str, str]:
    code = (f"import json, sys; sys.path.insert(0, {SOURCE_ROOT!r}); "
            "from relay.config import loads; from relay.host.doctor import Doctor; "
            "c = Doctor(loads(sys.stdin.read())).check_egress_nat(); "
            "print(json.dumps({'status': c.status, 'detail': c.detail}))")
    out = env.topo.run(env.lab.relay, [PYTHON, "-c", code],
                       stdin=env.relay.config_path.read_text()).stdout
    result: dict[str, str] = json.loads(out)
    return result


def test_doctor_warns_about_nat_touching_the_egress_address(env: LabEnv) -> None:
    lab, topo = env.lab, env.topo
    assert "NAT rule touching" not in _doctor_egress_nat(env)["detail"]
    topo.nft(lab.relay, "table ip natguardtest {\n chain post {\n"
                        "  type nat hook postrouting priority srcnat; policy accept;\n"
                        f"  ip saddr {lab.egress4} masquerade\n }}\n}}\n")
    try:
        warn = _doctor_egress_nat(env)
    finally:
        topo.run(lab.relay, ["nft", "delete", "table", "ip", "natguardtest"])
    assert warn["status"] == "WARN", warn
    assert f"NAT rule touching {lab.egress4}" in warn["detail"]
