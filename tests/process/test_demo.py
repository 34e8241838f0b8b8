"""`relay demo` end to end (what `make demo` runs), checked through its JSON summary."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from relay import demo
from relay.lab.netns import netns_unavailable_reason

pytestmark = pytest.mark.timeout(150)

SOFT_UNICAST = {"203.0.113.7", "2001:db8:7::7"}
SLICE = range(40000, 40064)  # relay/data/demo.toml


def _run_demo(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """The same main() that `relay demo` calls, as its own process (as ``user`` if given)."""
    prefix = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}",
                                      "--clear-groups"]
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "relay.demo", *args],
        capture_output=True, text=True, timeout=140, cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _leftover_namespaces() -> list[str]:
    if shutil.which("ip") is None:
        return []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith("rlyd-")]


def test_demo_end_to_end(tmp_path: Path) -> None:
    before = _leftover_namespaces()
    proc = _run_demo("--json", str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())

    one = summary["part1"]
    rounds, nbytes = one["rounds"], one["bytes_per_transfer"]
    assert set(one["gbit_s"]) == {"direct", "relay", "asyncio streams proxy"}
    assert all(v > 0 for v in one["gbit_s"].values())
    # Every transfer through the relay is in its flow log, ended cleanly; the deliberate
    # failures are named for what they were.
    assert one["endings"] == {
        "main:eof": rounds, "main:reset_client": 1, "flaky:reset_origin": 1, "dead:refused": 1,
    }
    moved = one["spliced_bytes"] + one["copied_bytes"]
    assert moved >= rounds * nbytes
    if one["engine"].startswith(("uring", "epoll")):
        assert one["spliced_bytes"] > rounds * nbytes * 0.9  # zero-copy really carried it
    assert "asyncio streams proxy" in proc.stdout and "spliced" in proc.stdout

    reason = netns_unavailable_reason()
    if reason is not None:
        assert "part2" not in summary and summary["part2_skipped"]
        assert "part 2 (network namespaces) skipped" in proc.stdout
        return
    two = summary["part2"]
    rows = two["flows"]
    assert {r["destination"] for r in rows} == set(demo.DESTINATIONS)
    assert len(rows) == two["connections"] == len(demo.DESTINATIONS) * 4
    for row in rows:
        assert row["reason"] == "eof" and row["bytes"] == 16 * demo.MIB
        # The flow table is what the relay's socket reported, and the origin agrees.
        assert row["relay_egress"] == row["origin_saw_source"]
        assert row["origin_saw_dest"] == row["destination"]
        host, _, port = row["relay_egress"].rpartition(":")
        assert str(ipaddress.ip_address(host.strip("[]"))) in SOFT_UNICAST
        assert int(port) in SLICE
    assert two["gbit_s"] > 0
    assert two["syns_from_slice"] >= len(rows) and two["syns_from_elsewhere"] == 0
    assert "MISMATCH" not in proc.stdout
    assert _leftover_namespaces() == before  # every namespace it made is gone


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the demo as an unprivileged user")
def test_demo_part2_says_why_it_is_skipped_without_root() -> None:
    proc = _run_demo("--part", "2", user=65534)
    assert "part 2 (network namespaces) skipped: needs root" in proc.stdout
