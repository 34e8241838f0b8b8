"""Soft-unicast egress: which (address, port slice) an upstream connection leaves from.

Fail closed: an upstream socket is bound to the egress address with the slice as its private
ephemeral range, and after connect() its local address is checked; a port outside the slice or
another address is an error, never a fallback.

Kernel facts this relies on (Linux 6.3+, verified on 6.18):
- IP_BIND_ADDRESS_NO_PORT: bind((addr, 0)) reserves no port; connect() picks one knowing the full
  4-tuple, so one slice port is reused across destinations and only "slice exhausted for this
  destination" can fail (connect() -> EADDRNOTAVAIL).
- IP_LOCAL_PORT_RANGE (SOL_IP, also honoured on AF_INET6 sockets): a bound that lies outside
  net.ipv4.ip_local_port_range is *silently ignored*; reserved ports are skipped. Hence
  validate_slices() at start/reload and check_local_port() after every connect.
- IP_TRANSPARENT / IPV6_TRANSPARENT: bind to an address no interface owns (CAP_NET_ADMIN).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from relay.sock import (
    IP_BIND_ADDRESS_NO_PORT,
    IP_LOCAL_PORT_RANGE,
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
)

__all__ = [
    "Egress",
    "EgressTable",
    "SliceViolation",
    "bind_upstream",
    "check_local_port",
    "parse_slice",
    "read_port_range",
    "read_reserved_ports",
    "validate_slices",
    "PROC_PORT_RANGE",
    "PROC_RESERVED_PORTS",
]

PROC_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
PROC_RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
_U32 = struct.Struct("=I")


class SliceViolation(Exception):
    """The kernel gave the upstream socket a local address outside its egress slice."""


@dataclass(frozen=True, slots=True)
class Egress:
    """One `[[egress]]` entry, parsed: bind `address`, ports `lo`..`hi` inclusive."""

    address: str
    lo: int
    hi: int
    family: int
    destinations: tuple[str, ...]

    @property
    def range_value(self) -> bytes:
        """IP_LOCAL_PORT_RANGE value: u32 `hi << 16 | lo` in host byte order."""
        return _U32.pack((self.hi << 16) | self.lo)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi


def parse_slice(text: str) -> tuple[int, int]:
    """ "40000-40999" -> (40000, 40999); a single port "40000" is a slice of one."""
    lo_s, sep, hi_s = str(text).strip().partition("-")
    if not lo_s.isdigit() or (sep and not hi_s.isdigit()):
        raise ValueError(f"port slice {text!r} is not LOW-HIGH")
    lo = int(lo_s)
    hi = int(hi_s) if sep else lo
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"port slice {text!r} must satisfy 1 <= low <= high <= 65535")
    return lo, hi


def _parse_entry(entry: Any) -> Egress:
    address = str(entry.address)
    ip = ipaddress.ip_address(address)
    lo, hi = parse_slice(entry.ports)
    # No destinations: every address of the egress address's family (as relay.config documents).
    dests = tuple(str(d) for d in (getattr(entry, "destinations", None) or ()))
    dests = dests or (("::/0",) if ip.version == 6 else ("0.0.0.0/0",))
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Egress(str(ip), lo, hi, int(family), dests)


class EgressTable:
    """Destination -> Egress, most specific `destinations` CIDR wins (ties: first entry).

    Built once per config; `lookup` is a handful of integer operations.
    """

    def __init__(self, entries: Iterable[Any]) -> None:
        self.entries: tuple[Egress, ...] = tuple(_parse_entry(e) for e in entries)
        routes: list[tuple[int, int, int, int, Egress]] = []
        for order, egress in enumerate(self.entries):
            for cidr in egress.destinations:
                net = ipaddress.ip_network(cidr, strict=False)
                if net.version != (6 if egress.family == socket.AF_INET6 else 4):
                    raise ValueError(
                        f"egress {egress.address}: destination {cidr} is another address family"
                    )
                routes.append((net.version, net.prefixlen, order, int(net.network_address), egress))
        routes.sort(key=lambda r: (-r[1], r[2]))
        self._routes = {
            v: tuple(
                ((32 if v == 4 else 128) - plen, netint, eg)
                for ver, plen, _o, netint, eg in routes
                if ver == v
            )
            for v in (4, 6)
        }

    @classmethod
    def from_config(cls, cfg: Any) -> EgressTable:
        return cls(getattr(cfg, "egress", None) or ())

    def lookup(self, ip: str) -> Egress | None:
        """The egress for destination `ip` (an IP literal of the socket's family), or None."""
        if ":" in ip:
            version, value = 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        else:
            version, value = 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        for shift, netint, egress in self._routes[version]:
            if value >> shift == netint >> shift:
                return egress
        return None

    def addresses(self) -> set[str]:
        return {e.address for e in self.entries}

    def __bool__(self) -> bool:
        return bool(self.entries)


def bind_upstream(sock: socket.socket, egress: Egress) -> None:
    """Prepare an unconnected TCP socket to leave from `egress`: transparent (the address may
    be non-local), port chosen at connect() inside the slice, bound to (address, 0).
    Raises OSError naming the option the kernel refused."""
    v6 = sock.family == socket.AF_INET6
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"egress {egress.address}: IP_TRANSPARENT refused ({exc.strerror}); "
            "it needs CAP_NET_RAW or CAP_NET_ADMIN",
        ) from None
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, egress.range_value)
    except OSError as exc:
        raise OSError(
            exc.errno, f"egress {egress.address}: port slice options refused ({exc.strerror})"
        ) from None
    sock.bind((egress.address, 0))


