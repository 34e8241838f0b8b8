"""relay nft beside a host's own firewall: per-listener ingress, the configurable mark, routing
table, rule priority, nft table and chain priorities, redirect listeners and rules that shadow
each other (rendered plans and `relay check`; applying them: tests/netns/test_nft_apply.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import cli
from relay.config import ConfigError, interception, loads
from relay.ops import nft

CUSTOM = """
[relay]
tproxy_mark = 0x2a
tproxy_table = 4242
tproxy_rule_priority = 777
nft_table = "edge_relay"
nft_priority = -160
nft_nat_priority = -90

[[listener]]
name = "t4"
bind = "127.0.0.1:7000"
mode = "tproxy"
ingress = ["eth1", "eth2"]

[[listener]]
name = "r4"
bind = "0.0.0.0:7001"
mode = "redirect"
ingress = ["eth3"]

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"
"""


def _lines(plan: nft.Plan) -> list[str]:
    return [line.strip() for line in plan.ruleset.splitlines()]


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        loads(text, "t.toml")
    return err.value.problems


def test_defaults_render_as_before() -> None:
    plan = nft.render(loads('[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxy"\n'), local=())
    lines = _lines(plan)
    assert lines[:3] == ["table inet relay", "delete table inet relay", "table inet relay {"]
    assert "type filter hook prerouting priority mangle; policy accept;" in lines
    assert plan.route_commands[0] == (
        "-4", "rule", "add", "priority", "100", "fwmark", "1", "lookup", "100")
    assert plan.routing == nft.Routing()


def test_custom_mark_table_priority_and_nft_table_are_used_everywhere() -> None:
    plan = nft.render(loads(CUSTOM), local=())
    lines = _lines(plan)
    assert lines[:3] == ["table inet edge_relay", "delete table inet edge_relay",
                         "table inet edge_relay {"]
    assert "type filter hook prerouting priority -160; policy accept;" in lines
    assert "type nat hook prerouting priority -90; policy accept;" in lines
    marks = [line for line in lines if "meta mark set" in line]
    assert marks and all(line.split("meta mark set ")[1].startswith("42 ") for line in marks)
    assert plan.route_commands == (
        ("-4", "rule", "add", "priority", "777", "fwmark", "42", "lookup", "4242"),
        ("-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "4242"),
    )
    assert plan.routing == nft.Routing("edge_relay", 42, 4242, 777)


def test_listener_ingress_key_limits_its_rule_and_the_flag_replaces_it() -> None:
    cfg = loads(CUSTOM)
    tproxy = [r for r in _lines(nft.render(cfg, local=())) if "tproxy ip to" in r]
    assert tproxy == [
        'iifname { "eth1", "eth2" } meta l4proto tcp fib daddr type != local '
        "ip daddr != { 203.0.113.7 } tproxy ip to 127.0.0.1:7000 meta mark set 42 accept"
        "  # listener t4"
    ]
    # --ingress wins over the file, for every listener (like every command-line setting)
    cfg6 = loads(CUSTOM.replace('"0.0.0.0:7001"', '"[::]:7001"'))
    flagged = _lines(nft.render(cfg6, ingress=["veth9"], local=()))
    caught = [r for r in flagged if "# listener" in r]
    assert len(caught) == 2 and all(r.startswith('iifname { "veth9" } ') for r in caught)
    assert cfg.listener[0].ingress == ["eth1", "eth2"]


def test_redirect_listener_gets_a_nat_rule_that_skips_tproxied_packets() -> None:
    lines = _lines(nft.render(loads(CUSTOM), local=()))
    assert "chain nat_prerouting {" in lines
    assert (
        'iifname { "eth3" } meta nfproto ipv4 meta l4proto tcp fib daddr type != local '
        "meta mark != 42 redirect to :7001  # listener r4"
    ) in lines
    specific = loads(
        '[[listener]]\nname = "r"\nbind = "127.0.0.1:7001"\nmode = "redirect"\n'
        '[[listener]]\nname = "r6"\nbind = "[2001:db8::1]:7001"\nmode = "redirect"\n'
    )
    plan = nft.render(specific, local=())
    rules = [r for r in _lines(plan) if "# listener" in r]
    assert rules[0].endswith("meta mark != 1 dnat ip to 127.0.0.1:7001  # listener r")
    assert "meta nfproto ipv6" in rules[1]
    assert rules[1].endswith("dnat ip6 to [2001:db8::1]:7001  # listener r6")
    assert any("route_localnet=1" in note for note in plan.notes)
    assert plan.route_commands == ()  # NAT needs no policy routing


def test_redirect_to_ipv6_loopback_is_refused() -> None:
    cfg = loads('[[listener]]\nname = "r"\nbind = "[::1]:7001"\nmode = "redirect"\n')
    with pytest.raises(nft.PlumbingError, match="listener r .*never delivers"):
        nft.render(cfg, local=())


def test_no_redirect_listener_no_nat_chain() -> None:
    plan = nft.render(loads('[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxy"\n'), local=())
    assert "nat" not in plan.ruleset


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("tproxy_mark", "0", ">= 1"),
        ("tproxy_mark", "4294967296", "<= 4294967295"),
        ("tproxy_table", "254", "reserved for the kernel's main table"),
        ("tproxy_table", "0", ">= 1"),
        ("tproxy_rule_priority", "32766", "<= 32765"),
        ("tproxy_rule_priority", "0", ">= 1"),
        ("nft_table", '"my table"', "letters, digits and '_'"),
        ("nft_nat_priority", "-200", ">= -199"),
    ],
)
def test_routing_settings_are_validated(key: str, value: str, reason: str) -> None:
    problems = _problems(f"[relay]\n{key} = {value}\n"
                         '[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxy"\n')
    assert len(problems) == 1 and problems[0].startswith(f"t.toml: relay.{key}: "), problems
    assert reason in problems[0]


def test_tproxy_chain_must_run_before_the_nat_chain() -> None:
    problems = _problems(CUSTOM.replace("nft_priority = -160", "nft_priority = -90"))
    assert problems == [
        "t.toml: relay.nft_priority: -90: must be below relay.nft_nat_priority (-90): the "
        "redirect rules skip packets the tproxy rules marked, so the tproxy chain has to run first"
    ]


@pytest.mark.parametrize(
    ("ingress", "reason"),
    [('["a/b"]', "not an interface name"), ('["sixteen-bytes-xx"]', "not an interface name"),
     ('[""]', "not an interface name")],
)
def test_bad_interface_names_are_refused(ingress: str, reason: str) -> None:
    problems = _problems(
        f'[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxy"\ningress = {ingress}\n')
    assert len(problems) == 1 and "listener[0].ingress[0]" in problems[0]
    assert reason in problems[0]


def test_ingress_on_a_backend_listener_is_refused() -> None:
    problems = _problems('[[listener]]\nbind = "127.0.0.1:7000"\nbackend = "127.0.0.1:9"\n'
                         'ingress = ["eth0"]\n')
    assert problems == ["t.toml: listener[0].ingress: ['eth0']: only used in modes \"tproxy\" "
                        'and "redirect"']


TWO = """
[[listener]]
name = "a"
bind = "127.0.0.1:7000"
mode = "{mode_a}"
{ingress_a}

