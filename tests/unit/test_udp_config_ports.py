"""UDP config (protocol, udp_* keys, refusals) and the UDP egress port allocator."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from relay.config import ConfigError, loads
from relay.config.model import EgressSlice
from relay.config.values import parse_port_range
from relay.serve.egress import EgressTable
from relay.serve.udp_ports import PortAllocator


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, "f.toml")
    return info.value.problems


def test_udp_listener_is_typed_with_its_settings() -> None:
    cfg = loads('''
[relay]
udp_idle_timeout = 2.5
udp_max_flows = 100
[[listener]]
name = "dns"
protocol = "udp"
bind = "127.0.0.1:5353"
backend = "127.0.0.1:53"
udp_responses = 1
[[listener]]
name = "tcp-same-port"
bind = "127.0.0.1:5353"
backend = "127.0.0.1:53"
''')
    dns, tcp = cfg.listener
    assert dns.is_udp and dns.protocol == "udp" and dns.udp_responses == 1
    assert not tcp.is_udp and tcp.protocol == "tcp"
    assert cfg.relay.udp_loop_options() == {"max_flows": 100, "idle_timeout_ms": 2500}
    assert loads('[[listener]]\nbind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\n'
                 ).relay.udp_idle_timeout == 60.0


def test_udp_refusals_name_key_value_and_reason() -> None:
    problems = _problems('''
[[listener]]
protocol = "udp"
bind = "127.0.0.1:5353"
mode = "redirect"
[[listener]]
protocol = "udp"
bind = "127.0.0.1:5354"
backend = "unix:/run/b.sock"
trusted_proxies = ["10.0.0.0/8"]
[[listener]]
protocol = "udp"
bind = "127.0.0.1:5355"
backend = "127.0.0.1:53"
udp_responses = -1
[[listener]]
protocol = "udp"
bind = "127.0.0.1:5355"
backend = "127.0.0.1:53"
[[listener]]
protocol = "sctp"
bind = "127.0.0.1:5356"
backend = "127.0.0.1:53"
''')
    text = "\n".join(problems)
    assert 'f.toml: listener[0].mode: "redirect": not available for protocol = "udp"' in text
    assert 'f.toml: listener[1].backend: "unix:/run/b.sock": a unix socket backend' in text
    assert "f.toml: listener[1].trusted_proxies: ['10.0.0.0/8']: TCP only" in text
    assert "f.toml: listener[2].udp_responses: -1:" in text
    assert 'f.toml: listener[3].bind: "127.0.0.1:5355": same address as listener[2]' in text
    assert 'f.toml: listener[4].protocol: "sctp": expected one of "tcp", "udp"' in text


def _table(*slices: tuple[str, str]) -> EgressTable:
    import ipaddress

    return EgressTable(EgressSlice(ip=ipaddress.ip_address(a), port_range=parse_port_range(p))
                       for a, p in slices)


def test_worker_shares_partition_the_slice() -> None:
    (egress,) = _table(("203.0.113.7", "40000-40009")).entries
    shares = [PortAllocator((egress,), slot, 3).slice_of(egress).ports for slot in range(3)]
    flat = [p for share in shares for p in share]
    assert sorted(flat) == list(range(40000, 40010)) and len(flat) == len(set(flat))
    assert list(shares[1]) == [40001, 40004, 40007]


def test_a_port_serves_many_destinations_but_one_flow_per_destination() -> None:
    (egress,) = _table(("203.0.113.7", "40000-40003")).entries
    share = PortAllocator((egress,), 0, 1).slice_of(egress)
    dests = [("198.51.100.1", 443), ("198.51.100.2", 443), ("198.51.100.1", 53)]
    taken = {d: [share.take(d) for _ in range(4)] for d in dests}
    for d, ports in taken.items():
        assert sorted(p for p in ports if p is not None) == [40000, 40001, 40002, 40003], d
        assert share.take(d) is None  # the fifth flow to one destination: exhausted
    # Every (port, destination) pair handed out once only.
    pairs = [(p, d) for d, ports in taken.items() for p in ports]
    assert len(pairs) == len(set(pairs)) == 12
    share.give_back(dests[0], 40002)
    assert share.take(dests[0]) == 40002
    assert share.take(dests[1]) is None
    with pytest.raises(KeyError):
        share.give_back(dests[1], 49999)


def test_no_two_workers_hand_out_the_same_four_tuple() -> None:
    (egress,) = _table(("203.0.113.7", "40000-40006")).entries
    allocators = [PortAllocator((egress,), slot, 2) for slot in range(2)]
    seen: set[tuple[int, tuple[str, int]]] = set()
    for alloc, dest in itertools.product(allocators, [("192.0.2.1", 1), ("192.0.2.2", 1)]):
        share = alloc.slice_of(egress)
        while (port := share.take(dest)) is not None:
            assert egress.lo <= port <= egress.hi
            assert (port, dest) not in seen
            seen.add((port, dest))
    assert len(seen) == 2 * 7  # the whole slice per destination, split over the two workers
    assert allocators[0].in_use() == {"203.0.113.7": 8}
    assert allocators[1].in_use() == {"203.0.113.7": 6}


def test_a_share_smaller_than_the_worker_count_is_empty_and_fails_closed() -> None:
    (egress,) = _table(("203.0.113.7", "40000-40001")).entries
    share = PortAllocator((egress,), 2, 3).slice_of(egress)
    assert len(share.ports) == 0 and share.take(("192.0.2.1", 1)) is None


def _loopback_udp_router(ports: str) -> tuple[Any, Any]:
    """A tproxy UDP listener's router (worker 0 of 1) with an egress slice on 127.0.0.1, and
    that egress entry."""
    from relay.serve.udp_routing import UdpRouter

    cfg = loads(f'''
[[listener]]
name = "t"
protocol = "udp"
bind = "127.0.0.1:0"
mode = "tproxy"
[[egress]]
address = "127.0.0.1"
ports = "{ports}"
''')
    table = EgressTable(cfg.egress)
    router = UdpRouter(cfg.listener[0], cfg, set(), PortAllocator(table.entries, 0, 1), table)
    return router, table.lookup("127.0.0.1")


def test_router_binds_slice_ports_shared_across_destinations_and_fails_closed() -> None:
    """Loopback stands in for a soft-unicast address (local: no IP_TRANSPARENT needed); the
    policy step is skipped because it refuses loopback destinations, as it should."""
    import socket

    from relay.serve.routing import SliceExhausted

    router, egress = _loopback_udp_router("45000-45001")
    origins = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    flows = []
    try:
        for o in origins:
            o.bind(("127.0.0.1", 0))
            o.settimeout(2)
            for _ in range(2):
                flows.append(router._open_upstream("127.0.0.1", o.getsockname()[1], egress))
        assert sorted((f.egress, f.dest[1]) for f in flows) == sorted(
            (("127.0.0.1", p), o.getsockname()[1]) for p in (45000, 45001) for o in origins)
        with pytest.raises(SliceExhausted):
            router._open_upstream("127.0.0.1", origins[0].getsockname()[1], egress)
        # Each reply reaches the socket connected to the origin that sent it.
        for f in flows:
            up = socket.socket(fileno=f.upstream_fd)
            up.settimeout(2)
            up.send(b"%d" % f.upstream_fd)
            o = next(o for o in origins if o.getsockname()[1] == f.dest[1])
            data, peer = o.recvfrom(64)
            assert peer == f.egress
            o.sendto(data, peer)
            assert up.recv(64) == data
            f.upstream_fd = up.detach()
        router.release(flows[0])
        again = router._open_upstream("127.0.0.1", flows[0].dest[1], egress)
        assert again.egress == flows[0].egress
        flows.append(again)
    finally:
        for f in flows:
            if f.upstream_fd >= 0:
                socket.socket(fileno=f.upstream_fd).close()
        for o in origins:
            o.close()


def test_datagrams_queued_before_connect_from_others_are_dropped() -> None:
    import socket

    from relay.serve.udp_routing import _drop_foreign

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        flow.bind(("127.0.0.1", 0))
        peer.bind(("127.0.0.1", 0))
        other.sendto(b"not yours", flow.getsockname())
        other.sendto(b"nor this", flow.getsockname())
        flow.connect(peer.getsockname())
        peer.sendto(b"mine", flow.getsockname())
        time.sleep(0.05)
        assert _drop_foreign(flow, peer.getsockname()) == 2
        flow.settimeout(1)
        assert flow.recv(64) == b"mine"
        assert _drop_foreign(flow, peer.getsockname()) == 0


def test_router_refuses_a_slice_that_no_longer_fits_the_port_sysctls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """relay.serve.slicecheck says the slice does not fit (a sysctl changed): the UDP flow is
    refused with slice_unusable before any socket is bound, as a TCP connection would be."""
    import socket

    from relay.serve import slicecheck
    from relay.serve.routing import Denied

    router, egress = _loopback_udp_router("45010-45010")
    assert egress is not None

    class Unusable:
        def problem(self, lo: int, hi: int) -> str | None:
            return f"{lo}-{hi} outside net.ipv4.ip_local_port_range 50000-60999"

    monkeypatch.setattr(slicecheck, "WATCH", Unusable())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as origin:
        origin.bind(("127.0.0.1", 0))
        dest_port = origin.getsockname()[1]
        with pytest.raises(Denied) as info:
            router._open_upstream("127.0.0.1", dest_port, egress)
        assert info.value.reason == "slice_unusable"
        assert "45010-45010 outside" in str(info.value)
        monkeypatch.undo()
        flow = router._open_upstream("127.0.0.1", dest_port, egress)
        try:
            # The refusal took no port: the one-port slice still has it to give.
            assert flow.egress == ("127.0.0.1", 45010)
        finally:
            socket.socket(fileno=flow.upstream_fd).close()
