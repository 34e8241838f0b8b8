"""Start and stop the processes under test: READY lines, listening checks, port picking, cleanup."""

from __future__ import annotations

import collections
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from bench.drivers import procstat

NOFILE = 131072  # every process we start may hold 10,000 idle connections (2 fds each)


class StartError(Exception):
    """A process under test could not be started; the message is the reason shown in the table."""


def raise_nofile(limit: int = NOFILE) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def max_proxied_conns() -> int:
    """How many connections a proxy can hold (2 fds each, plus headroom) under the hard fd limit.

    Raising the hard limit needs CAP_SYS_RESOURCE, which this VM's root does not have (20000).
    """
    return max(0, (min(nofile_hard(), NOFILE) - 600) // 2)


def free_port(protocol: str = "tcp") -> int:
    """A port that was free a moment ago: only for tools that cannot bind port 0 and report it.

    Callers retry on EADDRINUSE (see Service.start_retrying).
    """
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_ports(protocol: str = "tcp") -> set[int]:
    """TCP ports in LISTEN state (UDP: bound, unconnected sockets) on 127.0.0.1 or 0.0.0.0,
    read from /proc/net/tcp or /proc/net/udp."""
    ports: set[int] = set()
    wanted = "0A" if protocol == "tcp" else "07"  # TCP_LISTEN; TCP_CLOSE = an unconnected UDP socket
    with open(f"/proc/net/{protocol}") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, state, remote = parts[1], parts[3], parts[2]
            if state != wanted or (protocol == "udp" and not remote.endswith(":0000")):
                continue
            addr, port = local.split(":")
            if addr in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


class Service:
    """One long-lived process under test (proxy or origin), its output kept in ring buffers."""

    def __init__(self, name: str, argv: Sequence[str], cwd: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = 0
        self.ready_line = ""
        self.protocol = "tcp"
        self.admin_socket = ""  # relay contenders: the admin socket for `stats json`
        self.control_port = 0  # the UDP sink: where its counters are read
        self.stdout: collections.deque[str] = collections.deque(maxlen=50)
        self.stderr: collections.deque[str] = collections.deque(maxlen=50)
        self._ready = threading.Event()
        raise_nofile()  # inherited by the child
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,  # own process group: stop() kills forks too
            text=True,
            errors="replace",
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream: IO[str] | None, sink: collections.deque[str], watch_ready: bool) -> None:
        assert stream is not None
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\n")
            sink.append(line)
            if watch_ready and not self._ready.is_set() and line.startswith("READY"):
                self.ready_line = line
                self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        return procstat.descendants(self.pid) if self.alive() else []

    def failure_reason(self) -> str:
        lines = [ln.strip() for ln in list(self.stderr) + list(self.stdout) if ln.strip()]
        tail = " / ".join(lines[-2:]) if lines else "no output"  # e.g. the problem, then "1 problem"
        code = self.proc.poll()
        status = f"exit {code}" if code is not None else "still running"
        return f"{status}: {tail}"[:300]

    def wait_ready_line(self, timeout: float) -> str:
        """Wait for a line starting with READY on stdout; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return self.ready_line
            if not self.alive():
                time.sleep(0.1)  # let the pumps collect the last lines
                raise StartError(f"{self.name} exited before READY ({self.failure_reason()})")
        raise StartError(f"{self.name}: no READY line within {timeout:.0f}s ({self.failure_reason()})")

    def wait_listening(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port in listening_ports(self.protocol):
                if not self.alive():
                    raise StartError(f"{self.name} exited ({self.failure_reason()})")
                return
            if not self.alive():
                time.sleep(0.1)
                raise StartError(f"{self.name} exited before listening ({self.failure_reason()})")
            time.sleep(0.05)
        raise StartError(f"{self.name}: port {port} not listening within {timeout:.0f}s")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group we created, then SIGKILL it if needed."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout)
        # Children that outlived the leader (socat's forks, relay workers) share its group.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_retrying(
    make: Callable[[int], Service], attempts: int = 3, timeout: float = 20.0, ready_line: bool = False,
    protocol: str = "tcp",
) -> Service:
    """Start a service on a picked port, retrying with a new port when the port was taken."""
    last = ""
    for _ in range(attempts):
        port = free_port(protocol)
        svc = make(port)
        svc.protocol = protocol
        try:
            if ready_line:
                svc.wait_ready_line(timeout)
            svc.wait_listening(port, timeout)
        except StartError as exc:
            svc.stop()
            last = str(exc)
            if "in use" in last.lower() or "bind" in last.lower():
                continue
            raise
        svc.port = port
        return svc
    raise StartError(last)


def parse_ready_port(line: str) -> int:
    """The last integer-looking port in a READY line ('READY 12345' or 'READY ... 127.0.0.1:12345')."""
    for token in reversed(line.replace(",", " ").split()):
        candidate = token.rsplit(":", 1)[-1].strip("()[]")
        if candidate.isdigit() and 0 < int(candidate) < 65536:
            return int(candidate)
    raise StartError(f"no port in READY line {line!r}")


def start_reporting_port(name: str, argv: Sequence[str], timeout: float = 20.0, cwd: str | None = None,
                         protocol: str = "tcp") -> Service:
    """Start a script that binds port 0 and prints 'READY <port>'."""
    svc = Service(name, argv, cwd=cwd)
    svc.protocol = protocol
    try:
        svc.port = parse_ready_port(svc.wait_ready_line(timeout))
        svc.wait_listening(svc.port, timeout)
    except StartError:
        svc.stop()
        raise
    return svc
