"""Who runs: the relay engines, the competitors and the direct baseline, and how each starts."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.competitors import haproxy, socat

ROOT = str(Path(__file__).resolve().parent.parent)
DIRECT = "direct"
HAPROXY = "haproxy"
STREAMS = "asyncio-streams"
RELAY_ENGINES = ("uring", "epoll", "asyncio")


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "relay" | "competitor" | "baseline"
    available: Callable[[], str | None]  # None, or why it is skipped
    # start(backend_port, tmpdir) -> running service; None for the direct baseline.
    start: Callable[[int, Path], procs.Service | None]
    idle: bool = False  # also measured by the idle-connections driver


def _python_script(name: str, module: str) -> Callable[[int, Path], procs.Service | None]:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        argv = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend_port}"]
        return procs.start_reporting_port(name, argv, cwd=ROOT)

    return start


def _uvloop_available() -> str | None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "uvloop not installed"
    return None


def _start_socat(backend_port: int, tmp: Path) -> procs.Service:
    return procs.start_retrying(lambda port: procs.Service("socat", socat.argv(port, ("127.0.0.1", backend_port))))


def _start_haproxy(backend_port: int, tmp: Path) -> procs.Service:
    def make(port: int) -> procs.Service:
        nofile = min(procs.nofile_hard(), procs.NOFILE)
        cfg = haproxy.write_config(tmp, port, ("127.0.0.1", backend_port), nofile)
        return procs.Service("haproxy", haproxy.argv(cfg))

    return procs.start_retrying(make)


# How the relay engines were started in this batch: "cli" (python -m relay run) or "server"
# (bench.relay_launch, through relay.serve.server.Server) when the CLI is not usable yet.
RELAY_MODE: dict[str, str] = {}


# Competitors do not log per connection, so neither does the relay here.
RELAY_ARGS = ("--workers", "1", "--no-flow-log", "--drain-timeout", "1")


def _relay_cli(engine: str, backend_port: int) -> procs.Service:
    """`relay run` on port 0; its READY line ('READY pid=.. listeners=name=127.0.0.1:PORT') names the port."""
    argv = [
        sys.executable, "-m", "relay", "run", "--listen", "127.0.0.1:0",
        "--backend", f"127.0.0.1:{backend_port}", "--engine", engine, *RELAY_ARGS,
    ]
    return procs.start_reporting_port(f"relay-{engine}", argv, timeout=30.0, cwd=ROOT)


def _relay_server(engine: str, backend_port: int) -> procs.Service:
    argv = [sys.executable, "-m", "bench.relay_launch", "--engine", engine, "--backend", f"127.0.0.1:{backend_port}"]
    return procs.start_reporting_port(f"relay-{engine}", argv, timeout=30.0, cwd=ROOT)


def _relay(engine: str) -> Callable[[int, Path], procs.Service | None]:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        mode = RELAY_MODE.get(engine)
        if mode == "server":
            return _relay_server(engine, backend_port)
        try:
            svc = _relay_cli(engine, backend_port)
        except procs.StartError as cli_error:
            if mode == "cli":
                raise
            try:
                svc = _relay_server(engine, backend_port)
            except procs.StartError as server_error:
                raise procs.StartError(f"relay run: {cli_error}; Server(): {server_error}") from None
            RELAY_MODE[engine] = "server"
            return svc
        RELAY_MODE[engine] = "cli"
        return svc

    return start


def _always() -> str | None:
    return None


ALL: tuple[Contender, ...] = (
    Contender(DIRECT, "baseline", _always, lambda port, tmp: None),
    *(Contender(f"relay-{e}", "relay", _always, _relay(e), idle=True) for e in RELAY_ENGINES),
    Contender(HAPROXY, "competitor", haproxy.available, _start_haproxy, idle=True),
    Contender("uvloop-protocol", "competitor", _uvloop_available,
              _python_script("uvloop-protocol", "bench.competitors.uvloop_protocol")),
    Contender("asyncio-protocol", "competitor", _always,
              _python_script("asyncio-protocol", "bench.competitors.asyncio_protocol")),
    Contender(STREAMS, "competitor", _always, _python_script(STREAMS, "bench.competitors.asyncio_streams")),
    Contender("socat", "competitor", socat.available, _start_socat),
)


def select(only: list[str] | None) -> list[Contender]:
    """Contenders named in `only` (engine names like 'uring' mean 'relay-uring'); all if None."""
    if not only:
        return list(ALL)
    aliases = {"uvloop": "uvloop-protocol", "streams": STREAMS, **{e: f"relay-{e}" for e in RELAY_ENGINES}}
    wanted = {aliases.get(n, n) for n in only}
    unknown = wanted - {c.name for c in ALL}
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(c.name for c in ALL)}")
    return [c for c in ALL if c.name in wanted]
