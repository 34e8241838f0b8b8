"""Destination policy: where the relay may connect to in tproxy/redirect mode.

Order of checks (first hit wins, the reason is returned):
  1. never-allowed ranges, whatever the lists say: "loopback", "link_local" (incl. AWS/GCP's
     169.254.169.254 and fd00:ec2::254), "metadata" (Azure's 168.63.129.16, Alibaba's
     100.100.100.200), "unspecified" (0.0.0.0/8 and ::; Linux connects 0.0.0.0 to this host),
     "multicast", "broadcast";
  2. the relay's own listen/egress addresses: "own_address" (a connection to them loops back);
  3. a `deny` rule matches: "denied_by_rule";
  4. a private range (RFC 1918, CGNAT 100.64.0.0/10, ULA fc00::/7): "private", unless
     ``[policy] allow_private = true`` or the matching `allow` rule lies inside that range (an
     explicit "10.1.0.0/16" allows 10.1.x.x; the default "0.0.0.0/0" does not);
  5. no `allow` rule matches: "not_allowed" (an empty allow list allows nothing: fail closed).
IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are checked as the IPv4 address they reach; the
NAT64 (64:ff9b::/96) and 6to4 (2002::/16) forms of an IPv4 address also meet steps 1 and 4 as
that IPv4 address (a NAT64 gateway or 6to4 relay would deliver them there).

Rules arrive parsed (relay.config.model.PolicyRules; the grammar, "CIDR" or "CIDR:PORTS" with
PORTS like "80,443,8000-8999", IPv6 with ports as "[2001:db8::/32]:443", is relay.config.values').
A check costs one inet_pton and a dict lookup per distinct prefix length in use.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from relay.config.model import PolicyRules
from relay.config.values import IPNetwork, PolicyRule

__all__ = ["POLICY_DENY_REASONS", "NetworkSet", "Policy", "PortRanges", "Rule"]

# Every reason Policy.check returns: the first part of the deny vocabulary
# (relay.serve.routing.DENY_REASONS, the flow log's "denied_<reason>").
POLICY_DENY_REASONS = (
    "loopback",
    "link_local",
    "unspecified",
    "multicast",
    "broadcast",
    "own_address",
    "not_allowed",
    "denied_by_rule",
    "metadata",
    "private",
)

PortRanges = tuple[tuple[int, int], ...] | None  # None: every port
Rule = tuple[int, int, int, PortRanges]  # (version, network int, prefix length, ports)

_BUILTIN: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link_local"),  # includes 169.254.169.254, the cloud metadata service
    ("fe80::/10", "link_local"),
    ("fd00:ec2::254/128", "link_local"),  # AWS IPv6 metadata endpoint (reachable like 169.254/16)
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("168.63.129.16/32", "metadata"),  # Azure wireserver / IMDS relay
    ("100.100.100.200/32", "metadata"),  # Alibaba Cloud metadata
)
_PRIVATE: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7",
)
_NAT64_PREFIX = 0x0064FF9B << 96  # 64:ff9b::/96, the well-known NAT64 prefix (RFC 6052)
_NAT64_MASK = ((1 << 128) - 1) ^ 0xFFFFFFFF
_6TO4_PREFIX = 0x2002  # 2002::/16: the IPv4 address is bits 16..47 (RFC 3056)


_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96
_MAPPED_MASK = ((1 << 96) - 1) << 32


def _rule_tuple(rule: PolicyRule) -> Rule:
    """A config PolicyRule -> (version, network int, prefix length, ports or None), with
    IPv4-mapped IPv6 networks folded to IPv4 (destinations are folded the same way)."""
    net = rule.network
    ports: PortRanges = tuple(rule.ports) or None
    value = int(net.network_address)
    if net.version == 6 and net.prefixlen >= 96 and value & _MAPPED_MASK == _MAPPED_PREFIX:
        return (4, value & 0xFFFFFFFF, net.prefixlen - 96, ports)
    return (net.version, value, net.prefixlen, ports)


class _Table:
    """Networks grouped by (version, prefix length): lookup = shift + dict get per group."""

    def __init__(self) -> None:
        self._groups: dict[int, list[tuple[int, dict[int, list[Any]]]]] = {4: [], 6: []}

    def add(self, version: int, value: int, prefixlen: int, payload: Any) -> None:
        bits = 32 if version == 4 else 128
        shift = bits - prefixlen
        groups = self._groups[version]
        for group_shift, entries in groups:
            if group_shift == shift:
                entries.setdefault(value >> shift, []).append(payload)
                return
        groups.append((shift, {value >> shift: [payload]}))
        groups.sort(key=lambda g: g[0])  # most specific first

    def matches(self, version: int, value: int) -> Iterable[Any]:
        for shift, entries in self._groups[version]:
            found = entries.get(value >> shift)
            if found is not None:
                yield from found

    def __bool__(self) -> bool:
        return bool(self._groups[4] or self._groups[6])


def _ports_match(ports: PortRanges, port: int) -> bool:
    if ports is None:
        return True
    return any(lo <= port <= hi for lo, hi in ports)


def _to_int(ip: str) -> tuple[int, int]:
    """(version, address as int) with IPv4-mapped IPv6 folded to IPv4; ValueError if not an IP."""
    if ":" not in ip:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    head, pct, _scope = ip.partition("%")  # link-local scope id: the address decides
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, head if pct else ip), "big")
    if value & _MAPPED_MASK == _MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _embedded_ipv4(version: int, value: int) -> int | None:
    """The IPv4 address inside a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address, else None."""
    if version != 6:
        return None
    if value & _NAT64_MASK == _NAT64_PREFIX:
        return value & 0xFFFFFFFF
    if value >> 112 == _6TO4_PREFIX:
        return (value >> 80) & 0xFFFFFFFF
    return None


class Policy:
    """Destination filter for one relay. `rules`: the config's [policy], or None (allow
    everything not built-in denied); `own_addresses` are the relay's listen and egress IPs
    (wildcards are ignored)."""

    def __init__(self, rules: PolicyRules | None, own_addresses: Iterable[str] = ()) -> None:
        self._builtin = _Table()
        for cidr, reason in _BUILTIN:
            net = ipaddress.ip_network(cidr)
            self._builtin.add(net.version, int(net.network_address), net.prefixlen, reason)
        self._private = _Table()
        for cidr in _PRIVATE:
            net = ipaddress.ip_network(cidr)
            self._private.add(net.version, int(net.network_address), net.prefixlen, net.prefixlen)
        self._own: set[tuple[int, int]] = set()
        for ip in own_addresses:
            version, value = _to_int(ip)
            if value != 0:
                self._own.add((version, value))
        if rules is None:
            rules = PolicyRules()  # the config default: allow 0.0.0.0/0 and ::/0
        allow, deny = rules.allow_rules, rules.deny_rules
        self._allow_private = rules.allow_private
        self._allow = _Table()
        self._deny = _Table()
        for rule in deny:
            version, value, prefixlen, ports = _rule_tuple(rule)
            self._deny.add(version, value, prefixlen, ports)
        for rule in allow:
            version, value, prefixlen, ports = _rule_tuple(rule)
            self._allow.add(version, value, prefixlen, (ports, prefixlen))

    def check(self, ip: str, port: int) -> str | None:
        """None if (ip, port) may be relayed to, else the denial reason (see module doc)."""
        try:
            version, value = _to_int(ip)
        except (OSError, ValueError):
            return "unspecified"
        embedded = _embedded_ipv4(version, value)
        for reason in self._builtin.matches(version, value):
            return str(reason)
        if embedded is not None:
            for reason in self._builtin.matches(4, embedded):
                return str(reason)
        if (version, value) in self._own:
            return "own_address"
        for ports in self._deny.matches(version, value):
            if _ports_match(ports, port):
                return "denied_by_rule"
        private = 0  # prefix length of the private range the destination is in (0: none)
        if not self._allow_private:
            for plen in self._private.matches(version, value):
                private = int(plen)
            if embedded is not None and not private and any(self._private.matches(4, embedded)):
                private = 129  # no IPv6 allow rule lies inside an IPv4 private range
        for ports, prefixlen in self._allow.matches(version, value):
            if _ports_match(ports, port):
                return "private" if prefixlen < private else None
        return "private" if private else "not_allowed"

    def is_own(self, ip: str) -> bool:
        """True when `ip` (mapped forms folded) is one of the relay's own addresses."""
        try:
            return _to_int(ip) in self._own
        except (OSError, ValueError):
            return False


class NetworkSet:
    """A set of parsed networks with a cheap membership test for IP literals; IPv4-mapped IPv6
    addresses match the IPv4 networks."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._table = _Table()
        for net in networks:
            version, value, prefixlen, _ports = _rule_tuple(PolicyRule(net))
            self._table.add(version, value, prefixlen, True)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        try:
            version, value = _to_int(ip)
        except (OSError, ValueError):
            return False
        return any(True for _ in self._table.matches(version, value))

    def __bool__(self) -> bool:
        return bool(self._table)
