"""Shared fixtures: engine parametrisation, origins, clients, a relay Server in a thread, and the
check that every test leaves file descriptors and pipes as it found them."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import (
    Origin,
    RunningRelay,
    connect,
    count_fds,
    count_pipes,
    describe_fds,
    relay_config,
    require_engine,
    wait_until,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("uring", "epoll", "asyncio")
CORE_ENGINES = ("uring", "epoll")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_nofile()


def _run_probe(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _exit_description(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = str(-proc.returncode)
        what = f"killed by {name}"
    else:
        what = f"exit status {proc.returncode}"
    lines = proc.stderr.strip().splitlines()
    return what + (f": {lines[-1]}" if lines else "")


def probe_engines() -> dict[str, str | None]:
    """``relay.engines.available()``, computed in a child process so that a core that crashes
    while starting (a segfault in a fresh build) fails the engine's tests (helpers.require_engine)
    instead of killing the whole test run."""
    proc = _run_probe("import json; from relay.engines import available; "
                      "print(json.dumps(available()))")
    if proc.returncode == 0:
        result: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    result = {"asyncio": None}
    for name in CORE_ENGINES:
        one = _run_probe("from relay.engines import create; "
                         f"loop, _ = create({name!r}, max_conns=4, max_pipes=1); loop.close()")
        result[name] = None if one.returncode == 0 else (
            f"starting a {name} loop failed in a child process ({_exit_description(one)})")
    return result


@pytest.fixture(scope="session")
def engine_availability() -> dict[str, str | None]:
    return probe_engines()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, engine_availability: dict[str, str | None]) -> str:
    return require_engine(request.param, engine_availability)


@pytest.fixture
def fd_baseline() -> Iterator[None]:
    """Set up before, torn down after everything a test opened: fds and pipes must be back."""
    fds, pipes = count_fds(), count_pipes()
    before = describe_fds()
    yield
    ok = wait_until(lambda: count_fds() == fds and count_pipes() == pipes, timeout=5.0)
    if not ok:
        now = describe_fds()
        extra = sorted(set(now) - set(before))
        missing = sorted(set(before) - set(now))
        pytest.fail(f"descriptors not back to baseline: fds {fds} -> {count_fds()}, "
                    f"pipes {pipes} -> {count_pipes()}; new: {extra[:20]}; gone: {missing[:20]}")


@pytest.fixture
def origin(fd_baseline: None) -> Iterator[Callable[..., Origin]]:
    """Factory: ``origin(handler)`` starts an Origin; all are closed after the test."""
    started: list[Origin] = []

    def start(handler: Callable[..., None], backlog: int = 4096,
              unix_path: str | None = None) -> Origin:
        o = Origin(handler, backlog, unix_path)
        started.append(o)
        return o

    try:
        yield start
    finally:
        for o in reversed(started):
            o.close()


@pytest.fixture
def client(fd_baseline: None) -> Iterator[Callable[..., socket.socket]]:
    """Factory: ``client(address, rcvbuf=None, nodelay=False)``; closed after the test."""
    socks: list[socket.socket] = []

    def make(address: tuple[str, int], **kwargs: Any) -> socket.socket:
        s = connect(address, **kwargs)
        socks.append(s)
        return s

    try:
        yield make
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def relay_server(engine: str, fd_baseline: None) -> Iterator[Callable[..., RunningRelay]]:
    """Factory: ``relay_server(backend, **relay_settings)`` runs a ``relay.serve.server.Server`` with
    one backend-mode listener on 127.0.0.1:0 in a thread; stopped after the test, then the
    ``fd_baseline`` check runs."""
    from relay.serve.server import Server

    servers: list[Any] = []

    def start(backend: tuple[str, int] | str, **relay_settings: Any) -> RunningRelay:
        srv = Server(relay_config(engine, backend, **relay_settings))
        servers.append(srv)
        srv.start_thread()
        return RunningRelay(srv, srv.bound_addresses()["main"], engine)

    try:
        yield start
    finally:
        for srv in servers:
            t0 = time.monotonic()
            srv.stop(drain_timeout=2.0)
            assert time.monotonic() - t0 < 10, "server took too long to stop"
