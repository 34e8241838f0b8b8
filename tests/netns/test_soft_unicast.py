"""Soft-unicast egress, seen from the origin host's kernel.

The relay host owns no egress address: 203.0.113.7 / 2001:db8:7::7 are non-local there and
reach the relay's sockets only through IP_TRANSPARENT and the fwmark return path. The origin
counts SYNs with nft: from the slice vs from anywhere else.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from helpers import ENGINES, require_engine, require_netns

from relay.lab.netlab import (
    Flow,
    Lab,
    LabEnv,
    connect_refused,
    lab_config,
    open_flow,
    relay_in,
    running_lab,
    syn_counters,
    three_hosts,
)
from relay.lab.netns import Topology
from relay.lab.origins import split_hostport
from relay.lab.process import write_config

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

SLICE = (40000, 40007)
PORTS = (80, 443)
EXHAUST_PORT = 8080  # only the exhaustion test uses it: its ports start free


@pytest.fixture(scope="module", params=ENGINES)
def env(
    request: pytest.FixtureRequest,
    engine_availability: dict[str, str | None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LabEnv]:
    engine = require_engine(request.param, engine_availability)
    binds = [(d, p) for d in (*Lab.dests4, *Lab.dests6) for p in (*PORTS, EXHAUST_PORT)]
    counters = syn_counters([(Lab.egress4, *SLICE), (Lab.egress6, *SLICE)])
    config = lab_config(engine, SLICE, connect_timeout=1.0)
    with running_lab(str(tmp_path_factory.mktemp("egress")), config, binds, counters) as lab_env:
        yield lab_env


def _counters(env: LabEnv) -> tuple[int, int]:
    inside = env.topo.nft_counter(env.lab.origin, "inet", "origin", "in_slice")[0]
    outside = env.topo.nft_counter(env.lab.origin, "inet", "origin", "outside")[0]
    return inside, outside


def test_origin_sees_exactly_the_reported_source_and_only_slice_syns(env: LabEnv) -> None:
    lab = env.lab
    inside_before, outside_before = _counters(env)
    done = []
    for dest in [(d, p) for d in (*lab.dests4, *lab.dests6) for p in PORTS]:
        flow = open_flow(env.topo, lab.client, dest)
        client_port = flow.sock.getsockname()[1]
        assert flow.finish(b"d" * 1000) == 1000
        done.append((client_port, dest, flow.seen.peer))
    for client_port, dest, origin_saw in done:
        (record,) = env.relay.flows_of_client_port(client_port, dest)
        # What the relay's upstream socket reported (getsockname after connect) is exactly what
        # the origin's kernel saw: nothing between them rewrote address or port.
        assert split_hostport(str(record["egress"])) == origin_saw
        assert SLICE[0] <= origin_saw[1] <= SLICE[1]
    inside, outside = _counters(env)
    assert inside - inside_before >= len(done)
    assert outside == outside_before == 0


def test_slice_of_8_serves_8_per_destination_and_refuses_the_9th_fast(env: LabEnv) -> None:
    lab = env.lab
    dests = [(d, EXHAUST_PORT) for d in lab.dests4]
    held: list[Flow] = []
    try:
        for dest in dests:
            for _ in range(SLICE[1] - SLICE[0] + 1):
                held.append(open_flow(env.topo, lab.client, dest))
        for dest in dests:
            ports = {f.seen.peer[1] for f in held if f.seen.local == dest}
            # Eight different ports towards each destination, the same eight for all three:
            # a port is shared across destinations (IP_BIND_ADDRESS_NO_PORT).
            assert ports == set(range(SLICE[0], SLICE[1] + 1))
        assert {f.seen.peer[0] for f in held} == {lab.egress4}

        # The ninth to one destination: the slice is exhausted for it, the client is reset at
        # once, the origin never sees a SYN from another port or address.
        end = connect_refused(env.topo, lab.client, lab.client_address, dests[0])
        assert end.outcome == "reset" and end.seconds < 1.0
        assert [r["reason"] for r in env.relay.flows_of_client_port(end.client_port, dests[0])] == [
            "denied_slice_exhausted"
        ]
        assert _counters(env)[1] == 0

        # The other destinations' flows are unharmed.
        for flow in held:
            assert flow.finish(b"x" * 100) == 100
    finally:
        for flow in held:
            flow.sock.close()
    # Ports come back: the relay closed first, so its eight sockets towards dests[0] sit in
    # TIME_WAIT; with net.ipv4.tcp_tw_reuse=1 (timestamps prove old segments can't be taken
    # for new ones) connect() may reuse such a port one second later.
    time.sleep(1.1)
    again = open_flow(env.topo, lab.client, dests[0])
    assert SLICE[0] <= again.seen.peer[1] <= SLICE[1]
    assert again.finish(b"y") == 1


def test_without_the_return_path_the_failure_is_a_clear_connect_timeout(env: LabEnv) -> None:
    """Replies to the non-local egress address that are not routed locally (no socket mark:
    the return path missing) are dropped; the relay gives up at connect_timeout (1 s) and says
    so. With the return path back, traffic flows again."""
    lab, topo = env.lab, env.topo
    topo.run(lab.relay, ["nft", "insert", "rule", "inet", "relay", "prerouting",
                         "ip", "daddr", lab.egress4, "meta", "mark", "set", "0", "accept"])
    try:
        end = connect_refused(topo, lab.client, lab.client_address, (lab.dests4[0], 443))
        assert end.outcome in ("reset", "eof")
        assert 0.8 <= end.seconds < 3.0
        (record,) = env.relay.flows_of_client_port(end.client_port, (lab.dests4[0], 443))
        assert record["reason"] == "connect_timeout"
    finally:
        handle = next(
            line.rsplit("# handle ", 1)[1]
            for line in topo.run(lab.relay, ["nft", "-a", "list", "chain", "inet", "relay",
                                             "prerouting"]).stdout.splitlines()
            if "mark set 0x00000000" in line
        )
        topo.run(lab.relay, ["nft", "delete", "rule", "inet", "relay", "prerouting",
                             "handle", handle])
    # Another destination: the origin still holds the unanswered attempt to dests4[0]:443 in
    # SYN_RECV, and a new SYN from the same slice port would meet that stale state.
    flow = open_flow(topo, lab.client, (lab.dests4[2], 80))
    assert flow.seen.peer[0] == lab.egress4 and flow.finish(b"z") == 1


def test_unusable_slice_is_refused_at_reload_and_the_old_config_keeps_serving(env: LabEnv) -> None:
    lab, topo = env.lab, env.topo
    # Reserving a port inside the slice makes the very same config file invalid on this host.
    topo.sysctl(lab.relay, "net.ipv4.ip_local_reserved_ports", str(SLICE[0] + 3))
    try:
        os.kill(env.relay.proc.pid, signal.SIGHUP)  # `ip netns exec` exec'd: this is the relay
        deadline = time.monotonic() + 10
        while "reload refused" not in env.relay.output():
            assert time.monotonic() < deadline, env.relay.output()
            time.sleep(0.05)
        refusal = next(line for line in env.relay.err if "reload refused" in line)
        assert "ip_local_reserved_ports" in refusal
        assert env.relay.proc.poll() is None
        flow = open_flow(topo, lab.client, (lab.dests4[1], 443))
        assert flow.seen.peer[0] == lab.egress4 and SLICE[0] <= flow.seen.peer[1] <= SLICE[1]
        assert flow.finish(b"still serving") == len(b"still serving")
    finally:
        topo.sysctl(lab.relay, "net.ipv4.ip_local_reserved_ports", "")


@pytest.mark.parametrize(
    ("sysctl", "value", "slice_", "problem"),
    [
        # The kernel silently ignores IP_LOCAL_PORT_RANGE outside the namespace's range.
        ("net.ipv4.ip_local_port_range", "32768 49999", (50000, 50007), "ip_local_port_range"),
        ("net.ipv4.ip_local_reserved_ports", "40003", (40000, 40007), "ip_local_reserved_ports"),
    ],
)
def test_unusable_slice_is_refused_at_start_with_the_reason(
    tmp_path_factory: pytest.TempPathFactory,
    sysctl: str,
    value: str,
    slice_: tuple[int, int],
    problem: str,
) -> None:
    require_netns()
    workdir = str(tmp_path_factory.mktemp("badslice"))
    with Topology() as topo:
        lab = three_hosts(topo)
        topo.sysctl(lab.relay, sysctl, value)
        path = write_config(workdir, "bad", lab_config("auto", slice_))
        relay = relay_in(topo, lab.relay, path)
        code = relay.wait_exit(20)
        assert code != 0
        assert problem in relay.output()
        assert f"{slice_[0]}-{slice_[1]}" in relay.output()
