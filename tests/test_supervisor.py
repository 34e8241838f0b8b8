"""Supervisor lifecycle with real `relay run` processes: READY, stats, signals, crashes, hangs.

The helpers at the top (RelayProcess, origins, transfer clients) are shared by test_reload,
test_limits, test_metrics and test_privdrop.
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

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_RE = re.compile(r"^READY pid=(\d+) listeners=(\S+)$")


# --------------------------------------------------------------------------- origins


class Origin:
    """A threaded TCP server on 127.0.0.1:0 with blocking sockets; `handler(conn)` per client."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self._handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.port = self.address[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()


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
                 env: dict[str, str | None] | None = None) -> None:
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
                start_new_session=True, env=full_env,
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
        from relay.admin import request

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


# --------------------------------------------------------------------------- tests


def _has_ring(pid: int) -> bool:
    """True when `pid` holds an io_uring instance (an anon inode named [io_uring])."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                return True
    return False


@pytest.mark.timeout(60)
def test_ready_line_workers_and_stats(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2))
    listeners = rp.wait_ready()
    assert set(listeners) == {"main"}
    assert echo_roundtrip(rp.address(), b"x" * 100_000)
    snap = wait_for(lambda: (s := rp.stats()) and len(s["workers"]) == 2 and s, 10, "2 workers")
    pids = {w["pid"] for w in snap["workers"]}
    assert pids == rp.children(), "the workers stats names are the supervisor's children"
    assert all(w["state"] == "serving" and w["engine"] for w in snap["workers"])
    assert snap["listeners"]["main"].endswith(f":{listeners['main'][1]}")
    # The supervisor never loads the core nor owns a ring; the workers do.
    assert not _has_ring(rp.pid) and "relay_ext" not in Path(f"/proc/{rp.pid}/maps").read_text()
    if "uring" in {w["engine"] for w in snap["workers"]}:
        assert all(_has_ring(p) for p in pids)

    text = subprocess.run(
        [PYTHON, "-m", "relay", "stats", "--socket", rp.admin_socket],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )
    assert text.returncode == 0, text.stderr
    assert "workers: 2" in text.stdout and "listeners: main=" in text.stdout
    js = subprocess.run(
        [PYTHON, "-m", "relay", "stats", "--json", "--socket", rp.admin_socket],
        cwd=ROOT, capture_output=True, text=True, timeout=20,
    )
    assert js.returncode == 0, js.stderr
    assert {w["pid"] for w in json.loads(js.stdout)["workers"]} == pids


@pytest.mark.timeout(90)
def test_worker_sigkill_during_transfers(origins: Any, relays: Any) -> None:
    origin = origins(hash_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2))
    rp.wait_ready()
    transfers = [Transfer(rp.address(), 4 << 20, 3.0) for _ in range(8)]
    for t in transfers:
        t.start()
        time.sleep(0.02)

    def flows() -> list[dict[str, Any]] | None:
        ws = rp.workers()
        total = sum(w["stats"].get("flows_open", 0) for w in ws)
        return ws if len(ws) == 2 and total == len(transfers) else None

    workers = wait_for(flows, 10, "every transfer open in the workers' stats")
    busy = [w for w in workers if w["stats"]["flows_open"] > 0]
    # Kill a worker with transfers when both have some, else the idle one: either way the
    # transfers of the surviving worker must complete intact.
    victim = min(busy, key=lambda w: w["stats"]["flows_open"]) if len(busy) == 2 else next(
        w for w in workers if w["stats"]["flows_open"] == 0)
    lost = victim["stats"]["flows_open"]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in transfers:
        t.join(30)
    ok = [t for t in transfers if t.ok]
    failed = [t for t in transfers if not t.ok]
    assert len(ok) == len(transfers) - lost, [t.error for t in failed]
    assert not any("digest mismatch" in t.error for t in failed), [t.error for t in failed]
    # The slot comes back with a new process.
    new = wait_for(lambda: (ws := rp.workers()) and len(ws) == 2
                   and victim["pid"] not in {w["pid"] for w in ws} and ws, 15, "a replacement")
    assert victim["pid"] not in rp.children()
    assert rp.stats()["restarts"] >= 1
    assert len(new) == 2
    assert transfer_ok(rp.address())
    assert "killed by SIGKILL while serving" in rp.stderr()


def transfer_ok(addr: tuple[str, int]) -> bool:
    """One short checked transfer, in this thread."""
    t = Transfer(addr, 1 << 20, 0.1)
    t.run()
    return bool(t.ok)


@pytest.mark.timeout(60)
def test_sigterm_drains_transfers_then_exits(origins: Any, relays: Any) -> None:
    origin = origins(hash_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2))
    rp.wait_ready()
    workers = rp.children()
    transfers = [Transfer(rp.address(), 2 << 20, 2.0) for _ in range(3)]
    for t in transfers:
        t.start()
        t.connected.wait(5)
    time.sleep(0.3)
    started = time.monotonic()
    rp.signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):  # stopped accepting, for every worker at once
        socket.create_connection(rp.address(), timeout=2).close()
    assert rp.wait_exit(20) == 0, rp.stderr()
    elapsed = time.monotonic() - started
    for t in transfers:
        t.join(10)
    assert all(t.ok for t in transfers), [t.error for t in transfers]
    assert elapsed < 10, f"drain took {elapsed:.1f}s for 2 s transfers"
    assert not any(alive(p) for p in workers)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_fast_stop(origins: Any, relays: Any, sig: int) -> None:
    origin = origins(hash_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2))
    rp.wait_ready()
    workers = rp.children()
    t = Transfer(rp.address(), 8 << 20, 8.0)
    t.start()
    t.connected.wait(5)
    time.sleep(0.3)
    started = time.monotonic()
    rp.signal(sig)
    assert rp.wait_exit(10) == 0, rp.stderr()
    assert time.monotonic() - started < 4
    t.join(10)
    assert t.ok is False, "a fast stop must cut the 8 s transfer"
    assert not any(alive(p) for p in workers)


@pytest.mark.timeout(60)
def test_default_is_one_worker_per_cpu(origins: Any, relays: Any) -> None:
    cpus = len(os.sched_getaffinity(0))
    if cpus > 16:
        pytest.skip(f"{cpus} CPUs: too many workers for a quick test")
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=0))
    rp.wait_ready()
    assert len(rp.children()) == cpus


@pytest.mark.timeout(60)
def test_hung_worker_is_replaced(origins: Any, relays: Any) -> None:
    heartbeat_timeout = 2.5
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2,
                                         extra_relay=f"heartbeat_timeout = {heartbeat_timeout}"))
    rp.wait_ready()
    victim = min(rp.children())
    t0 = time.monotonic()
    os.kill(victim, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
    wait_for(lambda: not alive(victim), heartbeat_timeout + 10, "the hung worker to be killed")
    assert time.monotonic() - t0 >= heartbeat_timeout - 1.1   # not before its heartbeat lapsed
    wait_for(lambda: len(rp.children()) == 2, 10, "a replacement worker")
    assert "hung: no heartbeat" in rp.stderr()
    assert echo_roundtrip(rp.address())


@pytest.mark.timeout(60)
def test_crash_restarts_back_off(origins: Any, relays: Any) -> None:
    """A slot that keeps dying is restarted at once, then after 1 s, then 2 s."""
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=1))
    rp.wait_ready()
    times = []
    for _ in range(3):
        pid = wait_for(lambda: (ws := rp.workers()) and ws[0]["pid"], 10, "a serving worker")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda p=pid: (ws := rp.workers()) and ws[0]["pid"] != p, 15, "a restart")
        times.append(time.monotonic() - killed)
    assert times[0] < 1.0, times
    assert times[1] >= 0.9, times
    assert times[2] >= 1.9, times
    assert rp.stderr().count("restarting slot 0 of generation 1 in") == 2


@pytest.mark.timeout(60)
def test_worker_boot_failure_stops_the_service(origins: Any) -> None:
    """Workers that cannot boot stop the service with the reason, after one attempt each."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the supervisor as nobody")
    origin = origins(echo_handler)
    # Supervisor as `nobody`, config asking workers to become root: the worker's setuid fails.
    directory = Path(tempfile.mkdtemp(prefix="relay-boot-"))
    try:
        os.chmod(directory, 0o755)
        config = relay_config(origin.port, "", workers=2, extra_relay='user = "root"')
        rp = RelayProcess(directory, config,
                          prefix=["setpriv", "--reuid=nobody", "--regid=nogroup",
                                  "--clear-groups"])
        try:
            code = rp.wait_exit(30)
            err = rp.stderr()
            assert code == 1, err
            assert "worker failed to boot" in err and "cannot switch to user 'root'" in err, err
            assert 1 <= err.count("started (generation 1") <= 2, err
            assert "READY" not in "".join(iter_lines(rp))
        finally:
            rp.cleanup()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def iter_lines(rp: RelayProcess) -> Iterator[str]:
    while True:
        try:
            yield rp.lines.get_nowait()
        except queue.Empty:
            return


