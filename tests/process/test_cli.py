"""The `relay` command line: exit codes, one-line usage errors, check/config/version output, the
run hand-off to the supervisor with real processes, and log-line escaping (relay.ops.log)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO_ROOT, relay_cli

from relay import cli, config
from relay.ops import log as relay_log

ROOT = REPO_ROOT
GOOD = """
[relay]
workers = 1
maxconn = 100

[[listener]]
name = "main"
bind = "127.0.0.1:0"
backend = "127.0.0.1:9"
"""


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture(autouse=True)
def _no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)


# --------------------------------------------------------------------------- usage errors

USAGE_ERRORS = [
    (["run"], "relay run: error: give -c FILE, or --listen HOST:PORT --backend HOST:PORT"),
    (
        ["run", "--listen", "127.0.0.1:99999", "--backend", "127.0.0.1:1"],
        "argument --listen: invalid HOST:PORT '127.0.0.1:99999': port 99999 is outside 0-65535",
    ),
    (
        ["run", "--listen", "::1:80", "--backend", "127.0.0.1:1"],
        "argument --listen: invalid HOST:PORT '::1:80': IPv6 addresses need brackets",
    ),
    (
        ["run", "--listen", "127.0.0.1:1", "--backend", "nowhere"],
        "argument --backend: invalid HOST:PORT 'nowhere'",
    ),
    (["run", "--listen", "127.0.0.1:1"], "--listen in mode backend needs --backend HOST:PORT"),
    (["run", "--backend", "127.0.0.1:1"], "--backend needs --listen HOST:PORT"),
    (
        ["run", "--listen", "127.0.0.1:1", "--mode", "tproxy", "--backend", "127.0.0.1:2"],
        "--backend is only used in mode backend, not tproxy",
    ),
    (["run", "-c", "x.toml", "--listen", "127.0.0.1:1"], "cannot be combined with -c"),
    (
        ["run", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--workers", "-1"],
        "argument --workers: invalid value '-1': expected int >= 0",
    ),
    (
        ["run", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--workers", "many"],
        "argument --workers: invalid value 'many': expected an integer",
    ),
    (
        ["run", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--engine", "turbo"],
        "argument --engine: invalid choice: 'turbo'",
    ),
    (
        ["run", "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2", "--connect-timeout", "0"],
        "argument --connect-timeout: invalid value '0': expected float >= 0.001",
    ),
    (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["config"], "the following arguments are required: WHAT"),
    (["nft"], "the following arguments are required: -c/--config"),
    (["nft", "-c", "x", "--apply", "--remove"], "not allowed with argument"),
    (["bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS)
def test_bad_arguments_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err


def test_bad_arguments_as_a_process() -> None:
    res = relay_cli("run", "--listen", "1.2.3.4:0", "--backend", "1.2.3.4:70000")
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "relay run: error: argument --backend: invalid HOST:PORT '1.2.3.4:70000': "
        "port 70000 is outside 1-65535 (see `relay run --help`)"
    ]


def test_no_command_prints_help_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--workers", "--engine", "--maxconn", "--connect-timeout", "--no-splice"):
        assert flag in out
    assert "RELAY_MAXCONN" in out


# --------------------------------------------------------------------------- check


def test_check_good(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-c", str(good_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{good_file}: OK: 1 listener(s): main (127.0.0.1:0, backend)")


def test_check_reports_every_problem_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[relay]\nworkers = -2\n[[listener]]\nbind = '127.0.0.1:1'\nmode = 'tproxy'\n"
        "backend = '127.0.0.1:2'\n[[egress]]\naddress = '10.0.0.1'\nports = '5-4'\n"
    )
    res = relay_cli("check", "-c", str(path))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines == [
        f"{path}: relay.workers: -2: expected int >= 0",
        f'{path}: listener[0].backend: "127.0.0.1:2": only used in mode "backend", not "tproxy"',
        f'{path}: egress[0].ports: "5-4": range 5-4 is reversed (low end must be <= high end)',
        "relay check: 3 problems",
    ]
    assert res.stdout == ""


def test_check_missing_file_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "-c", str(tmp_path / "absent.toml")]) == 1
    assert "absent.toml: cannot read: No such file or directory" in capsys.readouterr().err


def test_semantic_flag_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"]
    assert cli.main([*argv, "--metrics-listen", "nowhere"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        '--metrics-listen: relay.metrics_listen: "nowhere": expected "HOST:PORT" '
        '(IPv6 as "[::1]:PORT")',
        "relay check: 1 problem",
    ]


def test_check_blames_the_environment(
    good_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_ENGINE", "warp")
    assert cli.main(["check", "-c", str(good_file)]) == 1
    err = capsys.readouterr().err
    assert 'RELAY_ENGINE: relay.engine: "warp": expected one of auto, uring, epoll, asyncio' in err


# --------------------------------------------------------------------------- config dump/schema


def test_config_dump_precedence(
    good_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_MAXCONN", "777")
    monkeypatch.setenv("RELAY_WORKERS", "5")
    assert cli.main(["config", "dump", "-c", str(good_file), "--workers", "3", "--no-splice"]) == 0
    out = capsys.readouterr().out
    cfg = config.loads(out, environ={})
    assert cfg.relay.maxconn == 777  # environment over file (100)
    assert cfg.relay.workers == 3  # command line over environment (5) and file (1)
    assert cfg.relay.splice is False
    assert cfg.relay.idle_timeout == 300.0  # defaults spelled out
    assert "idle_timeout = 300.0" in out


def test_config_dump_round_trips_through_load(good_file: Path, tmp_path: Path) -> None:
    res = relay_cli("config", "dump", "-c", str(good_file))
    assert res.returncode == 0, res.stderr
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(res.stdout)
    assert config.load(dumped, environ={}) == config.load(good_file, environ={})


def test_config_dump_without_file_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "dump", "--engine", "epoll"]) == 0
    cfg = config.loads(capsys.readouterr().out, require_listener=False)
    assert cfg.relay.engine == "epoll" and cfg.listener == ()
    assert cli.main(["config", "dump", "--listen", "[::1]:7000", "--backend", "unix:/run/b"]) == 0
    cfg = config.loads(capsys.readouterr().out)
    assert cfg.listener[0].bind_address == ("::1", 7000)
    assert cfg.listener[0].backend_address == "/run/b"


def test_config_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$ref"] == "#/$defs/Config"
    assert "maxconn" in schema["$defs"]["RelaySettings"]["properties"]


# --------------------------------------------------------------------------- version


def test_version_as_a_process() -> None:
    from relay import __version__

    res = relay_cli("--version")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"relay {__version__}\n")
    assert f"kernel: {os.uname().release}" in out
    assert "liburing: python-liburing" in out and "cython: " in out
    for engine in ("uring", "epoll", "asyncio"):
        assert f"    {engine}: " in out


def test_version_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"relay", "python", "cython", "liburing", "kernel", "engines"}
    assert info["engines"]["asyncio"] == "usable"  # pure Python: always there


# --------------------------------------------------------------------------- dispatch


def test_gen_systemd_dispatch(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["gen", "systemd", "--config-path", str(good_file)]) == 0
    out = capsys.readouterr().out
    assert "[Service]" in out and str(good_file) in out


def test_stats_without_a_running_relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "admin.sock"
    assert cli.main(["stats", "--socket", str(sock)]) == 1
    assert capsys.readouterr().err.startswith("relay stats: ")


def test_admin_socket_from_config(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reload", "-c", str(good_file)]) == 2
    assert "sets no relay.admin_socket; give --socket PATH" in capsys.readouterr().err


def test_demo_options_pass_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--help"]) == 0
    assert "--mib" in capsys.readouterr().out  # relay.demo's own parser answered


def test_nft_dispatch(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft not installed")
    rc = cli.main(["nft", "-c", str(good_file)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "table inet relay" in out


# --------------------------------------------------------------------------- run


class EchoServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def _start_relay(args: list[str], preexec: object = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,  # type: ignore[arg-type]
    )


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("READY"):
            return line
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"relay never printed READY (exit {proc.returncode}): {err[-2000:]}")


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def _listen_address(ready: str) -> tuple[str, int]:
    # READY pid=N listeners=listener0=127.0.0.1:PORT (IPv6: [::1]:PORT)
    listeners = ready.split("listeners=", 1)[1].split()[0]
    host, port = listeners.split(",")[0].split("=", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("host", "listen", "engine"),
    [("127.0.0.1", "127.0.0.1:0", "asyncio"), ("::1", "[::1]:0", "auto")],
    ids=["ipv4-asyncio", "ipv6-auto"],
)
def test_run_listen_backend_relays_bytes(host: str, listen: str, engine: str) -> None:
    if ":" in host and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    echo = EchoServer(host)
    port = echo.address[1]
    backend = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proc = _start_relay(
        [
            "--listen",
            listen,
            "--backend",
            backend,
            "--workers",
            "1",
            "--engine",
            engine,
            "--maxconn",
            "64",
        ]
    )
    try:
        address = _listen_address(_wait_ready(proc))
        with socket.create_connection(address, timeout=10) as c:
            payload = os.urandom(100_000)
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := c.recv(65536):
                got += chunk
        assert bytes(got) == payload
    finally:
        err = _stop(proc)
        echo.close()
    assert proc.returncode == 0, err


def test_run_raises_open_file_limit_and_says_so(echo: EchoServer) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"hard open-file limit {hard} is too low to show a raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    host, port = echo.address
    proc = _start_relay(
        [
            "--listen",
            "127.0.0.1:0",
            "--backend",
            f"{host}:{port}",
            "--workers",
            "1",
            "--engine",
            "asyncio",
            "--maxconn",
            "1000",
        ],
        preexec=low_soft_limit,
    )
    try:
        _wait_ready(proc)
        limit = _nofile_of(proc.pid)
    finally:
        err = _stop(proc)
    needed = 2 * 1000 + 2 * 250 + 1 + 64
    assert limit >= needed, err
    assert "raised the soft open-file limit 256 -> " in err


def _nofile_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc/PID/limits")


def test_stats_and_reload_reach_a_running_relay(tmp_path: Path, echo: EchoServer) -> None:
    sock = tmp_path / "admin.sock"
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[relay]\nworkers = 1\nengine = "asyncio"\nadmin_socket = "{sock}"\n'
        f'[[listener]]\nname = "main"\nbind = "127.0.0.1:0"\n'
        f'backend = "127.0.0.1:{echo.address[1]}"\n'
    )
    proc = _start_relay(["-c", str(path)])
    try:
        _wait_ready(proc)
        stats = relay_cli("stats", "--json", "-c", str(path))
        assert stats.returncode == 0, stats.stderr
        assert isinstance(json.loads(stats.stdout), dict)
        reload = relay_cli("reload", "--socket", str(sock))
        assert reload.returncode == 0, reload.stderr
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err


def test_admin_socket_from_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if os.path.exists(cli.SYSTEM_CONFIG):
        pytest.skip(f"{cli.SYSTEM_CONFIG} exists and would be used first")
    assert cli.main(["stats"]) == 2
    assert "no admin socket: give --socket PATH or -c FILE" in capsys.readouterr().err
    monkeypatch.setenv("RELAY_ADMIN_SOCKET", str(tmp_path / "gone.sock"))
    assert cli.main(["stats"]) == 1  # tried the socket the environment names
    assert "relay stats: " in capsys.readouterr().err


def test_run_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD + "\n[relay.extra]\n")
    res = relay_cli("run", "-c", str(path))
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1] == "relay run: 1 problem"
    assert "READY" not in res.stdout


# --------------------------------------------------------------------------- logging

NASTY = "evil\nFAKE 2026 INFO injected\r\x1b[31mred\x00\u2028end"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "relay.log"
    yield path
    relay_log.reset_logging()


def test_text_log_one_line_per_event(log_file: Path) -> None:
    relay_log.setup_logging("text", "info", str(log_file))
    lg = logging.getLogger("relay.test")
    lg.info("client said %s", NASTY, extra={"peer": NASTY, "port": 80})
    try:
        raise ValueError("multi\nline")
    except ValueError:
        lg.exception("failed")
    lg.debug("not shown at info")
    relay_log.flush()
    lines = log_file.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 3, lines
    first = lines[0]
    assert " INFO relay.test[" in first
    assert "evil\\nFAKE 2026 INFO injected\\r\\x1b[31mred\\x00\\u2028end" in first
    assert 'peer="evil\\nFAKE' in first and " port=80" in first
    assert not any(ch in first for ch in "\r\x1b\x00\u2028")
    assert "ERROR relay.test" in lines[1] and 'exc="Traceback' in lines[1]
    assert "ValueError: multi\\nline" in lines[1]


def test_json_log_lines_parse_back(log_file: Path) -> None:
    relay_log.setup_logging("json", "debug", str(log_file))
    logging.getLogger("relay.test").warning("x %s", NASTY, extra={"peer": NASTY})
    relay_log.flush()
    raw = log_file.read_text()
    assert raw.count("\n") == 1
    record = json.loads(raw)
    assert record["message"] == "x " + NASTY  # escaped on the wire, exact once decoded
    assert record["peer"] == NASTY
    assert record["level"] == "WARNING" and record["logger"] == "relay.test"
    assert record["pid"] == os.getpid() and record["time"].endswith("Z")
    assert not any(ch in raw[:-1] for ch in "\r\x1b\x00\u2028\n")


def test_reopen_after_rotation(log_file: Path) -> None:
    relay_log.setup_logging("text", "info", str(log_file))
    lg = logging.getLogger("relay.test")
    lg.info("before")
    rotated = log_file.with_suffix(".1")
    log_file.rename(rotated)
    lg.info("still old file")
    assert relay_log.reopen() is True
    lg.info("after")
    relay_log.flush()
    assert "before" in rotated.read_text() and "still old file" in rotated.read_text()
    assert "after" in log_file.read_text() and "before" not in log_file.read_text()


def test_log_every_rate_limits(log_file: Path) -> None:
    relay_log.setup_logging("text", "info", str(log_file))
    lg = logging.getLogger("relay.test")
    key = f"accept paused {os.getpid()} {time.monotonic()}"
    results = [relay_log.log_every(lg, key, 0.3, "accept paused %d", i) for i in range(5)]
    assert results == [True, False, False, False, False]
    time.sleep(0.35)
    assert relay_log.log_every(lg, key, 0.3, "accept paused %d", 99)
    relay_log.flush()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert "accept paused 0" in lines[0]
    assert "accept paused 99" in lines[1] and "suppressed=4" in lines[1]


def test_bad_log_settings() -> None:
    with pytest.raises(ValueError, match="log format 'xml'"):
        relay_log.setup_logging("xml")
    with pytest.raises(ValueError, match="log level 'loud'"):
        relay_log.setup_logging("text", "loud")


# --------------------------------------------------------------------------- check = run's refusals

RUN_REFUSALS = [
    ('[relay]\nlog_file = "{tmp}/missing/relay.log"\n', "relay.log_file", "does not exist"),
    ('[relay]\nlog_file = "/proc/version"\n', "relay.log_file", "cannot be opened for appending"),
    ('[relay]\nuser = "a\\u0000b"\n', "relay.user", "contains a NUL byte"),
    ("[relay]\nmax_pipes = 4294967296\n", "relay.max_pipes", "<= 20000000"),
    ("[relay]\nx = " + "[" * 3000 + "]" * 3000 + "\n", "TOML nested too deeply", ""),
]


@pytest.mark.parametrize(("fragment", "key", "reason"), RUN_REFUSALS)
def test_check_and_run_refuse_alike_without_traceback(
    tmp_path: Path, fragment: str, key: str, reason: str
) -> None:
    path = tmp_path / "r.toml"
    listener = GOOD[GOOD.index("[[listener]]"):]
    path.write_text(fragment.format(tmp=tmp_path) + "\n" + listener)
    for command in ("check", "run"):
        res = relay_cli(command, "-c", str(path))
        assert res.returncode == 1, (command, res.stderr)
        assert "Traceback" not in res.stderr and "READY" not in res.stdout
        first = res.stderr.splitlines()[0]
        assert first.startswith(f"{path}: {key}") and reason in first, res.stderr
        assert res.stderr.splitlines()[-1] == f"relay {command}: 1 problem"


def test_run_refuses_a_backend_that_is_the_listener(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody serves, for the refusal's sake only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = relay_cli("run", "--listen", f"127.0.0.1:{port}", "--backend", f"0.0.0.0:{port}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "reaches this listener itself" in res.stderr and "READY" not in res.stdout
