"""The value grammar of the config, written once: HOST:PORT, port ranges, CIDRs, policy rules.

Each parser takes the text as written in the TOML file (or on the command line) and raises
ValueError whose message is the reason shown to the user.  Only relay.config (validation) and
the command line call them: everything else receives the parsed values (relay.config.model).
No DNS: host names are only checked for shape.

Decided once, for every place a port or a range is written:
- Port 0 means "any port" and is accepted only where that makes sense: a listener's ``bind`` and
  ``relay.metrics_listen`` (``allow_port_zero=True``).  A backend, an egress slice or a policy
  port is 1-65535.
- A range is ``"LO-HI"`` or one port ``"P"``; blanks around the numbers are ignored, so
  ``"40000 - 40010"`` is the same range as ``"40000-40010"``.  LO <= HI.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import typing

from relay.sock import UNIX_PREFIX, format_address

__all__ = [
    "HostPort",
    "IPAddress",
    "IPNetwork",
    "PolicyRule",
    "UNIX_PREFIX",
    "family_of",
    "format_port_range",
    "parse_hostport",
    "parse_network",
    "parse_policy_rule",
    "parse_port_range",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class HostPort(typing.NamedTuple):
    """A parsed ``HOST:PORT``: an IP literal (normalised) or, for backends, a host name."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self)


def _parse_port(text: str, *, allow_zero: bool) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"port {text!r} is not a number of at most 5 digits")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is outside {low}-65535")
    return port


def parse_hostport(
    text: str, *, allow_port_zero: bool = False, allow_hostname: bool = False
) -> HostPort:
    """``"1.2.3.4:80"``, ``"[::1]:80"`` (and, if allowed, ``"name.example:80"``) -> (host, port).

    The host comes back without brackets; IP literals are normalised (``"[::0001]"`` -> ``"::1"``).
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1 :].startswith(":"):
            raise ValueError('expected "[IPv6]:PORT"')
        host, port_text = text[1:close], text[close + 2 :]
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        if addr.version != 6:
            raise ValueError(f"{host!r} in brackets must be IPv6")
        return HostPort(str(addr), _parse_port(port_text, allow_zero=allow_port_zero))
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError('expected "HOST:PORT" (IPv6 as "[::1]:PORT")')
    if ":" in host:
        raise ValueError('IPv6 addresses need brackets: "[::1]:PORT"')
    port = _parse_port(port_text, allow_zero=allow_port_zero)
    try:
        return HostPort(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    if allow_hostname and _HOSTNAME_RE.match(host) and not host.replace(".", "").isdigit():
        return HostPort(host, port)
    what = "an IP address or host name" if allow_hostname else "an IP address"
    raise ValueError(f"{host!r} is not {what}")


def parse_port_range(text: str) -> tuple[int, int]:
    """``"40000-40999"`` (or one port ``"40000"``) -> (40000, 40999), inside 1-65535, lo <= hi."""
    lo_text, sep, hi_text = text.partition("-")
    lo = _parse_port(lo_text.strip(), allow_zero=False)
    hi = _parse_port(hi_text.strip(), allow_zero=False) if sep else lo
    if lo > hi:
        raise ValueError(f"range {lo}-{hi} is reversed (low end must be <= high end)")
    return lo, hi


def parse_network(text: str) -> IPNetwork:
    """A CIDR (``"10.0.0.0/8"``, ``"2001:db8::/32"``) or one address (a /32 or /128)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR ({exc})") from None


@dataclasses.dataclass(frozen=True)
class PolicyRule:
    """One allow/deny entry: a network and the port ranges it covers (empty = every port)."""

    network: IPNetwork
    ports: tuple[tuple[int, int], ...] = ()

    def matches(self, address: str | IPAddress, port: int) -> bool:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if self.network.version == 4:
                ip = ip.ipv4_mapped
        if ip.version != self.network.version or ip not in self.network:
            return False
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)

    def __str__(self) -> str:
        """The rule as written in the config (``parse_policy_rule`` reads it back)."""
        if not self.ports:
            return str(self.network)
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        net = f"[{self.network}]" if self.network.version == 6 else str(self.network)
        return f"{net}:{ports}"


def _parse_port_list(text: str) -> tuple[tuple[int, int], ...]:
    if not text.strip():
        raise ValueError("empty port list after ':'")
    return tuple(parse_port_range(part) for part in text.split(","))


def parse_policy_rule(text: str) -> PolicyRule:
    """``"CIDR"``, ``"CIDR:80,443,8000-8999"`` or ``"[IPv6-CIDR]:443"`` -> PolicyRule."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError('missing "]" in "[IPv6-CIDR]:PORTS"')
        rest = text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError('expected "[IPv6-CIDR]:PORTS"')
        net = parse_network(text[1:close])
        return PolicyRule(net, _parse_port_list(rest[1:]) if rest else ())
    slash = text.find("/")
    if slash >= 0:
        prefix, sep, ports = text[slash:].partition(":")
        net = parse_network(text[:slash] + prefix)
        return PolicyRule(net, _parse_port_list(ports) if sep else ())
    try:
        return PolicyRule(parse_network(text))
    except ValueError:
        pass
    host, sep, ports = text.rpartition(":")
    if sep and ":" not in host:
        return PolicyRule(parse_network(host), _parse_port_list(ports))
    raise ValueError('expected "CIDR", "CIDR:PORTS" or "[IPv6-CIDR]:PORTS"')


def format_port_range(lo: int, hi: int) -> str:
    """(lo, hi) as written in the config: ``"lo-hi"``."""
    return f"{lo}-{hi}"


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an IP literal; ValueError for anything else (no DNS here)."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
