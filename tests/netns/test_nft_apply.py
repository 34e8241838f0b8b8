"""`relay nft` applying and removing its plan in a real network namespace, twice each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import require_netns

from relay.lab.netlab import relay_nft
from relay.lab.netns import Topology

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


