"""socat as a forking TCP proxy (one child process per connection)."""

from __future__ import annotations

import shutil


def available() -> str | None:
    """None when socat can run, else the reason it is skipped."""
    return None if shutil.which("socat") else "socat not installed"


def argv(listen_port: int, backend: tuple[str, int]) -> list[str]:
    host, port = backend
    return [
        "socat",
        f"TCP-LISTEN:{listen_port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
        f"TCP:{host}:{port},nodelay",
    ]


def udp_argv(listen_port: int, backend: tuple[str, int]) -> list[str]:
    """One-way UDP relay: every datagram received on the port is sent on to the backend.

    UDP4-RECV takes datagrams from any peer in one process (no fork per peer, unlike
    UDP4-RECVFROM,fork): the fastest socat setup for the one-way load the UDP driver sends.
    """
    host, port = backend
    return [
        "socat", "-u", "-b", "65536",
        f"UDP4-RECV:{listen_port},bind=127.0.0.1,rcvbuf=4194304",
        f"UDP4-SENDTO:{host}:{port}",
    ]