@pytest.mark.timeout(60)
def test_sd_notify_ready_and_stopping(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-notify-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        path = str(directory / "notify")
        notify.bind(path)
        notify.settimeout(20)
        rp = relays(lambda adm: relay_config(origin.port, adm, workers=1),
                    env={"NOTIFY_SOCKET": path})
        rp.wait_ready()
        first = notify.recv(4096).decode()
        assert "READY=1" in first and f"MAINPID={rp.pid}" in first
        rp.signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert rp.wait_exit(20) == 0
    finally:
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(60)
def test_sigusr1_reopens_log_file(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    directory = Path(tempfile.mkdtemp(prefix="relay-logs-"))
    try:
        log_file = directory / "relay.log"
        rp = relays(lambda adm: relay_config(origin.port, adm, workers=1,
                                             extra_relay=f'log_file = "{log_file}"'))
        rp.wait_ready()
        assert echo_roundtrip(rp.address())
        wait_for(lambda: "flow" in log_file.read_text(), 5, "a flow line in the log file")
        rotated = directory / "relay.log.1"
        log_file.rename(rotated)
        rp.signal(signal.SIGUSR1)
        wait_for(log_file.exists, 5, "the log file to be reopened")
        wait_for(lambda: "log files reopened" in log_file.read_text(), 5, "supervisor line")
        time.sleep(0.3)  # the workers got their SIGUSR1 with the supervisor's
        assert echo_roundtrip(rp.address())
        wait_for(lambda: "flow" in log_file.read_text(), 5, "a worker's flow line, new file")
        assert "log files reopened" not in rotated.read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(30)
def test_gen_systemd_unit_is_hardened_and_allows_io_uring(tmp_path: Path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(relay_config(9, "/run/relay/admin.sock"))
    out = subprocess.run([PYTHON, "-m", "relay", "gen", "systemd", "-c", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    unit = out.stdout
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert f"-m relay run --config {cfg}" in settings["ExecStart"][0]
    filters = " ".join(settings["SystemCallFilter"]).split()
    assert not any(f.startswith("~") and "io_uring" in f for f in filters)
    assert {"io_uring_setup", "io_uring_enter", "io_uring_register"} <= set(filters)
    assert "ProtectSystem" in settings and "CapabilityBoundingSet" in settings
    assert settings["TimeoutStopSec"] == [str(int(10.0) + 15)]
    analyze = shutil.which("systemd-analyze")
    if analyze:
        unit_path = tmp_path / "relay.service"
        unit_path.write_text(unit)
        res = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True,
                             text=True, timeout=30)
        assert "Unknown key" not in res.stderr and "Invalid" not in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_workers_leave_when_the_supervisor_is_killed(origins: Any, relays: Any) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed supervisor leaves no orphan worker serving forever."""
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, adm, workers=2))
    rp.wait_ready()
    workers = rp.children()
    assert len(workers) == 2
    rp.signal(signal.SIGKILL)
    rp.wait_exit(10)
    wait_for(lambda: not any(alive(p) for p in workers), 10, "the orphaned workers to exit")
