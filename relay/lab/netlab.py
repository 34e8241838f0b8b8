"""The relay's network lab: client <-> relay host <-> origin in three namespaces, shared by the
demo (part 2) and the network tests.

``three_hosts`` builds it (documentation-range addressing; the origin owns the "internet"
destinations, the relay host owns no egress address); ``syn_counters`` is an nft ruleset for the
origin counting SYNs from a slice vs anything else; ``start_relay`` applies the config's rules
with `relay nft` and starts `relay run` in the relay host; ``running_lab`` is all of it, removed
on exit. ``Flow`` / ``open_flow`` are a client connection speaking the origin protocol
(relay/lab/origins.py), ``connect_refused`` watches how a refused connection ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence

from relay.lab.netns import CommandFailed, Topology
from relay.lab.origins import Origin, Seen, read_line, split_hostport
from relay.lab.process import PYTHON, SOURCE_ROOT, RelayProcess, relay_config, write_config


class Flow:
    """A client connection to an Origin (possibly through the relay), held open."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        words = read_line(sock)
        if words[:1] != ["SEEN"]:
            raise ConnectionError(f"unexpected greeting {words!r}")
        self.seen = Seen(split_hostport(words[1]), split_hostport(words[2]))

    def finish(self, payload: bytes = b"x" * 4096) -> int:
        """Send ``payload``, half-close, return the byte count the origin reports."""
        try:
            self.sock.sendall(payload)
            self.sock.shutdown(socket.SHUT_WR)
            words = read_line(self.sock)
        finally:
            self.sock.close()
        if words[:1] != ["BYTES"]:
            raise ConnectionError(f"unexpected answer {words!r}")
        return int(words[1])


def open_flow(topo: Topology, ns: str, dest: tuple[str, int], timeout: float = 5.0) -> Flow:
    """Connect from ``ns`` and read the origin's greeting."""
    sock = topo.connect(ns, dest, timeout)
    try:
        return Flow(sock)
    except BaseException:
        sock.close()
        raise


@dataclasses.dataclass(frozen=True)
class Refusal:
    """How a connection the relay would not serve ended, seen by the client."""

    client_port: int
    outcome: str  # "reset" (RST), "eof" (clean close) or "data" (it answered: not refused)
    seconds: float  # from connect() to the end


