"""Kernel plumbing for a config: the nftables ruleset and the policy-routing commands.

``relay nft -c FILE`` prints them, checked with ``nft -c``; ``--apply`` installs them in the
current network namespace and ``--remove`` takes them away. Both are idempotent.

How TPROXY works (Linux): a `tproxy` rule in the prerouting hook (mangle priority, before the
routing decision) assigns a packet addressed to *any* destination to a local listening socket
with IP_TRANSPARENT, without rewriting the packet; the accepted socket's getsockname() is the
original destination. The packet still has to be *routed locally*: the rule marks it (fwmark 1)
and ``ip rule fwmark 1 lookup 100`` + ``local 0.0.0.0/0 dev lo table 100`` deliver it to the host.
Mark, table, rule priority, nft table name and chain priorities are ``[relay]`` settings
(``tproxy_mark``, ``tproxy_table``, ``tproxy_rule_priority``, ``nft_table``, ``nft_priority``,
``nft_nat_priority``) so that the plumbing fits beside a host's own firewall and policy routing.

Redirect listeners (``mode = "redirect"``) take TCP through NAT instead: a `redirect to :PORT`
(wildcard bind) or `dnat to ADDR:PORT` rule in a nat prerouting chain rewrites the destination
and conntrack remembers the original, which the relay reads back with SO_ORIGINAL_DST. Unlike
tproxy this depends on conntrack (a flushed or full conntrack table loses the destination) and
needs no policy routing. The nat rules skip packets the tproxy chain already marked.

The same path brings replies home to a soft-unicast egress address that is not on any interface
here: the outgoing socket has IP_TRANSPARENT, so `socket transparent 1` finds it for every reply
(SYN-ACK included) and the mark routes the reply locally instead of forwarding or dropping it.

UDP (listeners with ``protocol = "udp"``) takes the same path with `meta l4proto udp`: the
`tproxy` rule hands a datagram for any destination to the transparent listener, whose
IP_RECVORIGDSTADDR control message carries the original destination. A flow's reply socket
(bound to the original destination, connected to the client) gets the client's later datagrams
from the same `tproxy` rule: its first lookup is for an *established* socket, which for UDP
means connected and bound to a specific address. The UDP `socket transparent 1` rule is
therefore limited to the egress addresses, where it brings the destination's replies to the
upstream socket bound to (soft-unicast address, slice port). An unlimited one would also match
a reply socket in the instant between its bind() and connect(). Another client's datagram to
the same destination would then be marked for local delivery, find that socket connected by
the time UDP looks it up, and be dropped (UdpNoPorts, with an ICMP port unreachable); the
`tproxy` rule sends it to the listener instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterable, Sequence

from relay.config import interception
from relay.config.model import Config, Listener
from relay.config.settings import RelaySettings
from relay.ops import nftguard

__all__ = [
    "FWMARK", "ROUTE_TABLE", "RULE_PRIORITY", "TABLE", "Plan", "PlumbingError", "Routing",
    "apply", "check_ruleset", "main", "remove", "render",
]

# Defaults of the [relay] settings of the same meaning (relay.config.settings):
TABLE = "relay"  # nft_table: nft table (family inet) that holds everything this module installs
FWMARK = 1  # tproxy_mark: packet mark that selects the local-delivery routing table
ROUTE_TABLE = 100  # tproxy_table: routing table whose only route is "everything is local"
RULE_PRIORITY = 100  # tproxy_rule_priority: `ip rule` preference, before `main` (32766)
_NAMED_PRIORITIES = {-150: "mangle", -100: "dstnat"}  # nft's names for the defaults
TW_REUSE = "net/ipv4/tcp_tw_reuse"  # also governs IPv6 connect()s

IpCommand = tuple[str, ...]  # argv after "ip"


class PlumbingError(RuntimeError):
    """The ruleset failed validation or a command failed while applying it."""


class CannotValidate(PlumbingError):
    """`nft -c` could not run here (not installed, or no CAP_NET_ADMIN to read the kernel's
    ruleset cache): the ruleset is neither known good nor known bad."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """What identifies the installed plumbing: nft table, mark, routing table, rule priority."""

    table: str = TABLE
    mark: int = FWMARK
    route_table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY

    @classmethod
    def of(cls, settings: RelaySettings) -> Routing:
        return cls(settings.nft_table, settings.tproxy_mark, settings.tproxy_table,
                   settings.tproxy_rule_priority)

    def rule_selector(self) -> tuple[str, ...]:
        return ("priority", str(self.rule_priority), "fwmark", str(self.mark),
                "lookup", str(self.route_table))

    def local_route(self, version: int) -> tuple[str, ...]:
        default = "::/0" if version == 6 else "0.0.0.0/0"
        return ("local", default, "dev", "lo", "table", str(self.route_table))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one config needs from the kernel in the relay's network namespace."""

    ruleset: str  # `nft -f` text; replaces table inet relay atomically
    route_commands: tuple[IpCommand, ...]  # `ip` argv to add the policy routing
    families: tuple[int, ...]  # IP versions (4, 6) that need the policy routing
    notes: tuple[str, ...]  # what each part is for, for humans
    routing: Routing = Routing()

    def text(self) -> str:
        """The plan as a shell-readable script: comments, the ruleset, the ip commands."""
        lines = [f"# {note}" for note in self.notes]
        lines.append(f"nft -f - <<'EOF'\n{self.ruleset}EOF")
        lines.extend("ip " + " ".join(cmd) for cmd in self.route_commands)
        return "\n".join(lines) + "\n"


