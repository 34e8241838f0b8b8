"""The relay's network-namespace lab, on top of tests/netns.py's ``Topology``.

A threaded ``Origin`` that tells each client what its kernel saw (source and destination),
``RelayProcess`` (`relay run` in a namespace, flow log read back as JSON), ``three_hosts``
(client <-> relay <-> origin with the documentation-range addressing), ``relay_config``,
``start_relay`` (rules via `relay nft`, then the relay), ``syn_counters`` (origin-side nft
counters of SYNs inside/outside a slice) and ``running_lab`` (all of it, removed on exit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from netns import CommandFailed, Topology, require_netns

from relay.demo import read_line, serve_connection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ENGINES = ("uring", "epoll", "asyncio")  # every engine the network tests run the relay with


@dataclasses.dataclass(frozen=True)
class Seen:
    """What an origin connection saw: the peer (source) and local (destination) addresses."""

    peer: tuple[str, int]
    local: tuple[str, int]


def _addr(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    return str(sockaddr[0]), int(sockaddr[1])


class Origin:
    """'Internet' servers inside a namespace, on threads with blocking sockets, each connection
    served like the demo's origin (relay.demo.serve_connection): first
    ``SEEN <peer> <local>`` (what the origin's kernel says the connection is), then it reads to
    EOF and answers ``BYTES <n>``. ``seen`` records every connection in accept order.
    """

    def __init__(self, topo: Topology, ns: str, binds: Sequence[tuple[str, int]]) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        for host, port in binds:
            lsock = topo.new_socket(ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind((host, port))
            lsock.listen(512)
            self._listeners.append(lsock)
            threading.Thread(target=self._accept_loop, args=(lsock,), daemon=True).start()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # listener shut down by close()
            with self._lock:
                self.seen.append(Seen(_addr(conn.getpeername()), _addr(conn.getsockname())))
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            serve_connection(conn)
        except OSError:
            pass  # the client went away: what the test checks is on its side
        finally:
            with self._lock:
                self._conns.discard(conn)

    def close(self) -> None:
        for lsock in self._listeners:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            lsock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


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


class RelayProcess:
    """`python -m relay run -c FILE --workers 1` inside a namespace, JSON logs collected."""

    def __init__(self, topo: Topology, ns: str, config_path: str) -> None:
        self.path = config_path
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = topo.popen(
            ns, [sys.executable, "-m", "relay", "run", "-c", self.path, "--workers", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=REPO, env=env,
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True).start()

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            sink.append(line)
            if line.startswith("READY"):
                self._ready.set()

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the pumps read the last lines
                state = "exited" if self.proc.poll() is not None else "no READY line"
                raise RuntimeError(f"relay {state} ({self.proc.returncode}):\n{self.output()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.1)
        return code

    def flows(self) -> list[dict[str, Any]]:
        """Flow log records (logger relay.flow) so far."""
        out = []
        for line in list(self.stderr) + list(self.stdout):
            if '"relay.flow"' not in line:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("logger") == "relay.flow":
                    out.append(record)
        return out

    def flows_where(self, match: Callable[[dict[str, Any]], bool],
                    timeout: float = 5.0) -> list[dict[str, Any]]:
        """The flow records ``match`` accepts, once there is at least one."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.flows() if match(r)]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching flow log line:\n{self.output()}")
            time.sleep(0.05)
        return found

    def flows_of_client_port(self, port: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The flow records of the client connection from local port ``port``."""
        return self.flows_where(lambda r: split_hostport(str(r["client"]))[1] == port, timeout)

    def wait_flows(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.flows()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} flow log lines, got {len(found)}:\n{self.output()}"
                )
            time.sleep(0.05)
        return found


def split_hostport(text: str) -> tuple[str, int]:
    """ "1.2.3.4:80" / "[2001:db8::1]:80" (the flow log's format) -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


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


def relay_config(
    engine: str = "auto",
    slice_: tuple[int, int] = (40000, 40007),
    allow: Sequence[str] = ("198.51.100.0/24", "2001:db8:100::/48"),
    deny: Sequence[str] = (),
    connect_timeout: float = 2.0,
    egress4: str = Lab.egress4,
    egress6: str = Lab.egress6,
) -> str:
    """A relay config for the network tests: TPROXY listeners (IPv4 and IPv6, on loopback),
    the soft-unicast addresses with one slice, JSON logs (the tests read the flow log)."""
    lo, hi = slice_

    def toml_list(items: Sequence[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return f"""
[relay]
engine = "{engine}"
workers = 1
connect_timeout = {connect_timeout}
log_format = "json"
flow_log = true

[[listener]]
name = "tproxy4"
bind = "127.0.0.1:7000"
mode = "tproxy"

[[listener]]
name = "tproxy6"
bind = "[::1]:7000"
mode = "tproxy"

[[egress]]
address = "{egress4}"
ports = "{lo}-{hi}"

[[egress]]
address = "{egress6}"
ports = "{lo}-{hi}"

[policy]
allow = {toml_list(allow)}
deny = {toml_list(deny)}
"""


def relay_nft(topo: Topology, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`relay nft ARGS` (relay.ops.nft.main) as a process inside ``ns``."""
    code = (
        f"import sys; sys.path.insert(0, {REPO!r}); from relay.ops.nft import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    return topo.run(ns, [sys.executable, "-c", code, *args], check=False)


def write_config(workdir: str, name: str, text: str) -> str:
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_relay(
    topo: Topology, ns: str, config: str, workdir: str, ingress: str | None = None
) -> RelayProcess:
    """Apply the config's rules with relay.ops.nft in ``ns`` (TCP arriving on ``ingress`` is
    intercepted), then start the relay there and wait until it listens."""
    path = write_config(workdir, f"relay-{ns}", config)
    args = ["-c", path, "--apply"] + (["--ingress", ingress] if ingress else [])
    rules = relay_nft(topo, ns, *args)
    if rules.returncode != 0:
        raise CommandFailed(f"relay nft --apply failed in {ns}: {rules.stderr.strip()}")
    relay = RelayProcess(topo, ns, path)
    relay.wait_ready()
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
    workdir: str, config: str, binds: Sequence[tuple[str, int]], origin_nft: str = ""
) -> Iterator[LabEnv]:
    """``three_hosts``, an Origin on ``binds``, ``origin_nft`` loaded in the origin host, and
    the relay started with its rules (TCP intercepted on the client-facing interface).
    Everything is removed on exit."""
    require_netns()
    with Topology() as topo:
        lab = three_hosts(topo)
        if origin_nft:
            topo.nft(lab.origin, origin_nft)
        with Origin(topo, lab.origin, binds) as origin:
            relay = start_relay(topo, lab.relay, config, workdir, ingress=lab.relay_ingress)
            yield LabEnv(topo, lab, relay, origin)
