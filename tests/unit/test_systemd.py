"""`relay gen systemd`: a unit that starts on common installs (interpreter under /root or
/home, log file and admin socket outside /run/relay), reloads through the blocking `relay
reload`, and passes `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.process.systemd import relay_command, unit_text


def settings_of(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_protect_home_follows_where_relay_lives() -> None:
    system = settings_of(unit_text("/etc/relay/relay.toml", "/usr/bin/python3",
                                   package_dir="/usr/lib/python3/dist-packages"))
    assert system["ProtectHome"] == ["yes"]
    assert "ReadWritePaths" not in system
    for python, package, config in (("/root/venv/bin/python", "/opt/relay", "/etc/r.toml"),
                                    ("/usr/bin/python3", "/home/op/relay", "/etc/r.toml"),
                                    ("/usr/bin/python3", "/opt/relay", "/home/op/r.toml")):
        unit = settings_of(unit_text(config, python, package_dir=package))
        assert unit["ProtectHome"] == ["read-only"], (python, package, config)


def test_writable_paths_and_blocking_reload() -> None:
    unit = settings_of(unit_text("/etc/relay/relay.toml", "/usr/bin/python3",
                                 admin_socket="/var/lib/relay/admin.sock",
                                 log_file="/var/log/relay/relay.log",
                                 package_dir="/opt/relay"))
    assert unit["ReadWritePaths"] == ["-/var/lib/relay", "-/var/log/relay"]
    assert unit["ExecReload"] == ["/usr/bin/python3 -P -m relay reload --socket "
                                  "/var/lib/relay/admin.sock"]
    assert unit["ExecStart"] == ["/usr/bin/python3 -P -m relay run --config "
                                 "/etc/relay/relay.toml"]
    # No admin socket in the config: the unit gives relay one, so reload can still block.
    bare = settings_of(unit_text("/etc/relay/relay.toml", "/usr/bin/python3",
                                 package_dir="/opt/relay"))
    assert bare["ExecStart"][0].endswith("--admin-socket /run/relay/admin.sock")
    assert bare["ExecReload"][0].endswith("reload --socket /run/relay/admin.sock")
    assert "kill" not in bare["ExecReload"][0] and "ReadWritePaths" not in bare


def test_console_script_preferred() -> None:
    script = Path(sys.executable).with_name("relay")
    expected = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "relay"]
    assert relay_command(sys.executable) == expected
    assert relay_command("/nonexistent/bin/python3") == ["/nonexistent/bin/python3", "-P", "-m",
                                                          "relay"]


def test_generated_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing (Debian package systemd): unit not verified")
    unit_path = tmp_path / "relay.service"
    unit_path.write_text(unit_text(str(tmp_path / "relay.toml"), sys.executable, 10.0,
                                   log_file=str(tmp_path / "log" / "relay.log")))
    res = subprocess.run([analyze, "verify", str(unit_path)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and str(unit_path) not in res.stderr, res.stderr
