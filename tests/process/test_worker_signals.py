"""`relay run`'s workers act on a signal at once whichever of their threads the kernel gave it to:
the loop's wake-up pipe is Python's wakeup fd (relay.serve.signalwake).

The signals are sent with tgkill(2) to a thread of the worker that is not the one in loop.run()
(the command reader, the flow-log writer): the delivery that used to leave the wait asleep until
its timeout."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import alive, require_engine, wait_for
from helpers import echo as echo_handler

from relay.lab.process import relay_config

_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def other_thread(pid: int) -> int:
    """A thread of process `pid` other than its main thread (the one serving)."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert tids, f"worker {pid} has no other thread: the test would prove nothing"
    return tids[0]


def worker_stats(rp: Any, pid: int) -> dict[str, Any]:
    for w in rp.workers():
        if w["pid"] == pid:
            stats: dict[str, Any] = w["stats"]
            return stats
    raise AssertionError(f"worker {pid} not serving")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["uring", "epoll"])
def test_sigusr1_to_another_thread_reopens_the_log(origins: Any, relays: Any, name: str,
                                                   engine_availability: Any,
                                                   tmp_path: Path) -> None:
    require_engine(name, engine_availability)
    origin = origins(echo_handler)
    directory = tmp_path
    log_file = directory / "relay.log"
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, workers=1, engine=name,
                                         settings={"log_file": str(log_file)}))
    rp.wait_ready()
    (pid,) = rp.children()
    wait_for(lambda: log_file.exists(), 5, "the log file")
    # The reporter's SIGALRM (a process-directed timer) arrives each second: its wakeups are
    # counted once the loop watches its wake-up pipe.
    wait_for(lambda: worker_stats(rp, pid).get("signal_wakeups", 0) >= 1, 5,
             "a signal wakeup counted by the worker's loop")
    log_file.rename(directory / "relay.log.1")
    t0 = time.monotonic()
    tgkill(pid, other_thread(pid), signal.SIGUSR1)
    wait_for(lambda: log_file.exists(), 2, "the worker's reopened log file")
    assert time.monotonic() - t0 < 2.0
    assert rp.stop() == 0
    assert "wakeup fd" not in rp.output()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["uring", "epoll"])
def test_sigterm_to_another_thread_stops_the_worker(origins: Any, relays: Any, name: str,
                                                     engine_availability: Any) -> None:
    require_engine(name, engine_availability)
    origin = origins(echo_handler)
    rp = relays(lambda adm: relay_config(origin.port, admin_socket=adm, workers=1, engine=name))
    rp.wait_ready()
    (pid,) = rp.children()
    t0 = time.monotonic()
    tgkill(pid, other_thread(pid), signal.SIGTERM)
    wait_for(lambda: not alive(pid), 2, "the idle worker's exit after SIGTERM")
    assert time.monotonic() - t0 < 2.0
    assert rp.stop() == 0
    # The wakeup fd was reset before the loop closed its pipe: no signal was written to a
    # closed descriptor ("Exception ignored when trying to write to the signal wakeup fd").
    assert "wakeup fd" not in rp.output()
