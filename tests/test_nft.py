"""relay.ops.nft: the rendered plan, and `relay nft` applying/removing it in a real namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Topology, require_netns
from netns_lab import REPO, relay_nft

from relay.config import loads
from relay.ops import nft

TPROXY_CONFIG = """
[[listener]]
name = "in4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[listener]]
name = "in6"
bind = "[::]:7001"
mode = "tproxy"

[[listener]]
name = "plain"
bind = "127.0.0.1:8000"
backend = "127.0.0.1:9000"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"

[[egress]]
address = "2001:db8:7::7"
ports = "40000-40007"
"""

BACKEND_ONLY = """
[[listener]]
bind = "127.0.0.1:8000"
backend = "127.0.0.1:9000"
"""


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


# -- in a network namespace: the real nft and ip --------------------------------------------


@dataclass
class Host:
    """One fresh namespace, a tproxy config file, and the namespace's routing state before."""

    topo: Topology
    ns: str
    conf: Path
    before: tuple[str, ...]

    def relay_nft(self, *args: str) -> tuple[int, str, str]:
        res = relay_nft(self.topo, self.ns, *args)
        return res.returncode, res.stdout, res.stderr

    def state(self) -> tuple[str, ...]:
        """nft ruleset, ip rules and the routes of both families."""
        run = self.topo.run
        return (
            run(self.ns, ["nft", "list", "ruleset"]).stdout,
            run(self.ns, ["ip", "-4", "rule", "show"]).stdout,
            run(self.ns, ["ip", "-6", "rule", "show"]).stdout,
            run(self.ns, ["ip", "-4", "route", "show", "table", "all"]).stdout,
            run(self.ns, ["ip", "-6", "route", "show", "table", "100"], check=False).stdout,
        )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    require_netns()
    conf = tmp_path / "relay.toml"
    conf.write_text(TPROXY_CONFIG)
    with Topology() as topo:
        made = Host(topo, topo.host("n"), conf, ())
        made.before = made.state()
        yield made


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_apply_twice_then_remove_twice(host: Host, tmp_path: Path) -> None:
    rc, out, err = host.relay_nft("-c", str(host.conf))
    assert rc == 0, err
    assert "# nft -c: ruleset is valid" in out and "tproxy ip to 127.0.0.1:7000" in out
    assert host.state() == host.before  # printing changes nothing

    for _ in range(2):
        rc, _out, err = host.relay_nft("-c", str(host.conf), "--apply")
        assert rc == 0, err
    table, rules4, rules6, route4, route6 = host.state()
    assert table.count("tproxy ip to 127.0.0.1:7000") == 1
    assert table.count("tproxy ip6 to :7001") == 1
    assert rules4.count("fwmark 0x1 lookup 100") == 1
    assert rules6.count("fwmark 0x1 lookup 100") == 1
    assert "local default dev lo table 100" in route4
    assert "local default dev lo" in route6

    # Removal takes away what was applied even when the config changed in between.
    changed = tmp_path / "changed.toml"
    changed.write_text(BACKEND_ONLY)
    for path in (changed, host.conf):
        rc, out, err = host.relay_nft("-c", str(path), "--remove")
        assert rc == 0, err
        assert host.state() == host.before


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_invalid_ruleset_is_refused_before_anything_changes(host: Host) -> None:
    # Interface names are at most 15 bytes: the kernel-side check in `nft -c` rejects it.
    rc, _out, err = host.relay_nft(
        "-c", str(host.conf), "--ingress", "a-very-long-interface-name", "--apply"
    )
    assert rc == 1
    assert "nft -c rejected the ruleset" in err and "exceeds maximum length" in err
    assert host.state() == host.before


def test_bad_config_names_the_problem(tmp_path: Path) -> None:
    conf = tmp_path / "relay.toml"
    conf.write_text('[[listener]]\nbind = "127.0.0.1:7000"\nmode = "tproxi"\n')
    rc = nft.main(["-c", str(conf)])
    assert rc == 2


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or shutil.which("nft") is None,
                    reason="needs root, setpriv and nft to run `relay nft` as an unprivileged user")
def test_printing_without_cap_net_admin_says_it_could_not_validate() -> None:
    code = f"import sys; sys.path.insert(0, {REPO!r}); from relay.ops.nft import main; " \
           "raise SystemExit(main(sys.argv[1:]))"
    demo_config = os.path.join(REPO, "relay", "data", "demo.toml")
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code, "-c", demo_config],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert res.returncode == 0, res.stderr
    assert "tproxy ip to 127.0.0.1:7000" in res.stdout
    assert "# not validated: nft -c needs CAP_NET_ADMIN" in res.stdout
