"""A signal ends the core's wait at once: Loop.wakeup_fd() handed to signal.set_wakeup_fd().

A process-directed signal is delivered to any thread that does not block it; when that is not
the thread inside loop.run(), its io_uring_enter / epoll_wait is not interrupted and the Python
handler waited for the wait's timeout.  Each case runs in a child process (signal dispositions
and the wakeup fd are process-wide), blocks the signal in the main thread so another thread
must take it, and measures how long run(10000) lasted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import count_fds
from test_core import BACKENDS

import relay_ext._core as core

Loop = core.Loop


# argv: backend, mode, run timeout ms.  Modes:
#   wakeup     the loop's wakeup fd is Python's; the main thread blocks SIGUSR1, a second
#              thread (asleep in the interpreter, like the flow-log writer) takes it
#   nowakeup   the same without the wakeup fd: the control, the wait runs to its timeout
#   direct     no wakeup fd, single thread: the signal interrupts the wait itself (EINTR)
#   fork       as wakeup, after a forked child closed its copy of the loop and exited
#   eagain     as direct, with errno left at EAGAIN by an earlier non-blocking read (errno is
#              what python-liburing reports when set, whatever io_uring_enter returned)
CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from relay_ext._core import Loop
    backend, mode, timeout_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(time.monotonic()))
    loop = Loop(backend, max_conns=4)
    if mode not in ("direct", "eagain", "nowakeup"):
        signal.set_wakeup_fd(loop.wakeup_fd(), warn_on_full_buffer=False)
    if mode == "fork":
        pid = os.fork()
        if pid == 0:
            loop.close()
            os._exit(0)
        os.waitpid(pid, 0)
    if mode not in ("direct", "eagain"):
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    loop.run(0)
    r, w = os.pipe2(os.O_NONBLOCK)
    print("ready", flush=True)
    t0 = time.monotonic()
    events = []
    while not got and time.monotonic() - t0 < timeout_ms / 1000:
        if mode == "eagain":
            try:
                os.read(r, 1)
            except BlockingIOError:
                pass
        events += loop.run(max(1, int(timeout_ms - (time.monotonic() - t0) * 1000)))
    elapsed = time.monotonic() - t0
    for _ in range(100):            # the handler runs at the next bytecode boundary
        if got:
            break
        time.sleep(0.001)
    signal.set_wakeup_fd(-1)
    loop.close()
    print(f"{elapsed:.3f} {len(got)} {len(events)}", flush=True)
""")


def run_child(backend: str, mode: str, timeout_ms: int) -> tuple[float, int, int]:
    """Start the child, send SIGUSR1 to the process once it waits; (elapsed, handled, events)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, backend, mode, str(timeout_ms)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        # "ready" comes just before the wait: a signal sent too early (a loaded machine) is
        # handled before run() and ends nothing, so send one every 0.5 s until the child is
        # done.  Only a wait that a signal ends can finish before the timeout.
        while True:
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGUSR1)
            try:
                out, _ = proc.communicate(timeout=0.3)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    elapsed, handled, events = out.split()
    return float(elapsed), int(handled), int(events)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["wakeup", "fork"])
def test_signal_to_another_thread_ends_the_wait(backend: str, mode: str) -> None:
    elapsed, handled, events = run_child(backend, mode, 10000)
    assert elapsed < 2.0, f"run(10000) lasted {elapsed}s after the signal"
    assert handled >= 1
    assert events == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_wakeup_fd_another_thread_takes_the_signal(backend: str) -> None:
    # The control: proves the child's setup really sends the signal past the waiting thread
    # (without the wakeup fd the wait runs to its timeout and only then is the handler run).
    elapsed, handled, _ = run_child(backend, "nowakeup", 1500)
    assert elapsed >= 1.2
    assert handled >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["direct", "eagain"])
def test_signal_to_the_waiting_thread_ends_the_wait(backend: str, mode: str) -> None:
    elapsed, handled, _ = run_child(backend, mode, 10000)
    assert elapsed < 2.0, f"run(10000) lasted {elapsed}s after the signal (EINTR)"
    assert handled >= 1


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    return outer, inner


@pytest.mark.parametrize("backend", BACKENDS)
def test_wakeup_fd_takes_no_connection_slot(backend: str) -> None:
    n = 3
    loop = Loop(backend, max_conns=n)
    outers: list[socket.socket] = []
    try:
        assert loop.wakeup_fd() == loop.wakeup_fd()      # one pipe per loop
        for _ in range(n):
            c_out, c_in = tcp_pair()
            u_out, u_in = tcp_pair()
            outers += [c_out, u_out]
            loop.add_pair(c_in.detach(), u_in.detach())
        c_out, c_in = tcp_pair()
        u_out, u_in = tcp_pair()
        outers += [c_out, u_out, c_in, u_in]
        with pytest.raises(OSError, match="connection table full"):
            loop.add_pair(c_in.fileno(), u_in.fileno())
        stats = loop.stats()
        assert stats["conns_open"] == n
        assert stats["conn_slots_used"] == n
        assert len(loop.pairs()) == n
        # a byte in the pipe ends run() with no event and relays nothing amiss
        os.write(loop.wakeup_fd(), b"\x0a")
        t0 = time.monotonic()
        assert loop.run(5000) == []
        assert time.monotonic() - t0 < 2.0
        assert loop.stats()["signal_wakeups"] == 1
    finally:
        loop.close()
        for s in outers:
            s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wakeup_pipe_is_closed_with_the_loop(backend: str) -> None:
    before = count_fds()
    loop = Loop(backend, max_conns=4)
    base = count_fds()
    wfd = loop.wakeup_fd()
    assert count_fds() == base + 2
    assert os.get_blocking(wfd) is False
    assert os.get_inheritable(wfd) is False
    loop.close()
    loop.close()
    assert count_fds() == before
    with pytest.raises(RuntimeError):
        loop.wakeup_fd()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handed_off_pair_leaves_the_wakeup_pipe(backend: str) -> None:
    c_out, c_in = tcp_pair()
    u_out, u_in = tcp_pair()
    old, new = Loop(backend, max_conns=4), Loop(backend, max_conns=4)
    try:
        old.wakeup_fd()
        new.wakeup_fd()
        cid = old.add_pair(c_in.detach(), u_in.detach())
        state = old.export_pair(cid)
        new.import_pair(state)
        assert old.pairs() == [] and len(new.pairs()) == 1
        c_out.sendall(b"ping")
        deadline = time.monotonic() + 5
        got = b""
        u_out.settimeout(0.05)
        while got != b"ping" and time.monotonic() < deadline:
            new.run(10)
            try:
                got += u_out.recv(16)
            except TimeoutError:
                pass
        assert got == b"ping"
        os.write(old.wakeup_fd(), b"\x0a")  # the old loop still wakes, with nothing to report
        assert old.run(5000) == []
    finally:
        old.close()
        new.close()
        c_out.close()
        u_out.close()
