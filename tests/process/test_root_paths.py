"""Paths root touches for the workers (issue 12, items 7, 8, 11): a symlinked log file is neither
followed nor handed to the worker user, an admin_socket naming a file that is not a socket is
never deleted, and idle admin clients are timed out and capped."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import echo as echo_handler
from helpers import echo_roundtrip, relay_cli, wait_for

from relay.lab.process import relay_config
from relay.ops import admin
from relay.ops import log as relay_log

USER = "relaytest"


def _config(path: Path, **relay: str) -> Path:
    lines = ["[relay]", "workers = 1"] + [f'{k} = "{v}"' for k, v in relay.items()]
    path.write_text("\n".join(lines) + '\n\n[[listener]]\nbind = "127.0.0.1:0"\n'
                    'backend = "127.0.0.1:9"\n')
    return path


def test_symlinked_log_file_is_refused_and_its_target_untouched(
        tmp_path: Path, unprivileged_user: pwd.struct_passwd) -> None:
    secret = tmp_path / "root-secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    os.chown(logdir, unprivileged_user.pw_uid, unprivileged_user.pw_gid)  # the worker user can write here
    link = logdir / "relay.log"
    os.symlink(secret, link)
    cfg = _config(tmp_path / "relay.toml", user=USER, log_file=str(link))
    for command in ("check", "run"):
        res = relay_cli(command, "-c", str(cfg))
        assert res.returncode == 1, (command, res.stdout, res.stderr)
        assert f"relay.log_file: \"{link}\": is a symbolic link" in res.stderr, res.stderr
    st = os.stat(secret)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert secret.read_text() == "root only\n"


def test_log_directory_writable_by_the_unprivileged_user_is_refused(
        tmp_path: Path, unprivileged_user: pwd.struct_passwd) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    os.chown(logdir, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    cfg = _config(tmp_path / "relay.toml", user=USER, log_file=str(logdir / "relay.log"))
    res = relay_cli("check", "-c", str(cfg))
    assert res.returncode == 1, res.stdout
    assert f"is writable by the worker user {USER}" in res.stderr, res.stderr
    os.chown(logdir, 0, 0)
    os.chmod(logdir, 0o755)
    res = relay_cli("check", "-c", str(cfg))
    assert res.returncode == 0, res.stderr


def test_log_file_is_opened_without_following_links(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    link = tmp_path / "relay.log"
    os.symlink(secret, link)
    try:
        with pytest.raises(OSError, match="is a symbolic link"):
            relay_log.setup_logging("text", "info", str(link))
        link.unlink()
        relay_log.setup_logging("text", "info", str(link))
        os.rename(link, tmp_path / "rotated.log")
        os.symlink(secret, link)  # swapped for a link before SIGUSR1
        with pytest.raises(OSError, match="is a symbolic link"):
            relay_log.reopen()
    finally:
        relay_log.reset_logging()
    assert secret.read_text() == "x"


def test_log_file_is_handed_over_by_descriptor(
        tmp_path: Path, origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    os.chmod(tmp_path, 0o755)
    log_file = tmp_path / "relay.log"
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, settings={
        "user": USER, "log_file": str(log_file)}))
    rp.wait_ready()
    assert echo_roundtrip(rp.address())
    st = os.stat(log_file)
    assert (st.st_uid, st.st_gid) == (unprivileged_user.pw_uid, unprivileged_user.pw_gid)


def test_admin_socket_naming_a_regular_file_is_never_deleted(tmp_path: Path) -> None:
    victim = tmp_path / "important"
    victim.write_text("keep me\n")
    cfg = _config(tmp_path / "relay.toml", admin_socket=str(victim))
    for command in ("check", "run"):
        res = relay_cli(command, "-c", str(cfg))
        assert res.returncode == 1, (command, res.stdout, res.stderr)
        assert f"relay.admin_socket: \"{victim}\": exists and is not a socket" in res.stderr
    assert victim.read_text() == "keep me\n"


def test_admin_bind_keeps_a_non_socket_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    victim = tmp_path / "file"
    victim.write_text("keep me\n")
    with pytest.raises(OSError, match="not a socket"):
        admin._bind_unix(str(victim))
    assert victim.read_text() == "keep me\n"
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens: a dead supervisor's socket
    sock = admin._bind_unix(str(stale))
    try:
        assert stat.S_ISSOCK(os.lstat(stale).st_mode)
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_idle_admin_clients_are_timed_out_and_capped(origins: Any, relays: Any) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm))
    rp.wait_ready()
    idle = []
    try:
        for _ in range(admin.MAX_CLIENTS):
            c = socket.socket(socket.AF_UNIX)
            c.connect(rp.admin_socket)
            idle.append(c)
        time.sleep(0.5)  # let the supervisor accept them all
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(5)
        extra.connect(rp.admin_socket)
        assert extra.recv(200).startswith(b"error busy"), "the cap was not enforced"
        extra.close()
        started = time.monotonic()
        for c in idle:
            c.settimeout(admin.CLIENT_TIMEOUT + 5)
            assert c.recv(100) == b""  # closed by the supervisor
        waited = time.monotonic() - started
        assert waited < admin.CLIENT_TIMEOUT + 2, waited
        assert wait_for(lambda: "workers" in rp.stats(), 5, "stats after the idle clients")
    finally:
        for c in idle:
            c.close()


@pytest.mark.timeout(60)
def test_sigusr1_reopen_neither_follows_a_link_nor_hands_over_in_a_writable_directory(
        tmp_path: Path, origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    os.chmod(tmp_path, 0o755)
    logdir = tmp_path / "logs"
    logdir.mkdir(mode=0o755)
    log_file = logdir / "relay.log"
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, settings={
        "user": USER, "log_file": str(log_file)}))
    rp.wait_ready()
    assert os.stat(log_file).st_uid == unprivileged_user.pw_uid
    # logrotate moved the file; someone planted a link to root's file in its place.
    os.rename(log_file, logdir / "relay.log.1")
    os.symlink(secret, log_file)
    rp.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    assert rp.proc.poll() is None, "the supervisor died on SIGUSR1"
    st = os.stat(secret)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert "is a symbolic link" in (logdir / "relay.log.1").read_text()
    # The directory became writable by the worker user: a new file is not handed over.
    os.unlink(log_file)
    os.chown(logdir, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    rp.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: log_file.exists() and "not handed to user" in log_file.read_text(),
                    5, "the refusal in the new log file")
    assert os.stat(log_file).st_uid == 0
    assert echo_roundtrip(rp.address())
