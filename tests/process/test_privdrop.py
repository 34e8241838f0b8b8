"""Privilege drop: workers run as the configured user with only the capabilities they need."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
from typing import Any

import pytest
from helpers import PYTHON, REPO_ROOT, echo_roundtrip, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config
from relay.process import budgets, privs

USER = "relaytest"
IP_TRANSPARENT = 19


def _status(pid: int) -> dict[str, str]:
    return privs.proc_status(pid)


@pytest.mark.timeout(60)
def test_workers_run_unprivileged_without_capabilities(
        origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=2,
                                         extra_relay=f'user = "{USER}"'))
    rp.wait_ready()
    assert echo_roundtrip(rp.address(), b"y" * 300_000)
    workers = rp.children()
    assert len(workers) == 2
    uid, gid = unprivileged_user.pw_uid, unprivileged_user.pw_gid
    for pid in workers:
        st = _status(pid)
        assert st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(gid)] * 4, st["Gid"]
        assert st["Groups"].split() == [str(g) for g in sorted(
            {gid, *os.getgrouplist(USER, gid)})], st["Groups"]
        for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            assert int(st[key], 16) == 0, f"{key}={st[key]}"
        assert st["NoNewPrivs"] == "1"
    sup = _status(rp.pid)
    assert sup["Uid"].split()[0] == "0", "the supervisor stays root to bind on reload"


@pytest.mark.timeout(60)
def test_tproxy_worker_keeps_only_cap_net_raw(
        origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=1,
                                         extra_relay=f'user = "{USER}"', extra="""
[[listener]]
name = "transparent"
bind = "127.0.0.1:0"
mode = "tproxy"
"""))
    rp.wait_ready()
    (pid,) = rp.children()
    st = _status(pid)
    net_raw = 1 << privs.CAP_NET_RAW
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(st[key], 16) == net_raw, f"{key}={st[key]}"
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["Uid"].split()[0] == str(unprivileged_user.pw_uid)
    assert st["NoNewPrivs"] == "1"
    assert echo_roundtrip(rp.address())


_PROBE = """
import socket, sys
from relay.process import privs
target = privs.resolve_target(sys.argv[1])
caps = frozenset(int(c) for c in sys.argv[2:])
privs.drop_privileges(target, caps)
result = []
with socket.socket() as s:
    try:
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
        result.append("allowed")
    except PermissionError:
        result.append("denied")
try:
    import os
    os.setuid(0)
    result.append("regained-root")
except PermissionError:
    pass
