"""Network namespaces as hosts: namespaces, veth links, addresses, routes, nft, processes.

A ``Topology`` owns every namespace and process it creates and removes them on exit, even when
the body fails.  Namespaces are named ``<prefix><pid>-<n><role>`` (``rlyt-`` for the tests,
``rlyd-`` for the demo) so two runs never collide and a leftover is easy to attribute.  Only pids
this harness started are ever signalled.

    reason = netns_unavailable_reason()   # None, or why this cannot work here (probed)
    with Topology() as topo:
        client, relay = topo.host("c"), topo.host("r")
        topo.link(client, relay, ["192.0.2.2/24"], ["192.0.2.1/24"])
        topo.run(client, ["ip", "route", "add", "default", "via", "192.0.2.1"])
        proc = topo.popen(relay, [sys.executable, "-m", "relay", "run", "-c", path])
        sock = topo.connect(client, ("192.0.2.1", 80))   # a socket that lives in `client`

The standard client <-> relay <-> origin lab built on top of this is relay/lab/netlab.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from types import TracebackType

PREFIX = f"rlyt-{os.getpid()}-"  # the tests' namespaces; the demo passes its own
_topology_ids = itertools.count()
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the body with *this thread* in network namespace ``ns``.

    A socket belongs to the namespace it was created in for its whole life, whatever thread
    later uses it; switching only the calling thread (setns affects one task) lets a test hold
    client and origin sockets of several namespaces in one process, without subprocesses.
    """
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{ns}", "rb") as there:
        _setns(there.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None when namespaces, veth and nftables work here, else why not (probed, not guessed)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb",
                   check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        nft = subprocess.run(
            ["ip", "netns", "exec", probe, "nft", "-f", "-"],
            input="table inet probe {\n chain c {\n  type filter hook prerouting priority mangle;\n"
            "  meta l4proto tcp socket transparent 1 accept\n }\n}\n",
            capture_output=True, text=True, timeout=10,
        )
        if nft.returncode != 0:
            return f"nftables (with the socket match) does not work: {nft.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class CommandFailed(RuntimeError):
    """A command inside a namespace exited non-zero; the message carries its output."""


class Topology:
    """Namespaces, links and processes of one test, all removed by ``close()``."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.tag = f"{prefix}{next(_topology_ids)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._links = itertools.count()

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hosts and links ------------------------------------------------------------------

    def host(self, role: str, forwarding: bool = False) -> str:
        """Create a namespace with loopback up; ``forwarding`` makes it a router (v4 and v6)."""
        name = f"{self.tag}{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        self.run(name, ["ip", "link", "set", "lo", "up"])
        # IPv6 duplicate address detection would hold new addresses "tentative" (unusable) for
        # about a second; test links are point-to-point and addresses are unique by design.
        self.sysctl(name, "net.ipv6.conf.all.accept_dad", "0")
        self.sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
        if forwarding:
            self.sysctl(name, "net.ipv4.ip_forward", "1")
            self.sysctl(name, "net.ipv6.conf.all.forwarding", "1")
        return name

    def link(
        self,
        ns_a: str,
        ns_b: str,
        addrs_a: Sequence[str] = (),
        addrs_b: Sequence[str] = (),
    ) -> tuple[str, str]:
        """A veth pair between two namespaces, up, with addresses; returns the two names.

        The ends are created directly inside their namespaces, so their names only need to be
        unique per namespace and never touch the host's interface list.
        """
        n = next(self._links)
        if_a, if_b = f"veth{n}a", f"veth{n}b"
        self.run(ns_a, ["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b,
                        "netns", ns_b])
        for ns, ifname, addrs in ((ns_a, if_a, addrs_a), (ns_b, if_b, addrs_b)):
            for addr in addrs:
                self.addr(ns, ifname, addr)
            self.run(ns, ["ip", "link", "set", ifname, "up"])
        return if_a, if_b

    def addr(self, ns: str, ifname: str, cidr: str) -> None:
        family = "-6" if ":" in cidr else "-4"
        extra = ["nodad"] if family == "-6" else []
        self.run(ns, ["ip", family, "addr", "add", cidr, "dev", ifname, *extra])

    def route(self, ns: str, *spec: str) -> None:
        """``ip route add`` (or ``ip -6 route add`` when the spec holds a ':') in ``ns``."""
        family = "-6" if any(":" in part for part in spec) else "-4"
        self.run(ns, ["ip", family, "route", "add", *spec])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def nft(self, ns: str, ruleset: str) -> None:
        """Load an nftables ruleset (text for ``nft -f -``) in ``ns``."""
        self.run(ns, ["nft", "-f", "-"], stdin=ruleset)

    def nft_counter(self, ns: str, family: str, table: str, name: str) -> tuple[int, int]:
        """(packets, bytes) of a named nft counter object."""
        out = self.run(ns, ["nft", "list", "counter", family, table, name]).stdout.split()
        return int(out[out.index("packets") + 1]), int(out[out.index("bytes") + 1])

    def new_socket(
        self, ns: str, family: socket.AddressFamily = socket.AF_INET,
        kind: socket.SocketKind = socket.SOCK_STREAM,
    ) -> socket.socket:
        """A new socket that lives in ``ns`` (usable from any thread of this process)."""
        with inside(ns):
            return socket.socket(family, kind)

    def connect(self, ns: str, dest: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP connection from ``ns`` to ``dest`` (blocking socket with ``timeout``)."""
        sock = self.new_socket(ns, socket.AF_INET6 if ":" in dest[0] else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect(dest)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- commands and processes -------------------------------------------------------------

    def run(
        self,
        ns: str,
        cmd: Sequence[str],
        check: bool = True,
        timeout: float = 20.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` and wait; CommandFailed (with its output) if it fails."""
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *cmd],
            input=stdin, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(
                f"in {ns}: {' '.join(cmd)} exited {proc.returncode}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def popen(self, ns: str, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside ``ns`` in its own session; it is ended by ``close()``.

        `ip netns exec` enters the namespace and then execs the command, so the pid we hold is
        the command's own pid and its session id.
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 5.0) -> int:
        """Signal a process we started (its whole session), wait, SIGKILL if it lingers."""
        if proc.poll() is None:
            self._signal_session(proc, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_session(proc, signal.SIGKILL)
                proc.wait(5)
        # Children of a forking server (workers) may outlive it in its session.
        self._signal_session(proc, signal.SIGKILL)
        return proc.returncode

    @staticmethod
    def _signal_session(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the session (and group) we created for it
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """End our processes, then delete our namespaces; never raises for what's already gone."""
        for proc in reversed(self.processes):
            try:
                self.stop(proc, timeout=3.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        for ns in reversed(self.namespaces):
            # Anything still inside a namespace this topology created was started by this test
            # (a `run` that was cut short, a grandchild): end it by pid so the namespace, its
            # sockets and its addresses really go away.
            listed = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in listed:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(
            os.path.exists(f"/run/netns/{ns}") for ns in self.namespaces
        ):
            time.sleep(0.05)
        self.namespaces.clear()
