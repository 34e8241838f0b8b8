"""Several machines, one address: two relay hosts egress from the same soft-unicast address
with disjoint port slices; a router in front of the origin steers each reply to the relay that
owns its destination port (nftables mark + policy routing). Both egress at once, every flow
completes.

    c1 --- r1 (slice 40000-40007) ---+
                                     x (router: dport -> r1 | r2) --- origin (the "internet")
    c2 --- r2 (slice 40008-40015) ---+
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import require_netns

from relay.lab.netlab import Flow, Lab, lab_config, open_flow, start_relay, syn_counters
from relay.lab.netns import Topology
from relay.lab.origins import Origin, split_hostport

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

SHARED = Lab.egress4  # the one soft-unicast address both relay hosts use
SLICES = {"r1": (40000, 40007), "r2": (40008, 40015)}
DESTS = Lab.dests4
FLOWS_PER_RELAY = 6  # two per destination: both relays have flows open at the same moment

STEERING = f"""
table inet steer {{
    counter to_r1 {{ }}
    counter to_r2 {{ }}
    chain prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        ip daddr {SHARED} tcp dport {SLICES["r1"][0]}-{SLICES["r1"][1]} meta mark set 1 counter name "to_r1"
        ip daddr {SHARED} tcp dport {SLICES["r2"][0]}-{SLICES["r2"][1]} meta mark set 2 counter name "to_r2"
    }}
}}
"""


def _build(topo: Topology) -> dict[str, str]:
    """The six hosts; returns role -> namespace, plus each relay's ingress interface."""
    hosts = {role: topo.host(role, forwarding=(role == "x")) for role in
             ("c1", "c2", "r1", "r2", "x", "o")}
    _a, r1_in = topo.link(hosts["c1"], hosts["r1"], ["192.0.2.2/28"], ["192.0.2.1/28"])
    _b, r2_in = topo.link(hosts["c2"], hosts["r2"], ["192.0.2.18/28"], ["192.0.2.17/28"])
    topo.link(hosts["r1"], hosts["x"], ["192.0.2.34/28"], ["192.0.2.33/28"])
    topo.link(hosts["r2"], hosts["x"], ["192.0.2.50/28"], ["192.0.2.49/28"])
    topo.link(hosts["x"], hosts["o"], ["192.0.2.65/28"], ["192.0.2.66/28"])
    topo.route(hosts["c1"], "default", "via", "192.0.2.1")
    topo.route(hosts["c2"], "default", "via", "192.0.2.17")
    topo.route(hosts["r1"], "default", "via", "192.0.2.33")
    topo.route(hosts["r2"], "default", "via", "192.0.2.49")
    for relay in ("r1", "r2"):
        topo.sysctl(hosts[relay], "net.ipv4.tcp_tw_reuse", "1")
    topo.route(hosts["x"], "198.51.100.0/24", "via", "192.0.2.66")
    topo.route(hosts["o"], "203.0.113.0/24", "via", "192.0.2.65")
    for dest in DESTS:
        topo.addr(hosts["o"], "lo", f"{dest}/32")
    # The router: replies to the shared address go to the relay that owns the port. Anything
    # outside both slices has no route to the shared address here and is dropped.
    topo.nft(hosts["x"], STEERING)
    for mark, nexthop in ((1, "192.0.2.34"), (2, "192.0.2.50")):
        table = str(200 + mark)
        topo.run(hosts["x"], ["ip", "rule", "add", "fwmark", str(mark), "lookup", table])
        topo.route(hosts["x"], "default", "via", nexthop, "table", table)
    topo.nft(hosts["o"], syn_counters([(SHARED, *SLICES["r1"]), (SHARED, *SLICES["r2"])]))
    return {**hosts, "r1_in": r1_in, "r2_in": r2_in}


@pytest.mark.netns
def test_two_relays_share_one_address_with_disjoint_slices(tmp_path: Path, engine: str) -> None:
    require_netns()
    with Topology() as topo:
        hosts = _build(topo)
        with Origin(binds=[(d, 80) for d in DESTS], netns=hosts["o"]):
            relays = {
                name: start_relay(
                    topo, hosts[name], lab_config(engine, SLICES[name], egress4=SHARED),
                    str(tmp_path), ingress=hosts[f"{name}_in"],
                )
                for name in ("r1", "r2")
            }
            clients = {"r1": hosts["c1"], "r2": hosts["c2"]}
            work = [(name, (DESTS[i % len(DESTS)], 80))
                    for name in ("r1", "r2") for i in range(FLOWS_PER_RELAY)]

            with ThreadPoolExecutor(len(work)) as pool:
                # Every flow is open at once through both relays before any finishes.
                flows: list[Flow] = list(pool.map(
                    lambda job: open_flow(topo, clients[job[0]], job[1]), work))
                try:
                    for (name, dest), flow in zip(work, flows, strict=True):
                        lo, hi = SLICES[name]
                        assert flow.seen.local == dest
                        assert flow.seen.peer[0] == SHARED
                        assert lo <= flow.seen.peer[1] <= hi, (name, flow.seen)
                    payload = b"m" * 65536
                    counts = list(pool.map(lambda f: f.finish(payload), flows))
                finally:
                    for flow in flows:
                        flow.sock.close()
            assert counts == [len(payload)] * len(work)

            for name, relay in relays.items():
                records = relay.wait_flows(FLOWS_PER_RELAY)
                assert [r["reason"] for r in records] == ["eof"] * FLOWS_PER_RELAY
                lo, hi = SLICES[name]
                for record in records:
                    address, port = split_hostport(str(record["egress"]))
                    assert address == SHARED and lo <= port <= hi

            to_r1 = topo.nft_counter(hosts["x"], "inet", "steer", "to_r1")[0]
            to_r2 = topo.nft_counter(hosts["x"], "inet", "steer", "to_r2")[0]
            assert to_r1 > 0 and to_r2 > 0  # replies really were steered both ways
            inside, outside = (topo.nft_counter(hosts["o"], "inet", "origin", name)[0]
                               for name in ("in_slice", "outside"))
            assert inside >= len(work) and outside == 0
