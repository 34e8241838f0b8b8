"""An installed relay keeps its fast core (issue 10, defects 1 and 2).

The path a packager or an operator takes: an sdist of this tree, a wheel built from that sdist
(so the sdist must carry every Cython source), the wheel installed into a fresh venv with
neither Cython nor setuptools in it, then the installed `relay`: the core imports, io_uring and
epoll are usable, and `relay run` (the venv's console script, run from outside the tree) relays
bytes with the core mapped from the venv, not from this checkout.

Speed and the network: relay itself builds without build isolation with this interpreter's
Cython, setuptools and python-liburing (an isolated build would compile python-liburing again,
~2 minutes).  The run-time dependencies come as wheels from `pip wheel` (python-liburing's wheel
from pip's cache, which `make setup` fills); when they cannot be had (no network, no cache) the
test skips with pip's reason instead of failing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from helpers import REPO_ROOT, Origin, echo, pattern

from relay.lab.process import READY_RE, ReadyProcess, parse_listeners, relay_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BUILD_TOOLS = ("Cython", "setuptools", "liburing", "build", "pip")
# Not copied into the tree the sdist is made from: what a build or a test run leaves behind.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".benchmarks",
    "*.so", "*.c", "_build_info.py", ".built")


def clean_env() -> dict[str, str]:
    """This environment without what would import relay from this tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RELAY_"))}
    env.pop("NOTIFY_SOCKET", None)
    return env


def run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def must(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, (
        f"{what} failed ({proc.returncode}): {' '.join(proc.args)}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def host_uring_unavailable() -> str | None:
    """Why this host cannot create an io_uring (None: it can), probed with python-liburing."""
    from liburing import io_uring, io_uring_queue_exit, io_uring_queue_init

    ring = io_uring()
    try:
        io_uring_queue_init(8, ring, 0)
    except OSError as exc:
        return f"io_uring_queue_init: {exc.strerror} (errno {exc.errno})"
    io_uring_queue_exit(ring)
    return None


def runtime_dependencies() -> list[str]:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with relay installed from a wheel built from an sdist of this tree."""
    missing = [m for m in BUILD_TOOLS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"building relay needs {', '.join(missing)} in {sys.executable} "
                    "(pip install '.[test]')")
    top = tmp_path_factory.mktemp("install")
    src, dist, wheels = top / "src", top / "dist", top / "wheels"
    shutil.copytree(REPO_ROOT, src, ignore=NOT_SOURCE)

    # The run-time dependencies first: the only step that may need the network.
    try:
        deps = run([sys.executable, "-m", "pip", "wheel", "-q", "--retries", "1", "--timeout",
                    "15", "--wheel-dir", str(wheels), *runtime_dependencies()], top, 600)
    except subprocess.TimeoutExpired:
        pytest.skip("pip wheel of the run-time dependencies took over 600 s (no pip cache?)")
    if deps.returncode != 0:
        tail = (deps.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"cannot get wheels of {runtime_dependencies()} (no network, no cache): "
                    f"{tail}")

    must(run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist),
              str(src)], top, 300), "python -m build --sdist")
    (sdist,) = dist.glob("relay-*.tar.gz")
    must(run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "--wheel-dir", str(wheels), str(sdist)], top, 600), "pip wheel <sdist>")

    env = top / "venv"
    must(run([sys.executable, "-m", "venv", str(env)], top, 120), "python -m venv")
    py = str(env / "bin" / "python")
    must(run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
              "relay"], top, 300), "pip install relay (from the wheelhouse)")
    # Build-time tools must not be needed at run time: setuptools goes too, Cython never came.
    must(run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], top, 120),
         "pip uninstall setuptools")
    return env


def test_sdist_ships_the_sources_not_the_build(venv: Path) -> None:
    (sdist,) = (venv.parent / "dist").glob("relay-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "setup.py", "pyproject.toml", "relay_ext/_core.pyx",
                   "relay_ext/_core.pxd", "relay_ext/_udp.pyx", "relay_ext/includes/system.pxi",
                   "relay_ext/includes/uring_version_check.h", "tests/helpers.py",
                   "tests/conftest.py"):
        assert needed in names, f"{sdist.name} lacks {needed}"
    generated = sorted(n for n in names if n.endswith((".c", ".so")) or "_build_info" in n)
    assert not generated, f"{sdist.name} ships generated files: {generated}"


def test_installed_core_imports_without_cython(venv: Path) -> None:
    py = str(venv / "bin" / "python")
    probe = (
        "import json, sys\n"
        "import relay_ext._core as core\n"
        "import relay_ext._flowfmt\n"
        "from relay_ext import _build_info\n"
        "from relay.engines import available\n"
        "print(json.dumps({'core': core.__file__, 'cython': core.CYTHON_VERSION,\n"
        "    'headers': core.LIBURING_HEADERS, 'info': _build_info.LIBURING_HEADERS,\n"
        "    'engines': available(),\n"
        "    'build_tools': sorted(m for m in sys.modules\n"
        "        if m.split('.')[0] in ('Cython', 'setuptools', 'pkg_resources'))}))\n"
    )
    for module in ("Cython", "setuptools"):
        absent = run([py, "-I", "-c", f"import {module}"], venv.parent, 60)
        assert absent.returncode != 0, f"{module} is importable in the runtime venv"
    got = json.loads(must(run([py, "-I", "-c", probe], venv.parent, 60), "the import probe"))
    assert got["core"].startswith(str(venv)), f"core imported from {got['core']}, not the venv"
    assert got["cython"] == importlib.metadata.version("Cython")
    assert got["headers"] == got["info"] == "2.6"
    assert got["build_tools"] == []
    assert got["engines"]["epoll"] is None, got["engines"]
    why_not = host_uring_unavailable()
    if why_not is None:
        assert got["engines"]["uring"] is None, got["engines"]
    else:
        assert got["engines"]["uring"], "uring reported usable on a host that refuses a ring"

    version = must(run([str(venv / "bin" / "relay"), "--version"], venv.parent, 60),
                   "relay --version")
    assert "epoll: usable" in version, version
    if why_not is not None:
        pytest.skip(f"io_uring unavailable on this host ({why_not}): epoll checked only")
    assert "uring: usable" in version, version


def test_installed_relay_run_relays_bytes(venv: Path) -> None:
    engine = "uring" if host_uring_unavailable() is None else "epoll"
    payload = pattern(512 * 1024, seed=10)
    with Origin(echo) as origin:
        config = venv.parent / "relay.toml"
        config.write_text(relay_config(origin.port, engine=engine))
        proc = ReadyProcess([str(venv / "bin" / "relay"), "run", "-c", str(config)],
                            name="installed relay", env={"PYTHONPATH": None})
        try:
            line = proc.wait_ready(60)
            m = READY_RE.match(line)
            assert m is not None and int(m.group(1)) == proc.pid, line
            address = parse_listeners(m.group(2))["main"]
            workers = proc.children()
            assert workers, f"no worker forked:\n{proc.output()}"
            for pid in workers:
                with open(f"/proc/{pid}/maps") as f:
                    cores = {ln.split()[-1] for ln in f if "relay_ext/_core" in ln}
                assert cores and all(p.startswith(str(venv)) for p in cores), (
                    f"worker {pid} maps the core from {cores or 'nowhere'}, not {venv}")

            with socket.create_connection(address, timeout=10) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while data := s.recv(65536):
                    got += data
            assert bytes(got) == payload, (
                f"{len(got)} of {len(payload)} bytes came back:\n{proc.output()}")
            assert proc.stop() == 0, proc.output()
        finally:
            proc.cleanup()
