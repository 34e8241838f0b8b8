"""The kernel's half of "fail closed": an nft output guard for the soft-unicast egress addresses.

The relay checks its slice before connect() (relay.serve.slicecheck) and the local port after
it (relay.serve.egress), but a check in the relay comes after a wrong decision of the kernel
could already have sent a SYN: when net.ipv4.ip_local_port_range changes under a running relay,
IP_LOCAL_PORT_RANGE is silently ignored and connect() picks a port of another host's slice.
The guard is the kernel enforcing the slice itself: in the output hook, a TCP or UDP packet
whose source is a soft-unicast egress address of this host and whose source port is outside
this host's slice(s) of that address is dropped and counted in the named counter
``slice_guard`` (``relay stats``, ``relay_guard_dropped_packets_total``).

Only addresses that are not on an interface here are guarded: a local address used as egress is
shared with everything else on the host.

``relay.egress_notrack`` (off by default) adds NOTRACK for the soft-unicast flows in both
directions (raw priority, before conntrack): the slices of several hosts share one address, so a
conntrack entry, and above all a NAT rule that conntrack applies, can rewrite or collide on the
very 4-tuples the slices keep apart. Nothing of the relay needs conntrack on these flows (the
return path is `socket transparent`, not a conntrack state); enable it unless another rule of
yours needs the state of these flows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass

from relay.config.model import Config

__all__ = ["COUNTER", "GuardCounter", "guarded", "render_chains", "read_counter"]

COUNTER = "slice_guard"  # named nft counter in table inet relay
_CACHE_S = 5.0  # the supervisor reads the counter at most this often


def guarded(cfg: Config, local: Collection[str]) -> dict[str, list[tuple[int, int]]]:
    """Soft-unicast address -> this host's slices of it (addresses on no local interface)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for e in cfg.egress:
        if e.address not in local:
            out.setdefault(e.address, []).append(e.port_range)
    return out


def _family(address: str) -> str:
    return "ip6" if ":" in address else "ip"


def render_chains(cfg: Config, local: Collection[str]) -> tuple[list[str], list[str]]:
    """(lines inside ``table inet relay``, notes) for the guard and the optional NOTRACK."""
    addresses = guarded(cfg, local)
    if not addresses:
        return [], []
    lines = [
        f"    counter {COUNTER} {{",
        "    }",
        "    chain slice_guard {",
        "        type filter hook output priority filter; policy accept;",
    ]
    notes = []
    for address, slices in addresses.items():
        ports = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in sorted(slices))
        lines.append(
            f"        {_family(address)} saddr {address} meta l4proto {{ tcp, udp }} "
            f"th sport != {{ {ports} }} counter name \"{COUNTER}\" drop"
        )
        notes.append(f"guard: packets from {address} with a source port outside {ports} are "
                     f"dropped and counted (counter {COUNTER})")
    lines.append("    }")
    if cfg.relay.egress_notrack:
        out_rules = [f"        {_family(a)} saddr {a} meta l4proto {{ tcp, udp }} notrack"
                     for a in addresses]
        in_rules = [f"        {_family(a)} daddr {a} meta l4proto {{ tcp, udp }} notrack"
                    for a in addresses]
        lines += [
            "    chain notrack_out {",
            "        type filter hook output priority raw; policy accept;",
            *out_rules,
            "    }",
            "    chain notrack_in {",
            "        type filter hook prerouting priority raw; policy accept;",
            *in_rules,
            "    }",
        ]
        notes.append("egress_notrack: conntrack never tracks (nor NATs) the soft-unicast flows")
    return lines, notes


def read_counter(table: str = "relay") -> int | None:
    """Packets the guard dropped so far, or None when the guard is not installed here."""
    if shutil.which("nft") is None:
        return None
    try:
        res = subprocess.run(["nft", "-j", "list", "counter", "inet", table, COUNTER],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    try:
        for item in json.loads(res.stdout).get("nftables", []):
            counter = item.get("counter")
            if isinstance(counter, dict) and counter.get("name") == COUNTER:
                return int(counter.get("packets", 0))
    except (ValueError, AttributeError, TypeError):
        return None
    return None


@dataclass
class GuardCounter:
    """``read_counter`` cached for the supervisor (an nft process per read: not per scrape)."""

    enabled: bool
    table: str = "relay"  # relay.nft_table
    value: int | None = None
    read_at: float = -_CACHE_S

    def get(self) -> int | None:
        if not self.enabled:
            return None
        now = time.monotonic()
        if now - self.read_at >= _CACHE_S:
            self.read_at = now
            self.value = read_counter(self.table)
        return self.value
