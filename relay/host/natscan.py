"""Find NAT rules and conntrack entries that touch soft-unicast egress addresses.

The slices of several hosts share one address and are kept apart only by source port; NAT
rewrites ports (masquerade and SNAT pick a new source port when the 4-tuple collides), and a
conntrack entry is the state NAT is applied from. Either one touching these flows is the
failure the slices exist to prevent. `relay doctor` reports what it finds; the fix is to
exempt the addresses from NAT, or `relay.egress_notrack = true` with `relay nft --apply`.

Sources, each used when present: ``nft -j list ruleset`` (chains of type nat),
``iptables-save -t nat`` / ``ip6tables-save -t nat``, ``/proc/net/nf_conntrack``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["conntrack_entries", "nat_rules"]

CONNTRACK = "/proc/net/nf_conntrack"
_NAT_ACTIONS = ("masquerade", "snat", "dnat", "redirect")


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout if res.returncode == 0 else ""


def _mentions(text: str, address: str) -> bool:
    """``address`` appears in ``text`` as a whole address (not as part of a longer one)."""
    return re.search(rf"(?<![\w:.]){re.escape(address)}(?![\w:])", text) is not None


def _blanket(text: str) -> bool:
    """A NAT action with no address match at all: it applies to every source, ours included."""
    lowered = text.lower()
    return (any(a in lowered for a in _NAT_ACTIONS) and "saddr" not in lowered
            and "daddr" not in lowered and " -s " not in lowered and " -d " not in lowered)


def _nft_nat_rules() -> Iterator[str]:
    out = _run(["nft", "-j", "list", "ruleset"])
    if not out:
        return
    try:
        items: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    except ValueError:
        return
    nat_chains = {(c["family"], c["table"], c["name"]) for item in items
                  if isinstance(c := item.get("chain"), dict) and c.get("type") == "nat"}
    for item in items:
        rule = item.get("rule")
        if isinstance(rule, dict) and (rule.get("family"), rule.get("table"),
                                       rule.get("chain")) in nat_chains:
            where = f"nft {rule['family']} {rule['table']} {rule['chain']}"
            yield f"{where}: {json.dumps(rule.get('expr', []), separators=(',', ':'))}"


def _iptables_nat_rules() -> Iterator[str]:
    for tool in ("iptables-save", "ip6tables-save"):
        for line in _run([tool, "-t", "nat"]).splitlines():
            if line.startswith("-A "):
                yield f"{tool}: {line}"


def nat_rules(addresses: Iterable[str]) -> list[tuple[str, str]]:
    """(address or "every address", rule text) for each NAT rule that touches the addresses."""
    wanted = [str(ipaddress.ip_address(a)) for a in addresses]
    found: list[tuple[str, str]] = []
    for text in (*_nft_nat_rules(), *_iptables_nat_rules()):
        hits = [a for a in wanted if _mentions(text, a)]
        if hits:
            found.extend((a, text) for a in hits)
        elif wanted and _blanket(text):
            found.append(("every address", text))
    return found


def conntrack_entries(addresses: Iterable[str], path: str = CONNTRACK) -> dict[str, int]:
    """Conntrack entries naming each address (src= or dst=); empty when conntrack is not
    loaded here. IPv6 entries are written in full (uncompressed) in this file."""
    wanted = {a: ipaddress.ip_address(a) for a in addresses}
    counts = dict.fromkeys(wanted, 0)
    try:
        with open(path) as f:
            for line in f:
                for field in line.split():
                    if field.startswith(("src=", "dst=")):
                        try:
                            ip = ipaddress.ip_address(field[4:])
                        except ValueError:
                            continue
                        for name, want in wanted.items():
                            if ip == want:
                                counts[name] += 1
    except OSError:
        return {}
    return {a: n for a, n in counts.items() if n}
