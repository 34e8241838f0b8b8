"""io_uring unavailable (a seccomp filter returning EPERM, as Docker's default profile does):
`engine = "auto"` names the cause and the epoll engine takes over with the same guarantees;
`engine = "uring"` refuses to start with a clear error."""

from __future__ import annotations

import re
import socket
import time
from typing import Any

import pytest
from helpers import Origin, block_io_uring, pattern, read_all, respond_after_eof, sha

from relay.lab.process import NotReady, relay_config


def blocked_relay(relays: Any, engine: str, backend: tuple[str, int]) -> Any:
    try:
        return relays(lambda _admin: relay_config(backend, engine=engine), preexec=block_io_uring)
    except Exception as exc:  # SubprocessError from the preexec hook
        pytest.skip(f"cannot install a seccomp filter here: {exc}")


@pytest.mark.timeout(90)
def test_auto_falls_back_to_epoll_with_the_same_guarantees(relays: Any) -> None:
    origin = Origin(respond_after_eof(3 << 20))
    try:
        rp = blocked_relay(relays, "auto", origin.address)
        address = rp.wait_ready()["main"]
        log = rp.stderr()
        assert "epoll" in log and ("EPERM" in log or "not permitted" in log.lower()), log
        # half-close client-first, then a 3 MiB answer: byte-exact through the epoll engine
        request = pattern(1 << 20, seed=9)
        with socket.create_connection(address, timeout=20) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answer = read_all(client)
        assert answer.end == "eof" and answer.nbytes == 3 << 20
        assert answer.sha256 == sha(pattern(3 << 20, seed=2))
        deadline = time.monotonic() + 10
        while not origin.results and time.monotonic() < deadline:
            time.sleep(0.02)
        assert origin.results and origin.results[0].sha256 == sha(request)
        deadline = time.monotonic() + 10
        while not re.search(r"flow .*reason=eof", rp.stderr()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert re.search(r"flow .*reason=eof", rp.stderr()), rp.stderr()
    finally:
        origin.close()


@pytest.mark.timeout(60)
def test_uring_requested_but_blocked_fails_clearly(relays: Any) -> None:
    origin = Origin(respond_after_eof(10))
    try:
        rp = blocked_relay(relays, "uring", origin.address)
        with pytest.raises(NotReady, match="before READY"):
            rp.wait_ready()                        # exits without ever listening
        assert rp.wait_exit(30) != 0
        log = rp.stderr()
        assert "io_uring" in log and ("EPERM" in log or "not permitted" in log.lower()), log
        assert "seccomp" in log or "epoll" in log, log
    finally:
        origin.close()