def _read_sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return ""


def _family_flag(version: int) -> str:
    return "-6" if version == 6 else "-4"


def _priority(value: int) -> str:
    return _NAMED_PRIORITIES.get(value, str(value))


def _redirect_action(listener: Listener) -> tuple[str, str]:
    """(nft nat statement, family match) for a redirect listener; the note says what it needs."""
    host, port = listener.bind_address
    addr = ipaddress.ip_address(host)
    nfproto = f"meta nfproto ipv{addr.version}"
    if addr.is_unspecified:
        # The primary address of the interface the packet came in on: the wildcard listener
        # accepts on it.
        return f"redirect to :{port}", nfproto
    if addr.version == 6 and addr.is_loopback:
        raise PlumbingError(
            f"listener {listener.name} ({listener.bind}): IPv6 never delivers a packet from "
            "another interface to ::1; bind [::] or an address of this host"
        )
    family = "ip6" if addr.version == 6 else "ip"
    target = f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
    return f"dnat {family} to {target}", nfproto


def _tproxy_target(host: str, port: int) -> tuple[int, str]:
    """(IP version, nft `tproxy ... to` argument) for a listener's bind address."""
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        # Keep the packet's own destination address, change only the port: the wildcard
        # listener with IP_TRANSPARENT accepts for any address.
        return addr.version, f":{port}"
    if addr.version == 6:
        return 6, f"[{addr}]:{port}"
    return 4, f"{addr}:{port}"


def _quoted_set(names: Iterable[str]) -> str:
    items = ", ".join(json.dumps(n) for n in names)
    return "{ " + items + " }"


