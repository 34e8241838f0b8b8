"""relay.ops.nft: the rendered plan (no kernel). Applying it: tests/netns/test_nft_apply.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import BACKEND_ONLY, TPROXY_CONFIG

from relay.config import loads
from relay.ops import nft


def _rules(plan: nft.Plan) -> list[str]:
    return [line.strip() for line in plan.ruleset.splitlines() if "meta mark set" in line]


def test_render_tproxy_rules_per_listener_and_family() -> None:
    plan = nft.render(loads(TPROXY_CONFIG), local=set())
    rules = _rules(plan)
    assert rules[0] == "meta l4proto tcp socket transparent 1 meta mark set 1 accept"
    v4 = [r for r in rules if "tproxy ip to" in r]
    v6 = [r for r in rules if "tproxy ip6 to" in r]
    assert len(v4) == 1 and len(v6) == 1 and len(rules) == 3  # nothing for the backend listener
    assert "tproxy ip to 127.0.0.1:7000" in v4[0]
    assert "tproxy ip6 to :7001" in v6[0]  # wildcard bind: keep the packet's own address
    for rule in (v4[0], v6[0]):
        assert 'iifname != "lo"' in rule and "fib daddr type != local" in rule
    assert "ip daddr != { 203.0.113.7 }" in v4[0]  # replies to our egress address: never stolen
    assert "ip6 daddr != { 2001:db8:7::7 }" in v6[0]
    assert plan.ruleset.startswith("table inet relay\ndelete table inet relay\n")
    assert plan.route_commands == (
        ("-4", "rule", "add", "priority", "100", "fwmark", "1", "lookup", "100"),
        ("-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100"),
        ("-6", "rule", "add", "priority", "100", "fwmark", "1", "lookup", "100"),
        ("-6", "route", "replace", "local", "::/0", "dev", "lo", "table", "100"),
    )


def test_render_ingress_interfaces_restrict_interception() -> None:
    plan = nft.render(loads(TPROXY_CONFIG), ingress=["veth0b", "eth1"], local=set())
    tproxy = [r for r in _rules(plan) if "tproxy" in r]
    assert tproxy and all('iifname { "veth0b", "eth1" }' in r for r in tproxy)


def test_render_return_path_only_for_non_local_egress() -> None:
    cfg = loads(
        BACKEND_ONLY + '[[egress]]\naddress = "203.0.113.7"\nports = "40000-40007"\n'
        '[[egress]]\naddress = "2001:db8:7::7"\nports = "40000-40007"\n'
    )
    only_v4 = nft.render(cfg, local={"2001:db8:7::7"})
    assert only_v4.families == (4,)
    assert all(cmd[0] == "-4" for cmd in only_v4.route_commands)
    assert nft.render(cfg, local={"2001:db8:7::7", "203.0.113.7"}).route_commands == ()


def test_render_backend_only_needs_no_routing() -> None:
    plan = nft.render(loads(BACKEND_ONLY), local=set())
    assert plan.route_commands == () and plan.families == ()
    assert not any("tproxy" in r for r in _rules(plan))


def test_render_refuses_tproxy_listener_on_port_zero() -> None:
    cfg = loads('[[listener]]\nname = "t"\nbind = "127.0.0.1:0"\nmode = "tproxy"\n')
    with pytest.raises(nft.PlumbingError, match="needs a fixed port"):
        nft.render(cfg, local=set())


def test_bad_config_names_the_problem(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text('[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxi"\n')
    rc = nft.main(["-c", str(conf)])
    assert rc == 2




GUARDED = """
[relay]
egress_notrack = true

[[listener]]
bind = "127.0.0.1:7000"
mode = "tproxy"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"

[[egress]]
address = "203.0.113.7"
ports = "40100-40107"

[[egress]]
address = "2001:db8:7::7"
ports = "40000-40007"

[[egress]]
address = "192.0.2.1"
ports = "41000-41007"
"""


def test_output_guard_drops_ports_outside_the_slices_of_soft_unicast_addresses() -> None:
    plan = nft.render(loads(GUARDED), local={"192.0.2.1"})
    lines = [line.strip() for line in plan.ruleset.splitlines()]
    assert "counter slice_guard {" in lines
    assert "type filter hook output priority filter; policy accept;" in lines
    guard = [line for line in lines if line.endswith('counter name "slice_guard" drop')]
    assert guard == [
        "ip saddr 203.0.113.7 meta l4proto { tcp, udp } th sport != { 40000-40007, 40100-40107 }"
        ' counter name "slice_guard" drop',
        "ip6 saddr 2001:db8:7::7 meta l4proto { tcp, udp } th sport != { 40000-40007 }"
        ' counter name "slice_guard" drop',
    ]  # 192.0.2.1 is an address of this host: shared with everything else, not guarded
    notrack = [line for line in lines if line.endswith("notrack")]
    assert notrack == [
        "ip saddr 203.0.113.7 meta l4proto { tcp, udp } notrack",
        "ip6 saddr 2001:db8:7::7 meta l4proto { tcp, udp } notrack",
        "ip daddr 203.0.113.7 meta l4proto { tcp, udp } notrack",
        "ip6 daddr 2001:db8:7::7 meta l4proto { tcp, udp } notrack",
    ]


def test_notrack_is_off_by_default_and_no_egress_means_no_guard() -> None:
    text = GUARDED.replace("egress_notrack = true", "")
    assert "notrack" not in nft.render(loads(text), local=set()).ruleset
    assert "slice_guard" not in nft.render(loads(BACKEND_ONLY), local=set()).ruleset
