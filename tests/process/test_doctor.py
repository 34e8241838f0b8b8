"""`relay doctor`: real probes of this host, JSON shape, exit status, config-dependent severity;
relay.process.budgets: RLIMIT_NOFILE raising in a child process."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, block_io_uring, relay_cli

from relay.config import loads
from relay.engines.ring_failure import explain_ring_failure
from relay.host import doctor
from relay.host.doctor import CHECK_NAMES, Doctor, run_checks
from relay.process import budgets as limits

ROOT = REPO_ROOT
LISTENER = '[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:9"\n'


def relay_doctor(*args: str, preexec: object = None) -> subprocess.CompletedProcess[str]:
    return relay_cli("doctor", *args, timeout=120, preexec_fn=preexec)


def by_name(results: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {r.name: r for r in results}


def test_doctor_json_has_every_check() -> None:
    res = relay_doctor("--json")
    report = json.loads(res.stdout)
    names = [c["name"] for c in report["checks"]]
    assert names == list(CHECK_NAMES)
    for check in report["checks"]:
        assert check["status"] in ("PASS", "WARN", "FAIL")
        assert check["detail"]
        if check["status"] != "PASS":
            assert check["fix"] or check["name"] in ("io_uring_ops", "engines"), check
    failed = any(c["status"] == "FAIL" for c in report["checks"])
    assert report["ok"] is not failed
    assert res.returncode == (1 if failed else 0), res.stderr


def test_doctor_text_output() -> None:
    res = relay_doctor()
    lines = res.stdout.splitlines()
    for name in CHECK_NAMES:
        assert any(
            line.split()[1:2] == [name] for line in lines if line[:4] in ("PASS", "WARN", "FAIL")
        )
    summary = lines[-1]
    counts = {word: int(n) for n, word in (part.split() for part in summary.split(", "))}
    assert sum(counts.values()) == len(CHECK_NAMES)
    assert res.returncode == (1 if counts["FAIL"] else 0)


def test_splice_and_port_range_probes_pass_here() -> None:
    results = by_name(run_checks(Doctor()))
    assert results["splice"].status == "PASS", results["splice"]
    assert "65536 bytes" in results["splice"].detail
    opt = results["ip_local_port_range_option"]
    if "Protocol not available" in opt.detail:
        pytest.skip("kernel without IP_LOCAL_PORT_RANGE (Linux < 6.3)")
    assert opt.status == "PASS", opt
    assert "connect() got port" in opt.detail
    assert results["ip_bind_address_no_port"].status == "PASS"


def test_io_uring_probe_agrees_with_the_kernel() -> None:
    results = by_name(run_checks(Doctor()))
    disabled_path = "/proc/sys/kernel/io_uring_disabled"
    disabled = int(Path(disabled_path).read_text()) if os.path.exists(disabled_path) else 0
    ring = results["io_uring"]
    if disabled == 2:
        assert ring.status == "WARN" and "io_uring_disabled=2" in ring.detail
    elif ring.status == "PASS":
        assert results["io_uring_ops"].status == "PASS"
        assert "SPLICE" in results["io_uring_ops"].detail
    else:
        assert ring.status == "WARN" and "epoll" in ring.fix


def test_io_uring_blocked_by_seccomp(tmp_path: Path) -> None:
    if (
        Path("/proc/sys/kernel/io_uring_disabled").exists()
        and Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() != "0"
    ):
        pytest.skip("io_uring already disabled by sysctl")
    path = tmp_path / "r.toml"
    path.write_text('[relay]\nengine = "uring"\n' + LISTENER)
    try:
        res = relay_doctor("--json", "-c", str(path), preexec=block_io_uring)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot install a seccomp filter here: {exc}")
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    ring = checks["io_uring"]
    assert ring["status"] == "FAIL", ring  # engine = "uring" cannot work
    assert "EPERM" in ring["detail"] and "seccomp" in ring["detail"]
    assert "seccomp profile" in ring["fix"]
    assert checks["io_uring_ops"]["status"] == "WARN"
    assert res.returncode == 1
    # with engine = "auto" the same host only WARNs: epoll takes over
    res = relay_doctor("--json", preexec=block_io_uring)
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["io_uring"]["status"] == "WARN"
    assert "epoll engine serves meanwhile" in checks["io_uring"]["fix"]


def test_ring_failure_names_the_cause() -> None:
    assert "io_uring_disabled=2" in explain_ring_failure(errno.EPERM, 2)
    assert "io_uring_group" in explain_ring_failure(errno.EPERM, 1)
    assert "seccomp" in explain_ring_failure(errno.EPERM, 0)
    assert "seccomp" in explain_ring_failure(errno.EACCES, None)
    assert "without io_uring" in explain_ring_failure(errno.ENOSYS, 0)
    assert "seccomp" in doctor._ring_fix(errno.EPERM, 0)
    assert "kernel.io_uring_disabled=0" in doctor._ring_fix(errno.EPERM, 2)


def test_slice_outside_port_range_fails(tmp_path: Path) -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, _hi = (int(x) for x in f.read().split())
    if lo <= 1100:
        pytest.skip("ip_local_port_range starts too low for a slice below it")
    path = tmp_path / "r.toml"
    path.write_text(LISTENER + f'[[egress]]\naddress = "127.0.0.1"\nports = "{lo - 64}-{lo - 1}"\n')
    res = relay_doctor("--json", "-c", str(path))
    assert res.returncode == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["ip_local_port_range"]["status"] == "FAIL"
    assert "ip_local_port_range" in checks["ip_local_port_range"]["detail"]
    assert checks["config"]["status"] == "FAIL"
    assert f"relay check -c {path}" == checks["config"]["fix"]


def test_good_config_check_passes(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[relay]\nworkers = 1\n" + LISTENER)
    results = by_name(run_checks(Doctor(loads(path.read_text()), str(path))))
    assert results["config"].status == "PASS"
    assert "1 listener(s)" in results["config"].detail


def test_pipe_size_beyond_pipe_max_size() -> None:
    max_size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    cfg = loads(f"[relay]\npipe_size = {max_size * 2}\n" + LISTENER)
    check = by_name(run_checks(Doctor(cfg)))["pipe_size"]
    assert f"requested {max_size * 2}" in check.detail
    if doctor.has_capability(doctor.CAP_SYS_RESOURCE):
        assert check.status == "PASS"  # CAP_SYS_RESOURCE may exceed fs.pipe-max-size
    else:
        assert check.status == "WARN" and "fs.pipe-max-size" in check.fix


def test_nofile_too_low_for_maxconn() -> None:
    def tight() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    res = relay_doctor("--json", preexec=tight)
    check = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["nofile"]
    assert "soft 256, hard 256" in check["detail"]
    # needs 2 fds a connection: the default maxconn cannot fit in 256
    assert check["status"] in ("WARN", "FAIL")
    assert "LimitNOFILE=" in check["fix"]


def _in_child(code: str, soft: int, hard: int) -> str:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


RAISE = (
    "import json, sys, resource\n"
    "from relay.process.budgets import raise_nofile\n"
    "r = raise_nofile(int(sys.argv[1]) if len(sys.argv) > 1 else {needed})\n"
    "print(json.dumps([r.soft, r.hard, r.ok, r.changed, r.message, "
    "resource.getrlimit(resource.RLIMIT_NOFILE)]))\n"
)


def test_raise_nofile_soft_up_to_hard() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1000:
        pytest.skip(f"hard limit {hard} too low")
    soft, new_hard, ok, changed, message, actual = json.loads(
        _in_child(RAISE.format(needed=900), 128, min(hard, 4096))
    )
    assert (soft, ok, changed) == (900, True, True)
    assert actual == [900, new_hard]
    assert message.startswith("raised the soft open-file limit 128 -> 900")


def test_raise_nofile_never_lowers() -> None:
    soft, _hard, ok, changed, message, _ = json.loads(_in_child(RAISE.format(needed=10), 512, 512))
    assert (soft, ok, changed) == (512, True, False)
    assert "already covers" in message


def test_raise_nofile_beyond_hard_limit() -> None:
    ceiling = limits.nr_open() or 1 << 20
    soft, hard, ok, _changed, message, actual = json.loads(
        _in_child(RAISE.format(needed=ceiling + 1), 256, 512)
    )
    assert ok is False and soft == hard == actual[0] == actual[1]
    assert f"fs.nr_open={ceiling}" in message  # nobody may go past fs.nr_open
    if doctor.has_capability(doctor.CAP_SYS_RESOURCE):
        assert hard == ceiling and "raised the open-file limit" in message
    else:
        assert hard == 512 and "not permitted (needs root with CAP_SYS_RESOURCE)" in message
        assert "LimitNOFILE=" in message


def test_needed_formula() -> None:
    assert limits.nofile_needed(1000, 250, 2) == 2000 + 500 + 2 + limits.FD_SLACK
    cfg = loads("[relay]\nworkers = 2\nmaxconn = 1000\n" + LISTENER)
    assert limits.nofile_needed_for(cfg.relay, 1) == 2 * 500 + 2 * 125 + 1 + limits.FD_SLACK


def test_versions_report() -> None:
    info = doctor.versions()
    assert info["kernel"] == os.uname().release
    assert info["relay"] and info["python"].startswith(sys.version.split()[0])
    text = doctor.format_versions(info)
    assert text.startswith(f"relay {info['relay']}\n") and "engines:" in text
