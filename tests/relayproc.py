"""The relay-process test harness: `relay run` in its own session, origins, clients.

Shared by the process tests (test_supervisor, test_reload, test_limits, test_metrics,
test_privdrop): `RelayProcess` starts `python -m relay run -c FILE` and waits for its READY line;
the `origins` and `relays` fixtures make origins and relay processes that are cleaned up (by pid)
after the test; `Transfer` and `ConnectionStream` are clients that check what came back. A test
module uses the fixtures by binding them to its own names (`origins = relayproc.origins`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_RE = re.compile(r"^READY pid=(\d+) listeners=(\S+)$")


# --------------------------------------------------------------------------- origins


class Origin(helpers.Origin):
    """helpers.Origin (127.0.0.1:0, a thread per client) running `handler(conn)` per client."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        super().__init__(lambda conn, _seen: handler(conn), backlog=1024)
        self.port: int = self.address[1]


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def hash_handler(conn: socket.socket) -> None:
    """Read to EOF, answer with the SHA-256 of everything read."""
    h = hashlib.sha256()
    while True:
        data = conn.recv(262144)
        if not data:
            break
        h.update(data)
    conn.sendall(h.digest())


def hold_handler(conn: socket.socket) -> None:
    """Echo, and keep the connection until the client closes."""
    echo_handler(conn)


# --------------------------------------------------------------------------- clients


