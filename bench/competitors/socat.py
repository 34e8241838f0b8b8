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