[[listener]]
name = "b"
bind = "0.0.0.0:7001"
mode = "{mode_b}"
{ingress_b}
"""


def _two(mode_a: str, ingress_a: str, mode_b: str, ingress_b: str) -> str:
    return TWO.format(mode_a=mode_a, mode_b=mode_b,
                      ingress_a=f"ingress = {ingress_a}" if ingress_a else "",
                      ingress_b=f"ingress = {ingress_b}" if ingress_b else "")


@pytest.mark.parametrize(
    ("mode_a", "ingress_a", "mode_b", "ingress_b", "path"),
    [
        ("tproxy", "", "tproxy", '["eth1"]', "listener[1].ingress"),
        ("tproxy", '["eth1", "eth2"]', "tproxy", '["eth2"]', "listener[1].ingress"),
        ("tproxy", "", "redirect", "", "listener[1].mode"),
        # tproxy rules see packets before redirect rules whatever the order in the file
        ("redirect", '["eth1"]', "tproxy", "", "listener[0].ingress"),
        ("redirect", "", "redirect", '["eth4"]', "listener[1].ingress"),
    ],
)
def test_a_listener_that_can_never_get_traffic_is_refused(
    mode_a: str, ingress_a: str, mode_b: str, ingress_b: str, path: str
) -> None:
    problems = _problems(_two(mode_a, ingress_a, mode_b, ingress_b))
    assert len(problems) == 1 and problems[0].startswith(f"t.toml: {path}: "), problems
    assert "catches all of its traffic first: this one would get none" in problems[0]


@pytest.mark.parametrize(
    ("mode_a", "ingress_a", "mode_b", "ingress_b", "shadowed", "on"),
    [
        ("tproxy", '["eth1"]', "tproxy", '["eth1", "eth2"]', "b", "on eth1"),
        ("tproxy", '["eth1", "lo"]', "tproxy", "", "b", "on eth1"),
        ("tproxy", '["eth1"]', "redirect", "", "b", "on eth1"),
        ("redirect", "", "tproxy", '["eth2", "lo"]', "a", "on eth2"),
    ],
)
def test_partial_overlap_is_a_warning(
    mode_a: str, ingress_a: str, mode_b: str, ingress_b: str, shadowed: str, on: str
) -> None:
    cfg = loads(_two(mode_a, ingress_a, mode_b, ingress_b))
    found = interception.shadows(cfg.listener)
    assert [(s.name, s.never) for s in found] == [(shadowed, False)]
    assert f"{on}: this one gets only the rest" in found[0].reason
    plan = nft.render(cfg, local=())
    assert f"warning: listener {shadowed}: {found[0].reason}" in plan.notes


def test_disjoint_or_other_family_or_protocol_do_not_shadow() -> None:
    for text in (
        _two("tproxy", '["eth1"]', "tproxy", '["eth2"]'),
        _two("tproxy", "", "tproxy", "").replace('"0.0.0.0:7001"', '"[::]:7001"'),
        _two("tproxy", "", "tproxy", "").replace('mode = "tproxy"\n\n', 'mode = "tproxy"\n'
                                                 'protocol = "udp"\n\n', 1),
    ):
        assert interception.shadows(loads(text).listener) == [], text


def test_flag_that_makes_a_listener_unreachable_is_refused_by_relay_nft() -> None:
    cfg = loads(_two("tproxy", '["eth1"]', "tproxy", '["eth2"]'))
    with pytest.raises(nft.PlumbingError, match="listener b: listener a .* would get none"):
        nft.render(cfg, ingress=["eth1"], local=())


def test_relay_check_prints_the_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text(_two("tproxy", '["eth1"]', "tproxy", '["eth1", "eth2"]'))
    assert cli.main(["check", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert f"{conf}: warning: listener b: listener a (IPv4 TCP tproxy) catches its traffic " \
           "first on eth1: this one gets only the rest" in out
    assert ": OK: 2 listener(s)" in out


def test_relay_check_refuses_the_unreachable_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text(_two("tproxy", "", "tproxy", '["eth1"]'))
    assert cli.main(["check", "-c", str(conf)]) != 0
    err = capsys.readouterr().err
    assert f"{conf}: listener[1].ingress: ['eth1']: listener a (IPv4 TCP tproxy, every " \
           "interface but lo) catches all of its traffic first" in err


def test_dump_writes_the_ingress_key_back() -> None:
    from relay.config.schema import dumps

    cfg = loads(CUSTOM)
    again = loads(dumps(cfg))
    assert again.listener[0].ingress == ["eth1", "eth2"] and again.relay == cfg.relay
