"""The validated configuration as typed, frozen values: what everything below relay.config uses.

relay.config.validate builds these once from the TOML tables (relay.config.schema); nothing
downstream parses a string again.  Each value keeps its parsed form in a field (``bind_address``,
``port_range``, ``allow_rules`` ...) and gives back the text as the TOML key spells it through a
property of the key's name (``bind``, ``ports``, ``allow`` ...), which ``relay config dump``
writes and log lines show.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable
from typing import Literal

from relay.config.settings import RelaySettings
from relay.config.values import (
    UNIX_PREFIX,
    HostPort,
    IPAddress,
    IPNetwork,
    PolicyRule,
    format_port_range,
    parse_policy_rule,
)

__all__ = [
    "Backend",
    "Config",
    "EgressSlice",
    "Listener",
    "Mode",
    "PolicyRules",
    "Protocol",
    "ProxyProtocol",
]

Mode = Literal["backend", "tproxy", "redirect"]
ProxyProtocol = Literal["", "v2"]
Protocol = Literal["tcp", "udp"]
Backend = HostPort | str  # (host, port) or the path of a unix socket ("unix:/path" in the file)

_EVERYWHERE = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}


@dataclasses.dataclass(frozen=True, slots=True)
class Listener:
    """One ``[[listener]]``, resolved."""

    name: str
    bind_address: HostPort  # an IP literal; port 0 = any port
    bind_family: socket.AddressFamily
    mode: Mode = "backend"
    backend_address: Backend | None = None  # None unless mode is "backend"
    # AF_INET, AF_INET6, AF_UNIX; AF_UNSPEC for a host name (resolved by the router) or none
    backend_family: socket.AddressFamily = socket.AF_UNSPEC
    proxy_protocol: ProxyProtocol = ""
    trusted_networks: tuple[IPNetwork, ...] = ()
    protocol: Protocol = "tcp"
    udp_responses: int = 0  # UDP: end a flow after this many replies; 0 = unlimited
    udp_oneway: bool = False  # UDP: a flow ends once its datagrams are forwarded (no replies)

    @property
    def is_udp(self) -> bool:
        return self.protocol == "udp"
    reuseport: bool = False  # SO_REUSEPORT: other processes may serve the same address
    # relay nft: interfaces whose traffic this tproxy/redirect listener catches; () = all but lo
    ingress_interfaces: tuple[str, ...] = ()

    @property
    def transparent(self) -> bool:
        """tproxy mode: the listening socket needs IP_TRANSPARENT."""
        return self.mode == "tproxy"

    @property
    def bind(self) -> str:
        return str(self.bind_address)

    @property
    def backend(self) -> str:
        addr = self.backend_address
        if addr is None:
            return ""
        return UNIX_PREFIX + addr if isinstance(addr, str) else str(addr)

    @property
    def trusted_proxies(self) -> list[str]:
        return [str(n) for n in self.trusted_networks]

    @property
    def ingress(self) -> list[str]:
        return list(self.ingress_interfaces)


@dataclasses.dataclass(frozen=True, slots=True)
class EgressSlice:
    """One ``[[egress]]``: a soft-unicast address and this host's slice of its ports."""

    ip: IPAddress
    port_range: tuple[int, int]
    destination_networks: tuple[IPNetwork, ...] = ()  # as written; empty = the whole family

    @property
    def address(self) -> str:
        return str(self.ip)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.ip.version == 6 else socket.AF_INET

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """Destinations reached through this address (every address of its family if none)."""
        return self.destination_networks or (_EVERYWHERE[self.ip.version],)

    @property
    def ports(self) -> str:
        return format_port_range(*self.port_range)

    @property
    def destinations(self) -> list[str]:
        return [str(n) for n in self.destination_networks]


def _default_allow() -> tuple[PolicyRule, ...]:
    return (PolicyRule(_EVERYWHERE[4]), PolicyRule(_EVERYWHERE[6]))


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyRules:
    """``[policy]``: which destinations may be reached (deny wins)."""

    allow_rules: tuple[PolicyRule, ...] = dataclasses.field(default_factory=_default_allow)
    deny_rules: tuple[PolicyRule, ...] = ()
    allow_private: bool = False  # RFC 1918, CGNAT and ULA destinations without an explicit rule

    @classmethod
    def from_text(cls, allow: Iterable[str] = (), deny: Iterable[str] = (),
                  allow_private: bool = False) -> PolicyRules:
        """Rules from their text (as in the file); ValueError names a bad one."""
        return cls(
            tuple(parse_policy_rule(t) for t in allow), tuple(parse_policy_rule(t) for t in deny),
            allow_private,
        )

    @property
    def allow(self) -> list[str]:
        return [str(r) for r in self.allow_rules]

    @property
    def deny(self) -> list[str]:
        return [str(r) for r in self.deny_rules]


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration."""

    relay: RelaySettings = dataclasses.field(default_factory=RelaySettings)
    listener: tuple[Listener, ...] = ()
    egress: tuple[EgressSlice, ...] = ()
    policy: PolicyRules = dataclasses.field(default_factory=PolicyRules)
    metrics_address: HostPort | None = None  # relay.metrics_listen, parsed; None = no endpoint

    def listener_named(self, name: str) -> Listener:
        for lst in self.listener:
            if lst.name == name:
                return lst
        raise KeyError(f"no listener named {name!r}")