def connect_refused(topo: Topology, ns: str, source: str, dest: tuple[str, int],
                    timeout: float = 5.0) -> Refusal:
    """Connect from ``ns`` (bound to ``source``, so the port is known even if connect fails)
    and wait for the end. With TPROXY the relay host completes the handshake before the relay
    decides, so a refusal shows up as an RST after connect (locally it may even beat connect()'s
    return) or as a close."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    with topo.new_socket(ns, family) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        port = sock.getsockname()[1]
        started = time.monotonic()
        try:
            sock.connect(dest)
            outcome = "eof" if sock.recv(100) == b"" else "data"
        except ConnectionResetError:
            outcome = "reset"
        return Refusal(port, outcome, time.monotonic() - started)


# -- the standard layout: client <-> relay <-> origin -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Lab:
    """Three hosts; the origin owns the 'internet' destinations; the relay owns no egress
    address (soft-unicast addresses are non-local there) and routes them towards the origin."""

    client: str
    relay: str
    origin: str
    relay_ingress: str  # the relay's interface facing the client
    client_address: str = "192.0.2.2"
    relay_client_side: str = "192.0.2.1"
    relay_client_side6: str = "2001:db8:1::1"
    egress4: str = "203.0.113.7"
    egress6: str = "2001:db8:7::7"
    dests4: tuple[str, ...] = ("198.51.100.10", "198.51.100.11", "198.51.100.12")
    dests6: tuple[str, ...] = ("2001:db8:100::10", "2001:db8:100::11")


def three_hosts(topo: Topology) -> Lab:
    client, relay, origin = topo.host("cli"), topo.host("rly"), topo.host("org")
    _c_if, ingress = topo.link(client, relay, ["192.0.2.2/28", "2001:db8:1::2/64"],
                               ["192.0.2.1/28", "2001:db8:1::1/64"])
    topo.link(relay, origin, ["192.0.2.17/28", "2001:db8:2::1/64"],
              ["192.0.2.18/28", "2001:db8:2::2/64"])
    topo.route(client, "default", "via", "192.0.2.1")
    topo.route(client, "default", "via", "2001:db8:1::1")
    # The client reaches the "internet" (and the metadata address, for the policy tests)
    # through the relay host, where TPROXY picks the connections up.
    topo.route(client, "169.254.169.254/32", "via", "192.0.2.1")
    # The relay closes upstream connections first as often as not, leaving its (egress address,
    # slice port, destination) in TIME_WAIT for 60 s; a slice of a few ports then runs dry per
    # destination. tcp_tw_reuse=1 lets connect() reuse such a port after 1 s (TCP timestamps
    # keep old segments apart): the setting a soft-unicast relay host needs.
    topo.sysctl(relay, "net.ipv4.tcp_tw_reuse", "1")
    topo.route(relay, "default", "via", "192.0.2.18")
    topo.route(relay, "default", "via", "2001:db8:2::2")
    # The soft-unicast addresses live behind the relay host: replies go back to it.
    topo.route(origin, "203.0.113.0/24", "via", "192.0.2.17")
    topo.route(origin, "2001:db8:7::/48", "via", "2001:db8:2::1")
    lab = Lab(client, relay, origin, ingress)
    for addr in (*lab.dests4, "169.254.169.254"):
        topo.addr(origin, "lo", f"{addr}/32")
    for addr in lab.dests6:
        topo.addr(origin, "lo", f"{addr}/128")
    return lab


def syn_counters(slices: Sequence[tuple[str, int, int]]) -> str:
    """nft ruleset for the origin: counter `in_slice` for SYNs from one of the (address, lo, hi)
    slices, counter `outside` for every other SYN."""
    rules = []
    for address, lo, hi in slices:
        fam = "ip6" if ":" in address else "ip"
        rules.append(
            f"        tcp flags & (syn | ack) == syn {fam} saddr {address} "
            f'tcp sport {lo}-{hi} counter name "in_slice" accept'
        )
    return (
        "table inet origin {\n"
        "    counter in_slice { }\n"
        "    counter outside { }\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        + "\n".join(rules) + "\n"
        '        tcp flags & (syn | ack) == syn counter name "outside"\n'
        "    }\n"
        "}\n"
    )


def lab_config(
    engine: str = "auto",
    slice_: tuple[int, int] = (40000, 40007),
    allow: Sequence[str] = ("198.51.100.0/24", "2001:db8:100::/48"),
    deny: Sequence[str] = (),
    connect_timeout: float = 2.0,
    egress4: str = Lab.egress4,
    egress6: str = Lab.egress6,
) -> str:
    """The relay of the lab (``relay_config``): TPROXY listeners (IPv4 and IPv6, on loopback
    port 7000), the soft-unicast addresses with one slice, JSON logs (the flow log is read
    back)."""
    ports = f"{slice_[0]}-{slice_[1]}"
    return relay_config(
        engine=engine, tproxy_port=7000, egress=[(egress4, ports), (egress6, ports)],
        allow=allow, deny=deny,
        settings={"connect_timeout": connect_timeout, "log_format": "json", "flow_log": True},
    )


def relay_nft(topo: Topology, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`relay nft ARGS` (relay.ops.nft.main) as a process inside ``ns``."""
    code = (
        f"import sys; sys.path.insert(0, {SOURCE_ROOT!r}); from relay.ops.nft import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    return topo.run(ns, [PYTHON, "-c", code, *args], check=False)


def relay_in(topo: Topology, ns: str, path: str | os.PathLike[str]) -> RelayProcess:
    """`relay run -c PATH --workers 1` inside ``ns``, ended with the topology (also when the
    caller fails)."""
    relay = RelayProcess(path, args=["--workers", "1"], netns=ns)
    topo.processes.append(relay.proc)
    return relay


def start_relay(
    topo: Topology, ns: str, config: str, workdir: str | os.PathLike[str],
    ingress: str | None = None,
) -> RelayProcess:
    """Apply the config's rules with relay.ops.nft in ``ns`` (TCP arriving on ``ingress`` is
    intercepted), then start the relay there and wait until it listens."""
    path = write_config(workdir, f"relay-{ns}", config)
    args = ["-c", str(path), "--apply"] + (["--ingress", ingress] if ingress else [])
    rules = relay_nft(topo, ns, *args)
    if rules.returncode != 0:
        raise CommandFailed(f"relay nft --apply failed in {ns}: {rules.stderr.strip()}")
    relay = relay_in(topo, ns, path)
    try:
        relay.wait_ready(20)
    except BaseException:
        relay.cleanup()
        raise
    return relay


@dataclasses.dataclass(frozen=True)
class LabEnv:
    """A running lab: hosts, the relay process in the relay host, the origin's servers."""

    topo: Topology
    lab: Lab
    relay: RelayProcess
    origin: Origin


@contextlib.contextmanager
def running_lab(
    workdir: str | os.PathLike[str], config: str, binds: Sequence[tuple[str, int]],
    origin_nft: str = "",
) -> Iterator[LabEnv]:
    """``three_hosts``, an Origin on ``binds``, ``origin_nft`` loaded in the origin host, and
    the relay started with its rules (TCP intercepted on the client-facing interface).
    Everything is removed on exit. Callers check ``netns_unavailable_reason()`` first."""
    with Topology() as topo:
        lab = three_hosts(topo)
        if origin_nft:
            topo.nft(lab.origin, origin_nft)
        with Origin(binds=binds, netns=lab.origin) as origin:
            relay = start_relay(topo, lab.relay, config, workdir, ingress=lab.relay_ingress)
            yield LabEnv(topo, lab, relay, origin)
