"""`relay nft` applying and removing its plan in a real network namespace, twice each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BACKEND_ONLY, TPROXY_CONFIG, require_netns

from relay.lab.netlab import Lab, open_flow, relay_in, relay_nft, three_hosts
from relay.lab.netns import Topology
from relay.lab.origins import Origin
from relay.lab.process import relay_config, write_config

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


# -- beside a host's own policy routing: custom mark/table/priority, per-listener ingress,
# a redirect listener; end to end with a client, the relay and an origin ---------------------

DEST4, DEST6 = ("198.51.100.10", 80), ("2001:db8:100::10", 80)


def _fitted_config(ingress: str) -> str:
    """IPv4 through a redirect listener, IPv6 through a tproxy listener, both caught only on
    the client-facing interface (their `ingress` keys; no --ingress flag), with the mark,
    routing table, rule priority and nft table of an operator's choosing."""
    listeners = (
        f'[[listener]]\nname = "r4"\nbind = "0.0.0.0:7001"\nmode = "redirect"\n'
        f'ingress = ["{ingress}"]\n\n'
        f'[[listener]]\nname = "t6"\nbind = "[::1]:7000"\nmode = "tproxy"\n'
        f'ingress = ["{ingress}"]\n'
    )
    return relay_config(
        egress=[(Lab.egress4, "40000-40007"), (Lab.egress6, "40000-40007")],
        allow=("198.51.100.0/24", "2001:db8:100::/48"),
        settings={"tproxy_mark": 0x2A, "tproxy_table": 4242, "tproxy_rule_priority": 777,
                  "nft_table": "edge_relay", "connect_timeout": 2.0},
        extra=listeners,
    )


@pytest.mark.netns
@pytest.mark.timeout(90)
def test_custom_routing_and_redirect_listener_intercept_end_to_end(tmp_path: Path) -> None:
    require_netns()
    with Topology() as topo:
        lab = three_hosts(topo)
        path = write_config(tmp_path, "fitted", _fitted_config(lab.relay_ingress))
        run = topo.run
        # The host's own policy routing at the default priority and table stays untouched.
        run(lab.relay, ["ip", "-4", "rule", "add", "priority", "100", "fwmark", "1",
                        "lookup", "100"])
        before = run(lab.relay, ["ip", "-4", "rule", "show"]).stdout

        res = relay_nft(topo, lab.relay, "-c", str(path), "--apply")
        assert res.returncode == 0, res.stderr
        assert "applied table inet edge_relay and the fwmark 42 routing (table 4242)" in res.stdout
        rules4 = run(lab.relay, ["ip", "-4", "rule", "show"]).stdout
        rules6 = run(lab.relay, ["ip", "-6", "rule", "show"]).stdout
        assert "777:\tfrom all fwmark 0x2a lookup 4242" in rules4  # egress return path (IPv4)
        assert "777:\tfrom all fwmark 0x2a lookup 4242" in rules6  # tproxy + return path (IPv6)
        assert "100:\tfrom all fwmark 0x1 lookup 100" in rules4
        route4 = run(lab.relay, ["ip", "-4", "route", "show", "table", "4242"]).stdout
        route6 = run(lab.relay, ["ip", "-6", "route", "show", "table", "4242"]).stdout
        assert route4.strip() == "local default dev lo scope host"
        assert route6.startswith("local default dev lo")
        table = run(lab.relay, ["nft", "list", "table", "inet", "edge_relay"]).stdout
        assert f'iifname "{lab.relay_ingress}"' in table and "redirect to :7001" in table

        with Origin(binds=[DEST4, DEST6], netns=lab.origin) as _origin:
            relay = relay_in(topo, lab.relay, path)
            relay.wait_ready(20)
            for dest, egress in ((DEST4, Lab.egress4), (DEST6, Lab.egress6)):
                flow = open_flow(topo, lab.client, dest)
                # The origin was reached at the address the client dialled, from the
                # soft-unicast address: the redirect (IPv4) and tproxy (IPv6) rules caught the
                # connection, and mark 42 -> table 4242 brought the origin's replies home.
                assert flow.seen.local == dest
                assert flow.seen.peer[0] == egress and 40000 <= flow.seen.peer[1] <= 40007
                assert flow.finish(b"y" * 10000) == 10000
            relay.cleanup()

        res = relay_nft(topo, lab.relay, "-c", str(path), "--remove")
        assert res.returncode == 0, res.stderr
        assert run(lab.relay, ["ip", "-4", "rule", "show"]).stdout == before
        assert "4242" not in run(lab.relay, ["ip", "-6", "rule", "show"]).stdout
        assert run(lab.relay, ["ip", "-4", "route", "show", "table", "4242"],
                   check=False).stdout == ""
        assert "edge_relay" not in run(lab.relay, ["nft", "list", "tables"]).stdout


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_a_foreign_rule_at_the_priority_is_refused_before_anything_changes(host: Host) -> None:
    host.topo.run(host.ns, ["ip", "-4", "rule", "add", "priority", "100", "lookup", "main"])
    host.before = host.state()
    rc, _out, err = host.relay_nft("-c", str(host.conf), "--apply")
    assert rc == 1
    assert 'ip -4 rule priority 100 already holds "from all lookup main"' in err
    assert "set relay.tproxy_rule_priority to a free preference" in err
    assert host.state() == host.before
