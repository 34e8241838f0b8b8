"""`relay demo --part 2`: UDP flows (DNS and HTTP/3) leave from the slice next to the TCP ones,
and each one's egress is what its server saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SLICE = range(40000, 40064)  # relay/data/demo.toml
SOFT_UNICAST = ("203.0.113.7:", "[2001:db8:7::7]:")


def test_demo_part2_shows_udp_flows_from_the_slice(tmp_path: Path) -> None:
    require_netns()
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "relay.demo", "--part", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    udp = json.loads(out.read_text())["part2"]["udp"]
    apps = {"dns": 2, "http3": 2}
    for app in udp["skipped"]:
        apps.pop(app)  # a missing tool is named, not hidden
        assert f"{app}: skipped:" in proc.stdout
    if "dns" in apps:
        assert [d["answer"] for d in udp["dig"]] == ["192.0.2.80", "2001:db8::80"]
    if "http3" in apps:
        assert [h["status"] for h in udp["http3"]] == [200, 200]
    rows = udp["flows"]
    assert sorted(r["app"] for r in rows) == sorted(a for a, n in apps.items() for _ in range(n))
    for row in rows:
        assert row["relay_egress"].startswith(SOFT_UNICAST)
        assert int(row["relay_egress"].rpartition(":")[2]) in SLICE
        assert row["server_saw_it"]  # the server logged that very address and port
        assert row["c2s_dgrams"] >= 1 and row["s2c_dgrams"] >= 1
    assert udp["dgrams_from_slice"] == sum(r["c2s_dgrams"] for r in rows)
    assert udp["dgrams_from_elsewhere"] == 0
    assert "MISMATCH" not in proc.stdout and "UDP datagrams at the origin" in proc.stdout
