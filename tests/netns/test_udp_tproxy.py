"""UDP through TPROXY and the soft-unicast slices, end to end: client -> relay host (nft tproxy
from `relay nft`) -> origin, in three network namespaces (relay/lab/udp.py).

The origin owns the "internet" destinations and answers from the address the datagram was sent
to (one socket per address); its nft counters tell datagrams from the slice from anything else.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import require_netns, wait_until

from relay.lab.netlab import Lab
from relay.lab.udp import UdpLabEnv, exchange, receive, running_udp_lab, udp_lab_config
from relay.sock import format_address

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

SLICE = (40000, 40007)  # 8 ports
IDLE = 1.5  # udp_idle_timeout of the lab relay
ECHO_PORTS = (80, 443, 53)  # echo origin on every destination; 443 is the slice test's
SINK = ("198.51.100.11", 9000)  # the burst's origin
TWICE = ("198.51.100.12", 5353)  # answers every query twice
DNS_BIND = "192.0.2.1:5353"  # the relay host's own address: a UDP backend listener, responses = 1


def _echo_binds() -> list[tuple[str, int]]:
    return [(d, p) for d in (*Lab.dests4, *Lab.dests6) for p in ECHO_PORTS]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UdpLabEnv]:
    require_netns()
    workdir = tmp_path_factory.mktemp("udp")
    config = udp_lab_config(
        SLICE, idle_timeout=IDLE,
        backend=(DNS_BIND, f"{TWICE[0]}:{TWICE[1]}", 1),
        admin_socket=str(workdir / "admin.sock"),
    )
    binds: Any = {"echo": _echo_binds(), "sink": [SINK], "twice": [TWICE]}
    with running_udp_lab(str(workdir), config, binds, SLICE) as lab_env:
        yield lab_env


def _egress_for(lab: Lab, dest: str) -> str:
    return lab.egress6 if ":" in dest else lab.egress4


def _family(dest: tuple[str, int]) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in dest[0] else socket.AF_INET


def _fmt(addr: tuple[str, int]) -> str:
    return format_address(addr)


def _udp_records(env: UdpLabEnv) -> list[dict[str, Any]]:
    return [r for r in env.relay.flows() if r.get("protocol") == "udp"]


def _wait_records(env: UdpLabEnv, match: Any, count: int, timeout: float) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = [r for r in _udp_records(env) if match(r)]
        return len(found) >= count

    assert wait_until(enough, timeout, 0.05), (
        f"{len(found)} of {count} flow records; stats {_udp_stats(env)}; "
        f"records {[(r['client'], r['dest'], r['reason']) for r in found][:20]}")
    return found


def _udp_stats(env: UdpLabEnv) -> dict[str, Any]:
    """The udp_* keys summed over the serving workers (numbers) or merged (label dicts)."""
    total: dict[str, Any] = {}
    for worker in env.relay.workers():
        stats = worker.get("stats", worker)
        for key, value in stats.items():
            if not key.startswith("udp_"):
                continue
            if isinstance(value, dict):
                merged = total.setdefault(key, {})
                for label, n in value.items():
                    merged[label] = merged.get(label, 0) + n
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total


def test_flows_to_several_destinations_ipv4_and_ipv6(env: UdpLabEnv) -> None:
    lab = env.lab
    dests = [(d, 80) for d in (*lab.dests4, *lab.dests6)]
    with contextlib.ExitStack() as stack:
        clients = {dest: [stack.enter_context(env.client(_family(dest))) for _ in range(2)]
                   for dest in dests}
        egress_ports: dict[tuple[str, int], set[int]] = {}
        for round_ in range(3):
            for dest, socks in clients.items():
                for i, sock in enumerate(socks):
                    payload = f"{dest} client {i} round {round_}".encode()
                    reply = exchange(sock, dest, payload)
                    assert reply is not None, (
                        f"no answer from {dest} (round {round_}):\n{env.relay.output()[-3000:]}")
                    # From the address and port the client addressed, to this very socket.
                    assert reply.source == dest and reply.payload == payload
                    assert reply.origin_local == dest
                    source, port = reply.origin_peer
                    assert source == _egress_for(lab, dest[0])
                    assert SLICE[0] <= port <= SLICE[1]
                    egress_ports.setdefault((dest, i), set()).add(port)
        # Each flow kept its egress port while it lived; two flows to one destination never
        # share one (unique 4-tuple).
        assert all(len(ports) == 1 for ports in egress_ports.values()), egress_ports
        for dest in dests:
            assert egress_ports[(dest, 0)] != egress_ports[(dest, 1)]
    # The origin saw the same: 3 datagrams from each (egress, port), nothing from elsewhere.
    for dest in dests:
        seen = [s for s in env.origins["echo"].seen() if s.local == dest]
        assert len(seen) == 2 and all(s.datagrams == 3 for s in seen), seen
    records = _wait_records(
        env, lambda r: r["dest"] in {_fmt(d) for d in dests} and r["reason"] == "idle_timeout",
        len(dests) * 2, IDLE * 4 + 5)
    for record in records:
        assert record["c2s_dgrams"] == 3 and record["s2c_dgrams"] == 3
        assert record["listener"] in ("udp4", "udp6")


def test_slice_of_8_ports_serves_8_flows_per_destination_and_fails_closed(
    env: UdpLabEnv,
) -> None:
    lab = env.lab
    dests = [(d, 443) for d in lab.dests4]
    before = env.counters()
    with contextlib.ExitStack() as stack:
        ports: dict[tuple[str, int], set[int]] = {d: set() for d in dests}
        for dest in dests:
            for _ in range(8):
                sock = stack.enter_context(env.client())
                reply = exchange(sock, dest)
                assert reply is not None, f"flow {len(ports[dest]) + 1} to {dest} got nothing"
                ports[dest].add(reply.origin_peer[1])
        # All 8 ports of the slice, towards each destination at once: 24 flows on 8 ports.
        assert all(p == set(range(SLICE[0], SLICE[1] + 1)) for p in ports.values()), ports
        ninth = env.client()
        stack.callback(ninth.close)
        assert exchange(ninth, dests[0], timeout=1.0) is None
        ninth_port = ninth.getsockname()[1]
        refused = _wait_records(
            env, lambda r: r["client"].endswith(f":{ninth_port}"), 1, 5)
        assert refused[0]["reason"] == "slice_exhausted" and refused[0]["egress"] == ""
        after = env.counters()
        # Never a port outside the slice (nor another address): not one datagram.
        assert after["outside"] == before["outside"]
        assert after["in_slice"] - before["in_slice"] == 24
        assert env.origins["echo"].datagrams_to(dests[0]) == 8
        # After the idle timeout the 24 flows are gone and the refused client gets a flow.
        _wait_records(env, lambda r: r["dest"] in {_fmt(d) for d in dests}
                      and r["reason"] == "idle_timeout", 24, IDLE * 4 + 5)
        reply = exchange(ninth, dests[0])
        assert reply is not None and SLICE[0] <= reply.origin_peer[1] <= SLICE[1]
        assert reply.source == dests[0]


def test_burst_of_quic_sized_datagrams_arrives(env: UdpLabEnv) -> None:
    """2,000 datagrams of 1,200 bytes on one flow, paced, arrive with < 1 % loss. The flow is
    opened first, as a QUIC client's Initial would: until Python has decided a new flow the
    core holds only its first few datagrams (max_pending) and drops the rest."""
    count, size = 2000, 1200
    sink = env.origins["sink"]
    with env.client() as sock:
        sock.connect(SINK)
        sock.send(b"open")
        assert wait_until(lambda: sink.datagrams_to(SINK) == 1, 3.0)
        payload = bytes(size)
        for i in range(count):
            sock.send(payload)
            if i % 16 == 15:
                time.sleep(0.001)  # paced: about 13 k datagrams/s, 130 Mbit/s
        peer = sock.getsockname()
    wait_until(lambda: sink.datagrams_to(SINK) >= count + 1, 3.0)
    time.sleep(0.2)
    (seen,) = sink.seen()
    got = seen.datagrams - 1
    assert seen.nbytes == got * size + len(b"open")
    assert got >= count * 0.99, (
        f"{count - got} of {count} lost ({peer}); relay: {json.dumps(_udp_stats(env))}")


def test_responses_one_ends_dns_style_flows_at_once(env: UdpLabEnv) -> None:
    """A backend listener with udp_responses = 1 in front of an origin that answers twice:
    the client gets the first answer only, and the flow ends with it (not at the idle
    timeout)."""
    host, port = DNS_BIND.split(":")
    queries = 5
    clients = [env.client() for _ in range(queries)]
    try:
        started = time.monotonic()
        for sock in clients:
            reply = exchange(sock, (host, int(port)), b"A? example.org")
            assert reply is not None and reply.tag == "#1" and reply.source == (host, int(port))
        records = _wait_records(
            env, lambda r: r["listener"] == "udpbackend" and r["reason"] == "responses",
            queries, IDLE)
        assert time.monotonic() - started < IDLE  # at once, well before the idle timeout
        for sock in clients:
            assert receive(sock, 0.3) is None  # the second answer never came through
    finally:
        for sock in clients:
            sock.close()
    for record in records:
        assert record["s2c_dgrams"] == 1 and record["c2s_dgrams"] == 1
        assert record["dest"] == f"{TWICE[0]}:{TWICE[1]}"


def test_client_spoofing_many_source_ports(env: UdpLabEnv) -> None:
    """200 source ports to one destination: 8 flows (the slice), the rest refused and counted;
    nothing leaves from outside the slice; other destinations are still served."""
    dest = (env.lab.dests4[2], 53)
    echo = env.origins["echo"]
    before = env.counters()
    socks = [env.client() for _ in range(200)]
    try:
        for i, sock in enumerate(socks):
            sock.sendto(b"spoof %d" % i, dest)
            if i % 25 == 24:
                # 200 back-to-back datagrams can overrun the listener's receive buffer
                # (rmem_default): the kernel's drop, not the relay's. Pace them.
                time.sleep(0.002)
        assert wait_until(lambda: echo.datagrams_to(dest) >= 8, 3.0)

        # Every datagram is one of the 8 flows or a logged refusal. None may reach a new flow's
        # reply socket between its bind() and connect() (relay nft: the UDP socket rule is
        # only for the egress addresses; tproxy skips unconnected sockets).
        def refused() -> int:
            return len([r for r in _udp_records(env)
                        if r["dest"] == _fmt(dest) and r["reason"] == "slice_exhausted"])

        assert wait_until(lambda: refused() >= 192, 5.0, 0.1), refused()
        time.sleep(0.2)
        assert refused() == 192
        assert _udp_stats(env)["udp_drops"].get("foreign", 0) == 0
        flows = [s for s in echo.seen() if s.local == dest]
        assert len(flows) == 8 and all(f.datagrams == 1 for f in flows)  # none misattributed
        answered = 0
        for i, sock in enumerate(socks):
            reply = receive(sock, 0.0)
            if reply is not None:  # each flow's answer reached the very socket that asked
                assert reply.payload == b"spoof %d" % i and reply.source == dest
                answered += 1
        assert answered == 8
        assert env.counters()["outside"] == before["outside"]
        with env.client() as other:  # another destination is still served
            assert exchange(other, (env.lab.dests4[0], 53)) is not None
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.timeout(60)
def test_flood_beyond_udp_max_flows_is_refused_and_counted(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_netns()
    workdir = tmp_path_factory.mktemp("udpflood")
    limit = 16
    admin = str(workdir / "admin.sock")
    config = udp_lab_config(SLICE, idle_timeout=5.0, max_flows=limit, admin_socket=admin)
    binds: Any = {"sink": [(d, 7) for d in Lab.dests4]}
    with running_udp_lab(str(workdir), config, binds, SLICE) as env:
        before = env.counters()
        sink = env.origins["sink"]
        socks = [env.client() for _ in range(60)]
        try:
            for i, sock in enumerate(socks):  # 20 per destination: the slice allows 24 in all
                sock.sendto(b"new flow", (Lab.dests4[i % 3], 7))
            wait_until(lambda: sum(s.datagrams for s in sink.seen()) >= limit, 3.0)
            stats: dict[str, Any] = {}

            def full() -> bool:
                nonlocal stats
                stats = _udp_stats(env)
                return (stats.get("udp_flows_open") == limit
                        and stats.get("udp_drops", {}).get("no_flow_slot", 0) >= 60 - limit)

            assert wait_until(full, 5.0, 0.1), json.dumps(stats)
            drops = stats["udp_drops"]
            assert drops["no_flow_slot"] == 60 - limit, json.dumps(stats)
            assert drops.get("foreign", 0) == 0
            assert stats["udp_dgrams_c2s"] == limit  # one datagram per flow, none misattributed
            assert len(sink.seen()) == limit  # 16 flows reached the origin, no more
            first_round = drops["no_flow_slot"]
            # Sent again: still no growth, and the drops keep being counted.
            for i, sock in enumerate(socks):
                sock.sendto(b"again", (Lab.dests4[i % 3], 7))

            def counted() -> bool:
                nonlocal stats
                stats = _udp_stats(env)
                return stats["udp_drops"]["no_flow_slot"] >= first_round + 60 - limit

            assert wait_until(counted, 5.0, 0.1), json.dumps(stats)
            time.sleep(0.3)
            stats = _udp_stats(env)
            assert stats["udp_drops"]["no_flow_slot"] == first_round + 60 - limit
            assert stats["udp_flows_open"] == limit
            assert stats["udp_dgrams_c2s"] == 2 * limit
            assert len(sink.seen()) == limit
            assert env.counters()["outside"] == before["outside"]
        finally:
            for sock in socks:
                sock.close()