def local_addresses() -> frozenset[str]:
    """Addresses configured on any interface of the current network namespace."""
    out = subprocess.run(
        ["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    found: set[str] = set()
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if "local" in info:
                found.add(str(ipaddress.ip_address(info["local"])))
    return frozenset(found)


def render(
    cfg: Config,
    ingress: Sequence[str] = (),
    local: Collection[str] | None = None,
) -> Plan:
    """The nft ruleset and `ip` commands that ``cfg`` needs.

    ``ingress``: interfaces whose TCP and UDP are intercepted, for every listener (it replaces the
    listeners' own ``ingress`` keys); empty: each listener's ``ingress``, else every interface but
    lo. Raises PlumbingError when a listener's rule could then never catch a packet.
    ``local``: this host's own addresses (default: read from the current namespace); an egress
    address among them needs no return path.
    """
    own = frozenset(local) if local is not None else local_addresses()
    routing = Routing.of(cfg.relay)
    mark = routing.mark
    notes: list[str] = []
    for shadow in interception.shadows(cfg.listener, ingress):
        if shadow.never:
            raise PlumbingError(f"listener {shadow.name}: {shadow.reason}")
        notes.append(f"warning: listener {shadow.name}: {shadow.reason}")
    versions: set[int] = set()

    egress_by_version: dict[int, list[str]] = {4: [], 6: []}
    for egress in cfg.egress:
        addr = egress.ip
        egress_by_version[addr.version].append(str(addr))
        if str(addr) in own:
            notes.append(f"egress {addr}: local address, replies need no return path")
        else:
            versions.add(addr.version)
            notes.append(
                f"egress {addr} (ports {egress.ports}): not on any interface here; replies "
                f"reach its IP_TRANSPARENT sockets via mark {mark} -> table "
                f"{routing.route_table}"
            )

    intercept: list[str] = []
    redirect: list[str] = []
    for listener in interception.catch_order(cfg.listener):
        names = list(ingress) or list(listener.ingress)
        where = f"iifname {_quoted_set(names)}" if names else 'iifname != "lo"'
        if listener.mode == "redirect":
            action, nfproto = _redirect_action(listener)
            redirect.append(
                f"        {where} {nfproto} meta l4proto tcp fib daddr type != local "
                f"meta mark != {mark} {action}  # listener {listener.name}"
            )
            notes.append(
                f"listener {listener.name} ({listener.bind}, redirect): TCP arriving on "
                f"{interception.where(names)} for a non-local destination is NATed to it "
                "(conntrack keeps the original destination for SO_ORIGINAL_DST)"
            )
            if action.startswith("dnat ip to 127."):
                notes.append(
                    f"listener {listener.name}: a DNAT to 127.0.0.0/8 from another interface "
                    "needs net.ipv4.conf.<iface>.route_localnet=1 there"
                )
            continue
        proto = listener.protocol
        host, port = listener.bind_address
        if port == 0:
            raise PlumbingError(
                f"listener {listener.name} ({listener.bind}): a tproxy listener needs a fixed "
                "port for the nft tproxy rule, not port 0"
            )
        version, target = _tproxy_target(host, port)
        versions.add(version)
        family = "ip6" if version == 6 else "ip"
        # Never steal traffic addressed to this host itself (fib type local) nor replies to
        # the egress addresses (sockets already own those; the rule above accepted them).
        skip_egress = egress_by_version[version]
        not_egress = f" {family} daddr != {{ {', '.join(skip_egress)} }}" if skip_egress else ""
        intercept.append(
            f"        {where} meta l4proto {proto} fib daddr type != local{not_egress} "
            f"tproxy {family} to {target} meta mark set {mark} accept"
            f"  # listener {listener.name}"
        )
        notes.append(
            f"listener {listener.name} ({listener.bind}): {proto.upper()} arriving on "
            f"{interception.where(names)} for a non-local "
            f"IPv{version} destination is delivered to it"
        )

    # A packet that belongs to a transparent socket we already have (an accepted TPROXY
    # connection or an egress connection from a soft-unicast address; for UDP only a flow's
    # upstream socket, addressed by an egress address: see the module docstring): route it
    # locally.
    own_sockets = [f"        meta l4proto tcp socket transparent 1 meta mark set {mark} accept"]
    if any(listener.is_udp for listener in cfg.listener):
        for version, family in ((4, "ip"), (6, "ip6")):
            if not egress_by_version[version]:
                continue
            addresses = ", ".join(egress_by_version[version])
            own_sockets.append(
                f"        meta l4proto udp {family} daddr {{ {addresses} }} "
                f"socket transparent 1 meta mark set {mark} accept"
            )
        notes.append(
            "udp: replies to the soft-unicast addresses are delivered to the flows' upstream "
            "sockets; a client's later datagrams reach its flow's reply socket through tproxy"
        )
    guard_lines, guard_notes = nftguard.render_chains(cfg, own)
    notes.extend(guard_notes)
    nat_chain = [
        "    chain nat_prerouting {",
        f"        type nat hook prerouting priority {_priority(cfg.relay.nft_nat_priority)}; "
        "policy accept;",
        *redirect,
        "    }",
    ] if redirect else []
    table = routing.table
    body = [
        f"table inet {table} {{",
        "    chain prerouting {",
        f"        type filter hook prerouting priority {_priority(cfg.relay.nft_priority)}; "
        "policy accept;",
        *own_sockets,
        *intercept,
        "    }",
        *nat_chain,
        *guard_lines,
        "}",
    ]
    # Declaring the table first makes `delete` succeed when it does not exist yet, so the whole
    # file replaces the table in one transaction (idempotent, never half-applied).
    ruleset = f"table inet {table}\ndelete table inet {table}\n" + "\n".join(body) + "\n"

    commands: list[IpCommand] = []
    for version in sorted(versions):
        fam = _family_flag(version)
        commands.append((fam, "rule", "add", *routing.rule_selector()))
        commands.append((fam, "route", "replace", *routing.local_route(version)))
    if not versions:
        notes.append("no tproxy listener and no non-local egress address: no policy routing")
    if cfg.egress and _read_sysctl(TW_REUSE) != "1":
        notes.append(
            f"warning: {TW_REUSE.replace('/', '.')} is not 1: an upstream socket that closed "
            "first keeps its slice port in TIME_WAIT for 60 s towards that destination; a "
            "small slice runs dry. Set it to 1 (reuse after 1 s, TCP timestamps keep old "
            "segments apart)"
        )
    return Plan(ruleset, tuple(commands), tuple(sorted(versions)), tuple(notes), routing)


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=20)


def check_ruleset(ruleset: str) -> None:
    """Validate with `nft -c` (parsed and checked by the kernel, nothing committed)."""
    if shutil.which("nft") is None:
        raise CannotValidate("nft is not installed (Debian: apt-get install nftables)")
    res = _run(["nft", "-c", "-f", "-"], ruleset)
    if res.returncode != 0 and "Operation not permitted" in res.stderr:
        raise CannotValidate("nft -c needs CAP_NET_ADMIN (run as root) to check the ruleset")
    if res.returncode != 0:
        raise PlumbingError(f"nft -c rejected the ruleset: {res.stderr.strip()}")


def _rules_at(version: int, routing: Routing) -> list[str]:
    """`ip rule` lines at the plan's priority, without the "PRIORITY:" prefix."""
    res = _run(["ip", _family_flag(version), "rule", "show", "priority",
                str(routing.rule_priority)])
    return [line.partition(":")[2].strip() for line in res.stdout.splitlines() if ":" in line]


def _is_ours(rule: str, routing: Routing) -> bool:
    # ip prints marks in hex and a table by its name when /etc/iproute2/rt_tables has one
    return f"fwmark {routing.mark:#x} lookup " in rule and rule.split()[-1] in (
        str(routing.route_table), *_table_names(routing.route_table))


def _table_names(number: int) -> tuple[str, ...]:
    names = []
    for path in ("/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split("#", 1)[0].split()
                    if len(parts) == 2 and parts[0] == str(number):
                        names.append(parts[1])
        except OSError:
            continue
    return tuple(names)


def _rule_present(version: int, routing: Routing) -> bool:
    return any(_is_ours(rule, routing) for rule in _rules_at(version, routing))


def apply(plan: Plan) -> None:
    """Install the plan in the current network namespace; running it twice changes nothing."""
    check_ruleset(plan.ruleset)
    routing = plan.routing
    for cmd in plan.route_commands:
        if cmd[1:3] != ("rule", "add"):
            continue
        version = 6 if cmd[0] == "-6" else 4
        foreign = [r for r in _rules_at(version, routing) if not _is_ours(r, routing)]
        if foreign:
            # Rules of one preference are evaluated in an unspecified order of insertion:
            # sharing it with the host's own rule makes either one's effect depend on history.
            raise PlumbingError(
                f"ip {cmd[0]} rule priority {routing.rule_priority} already holds "
                f"\"{foreign[0]}\": set relay.tproxy_rule_priority to a free preference"
            )
    res = _run(["nft", "-f", "-"], plan.ruleset)
    if res.returncode != 0:
        raise PlumbingError(f"nft -f failed: {res.stderr.strip()}")
    for cmd in plan.route_commands:
        if cmd[1:3] == ("rule", "add") and _rule_present(6 if cmd[0] == "-6" else 4, routing):
            continue
        res = _run(["ip", *cmd])
        if res.returncode != 0:
            raise PlumbingError(f"ip {' '.join(cmd)} failed: {res.stderr.strip()}")


def remove(routing: Routing = Routing()) -> None:
    """Take away what ``apply`` installs, for both families whatever the listeners and egress
    addresses say now: the table name, rule priority, mark and route table of ``routing`` (the
    config's [relay] settings) identify it. What is gone is no error."""
    table = routing.table
    # "table; delete table" in one transaction: succeeds whether or not the table exists.
    res = _run(["nft", "-f", "-"], f"table inet {table}\ndelete table inet {table}\n")
    if res.returncode != 0:
        raise PlumbingError(f"nft delete table inet {table} failed: {res.stderr.strip()}")
    for version in (4, 6):
        fam = _family_flag(version)
        while _rule_present(version, routing):
            res = _run(["ip", fam, "rule", "del", *routing.rule_selector()])
            if res.returncode != 0:
                raise PlumbingError(f"ip {fam} rule del failed: {res.stderr.strip()}")
        _run(["ip", fam, "route", "del", *routing.local_route(version)])  # fails if already gone


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay nft",
        description="Print (default), apply or remove the nftables rules and policy routing "
        "that a config needs: TPROXY ingress and the return path of non-local egress addresses.",
    )
    p.add_argument("-c", "--config", required=True, help="relay TOML config file")
    p.add_argument(
        "--ingress",
        action="append",
        default=[],
        metavar="IFACE",
        help="intercept TCP and UDP only on this interface (repeatable), for every listener: "
        "replaces the listeners' `ingress` keys; default: those keys, else all but lo",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="install in this network namespace")
    action.add_argument("--remove", action="store_true", help="take the installed rules away")
    return p


def main(args: Sequence[str] | argparse.Namespace | None = None) -> int:
    """`relay nft -c FILE [--ingress IFACE]... [--apply | --remove]`; returns the exit status.

    `args`: the argument strings, or the namespace `relay nft` (relay.cli) already parsed."""
    from relay.config import ConfigError, load

    opts = args if isinstance(args, argparse.Namespace) else _parser().parse_args(args)
    try:
        cfg = load(opts.config)
    except (ConfigError, OSError) as exc:
        print(f"relay nft: {exc}", file=sys.stderr)
        return 2
    try:
        routing = Routing.of(cfg.relay)
        if opts.remove:
            remove(routing)
            print(f"relay nft: removed table inet {routing.table} and the fwmark "
                  f"{routing.mark} routing (table {routing.route_table})")
            return 0
        plan = render(cfg, ingress=opts.ingress)
        sys.stdout.write(plan.text())
        if opts.apply:
            apply(plan)
            print(f"relay nft: applied table inet {routing.table} and the fwmark "
                  f"{routing.mark} routing (table {routing.route_table})")
        else:
            check_ruleset(plan.ruleset)
            print("# nft -c: ruleset is valid")
    except CannotValidate as exc:
        if opts.apply:
            print(f"relay nft: cannot apply: {exc}", file=sys.stderr)
            return 1
        print(f"# not validated: {exc}")
        return 0
    except (PlumbingError, OSError, subprocess.SubprocessError) as exc:
        print(f"relay nft: {exc}", file=sys.stderr)
        return 1
    return 0
