"""Soft-unicast egress: which (address, port slice) an upstream connection leaves from.

Fail closed: an upstream socket is bound to the egress address with the slice as its private
ephemeral range, and after connect() its local address is checked; a port outside the slice or
another address is an error, never a fallback.

Kernel facts this relies on (Linux 6.3+, verified on 6.18):
- IP_BIND_ADDRESS_NO_PORT: bind((addr, 0)) reserves no port; connect() picks one knowing the full
  4-tuple, so one slice port is reused across destinations and only "slice exhausted for this
  destination" can fail (connect() -> EADDRNOTAVAIL).
- IP_LOCAL_PORT_RANGE (SOL_IP, also honoured on AF_INET6 sockets): a bound that lies outside
  net.ipv4.ip_local_port_range is *silently ignored*; reserved ports are skipped. Hence the
  slice checks of relay.config.host at start/reload and check_local_port() after every connect.
- IP_TRANSPARENT / IPV6_TRANSPARENT: bind to an address no interface owns (CAP_NET_ADMIN).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from relay.config.model import Config, EgressSlice
from relay.sock import IP_BIND_ADDRESS_NO_PORT, IP_LOCAL_PORT_RANGE, make_transparent

__all__ = [
    "Egress",
    "EgressTable",
    "SliceViolation",
    "bind_upstream",
    "check_local_port",
]

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


def _from_config(entry: EgressSlice) -> Egress:
    lo, hi = entry.port_range
    dests = tuple(str(n) for n in entry.networks)
    return Egress(entry.address, lo, hi, int(entry.family), dests)


class EgressTable:
    """Destination -> Egress, most specific `destinations` CIDR wins (ties: first entry).

    Built once per config; `lookup` is a handful of integer operations.
    """

    def __init__(self, entries: Iterable[EgressSlice]) -> None:
        slices = tuple(entries)
        self.entries: tuple[Egress, ...] = tuple(_from_config(e) for e in slices)
        routes: list[tuple[int, int, int, int, Egress]] = []
        # Validation (relay.config) guarantees each destination is of its address's family.
        for order, (entry, egress) in enumerate(zip(slices, self.entries, strict=True)):
            for net in entry.networks:
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
    def from_config(cls, cfg: Config) -> EgressTable:
        return cls(cfg.egress)

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
    make_transparent(sock, f"egress {egress.address}")
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
