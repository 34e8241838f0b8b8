"""`relay nft` with UDP listeners, applied in a real network namespace and removed again."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import require_netns

from relay.lab.netlab import relay_nft
from relay.lab.netns import Topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

UDP_CONFIG = """
[[listener]]
name = "udp4"
bind = "127.0.0.1:7000"
mode = "tproxy"
protocol = "udp"

[[listener]]
name = "udp6"
bind = "[::1]:7000"
mode = "tproxy"
protocol = "udp"

[[listener]]
name = "tcp4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[egress]]
address = "203.0.113.7"
ports = "40000-40007"
"""


def test_udp_rules_apply_twice_and_remove(tmp_path: Path) -> None:
    require_netns()
    conf = tmp_path / "relay.toml"
    conf.write_text(UDP_CONFIG)
    with Topology() as topo:
        ns = topo.host("n")
        before = topo.run(ns, ["nft", "list", "ruleset"]).stdout
        for _ in range(2):
            res = relay_nft(topo, ns, "-c", str(conf), "--apply")
            assert res.returncode == 0, res.stderr
        table = topo.run(ns, ["nft", "list", "table", "inet", "relay"]).stdout
        # nft prints the rules back as the kernel holds them: one of each, both protocols.
        assert table.count("meta l4proto udp ip daddr 203.0.113.7 socket transparent 1") == 1
        assert table.count("meta l4proto tcp socket transparent 1") == 1
        assert table.count("meta l4proto udp") == 3
        assert table.count("tproxy ip to 127.0.0.1:7000") == 2  # tcp4 and udp4
        assert table.count("tproxy ip6 to [::1]:7000") == 1
        rules6 = topo.run(ns, ["ip", "-6", "rule", "show"]).stdout
        assert rules6.count("fwmark 0x1 lookup 100") == 1
        res = relay_nft(topo, ns, "-c", str(conf), "--remove")
        assert res.returncode == 0, res.stderr
        assert topo.run(ns, ["nft", "list", "ruleset"]).stdout == before
