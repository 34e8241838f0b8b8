"""Which traffic each tproxy/redirect listener's nft rule catches, and which rules shadow others.

relay nft writes one rule per listener: `tproxy` rules in a filter chain at ``nft_priority``
(mangle), `redirect`/`dnat` rules in a nat chain at ``nft_nat_priority`` (dstnat). Every rule
catches "non-local destinations of the listener's IP family and protocol, arriving on its
ingress interfaces" (default: every interface but lo), and the first rule that matches a packet
takes it: a `tproxy ... accept` ends the chain, and the tproxy chain runs before the nat chain,
whose rules skip packets tproxy already marked. So the order in which rules see traffic is:
every tproxy listener in config order, then every redirect listener in config order.

A later listener whose traffic an earlier one catches entirely (same family and protocol, its
interfaces among the earlier one's) can never receive a packet: relay check refuses it. One
whose interfaces only partly overlap gets the rest: a warning.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from relay.config.model import Listener

__all__ = ["IFACE_RE", "Shadow", "catch_order", "check_iface", "shadows", "where"]

# Linux dev_valid_name(): 1-15 bytes (IFNAMSIZ 16 with the NUL), not "." or "..", no "/", ":"
# or whitespace. A trailing "*" is nft's wildcard: it is matched as a prefix.
IFACE_RE = re.compile(r"[^/:\s\"\\]{1,15}")


def check_iface(name: str) -> str:
    """``name`` if it can be an interface name; ValueError with the reason otherwise."""
    if name in (".", "..") or not IFACE_RE.fullmatch(name) or len(name.encode()) > 15:
        raise ValueError("not an interface name (1-15 bytes, no '/', ':', '\"' or whitespace)")
    return name


@dataclasses.dataclass(frozen=True)
class Shadow:
    """Listener ``name`` loses traffic to the earlier rule of listener ``by``."""

    name: str
    by: str
    never: bool  # True: it can never receive traffic; False: only on the overlapping interfaces
    reason: str


def catch_order(listeners: Sequence[Listener]) -> list[Listener]:
    """The listeners that relay nft writes a rule for, in the order their rules see packets."""
    tproxy = [lst for lst in listeners if lst.mode == "tproxy"]
    return tproxy + [lst for lst in listeners if lst.mode == "redirect"]


def where(ingress: Sequence[str]) -> str:
    """The interfaces as words: "every interface but lo" or "eth1, eth2"."""
    return ", ".join(ingress) if ingress else "every interface but lo"


def _covers(first: frozenset[str] | None, second: frozenset[str] | None) -> bool:
    """Does ``first`` (None: every interface but lo) include every interface of ``second``?"""
    if first is None:
        return second is None or "lo" not in second
    return second is not None and second <= first


def _overlap(first: frozenset[str] | None, second: frozenset[str] | None) -> frozenset[str] | None:
    """Interfaces both catch on (None: every interface but lo; empty: none)."""
    if first is None:
        return None if second is None else second - {"lo"}
    if second is None:
        return first - {"lo"}
    return first & second


def shadows(listeners: Sequence[Listener], ingress: Sequence[str] | None = None) -> list[Shadow]:
    """Every (later listener, earlier listener) pair whose rules catch the same traffic.

    ``ingress``: interfaces that replace every listener's own (``relay nft --ingress``)."""
    out: list[Shadow] = []
    earlier: list[tuple[Listener, frozenset[str] | None]] = []
    for lst in catch_order(listeners):
        names = ingress if ingress else lst.ingress
        mine = frozenset(names) if names else None
        for first, theirs in earlier:
            if first.protocol != lst.protocol or first.bind_family != lst.bind_family:
                continue
            both = _overlap(theirs, mine)
            if both is not None and not both:
                continue
            kind = (f"IPv{6 if ':' in first.bind_address.host else 4} "
                    f"{first.protocol.upper()} {first.mode}")
            if _covers(theirs, mine):
                reason = (f"listener {first.name} ({kind}, {where(sorted(theirs or ()))}) catches "
                          "all of its traffic first: this one would get none")
                out.append(Shadow(lst.name, first.name, True, reason))
                break
            shared = where(sorted(both)) if both is not None else "every interface but lo"
            reason = (f"listener {first.name} ({kind}) catches its traffic first on {shared}: "
                      "this one gets only the rest")
            out.append(Shadow(lst.name, first.name, False, reason))
        earlier.append((lst, mine))
    return out
