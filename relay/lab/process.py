"""Processes of the lab: `relay run` and the helper processes around it.

``ReadyProcess`` starts a command in its own session (inside a network namespace when asked),
collects its stdout and stderr lines, and waits for the first stdout line starting with READY.
``stop()`` ends it and everything it forked (its session, and every pid seen as its child),
never anything else. ``RelayProcess`` is `python -m relay run -c FILE`: it parses the READY line
(pid and listener addresses), talks to the admin socket, and reads the JSON flow log back.
``relay_config`` writes the TOML the tests and the demo start it with.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from relay.lab.origins import split_hostport

# The source tree this package was imported from: child processes import the same relay.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])
PYTHON = sys.executable
READY_RE = re.compile(r"^READY pid=(\d+) listeners=(\S+)$")


class NotReady(RuntimeError):
    """The process exited, or printed no READY line in time; the message carries its output."""


def children_of(pid: int) -> set[int]:
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


def child_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This environment with PYTHONPATH at the source tree and no systemd NOTIFY_SOCKET;
    ``env`` overrides it (None removes a variable)."""
    full = dict(os.environ)
    full["PYTHONPATH"] = SOURCE_ROOT
    full.pop("NOTIFY_SOCKET", None)
    for key, val in (env or {}).items():
        if val is None:
            full.pop(key, None)
        else:
            full[key] = val
    return full


