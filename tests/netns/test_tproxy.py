"""TPROXY ingress end to end: client -> relay host (nft tproxy, rules from relay.ops.nft) -> origin.

The client connects to "internet" addresses that only the origin host owns; the relay host
intercepts, the relay connects from its soft-unicast address, the origin reports what its kernel
saw. Also the destination policy as seen from a real client.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from helpers import ENGINES, require_engine, require_netns

from relay.lab.netlab import (
    Lab,
    LabEnv,
    connect_refused,
    lab_config,
    open_flow,
    running_lab,
    start_relay,
    three_hosts,
)
from relay.lab.netns import Topology
from relay.lab.origins import split_hostport
from relay.sock import format_address

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

SLICE = (40000, 40007)
PORTS4 = (80, 443, 8080, 9999)
PORTS6 = (80, 443)
METADATA = ("169.254.169.254", 80)


@pytest.fixture(scope="module", params=ENGINES)
def env(
    request: pytest.FixtureRequest,
    engine_availability: dict[str, str | None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LabEnv]:
    engine = require_engine(request.param, engine_availability)
    config = lab_config(
        engine,
        SLICE,
        # 169.254.0.0/16 is listed on purpose: link-local must stay refused anyway.
        allow=("198.51.100.0/24:80,443,8080", "2001:db8:100::/48", "169.254.0.0/16"),
        deny=("198.51.100.12/32:8080",),
    )
    binds = [(d, p) for d in Lab.dests4 for p in PORTS4]
    binds += [(d, p) for d in Lab.dests6 for p in PORTS6]
    with running_lab(str(tmp_path_factory.mktemp("tproxy")), config, [*binds, METADATA]) as lab_env:
        yield lab_env


def _egress_for(lab: Lab, dest: str) -> str:
    return lab.egress6 if ":" in dest else lab.egress4


def _fmt(host: str, port: int) -> str:
    return format_address((host, port))


def test_intercepts_many_destinations_and_ports_ipv4_and_ipv6(env: LabEnv) -> None:
    lab = env.lab
    targets = [(d, p) for d in lab.dests4 for p in (80, 443)]
    targets += [(d, p) for d in lab.dests6 for p in PORTS6]
    payload = bytes(range(256)) * 64
    seen = []
    for dest in targets:
        flow = open_flow(env.topo, lab.client, dest)
        # The origin was reached at the address and port the client dialled: TPROXY kept the
        # original destination, the relay connected to it.
        assert flow.seen.local == dest
        assert flow.seen.peer[0] == _egress_for(lab, dest[0])
        assert SLICE[0] <= flow.seen.peer[1] <= SLICE[1]
        assert flow.finish(payload) == len(payload)
        seen.append((dest, flow.seen.peer))

    records = env.relay.wait_flows(len(targets))
    by_dest = {r["dest"]: r for r in records}
    for dest, peer in seen:
        record = by_dest[_fmt(*dest)]
        assert record["listener"] == ("tproxy6" if ":" in dest[0] else "tproxy4")
        assert record["reason"] == "eof"
        assert record["c2s_bytes"] == len(payload)
        assert split_hostport(record["egress"]) == peer


def test_relay_hosts_own_address_is_not_intercepted(env: LabEnv) -> None:
    """TCP to an address of the relay host itself goes to that host's own socket (the tproxy
    rule skips `fib daddr type local`), never into the relay."""
    service = env.topo.new_socket(env.lab.relay)
    service.bind((env.lab.relay_client_side, 2222))
    service.listen(4)

    def answer() -> None:
        conn, _ = service.accept()
        conn.sendall(b"relay host itself\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with env.topo.connect(env.lab.client, (env.lab.relay_client_side, 2222)) as sock:
            assert sock.recv(100) == b"relay host itself\n"
    finally:
        service.close()


@pytest.mark.parametrize(
    ("dest", "reason"),
    [
        (METADATA, "denied_link_local"),  # allowed by the list, refused anyway
        (("198.51.100.12", 8080), "denied_denied_by_rule"),
        (("198.51.100.10", 9999), "denied_not_allowed"),  # port not in the allow rule
    ],
)
def test_policy_refuses_with_a_reset_and_a_log_line(
    env: LabEnv, dest: tuple[str, int], reason: str
) -> None:
    before = len(env.origin.results)
    end = connect_refused(env.topo, env.lab.client, env.lab.client_address, dest)
    # An RST, not a clean EOF that could pass for an empty answer; at once.
    assert end.outcome == "reset" and end.seconds < 1.0
    mine = env.relay.flows_of_client_port(end.client_port, dest)
    assert [r["reason"] for r in mine] == [reason]
    assert mine[0]["egress"] == "" and mine[0]["c2s_bytes"] == 0
    # Nothing reached the origin: refused before any upstream connect.
    assert [s for s in env.origin.results[before:] if s.local == dest] == []


def test_allowed_connection_still_works_after_refusals(env: LabEnv) -> None:
    flow = open_flow(env.topo, env.lab.client, (env.lab.dests4[2], 443))
    assert flow.seen.local == (env.lab.dests4[2], 443)
    assert flow.finish(b"ok") == 2


def test_refused_by_the_origin_resets_the_client_promptly(env: LabEnv) -> None:
    """An IPv6 destination where the origin has no listener: the origin answers RST, the relay
    records `refused` and closes or resets the client at once (no hang, no retry)."""
    dest = (env.lab.dests6[0], 8443)
    end = connect_refused(env.topo, env.lab.client, "2001:db8:1::2", dest)
    assert end.outcome in ("reset", "eof") and end.seconds < 2.0
    env.relay.flows_where(lambda r: r["dest"] == _fmt(*dest) and r["reason"] == "refused")


@pytest.mark.timeout(60)
def test_egress_routed_back_into_the_relay_is_stopped_at_the_first_hop(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A destination whose route leads back to the relay host: the relay's own egress SYN
    arrives there again and TPROXY (intercepting on every interface) hands it to the relay. The
    relay recognises its own egress address and slice port as the client ("loop") and refuses
    at once: one refusal, not a connection storm."""
    require_netns()
    looped = "198.51.100.99"
    with Topology() as topo:
        lab = three_hosts(topo)
        topo.sysctl(lab.origin, "net.ipv4.ip_forward", "1")
        topo.route(lab.origin, f"{looped}/32", "via", "192.0.2.17")  # misroute: back to relay
        workdir = str(tmp_path_factory.mktemp("loop"))
        relay = start_relay(topo, lab.relay, lab_config("auto", SLICE), workdir)  # all ifaces
        end = connect_refused(topo, lab.client, lab.client_address, (looped, 80))
        assert end.outcome in ("reset", "eof") and end.seconds < 2.0
        records = relay.wait_flows(2)
        time.sleep(0.5)  # a loop would keep producing records
        reasons = Counter(str(r["reason"]) for r in relay.flows())
        assert reasons["denied_loop"] == 1, reasons
        (loop_record,) = [r for r in records if r["reason"] == "denied_loop"]
        address, port = split_hostport(str(loop_record["client"]))
        assert address == lab.egress4 and SLICE[0] <= port <= SLICE[1]
        # The client's own flow ended when the relay refused its own looped connection.
        assert reasons["reset_origin"] + reasons["refused"] == 1
        assert sum(reasons.values()) == 2
