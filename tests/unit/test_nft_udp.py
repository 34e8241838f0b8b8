"""relay.ops.nft for UDP listeners: the rendered plan (no kernel). Applying it in a namespace:
tests/netns/test_udp_nft_apply.py."""

from __future__ import annotations

import pytest

from relay.config import loads
from relay.ops import nft

TCP_ONLY = """
[[listener]]
name = "in4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"
"""


def _rules(plan: nft.Plan) -> list[str]:
    return [line.strip() for line in plan.ruleset.splitlines() if "meta mark set" in line]

UDP_CONFIG = """
[[listener]]
name = "tcp4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[listener]]
name = "udp4"
bind = "127.0.0.1:7000"
mode = "tproxy"
protocol = "udp"

[[listener]]
name = "udp6"
bind = "[::1]:7053"
mode = "tproxy"
protocol = "udp"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"

[[egress]]
address = "2001:db8:7::7"
ports = "40000-40007"
"""


def test_render_udp_listeners_get_udp_tproxy_and_socket_rules() -> None:
    plan = nft.render(loads(UDP_CONFIG), local=set())
    rules = _rules(plan)
    # Own transparent sockets first: TCP connections, and for UDP only the upstream sockets
    # (replies to the egress addresses). A client's later datagrams reach its flow's reply
    # socket through tproxy's established lookup, which skips a reply socket not yet connected.
    assert rules[:3] == [
        "meta l4proto tcp socket transparent 1 meta mark set 1 accept",
        "meta l4proto udp ip daddr { 203.0.113.7 } socket transparent 1 meta mark set 1 accept",
        "meta l4proto udp ip6 daddr { 2001:db8:7::7 } socket transparent 1 meta mark set 1 "
        "accept",
    ]
    tproxy = rules[3:]
    assert len(tproxy) == 3
    tcp4, udp4, udp6 = tproxy
    assert "meta l4proto tcp " in tcp4 and "tproxy ip to 127.0.0.1:7000" in tcp4
    # The same port for TCP and UDP: two namespaces, two sockets, two rules.
    assert "meta l4proto udp " in udp4 and "tproxy ip to 127.0.0.1:7000" in udp4
    assert udp4.endswith("# listener udp4")
    assert "meta l4proto udp " in udp6 and "tproxy ip6 to [::1]:7053" in udp6
    for rule in (udp4, udp6):
        assert 'iifname != "lo"' in rule and "fib daddr type != local" in rule
    assert "ip daddr != { 203.0.113.7 }" in udp4  # replies to a finished flow: not a new flow
    assert "ip6 daddr != { 2001:db8:7::7 }" in udp6
    assert plan.families == (4, 6)  # the same ip rule and local table serve both protocols
    assert len(plan.route_commands) == 4
    assert any(note.startswith("listener udp6 ([::1]:7053): UDP arriving") for note in plan.notes)


def test_render_tcp_only_config_has_no_udp_rules() -> None:
    """No UDP interception nor UDP socket rule without a UDP listener; only the slice guard
    (relay.ops.nftguard) names UDP: it guards the egress address for both protocols."""
    plan = nft.render(loads(TCP_ONLY), local=set())
    prerouting = plan.ruleset.split("chain prerouting", 1)[1].split("\n    }", 1)[0]
    assert "tproxy" in prerouting and "udp" not in prerouting
    udp_lines = [line.strip() for line in plan.ruleset.splitlines() if "udp" in line]
    assert udp_lines == [
        'ip saddr 203.0.113.7 meta l4proto { tcp, udp } th sport != { 40000-40007 } '
        'counter name "slice_guard" drop'
    ]


def test_render_udp_backend_listener_intercepts_nothing() -> None:
    """A UDP listener in backend mode gets no tproxy rule; the UDP socket rule for the egress
    address is there for any UDP listener, and the non-local address gets its return path."""
    cfg = loads(
        '[[listener]]\nname = "dns"\nbind = "127.0.0.1:5353"\nprotocol = "udp"\n'
        'backend = "198.51.100.10:53"\n'
        '[[egress]]\naddress = "203.0.113.7"\nports = "40000-40007"\n'
    )
    plan = nft.render(cfg, local=set())
    assert _rules(plan) == [
        "meta l4proto tcp socket transparent 1 meta mark set 1 accept",
        "meta l4proto udp ip daddr { 203.0.113.7 } socket transparent 1 meta mark set 1 accept",
    ]
    assert plan.families == (4,)


def test_render_udp_without_egress_has_no_udp_socket_rule() -> None:
    cfg = loads('[[listener]]\nname = "u"\nbind = "127.0.0.1:7000"\nmode = "tproxy"\n'
                'protocol = "udp"\n')
    rules = _rules(nft.render(cfg, local=set()))
    assert not any("udp" in r and "socket transparent" in r for r in rules)
    assert any("meta l4proto udp" in r and "tproxy ip to 127.0.0.1:7000" in r for r in rules)


def test_render_refuses_udp_tproxy_listener_on_port_zero() -> None:
    cfg = loads('[[listener]]\nname = "u"\nbind = "127.0.0.1:0"\nmode = "tproxy"\n'
                'protocol = "udp"\n')
    with pytest.raises(nft.PlumbingError, match="listener u .*needs a fixed port"):
        nft.render(cfg, local=set())
