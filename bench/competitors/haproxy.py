"""HAProxy in TCP mode with `option splice-auto`, one thread, config generated into a temp dir."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CONFIG = """\
global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}
    tune.maxaccept 64

defaults
    mode tcp
    option splice-auto
    maxconn {maxconn}
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    timeout client-fin 10m
    timeout server-fin 10m

frontend fe
    bind 127.0.0.1:{listen_port}
    backlog 4096
    default_backend be

backend be
    server origin {backend_host}:{backend_port}
"""


def available() -> str | None:
    """None when haproxy can run, else the reason it is skipped."""
    exe = shutil.which("haproxy")
    if exe is None:
        return "haproxy not installed"
    try:
        subprocess.run([exe, "-v"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"haproxy -v failed: {exc}"
    return None


def version() -> str:
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


MAXPIPES = 128  # splice pipes; a bulk stream uses one per direction while data is pending


def write_config(directory: Path, listen_port: int, backend: tuple[str, int], nofile: int) -> Path:
    """maxconn is as high as the fd limit allows: HAProxy refuses to start when
    2 * maxconn + 2 * maxpipes + its own fds exceed the hard RLIMIT_NOFILE it cannot raise."""
    maxconn = min(40000, (nofile - 2 * MAXPIPES - 200) // 2)
    path = directory / f"haproxy-{listen_port}.cfg"
    path.write_text(
        CONFIG.format(listen_port=listen_port, backend_host=backend[0], backend_port=backend[1],
                      maxconn=maxconn, maxpipes=MAXPIPES)
    )
    return path


def argv(config: Path) -> list[str]:
    # -db: stay in the foreground, no daemon, so the harness owns the process.
    return ["haproxy", "-db", "-f", str(config)]
