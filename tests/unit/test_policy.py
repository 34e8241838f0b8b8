"""Destination policy: never-allowed ranges, own addresses, allow/deny lists with ports."""

from __future__ import annotations

import ipaddress
import time

import pytest

from relay.config import PolicyRules
from relay.serve.policy import NetworkSet, Policy

OPEN = PolicyRules()  # the config default: allow 0.0.0.0/0 and ::/0


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link_local"),
        ("::ffff:169.254.169.254", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%lo", "link_local"),
        ("fd00:ec2::254", "link_local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:224.0.0.251", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("not-an-ip", "unspecified"),
        ("168.63.129.16", "metadata"),
        ("100.100.100.200", "metadata"),
        ("::ffff:168.63.129.16", "metadata"),
        # NAT64 (64:ff9b::/96) and 6to4 (2002::/16) forms of the IPv4 ranges above
        ("64:ff9b::7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "link_local"),
        ("64:ff9b::a83f:8110", "metadata"),
        ("64:ff9b::6464:64c8", "metadata"),
        ("64:ff9b::", "unspecified"),
        ("2002:7f00:1::1", "loopback"),
        ("2002:a9fe:a9fe::", "link_local"),
        ("2002:a83f:8110::1", "metadata"),
        ("2002:6464:64c8:1::5", "metadata"),
    ],
)
def test_never_allowed_whatever_the_allow_list(ip: str, reason: str) -> None:
    assert Policy(OPEN).check(ip, 80) == reason


def test_public_addresses_pass_the_default_policy() -> None:
    policy = Policy(OPEN)
    assert policy.check("198.51.100.7", 443) is None
    assert policy.check("2001:db8::7", 443) is None
    assert policy.check("::ffff:198.51.100.7", 443) is None
    assert policy.check("64:ff9b::c633:6407", 443) is None  # NAT64 of 198.51.100.7


@pytest.mark.parametrize(
    "ip",
    ["10.0.0.1", "172.16.5.5", "172.31.255.254", "192.168.1.1", "100.64.0.1", "100.127.255.254",
     "fd12:3456::1", "fc00::1", "::ffff:10.1.2.3", "64:ff9b::a00:1", "2002:c0a8:101::1"],
)
def test_private_ranges_need_the_opt_out_or_an_explicit_rule(ip: str) -> None:
    assert Policy(OPEN).check(ip, 22) == "private"
    assert Policy(PolicyRules.from_text(["0.0.0.0/0", "::/0"], allow_private=True)).check(
        ip, 22) is None


def test_an_allow_rule_inside_a_private_range_allows_it() -> None:
    policy = Policy(PolicyRules.from_text(["0.0.0.0/0", "10.1.0.0/16", "fd00::/8:443"]))
    assert policy.check("10.1.2.3", 80) is None
    assert policy.check("10.2.0.1", 80) == "private"  # only the broad rule matches
    assert policy.check("fd00::5", 443) is None
    assert policy.check("fd00::5", 22) == "private"
    assert policy.check("100.63.255.255", 80) is None  # just below CGNAT
    assert policy.check("172.32.0.1", 80) is None  # just above 172.16/12
    narrow = Policy(PolicyRules.from_text(["198.51.100.0/24"]))
    assert narrow.check("10.0.0.1", 80) == "private"
    assert narrow.check("203.0.113.1", 80) == "not_allowed"


def test_own_addresses_and_their_mapped_forms_are_refused() -> None:
    policy = Policy(OPEN, {"203.0.113.7", "2001:db8::53", "0.0.0.0", "::"})
    assert policy.check("203.0.113.7", 40000) == "own_address"
    assert policy.check("::ffff:203.0.113.7", 80) == "own_address"
    assert policy.check("2001:db8::53", 80) == "own_address"
    assert policy.check("203.0.113.8", 80) is None
    assert policy.is_own("::ffff:203.0.113.7") and not policy.is_own("203.0.113.8")


def test_deny_wins_and_honours_ports() -> None:
    cfg = PolicyRules.from_text(
        allow=["0.0.0.0/0", "::/0"], deny=["10.0.0.0/8:22,8000-8999", "[2001:db8::/32]:25"],
        allow_private=True,
    )
    policy = Policy(cfg)
    assert policy.check("10.1.2.3", 22) == "denied_by_rule"
    assert policy.check("10.1.2.3", 8500) == "denied_by_rule"
    assert policy.check("10.1.2.3", 9000) is None
    assert policy.check("::ffff:10.1.2.3", 22) == "denied_by_rule"
    assert policy.check("2001:db8::1", 25) == "denied_by_rule"
    assert policy.check("2001:db8::1", 587) is None


def test_allow_list_restricts_by_network_and_port() -> None:
    policy = Policy(PolicyRules.from_text(allow=["198.51.100.0/24:80,443", "192.0.2.9"], deny=[]))
    assert policy.check("198.51.100.20", 443) is None
    assert policy.check("198.51.100.20", 22) == "not_allowed"
    assert policy.check("192.0.2.9", 1234) is None
    assert policy.check("192.0.2.10", 80) == "not_allowed"
    assert policy.check("2001:db8::1", 80) == "not_allowed"


def test_empty_allow_list_fails_closed() -> None:
    assert Policy(PolicyRules.from_text(allow=[], deny=[])).check("198.51.100.7", 80) == "not_allowed"


def test_mapped_rule_networks_match_ipv4_destinations() -> None:
    policy = Policy(PolicyRules.from_text(allow=["0.0.0.0/0"], deny=["::ffff:192.0.2.0/120"]))
    assert policy.check("192.0.2.77", 80) == "denied_by_rule"
    assert policy.check("192.0.3.77", 80) is None


def test_no_policy_section_still_enforces_builtins() -> None:
    policy = Policy(None)
    assert policy.check("198.51.100.7", 80) is None
    assert policy.check("127.0.0.1", 80) == "loopback"


def test_bad_rule_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError):
        PolicyRules.from_text(allow=["10.0.0.0/33"])


def test_network_set_membership() -> None:
    nets = NetworkSet([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")])
    assert "10.200.0.1" in nets and "::ffff:10.0.0.1" in nets and "2001:db8::5" in nets
    assert "11.0.0.1" not in nets and "2001:db9::1" not in nets and "junk" not in nets
    assert not NetworkSet([])


def test_check_is_cheap_with_many_rules() -> None:
    deny = [f"10.{i}.{j}.0/24" for i in range(20) for j in range(50)]  # 1000 rules
    policy = Policy(PolicyRules.from_text(allow=["0.0.0.0/0"], deny=deny))
    assert policy.check("10.19.49.1", 80) == "denied_by_rule"
    start = time.perf_counter()
    for _ in range(20000):
        policy.check("198.51.100.7", 443)
    per_check = (time.perf_counter() - start) / 20000
    assert per_check < 20e-6, f"policy check took {per_check * 1e6:.1f} us"
