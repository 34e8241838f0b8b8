"""UDP in the lab: origins, the origin's nft counters, clients, and the relay's UDP config.

``UdpOrigin`` binds one socket per address (a UDP socket bound to 0.0.0.0 answers from the
host's primary address unless it uses IP_PKTINFO, so a client would see the wrong source) and
serves them all from one thread. Every datagram is recorded per (peer, local) in
``UdpOrigin.flows`` so a test can see what left the relay: the soft-unicast source and its port.
Modes:

- ``echo``: one reply per datagram, ``SEEN <peer> <local>\\n`` followed by the payload (what the
  origin's kernel saw: with a transparent relay, the soft-unicast source and the original
  destination). A DNS-style exchange is one query and this one answer.
- ``twice``: two replies per datagram (``SEEN ... #1`` and ``#2``): a flow with
  ``udp_responses = 1`` must deliver only the first.
- ``sink``: count, never answer (bursts).

``udp_counters`` is the origin's nft ruleset counting UDP from the slices vs anything else;
``udp_lab_config`` the relay's TOML (TPROXY UDP listeners next to the TCP ones);
``running_udp_lab`` the three-host lab of relay/lab/netlab.py with UDP origins and counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from relay.lab.netlab import Lab, start_relay, three_hosts
from relay.lab.netns import Topology
from relay.lab.origins import split_hostport
from relay.lab.process import RelayProcess, relay_config
from relay.serve.flowlog import format_addr

__all__ = [
    "UDP_TABLE",
    "UdpFlowSeen",
    "UdpOrigin",
    "UdpLabEnv",
    "UdpReply",
    "counters",
    "dnsmasq_argv",
    "dnsmasq_queries",
    "exchange",
    "parse_reply",
    "receive",
    "running_udp_lab",
    "udp_counters",
    "udp_lab_config",
]

Mode = Literal["echo", "twice", "sink"]
UDP_TABLE = "origin_udp"  # nft table (inet) of ``udp_counters`` in the origin host
MAX_DATAGRAM = 65535


@dataclasses.dataclass
class UdpFlowSeen:
    """Datagrams from one peer to one local address, as the origin's kernel delivered them."""

    peer: tuple[str, int]
    local: tuple[str, int]
    datagrams: int = 0
    nbytes: int = 0
    first: float = 0.0
    last: float = 0.0