def check_local_port(sock: socket.socket, egress: Egress) -> tuple[str, int]:
    """After connect(): the socket's local (address, port); raises SliceViolation when the port
    is outside the slice or the address is not the egress address."""
    local = sock.getsockname()
    address, port = local[0], local[1]
    if port < egress.lo or port > egress.hi or address != egress.address:
        raise SliceViolation(
            f"upstream local address {address}:{port} outside egress "
            f"{egress.address} ports {egress.lo}-{egress.hi}"
        )
    return address, port


def read_port_range(path: str = PROC_PORT_RANGE) -> tuple[int, int]:
    """net.ipv4.ip_local_port_range of this network namespace (also governs IPv6)."""
    with open(path) as f:
        lo, hi = f.read().split()
    return int(lo), int(hi)


def read_reserved_ports(path: str = PROC_RESERVED_PORTS) -> list[tuple[int, int]]:
    """net.ipv4.ip_local_reserved_ports as ranges ("8080,9000-9010" format; may be empty)."""
    with open(path) as f:
        text = f.read().strip()
    ranges: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_s, _, hi_s = part.partition("-")
        ranges.append((int(lo_s), int(hi_s or lo_s)))
    return ranges


def _probe_option(family: int) -> str | None:
    """Set IP_LOCAL_PORT_RANGE and IP_BIND_ADDRESS_NO_PORT on a scratch socket and read them
    back: the only reliable test that this kernel implements them (no version checks)."""
    probe_value = (40001 << 16) | 40000
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if s.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) != 1:
                return "kernel ignores IP_BIND_ADDRESS_NO_PORT"
            s.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, _U32.pack(probe_value))
            got = _U32.unpack(s.getsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, 4))[0]
            if got != probe_value:
                return f"kernel IP_LOCAL_PORT_RANGE read back {got:#x}, expected {probe_value:#x}"
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return "kernel lacks IP_LOCAL_PORT_RANGE (Linux 6.3+ needed)"
        if exc.errno == errno.EAFNOSUPPORT:
            return "address family not supported by this kernel"
        return f"probing IP_LOCAL_PORT_RANGE failed: {exc}"
    return None


def validate_slices(cfg: Any) -> list[str]:
    """Every reason the egress config cannot be used safely on this host, [] when it can.

    Checks: addresses and slices parse; the kernel supports the options (per family used);
    each slice lies inside net.ipv4.ip_local_port_range (the kernel silently ignores one that
    does not); no slice touches net.ipv4.ip_local_reserved_ports; slices of the same address do
    not overlap; destination CIDRs are of the address's family.
    """
    problems: list[str] = []
    parsed: list[tuple[int, Egress]] = []
    for i, entry in enumerate(getattr(cfg, "egress", None) or ()):
        where = f"egress[{i}]"
        try:
            egress = _parse_entry(entry)
        except (ValueError, AttributeError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        version = 6 if egress.family == socket.AF_INET6 else 4
        for cidr in egress.destinations:
            try:
                net = ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                problems.append(f"{where}.destinations: {cidr!r}: {exc}")
                continue
            if net.version != version:
                problems.append(
                    f"{where}.destinations: {cidr} is IPv{net.version} but address "
                    f"{egress.address} is IPv{version}"
                )
        parsed.append((i, egress))
    if not parsed:
        return problems

    for family in sorted({e.family for _i, e in parsed}):
        reason = _probe_option(family)
        if reason is not None:
            fam = "IPv6" if family == socket.AF_INET6 else "IPv4"
            problems.append(f"egress ({fam}): {reason}")

    try:
        sys_lo, sys_hi = read_port_range()
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read {PROC_PORT_RANGE}: {exc}")
        sys_lo, sys_hi = 0, -1
    try:
        reserved = read_reserved_ports()
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read {PROC_RESERVED_PORTS}: {exc}")
        reserved = []

    for i, egress in parsed:
        where = f"egress[{i}] {egress.address} ports {egress.lo}-{egress.hi}"
        if sys_hi >= sys_lo and not (sys_lo <= egress.lo and egress.hi <= sys_hi):
            problems.append(
                f"{where}: outside net.ipv4.ip_local_port_range {sys_lo}-{sys_hi} "
                "(the kernel would silently ignore the slice)"
            )
        for r_lo, r_hi in reserved:
            if r_lo <= egress.hi and egress.lo <= r_hi:
                text = f"{r_lo}" if r_lo == r_hi else f"{r_lo}-{r_hi}"
                problems.append(
                    f"{where}: overlaps net.ipv4.ip_local_reserved_ports {text}"
                )
    for n, (i, a) in enumerate(parsed):
        for j, b in parsed[n + 1 :]:
            if a.address == b.address and a.lo <= b.hi and b.lo <= a.hi:
                problems.append(
                    f"egress[{i}] ports {a.lo}-{a.hi} and egress[{j}] ports {b.lo}-{b.hi} "
                    f"overlap on address {a.address}"
                )
    return problems
