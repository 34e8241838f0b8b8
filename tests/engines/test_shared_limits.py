"""relay_ext._limits: connection counters shared by forked workers (exact across processes, a
dead worker's share freed, a lock holder killed never blocks the others), and the source keys
of relay.serve.limits (IPv6 counted per prefix)."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from relay.serve.limits import source_key

_limits = pytest.importorskip("relay_ext._limits", reason="relay_ext._limits is not built")
SharedLimits = _limits.SharedLimits
ADMITTED, OVER_MAXCONN, OVER_PER_SOURCE = (
    _limits.ADMITTED, _limits.OVER_MAXCONN, _limits.OVER_PER_SOURCE)


def test_source_keys_aggregate_ipv6_by_prefix() -> None:
    assert source_key("192.0.2.7") == bytes([192, 0, 2, 7])
    assert source_key("::ffff:192.0.2.7") == bytes([192, 0, 2, 7])
    a, b = source_key("2001:db8:1:2::1"), source_key("2001:db8:1:2:ffff::9")
    assert a == b and len(a) == 16  # one /64
    assert source_key("2001:db8:1:3::1") != a
    assert source_key("2001:db8:1:2::1", 128) != source_key("2001:db8:1:2::2", 128)
    assert source_key("2001:db8:1:2::1", 48) == source_key("2001:db8:1:ffff::1", 48)
    assert source_key("fe80::1%lo") == source_key("fe80::2")


def test_limits_within_one_process() -> None:
    lim = SharedLimits(2, 5, 3)
    k1, k2 = b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"
    assert [lim.acquire(0, k1) for _ in range(4)] == [ADMITTED] * 3 + [OVER_PER_SOURCE]
    assert lim.acquire(1, k1) == OVER_PER_SOURCE  # the other worker sees the same count
    assert [lim.acquire(1, k2) for _ in range(3)] == [ADMITTED, ADMITTED, OVER_MAXCONN]
    assert lim.stats()["open"] == 5 and lim.source_count(k1) == 3
    lim.release(0, k1)
    assert lim.acquire(1, k1) == ADMITTED
    assert lim.clear_slot(1) == 3  # worker 1 died holding k2 x2 and k1 x1
    assert lim.stats()["open"] == 2 and lim.source_count(k1) == 2 and lim.source_count(k2) == 0
    assert lim.acquire(1, None) == ADMITTED  # no per-source key: only the global limit


def test_tombstones_are_compacted_and_counts_survive() -> None:
    lim = SharedLimits(1, 100, 1000)
    cap = lim.stats()["capacity"]
    held = [i.to_bytes(4, "big") for i in range(50)]
    for k in held:
        assert lim.acquire(0, k) == ADMITTED
    for i in range(cap * 4):  # many short-lived sources
        k = (1_000_000 + i).to_bytes(4, "big")
        assert lim.acquire(0, k) == ADMITTED
        lim.release(0, k)
    s = lim.stats()
    assert s["sources"] == 50 and s["tombstones"] * 4 <= cap * 3
    assert all(lim.source_count(k) == 1 for k in held)


def _hammer(lim: object, slot: int, keys: list[bytes], seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    mine: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if mine and rng.random() < 0.5:
            lim.release(slot, mine.pop(rng.randrange(len(mine))))  # type: ignore[attr-defined]
        else:
            k = rng.choice(keys)
            if lim.acquire(slot, k) == ADMITTED:  # type: ignore[attr-defined]
                mine.append(k)
    for k in mine:
        lim.release(slot, k)  # type: ignore[attr-defined]


def _fork(fn: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


@pytest.mark.timeout(60)
def test_exact_across_processes_under_contention() -> None:
    lim = SharedLimits(4, 40, 7)
    keys = [bytes([10, 0, 0, i]) for i in range(8)]
    # A watcher process checks the invariants while four workers admit and release.
    pids = [_fork(_hammer, lim, slot, keys, 0.7, slot) for slot in range(4)]
    worst, samples, alive, codes = 0, 0, set(pids), []
    while alive:
        s = lim.stats()
        assert s["open"] <= 40
        worst = max(worst, max(lim.source_count(k) for k in keys))
        samples += 1
        for p in list(alive):
            done, status = os.waitpid(p, os.WNOHANG)
            if done:
                alive.discard(p)
                codes.append(os.waitstatus_to_exitcode(status))
    assert codes == [0, 0, 0, 0]
    assert samples > 10 and 0 < worst <= 7
    assert lim.stats()["open"] == 0 and all(lim.source_count(k) == 0 for k in keys)


@pytest.mark.timeout(60)
def test_a_worker_killed_mid_flight_never_blocks_the_others() -> None:
    lim = SharedLimits(2, 1000, 1000)
    keys = [bytes([10, 0, 1, i]) for i in range(16)]
    rounds = 0
    while lim.stats()["recovered"] < 1 or rounds < 10:  # until one died holding the lock
        rounds += 1
        assert rounds < 300, "no kill landed inside the lock"
        pid = _fork(_hammer, lim, 1, keys, 60.0, 1)
        time.sleep(random.uniform(0.005, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lim.clear_slot(1)  # what the supervisor does for a dead worker
        assert lim.acquire(0, keys[0]) == ADMITTED  # would hang on a dead owner's lock
        lim.release(0, keys[0])
    s = lim.stats()
    assert s["open"] == 0 and s["sources"] == 0 and s["recovered"] >= 1, s