class UdpOrigin:
    """UDP sockets on ``binds`` ((host, port), port 0 for any), inside ``netns`` when given,
    served by one thread. ``addresses`` are the bound addresses in ``binds`` order."""

    def __init__(self, binds: Sequence[tuple[str, int]], *, mode: Mode = "echo",
                 netns: str | None = None, rcvbuf: int = 0) -> None:
        self.mode = mode
        self.flows: dict[tuple[tuple[str, int], tuple[str, int]], UdpFlowSeen] = {}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._wake_r, self._wake_w = os.pipe()
        try:
            for host, port in binds:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                if netns is None:
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                else:
                    from relay.lab.netns import inside

                    with inside(netns):  # the socket belongs to the namespace it was made in
                        sock = socket.socket(family, socket.SOCK_DGRAM)
                self._socks.append(sock)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.bind((host, port))
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        self.addresses = [_addr(s.getsockname()) for s in self._socks]
        self._thread = threading.Thread(target=self._serve, name="udp-origin", daemon=True)
        self._thread.start()

    def __enter__(self) -> UdpOrigin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        by_fd = {s.fileno(): s for s in self._socks}
        while True:
            readable, _, _ = select.select([self._wake_r, *by_fd], [], [])
            if self._wake_r in readable:
                return
            for fd in readable:
                sock = by_fd[fd]
                local = _addr(sock.getsockname())
                while True:
                    try:
                        data, peer_raw = sock.recvfrom(MAX_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # an ICMP error queued on the socket: nothing to record
                    peer = _addr(peer_raw)
                    self._record(peer, local, len(data))
                    self._answer(sock, peer_raw, peer, local, data)

    def _record(self, peer: tuple[str, int], local: tuple[str, int], size: int) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self.flows.get((peer, local))
            if seen is None:
                seen = self.flows[(peer, local)] = UdpFlowSeen(peer, local, first=now)
            seen.datagrams += 1
            seen.nbytes += size
            seen.last = now

    def _answer(self, sock: socket.socket, peer_raw: Any, peer: tuple[str, int],
                local: tuple[str, int], data: bytes) -> None:
        if self.mode == "sink":
            return
        head = f"SEEN {format_addr(peer)} {format_addr(local)}"
        replies = [head] if self.mode == "echo" else [f"{head} #1", f"{head} #2"]
        for line in replies:
            with contextlib.suppress(OSError):  # a full queue drops, as UDP does
                sock.sendto(line.encode() + b"\n" + data, peer_raw)

    def seen(self) -> list[UdpFlowSeen]:
        """Every (peer, local) pair so far (copies)."""
        with self._lock:
            return [dataclasses.replace(s) for s in self.flows.values()]

    def seen_from(self, peer: tuple[str, int]) -> list[UdpFlowSeen]:
        return [s for s in self.seen() if s.peer == peer]

    def datagrams_to(self, local: tuple[str, int]) -> int:
        return sum(s.datagrams for s in self.seen() if s.local == local)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(5)
        for sock in self._socks:
            sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _addr(sockaddr: Any) -> tuple[str, int]:
    return str(sockaddr[0]), int(sockaddr[1])


# -- clients ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UdpReply:
    """One answer of an echo origin, as the client got it."""

    source: tuple[str, int]  # where the reply came from (the client's kernel says)
    origin_peer: tuple[str, int]  # the source the origin saw: the relay's egress address:port
    origin_local: tuple[str, int]  # the destination the origin saw
    tag: str  # "" (echo) or "#1" / "#2" (twice)
    payload: bytes


def parse_reply(data: bytes, source: Any) -> UdpReply:
    head, _, payload = data.partition(b"\n")
    words = head.decode().split()
    if words[:1] != ["SEEN"] or len(words) < 3:
        raise ValueError(f"not an origin answer: {data[:80]!r}")
    return UdpReply(_addr(source), split_hostport(words[1]), split_hostport(words[2]),
                    words[3] if len(words) > 3 else "", payload)


def exchange(sock: socket.socket, dest: tuple[str, int], payload: bytes = b"query",
             timeout: float = 2.0) -> UdpReply | None:
    """Send one datagram to ``dest`` and wait for one answer; None when none comes."""
    sock.sendto(payload, dest)
    return receive(sock, timeout)


def receive(sock: socket.socket, timeout: float = 2.0) -> UdpReply | None:
    """The next answer on ``sock`` within ``timeout`` s, or None."""
    if not select.select([sock], [], [], timeout)[0]:
        return None
    data, source = sock.recvfrom(MAX_DATAGRAM)
    return parse_reply(data, source)


# -- the origin's counters and the relay's config ---------------------------------------------


def udp_counters(slices: Sequence[tuple[str, int, int]]) -> str:
    """nft ruleset for the origin: counter ``in_slice`` for UDP from one of the (address, lo,
    hi) slices, counter ``outside`` for every other UDP datagram (table inet ``UDP_TABLE``)."""
    rules = []
    for address, lo, hi in slices:
        fam = "ip6" if ":" in address else "ip"
        rules.append(f'        {fam} saddr {address} udp sport {lo}-{hi} counter name "in_slice" '
                     "accept")
    return (
        f"table inet {UDP_TABLE} {{\n"
        "    counter in_slice { }\n"
        "    counter outside { }\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        + "\n".join(rules) + "\n"
        '        meta l4proto udp counter name "outside"\n'
        "    }\n"
        "}\n"
    )


def dnsmasq_argv(listen: Sequence[str], answers: dict[str, Sequence[str]]) -> list[str]:
    """`dnsmasq` in the foreground, serving only ``answers`` (name -> addresses) on the
    ``listen`` addresses (one socket each: it answers from the address it was asked), port 53,
    logging every query with its source address and port to stdout."""
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", "--port=53", "--user=root", "--pid-file=",
            "--log-queries=extra", "--log-facility=-"]
    argv += [f"--listen-address={a}" for a in listen]
    argv += [f"--address=/{name}/{a}" for name, addrs in answers.items() for a in addrs]
    return argv


_DNSMASQ_QUERY = re.compile(r" query\[(\w+)\] (\S+) from (\S+)")
_DNSMASQ_SOURCE = re.compile(r"\d+ (\S+)/(\d+) query\[")


def dnsmasq_queries(log: str) -> list[tuple[str, str, tuple[str, int]]]:
    """(type, name, (source address, port)) of every query in a ``dnsmasq_argv`` log."""
    out = []
    for line in log.splitlines():
        query, source = _DNSMASQ_QUERY.search(line), _DNSMASQ_SOURCE.search(line)
        if query and source:
            out.append((query.group(1), query.group(2), (source.group(1), int(source.group(2)))))
    return out


