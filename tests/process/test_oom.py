"""relay.process.oom against a real memory cgroup: a process OOM-killed inside it moves the
counter the supervisor reads, a plain SIGKILL does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.process.oom import CGROUP_ROOT, OomCounter

LIMIT = 64 << 20


def _make_cgroup() -> tuple[Path, str]:
    """A fresh memory cgroup limited to LIMIT: (directory, how a pid joins it)."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    name = f"relay-oomtest-{os.getpid()}"
    v2 = CGROUP_ROOT / "cgroup.controllers"
    if v2.exists() and "memory" in v2.read_text().split():
        directory = CGROUP_ROOT / name
        limit_file = "memory.max"
    elif (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
        directory = CGROUP_ROOT / "memory" / name
        limit_file = "memory.limit_in_bytes"
    else:
        pytest.skip("no writable memory cgroup controller here")
    try:
        directory.mkdir()
        (directory / limit_file).write_text(str(LIMIT))
        swap = directory / ("memory.swap.max" if limit_file == "memory.max"
                            else "memory.memsw.limit_in_bytes")
        if swap.exists():
            try:
                swap.write_text("0" if limit_file == "memory.max" else str(LIMIT))
            except OSError:
                pass
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup: {exc}")
    return directory, "cgroup.procs"


@pytest.fixture
def cgroup() -> Iterator[Path]:
    directory, _ = _make_cgroup()
    try:
        yield directory
    finally:
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _child_in(cgroup: Path, code: str) -> subprocess.Popen[bytes]:
    # The child waits for a line on stdin: by then it has been moved into the cgroup.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + code],
                            stdin=subprocess.PIPE)
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    return proc


@pytest.mark.timeout(60)
def test_oom_kill_moves_the_counter_sigkill_does_not(cgroup: Path) -> None:
    sleeper = _child_in(cgroup, "import time; time.sleep(60)")
    counter = OomCounter(sleeper.pid)
    assert counter.path is not None, "the cgroup's oom_kill counter was not found"
    assert cgroup in counter.path.parents
    sleeper.kill()
    sleeper.wait()
    assert sleeper.returncode == -signal.SIGKILL
    assert not counter.moved(), "a plain SIGKILL counted as an OOM kill"

    hog = _child_in(cgroup, "chunks = []\nwhile True: chunks.append(bytearray(1 << 20))")
    assert hog.stdin is not None
    hog.stdin.write(b"go\n")
    hog.stdin.flush()
    hog.wait(30)
    if hog.returncode != -signal.SIGKILL:
        pytest.skip(f"the hog ended with {hog.returncode}, not an OOM kill (swap?)")
    assert counter.moved(), "an OOM kill did not move the counter"
    assert not counter.moved(), "moved() reports each kill once"
