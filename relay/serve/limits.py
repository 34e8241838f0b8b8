"""Connection limits across the workers of one generation: the source key and the shared
counters (relay_ext._limits).

``maxconn`` and ``maxconn_per_source`` are exact over all workers: the supervisor creates one
``SharedLimits`` region per generation before it forks, each worker admits and releases through
it with its slot number, and the supervisor zeroes a dead worker's slot before the slot serves
again. Without the extension (not built) each worker enforces its share (limit / workers,
rounded up), as a fallback that says so in the log.

A source is an IPv4 address, or an IPv6 prefix of ``relay.ipv6_source_prefix`` bits (default
/64: one client, one home or one VM usually owns a whole /64, so counting single IPv6
addresses would let it open the limit 2^64 times). IPv4-mapped IPv6 clients count as their IPv4
address.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from relay.config.settings import RelaySettings

__all__ = ["VERDICT_REASONS", "create", "source_key"]

log = logging.getLogger("relay.limits")

_MAPPED = b"\x00" * 10 + b"\xff\xff"
# relay_ext._limits verdicts -> the rejected counter's label (relay.serve.server.REJECT_REASONS)
VERDICT_REASONS = {1: "maxconn", 2: "maxconn_per_source", 3: "maxconn_per_source"}


def source_key(ip: str, ipv6_prefix: int = 64) -> bytes:
    """The per-source key of a client address: 4 bytes (IPv4) or the masked IPv6 prefix."""
    if ":" not in ip:
        return socket.inet_pton(socket.AF_INET, ip)
    head = ip.partition("%")[0]
    raw = socket.inet_pton(socket.AF_INET6, head)
    if raw[:12] == _MAPPED:
        return raw[12:]
    value = int.from_bytes(raw, "big") >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    return value.to_bytes(16, "big")


def create(settings: RelaySettings, slots: int) -> Any | None:
    """A SharedLimits region for ``slots`` workers, or None when the extension is missing."""
    try:
        from relay_ext._limits import SharedLimits
    except ImportError as exc:
        log.warning("shared connection limits unavailable (%s): each worker enforces "
                    "maxconn / workers and maxconn_per_source / workers", exc)
        return None
    return SharedLimits(slots, settings.maxconn, settings.maxconn_per_source,
                        settings.maxconn)