print(",".join(result))
"""


def _after_drop(caps: frozenset[int]) -> str:
    """Drop to USER keeping `caps` in a fresh interpreter, then try IP_TRANSPARENT."""
    out = subprocess.run([PYTHON, "-c", _PROBE, USER, *map(str, sorted(caps))],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=20,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.timeout(30)
def test_cap_net_raw_is_enough_for_ip_transparent(unprivileged_user: pwd.struct_passwd) -> None:
    assert _after_drop(frozenset({privs.CAP_NET_RAW})) == "allowed"
    assert _after_drop(frozenset()) == "denied"


def _core_engine() -> str:
    from relay.engines import available

    for name in ("uring", "epoll"):
        if available().get(name) is None:
            return name
    pytest.skip("the core (uring/epoll) is not available: no pipes to budget")


@pytest.mark.timeout(90)
def test_pipe_budget_holds_for_the_unprivileged_user(
        origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    engine = _core_engine()
    soft_path = "/proc/sys/fs/pipe-user-pages-soft"
    with open(soft_path) as f:
        soft = int(f.read())
    if soft == 0:
        pytest.skip("fs.pipe-user-pages-soft is 0: no per-user pipe limit on this host")
    pipe_pages = (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    per_worker = soft // pipe_pages // 2
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=2,
                                         engine=engine,
                                         extra_relay=f'user = "{USER}"\npipe_size = 1048576'),
                env={"RELAY_ENGINE": None})  # pipes exist in the core engines only
    rp.wait_ready()
    budget = rp.stats()["budget"]
    assert f"user {USER} may hold {soft} pipe pages" in budget, budget
    assert f"pipes: {per_worker} pipes of 1024 KiB per worker" in budget, budget

    results: list[bool] = []
    payload = os.urandom(4 << 20)

    def bulk() -> None:
        results.append(echo_roundtrip(rp.address(), payload, timeout=30))

    threads = [threading.Thread(target=bulk) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 8

    def reported() -> list[dict[str, Any]] | None:
        ws = rp.workers()
        moved = sum(w["stats"].get("bytes_spliced", 0) + w["stats"].get("bytes_copied", 0)
                    for w in ws)
        return ws if moved >= 2 * 8 * len(payload) else None

    workers = wait_for(reported, 10, "the transfers in the workers' stats")
    assert sum(w["stats"]["bytes_spliced"] for w in workers) > 0, "nothing was spliced"
    for w in workers:
        st = w["stats"]
        assert st.get("pipes_max", per_worker) <= per_worker, st.get("pipes_max")
        assert st["pipe_size_granted"] == 1 << 20, st["pipe_size_granted"]
        assert st.get("pipe_resize_denied", 0) == 0, "pipes shrank: the user budget overflowed"


@pytest.mark.timeout(10)
def test_pipe_budget_follows_the_kernel_limits(unprivileged_user: pwd.struct_passwd) -> None:
    """The per-user budget from fs.pipe-user-pages-soft/hard and fs.pipe-max-size, shared by
    the workers; root workers are exempt."""
    with open("/proc/sys/fs/pipe-user-pages-soft") as f:
        soft = int(f.read())
    with open("/proc/sys/fs/pipe-user-pages-hard") as f:
        hard = int(f.read())
    limits = [x for x in (soft, hard) if x > 0]
    if not limits:
        pytest.skip("no per-user pipe limit on this host")
    target = privs.resolve_target(USER)
    assert target is not None
    page = os.sysconf("SC_PAGE_SIZE")
    user_pipes = min(limits) // ((1 << 20) // page)
    b = budgets.pipe_budget(target.user, 1 << 20, wanted=10_000, workers=2)
    assert b.per_worker == user_pipes // 2 and b.pipe_bytes == 1 << 20
    assert budgets.pipe_budget(target.user, 1 << 20, wanted=3, workers=2).per_worker == 3
    assert budgets.pipe_budget(
        target.user, 1 << 20, wanted=10, workers=user_pipes + 1
    ).per_worker == 0
    assert budgets.pipe_budget(None, 1 << 20, wanted=10_000, workers=2).per_worker == 10_000
    # A 5000-byte request is rounded up to a power-of-two number of pages, as fs/pipe.c does.
    assert budgets.pipe_budget(target.user, 5000, wanted=1, workers=1).pipe_bytes == 2 * page


@pytest.mark.timeout(60)
def test_reload_switches_the_worker_user(
        origins: Any, relays: Any, unprivileged_user: pwd.struct_passwd) -> None:
    """The supervisor keeps root, so a reload may change relay.user: new workers use it."""
    echo = origins(echo_handler)
    rp = relays(lambda adm: relay_config(echo.port, admin_socket=adm, drain=10.0, workers=1))
    rp.wait_ready()
    (old,) = rp.children()
    assert _status(old)["Uid"].split()[0] == "0"
    text = rp.config_path.read_text()
    rp.config_path.write_text(text.replace("[relay]\n", f'[relay]\nuser = "{USER}"\n', 1))
    assert "ok " in rp.admin("reload", timeout=30)
    wait_for(lambda: old not in rp.children() and len(rp.children()) == 1, 15, "new worker")
    (new,) = rp.children()
    assert _status(new)["Uid"].split() == [str(unprivileged_user.pw_uid)] * 4
    assert echo_roundtrip(rp.address())