def echo_roundtrip(addr: tuple[str, int], payload: bytes = b"ping", timeout: float = 5.0,
                   source: str | None = None) -> bool:
    """Connect, send `payload`, read it back whole; False on any failure."""
    try:
        with socket.create_connection(addr, timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = s.recv(65536)
                if not data:
                    return False
                got += data
            return got == payload
    except OSError:
        return False


class Transfer(threading.Thread):
    """Send `total` random bytes paced over `duration` s to a hash origin; check its digest."""

    def __init__(self, addr: tuple[str, int], total: int, duration: float) -> None:
        super().__init__(daemon=True)
        self.addr, self.total, self.duration = addr, total, duration
        self.connected = threading.Event()
        self.ok: bool | None = None
        self.error = ""

    def begin(self, timeout: float = 5.0) -> Transfer:
        """Start, and wait (up to `timeout` s) until connected; returns self."""
        self.start()
        self.connected.wait(timeout)
        return self

    def run(self) -> None:
        chunk_count = max(1, int(self.duration / 0.05))
        chunk = max(1, self.total // chunk_count)
        want = hashlib.sha256()
        try:
            with socket.create_connection(self.addr, timeout=30) as s:
                self.connected.set()
                sent = 0
                start = time.monotonic()
                i = 0
                while sent < self.total:
                    n = min(chunk, self.total - sent)
                    data = os.urandom(n)
                    s.sendall(data)
                    want.update(data)
                    sent += n
                    i += 1
                    delay = start + i * self.duration / chunk_count - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < 32:
                    data = s.recv(64)
                    if not data:
                        break
                    got += data
            self.ok = got == want.digest()
            if not self.ok:
                self.error = f"digest mismatch: got {len(got)} bytes"
        except OSError as exc:
            self.connected.set()
            self.ok = False
            self.error = f"{type(exc).__name__}: {exc}"


class ConnectionStream(threading.Thread):
    """New connections one after another (echo round trips) until stopped; counts failures."""

    def __init__(self, addr: tuple[str, int], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.addr, self.interval = addr, interval
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_event.is_set():
            n += 1
            payload = f"hello {n}".encode()
            try:
                with socket.create_connection(self.addr, timeout=5) as s:
                    s.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError("closed before the echo")
                        got += data
                    if got != payload:
                        raise ConnectionError("wrong echo")
                self.ok += 1
            except OSError as exc:
                self.failed += 1
                self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


# --------------------------------------------------------------------------- relay process


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def relay_config(backend_port: int, admin_socket: str, *, workers: int = 2,
                 extra_relay: str = "", extra: str = "", engine: str = "auto",
                 bind: str = "127.0.0.1:0", drain: float = 10.0) -> str:
    return f"""\
[relay]
engine = "{engine}"
workers = {workers}
admin_socket = "{admin_socket}"
drain_timeout = {drain}
flow_log = true
{extra_relay}

[[listener]]
name = "main"
bind = "{bind}"
backend = "127.0.0.1:{backend_port}"
{extra}
"""


class RelayProcess:
    """`python -m relay run -c FILE` in its own session; stdout parsed for READY."""

    def __init__(self, directory: Path, config: str, *, name: str = "relay",
                 prefix: list[str] | None = None,
                 env: dict[str, str | None] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.dir = directory
        self.config_path = directory / f"{name}.toml"
        self.config_path.write_text(config)
        self.stderr_path = directory / f"{name}.stderr"
        self.admin_socket = _admin_socket_of(config)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.pop("NOTIFY_SOCKET", None)
        for key, val in (env or {}).items():  # None removes a variable
            if val is None:
                full_env.pop(key, None)
            else:
                full_env[key] = val
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*(prefix or []), PYTHON, "-m", "relay", "run", "-c", str(self.config_path)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True, env=full_env, preexec_fn=preexec,
            )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self.listeners: dict[str, tuple[str, int]] = {}
        self.known_pids: set[int] = set()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("")

    def wait_ready(self, timeout: float = 30.0) -> dict[str, tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no READY line in {timeout}s; stderr:\n{self.stderr()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                raise AssertionError(
                    f"relay exited ({self.proc.returncode}) before READY; stderr:\n"
                    f"{self.stderr()}")
            m = READY_RE.match(line)
            if m:
                assert int(m.group(1)) == self.pid
                for item in m.group(2).split(","):
                    name, _, addr = item.partition("=")
                    host, _, port = addr.rpartition(":")
                    self.listeners[name] = (host.strip("[]"), int(port))
                self.remember_workers()
                return self.listeners

    def address(self, name: str = "main") -> tuple[str, int]:
        return self.listeners[name]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def admin(self, line: str, timeout: float = 10.0) -> str:
        from relay.ops.admin import request

        assert self.admin_socket, "config has no admin_socket"
        return request(self.admin_socket, line, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.admin("stats json"))

    def workers(self, state: str | None = "serving") -> list[dict[str, Any]]:
        return [w for w in self.stats()["workers"] if state is None or w["state"] == state]

    def children(self) -> set[int]:
        kids = _children(self.pid)
        self.known_pids |= kids
        return kids

    def remember_workers(self) -> set[int]:
        return self.children()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """SIGKILL the supervisor and every worker it was seen with, by pid."""
        self.children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        for pid in self.known_pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _admin_socket_of(config: str) -> str:
    m = re.search(r'^admin_socket\s*=\s*"([^"]*)"', config, re.M)
    return m.group(1) if m else ""


@pytest.fixture
def origins() -> Iterator[Callable[[Callable[[socket.socket], None]], Origin]]:
    made: list[Origin] = []

    def make(handler: Callable[[socket.socket], None]) -> Origin:
        o = Origin(handler)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


@pytest.fixture
def relays() -> Iterator[Callable[..., RelayProcess]]:
    """Factory of RelayProcess in a short private directory (unix socket paths stay short)."""
    made: list[RelayProcess] = []
    directory = Path(tempfile.mkdtemp(prefix="relay-test-"))

    def make(config_fn: Callable[[str], str], **kw: Any) -> RelayProcess:
        rp = RelayProcess(directory, config_fn(str(directory / f"admin{len(made)}.sock")),
                          name=f"relay{len(made)}", **kw)
        made.append(rp)
        return rp

    yield make
    for rp in made:
        rp.cleanup()
    shutil.rmtree(directory, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