def udp_lab_config(
    slice_: tuple[int, int] = (40000, 40007),
    *,
    idle_timeout: float = 60.0,
    max_flows: int | None = None,
    responses: int = 0,
    allow: Sequence[str] = ("198.51.100.0/24", "2001:db8:100::/48"),
    deny: Sequence[str] = (),
    egress4: str = "203.0.113.7",
    egress6: str = "2001:db8:7::7",
    port: int = 7000,
    backend: tuple[str, str, int] | None = None,
    admin_socket: str = "",
    settings: dict[str, Any] | None = None,
) -> str:
    """The lab relay (``relay_config``) with TPROXY listeners for TCP ("tproxy4", "tproxy6")
    and UDP ("udp4", "udp6") on loopback ``port``, the soft-unicast slices, JSON logs.
    ``backend`` = (bind, backend, responses) adds a UDP backend-mode listener "udpbackend"."""
    ports = f"{slice_[0]}-{slice_[1]}"
    relay: dict[str, Any] = {"log_format": "json", "flow_log": True,
                             "udp_idle_timeout": idle_timeout}
    if max_flows is not None:
        relay["udp_max_flows"] = max_flows
    relay.update(settings or {})
    extra = []
    for name, host in (("udp4", "127.0.0.1"), ("udp6", "[::1]")):
        extra += ["[[listener]]", f'name = "{name}"', f'bind = "{host}:{port}"',
                  'mode = "tproxy"', 'protocol = "udp"', f"udp_responses = {responses}", ""]
    if backend is not None:
        bind, target, backend_responses = backend
        extra += ["[[listener]]", 'name = "udpbackend"', f'bind = "{bind}"',
                  f'backend = "{target}"', 'protocol = "udp"',
                  f"udp_responses = {backend_responses}", ""]
    return relay_config(tproxy_port=port, egress=[(egress4, ports), (egress6, ports)],
                        allow=allow, deny=deny, admin_socket=admin_socket, settings=relay,
                        extra="\n".join(extra))


def lab_slices(lab: Lab, slice_: tuple[int, int]) -> list[tuple[str, int, int]]:
    """The (address, lo, hi) slices of ``udp_lab_config`` for ``udp_counters``."""
    return [(lab.egress4, *slice_), (lab.egress6, *slice_)]


def counters(topo: Topology, ns: str) -> dict[str, int]:
    """Packets counted by ``udp_counters`` in ``ns``: {"in_slice": n, "outside": n}."""
    return {name: topo.nft_counter(ns, "inet", UDP_TABLE, name)[0]
            for name in ("in_slice", "outside")}


@dataclasses.dataclass(frozen=True)
class UdpLabEnv:
    """A running lab: hosts, the relay in the relay host, UDP origins by mode."""

    topo: Topology
    lab: Lab
    relay: RelayProcess
    origins: dict[Mode, UdpOrigin]

    def counters(self) -> dict[str, int]:
        return counters(self.topo, self.lab.origin)

    def client(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """A new UDP socket in the client host, bound to an ephemeral port."""
        sock = self.topo.new_socket(self.lab.client, family, socket.SOCK_DGRAM)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return sock


@contextlib.contextmanager
def running_udp_lab(
    workdir: str | os.PathLike[str], config: str,
    binds: dict[Mode, Sequence[tuple[str, int]]],
    slice_: tuple[int, int] = (40000, 40007),
) -> Iterator[UdpLabEnv]:
    """``three_hosts``; ``udp_counters`` for the slices in the origin host; a ``UdpOrigin`` per
    mode on its binds there; the relay started with its rules (TCP and UDP intercepted on the
    client-facing interface). Everything is removed on exit. Callers check
    ``netns_unavailable_reason()`` first."""
    with Topology() as topo, contextlib.ExitStack() as stack:
        lab = three_hosts(topo)
        topo.nft(lab.origin, udp_counters(lab_slices(lab, slice_)))
        origins = {mode: stack.enter_context(UdpOrigin(b, mode=mode, netns=lab.origin))
                   for mode, b in binds.items()}
        relay = start_relay(topo, lab.relay, config, workdir, ingress=lab.relay_ingress)
        yield UdpLabEnv(topo, lab, relay, origins)