class _Child:
    """``argv`` in its own session (in network namespace ``netns`` when given: `ip netns exec`
    execs the command, so the pid held here is the command's own)."""

    def __init__(self, argv: Sequence[str], *, name: str = "process", netns: str | None = None,
                 env: Mapping[str, str | None] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.name = name
        self.lines: queue.Queue[str] = queue.Queue()  # stdout, "" at its end
        self.out: list[str] = []
        self.err: list[str] = []
        self.ready = ""
        self.known_pids: set[int] = set()
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [*prefix, *argv], cwd=SOURCE_ROOT, env=child_env(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=preexec,
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream: IO[bytes], is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            (self.out if is_stdout else self.err).append(line)
            if is_stdout:
                self.lines.put(line)
        if is_stdout:
            self.lines.put("")

    def stderr(self) -> str:
        return "\n".join(self.err)

    def output(self) -> str:
        return "\n".join(self.out + self.err)

    def _wait_ready_line(self, timeout: float) -> str:
        """The READY line; NotReady (with the output) if the process exits or is silent."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotReady(f"{self.name}: no READY line in {timeout}s:\n{self.output()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                time.sleep(0.1)  # let the stderr pump read the last lines
                raise NotReady(f"{self.name} exited ({self.proc.returncode}) before READY:\n"
                               f"{self.output()}")
            if line.startswith("READY"):
                self.ready = line
                return line

    def children(self) -> set[int]:
        kids = children_of(self.pid)
        self.known_pids |= kids
        return kids

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.1)  # let the pumps read the last lines
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Send ``sig`` to the session, wait up to ``timeout`` s, then SIGKILL the session and
        every pid seen as a child (forked workers may have left the session's group)."""
        self.children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in self.known_pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        """Kill at once (SIGKILL, no drain): the end of a test."""
        self.stop(signal.SIGKILL, timeout=0)


class ReadyProcess(_Child):
    """A helper process (an origin, a baseline proxy) that prints READY once it serves."""

    def wait_ready(self, timeout: float = 30.0) -> str:
        return self._wait_ready_line(timeout)


class RelayProcess(_Child):
    """`python -m relay run -c CONFIG_PATH [ARGS]`; ``wait_ready()`` returns its listeners."""

    def __init__(self, config_path: str | os.PathLike[str], *, args: Sequence[str] = (),
                 name: str = "relay", netns: str | None = None,
                 prefix: Sequence[str] = (), env: Mapping[str, str | None] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.config_path = Path(config_path)
        self.admin_socket = admin_socket_of(self.config_path.read_text())
        self.listeners: dict[str, tuple[str, int]] = {}
        super().__init__([*prefix, PYTHON, "-m", "relay", "run", "-c", str(self.config_path),
                          *args], name=name, netns=netns, env=env, preexec=preexec)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, tuple[str, int]]:
        """Wait for `READY pid=N listeners=...`; the listeners' bound addresses by name."""
        line = self._wait_ready_line(timeout)
        m = READY_RE.match(line)
        if m is None or int(m.group(1)) != self.pid:
            raise NotReady(f"{self.name}: unexpected READY line {line!r} (pid {self.pid})")
        self.listeners = parse_listeners(m.group(2))
        self.children()
        return self.listeners

    def address(self, name: str = "main") -> tuple[str, int]:
        return self.listeners[name]

    # -- the admin socket ----------------------------------------------------------------------

    def admin(self, line: str, timeout: float = 10.0) -> str:
        from relay.ops.admin import request

        if not self.admin_socket:
            raise RuntimeError(f"{self.config_path} has no admin_socket")
        return request(self.admin_socket, line, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self.admin("stats json"))
        return stats

    def workers(self, state: str | None = "serving") -> list[dict[str, Any]]:
        return [w for w in self.stats()["workers"] if state is None or w["state"] == state]

    def remember_workers(self) -> set[int]:
        return self.children()

    # -- the flow log (log_format = "json") ------------------------------------------------------

    def flows(self) -> list[dict[str, Any]]:
        """Flow log records (logger relay.flow) so far."""
        return flow_records(list(self.err) + list(self.out))

    def flows_where(self, match: Callable[[dict[str, Any]], bool],
                    timeout: float = 5.0) -> list[dict[str, Any]]:
        """The flow records ``match`` accepts, once there is at least one."""
        deadline = time.monotonic() + timeout
        while not (found := [r for r in self.flows() if match(r)]):
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching flow log line:\n{self.output()}")
            time.sleep(0.05)
        return found

    def flows_of_client_port(self, port: int, dest: tuple[str, int] | None = None,
                             timeout: float = 5.0) -> list[dict[str, Any]]:
        """The flow records of the client connection from local port ``port`` (to ``dest``:
        connect() gives different destinations the same ephemeral port, so a client port alone
        is unique only per destination)."""
        def match(r: dict[str, Any]) -> bool:
            if split_hostport(str(r["client"]))[1] != port:
                return False
            return dest is None or split_hostport(str(r["dest"])) == (dest[0], dest[1])

        return self.flows_where(match, timeout)

    def wait_flows(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(found := self.flows()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} flow log lines, got {len(found)}:\n{self.output()}")
            time.sleep(0.05)
        return found


def parse_listeners(text: str) -> dict[str, tuple[str, int]]:
    """'main=127.0.0.1:4000,b=[::1]:5' (READY's listeners=) -> {"main": ("127.0.0.1", 4000)...}"""
    out = {}
    for item in text.split(","):
        name, _, addr = item.partition("=")
        out[name] = split_hostport(addr)
    return out


def admin_socket_of(config: str) -> str:
    m = re.search(r'^admin_socket\s*=\s*"([^"]*)"', config, re.M)
    return m.group(1) if m else ""


def flow_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON flow log records (logger relay.flow) among log lines."""
    out = []
    for line in lines:
        if '"relay.flow"' not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("logger") == "relay.flow":
                out.append(record)
    return out


def write_config(directory: str | os.PathLike[str], name: str, text: str) -> Path:
    path = Path(directory) / f"{name}.toml"
    path.write_text(text)
    return path


# -- the config -------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def relay_config(
    backend: int | str | tuple[str, int] | None = None,
    *,
    engine: str = "auto",
    workers: int = 1,
    bind: str = "127.0.0.1:0",
    admin_socket: str = "",
    drain: float | None = None,
    tproxy_port: int | None = None,
    egress: Sequence[tuple[str, str]] = (),
    allow: Sequence[str] | None = None,
    deny: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    extra_relay: str = "",
    extra: str = "",
) -> str:
    """The TOML of a relay for the tests and the demo (``relay.config.loads`` makes it a
    ``Config`` for an in-process ``Server``).

    ``backend`` (a port on 127.0.0.1, (host, port), "HOST:PORT" or a unix socket path) makes
    listener "main" on ``bind`` in backend mode; ``tproxy_port`` makes TPROXY listeners
    "tproxy4" (127.0.0.1) and "tproxy6" ([::1]) on that port; ``egress`` are (address,
    "lo-hi") soft-unicast slices; ``allow``/``deny`` the destination policy; ``settings`` any
    other [relay] keys (``extra_relay``: the same as TOML lines); ``extra`` is TOML appended
    as is (more listeners ...).
    """
    relay: dict[str, Any] = {"engine": engine, "workers": workers}
    if admin_socket:
        relay["admin_socket"] = admin_socket
    if drain is not None:
        relay["drain_timeout"] = drain
    relay.update(settings or {})
    parts = ["[relay]", *(f"{k} = {_toml_value(v)}" for k, v in relay.items()), extra_relay, ""]
    if backend is not None:
        if isinstance(backend, int):
            backend = f"127.0.0.1:{backend}"
        elif isinstance(backend, tuple):
            backend = f"{backend[0]}:{backend[1]}"
        parts += ["[[listener]]", 'name = "main"', f"bind = {_toml_value(bind)}",
                  f"backend = {_toml_value(backend)}", ""]
    if tproxy_port is not None:
        for name, host in (("tproxy4", "127.0.0.1"), ("tproxy6", "[::1]")):
            parts += ["[[listener]]", f"name = {_toml_value(name)}",
                      f'bind = "{host}:{tproxy_port}"', 'mode = "tproxy"', ""]
    for address, ports in egress:
        parts += ["[[egress]]", f"address = {_toml_value(address)}",
                  f"ports = {_toml_value(ports)}", ""]
    if allow is not None or deny:
        parts += ["[policy]"]
        if allow is not None:
            parts += [f"allow = {_toml_value(list(allow))}"]
        parts += [f"deny = {_toml_value(list(deny))}", ""]
    return "\n".join(parts) + extra
