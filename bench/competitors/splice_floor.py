"""The splice floor: splice_floor.c, compiled into the batch's temp dir on first use.

Two threads per connection doing blocking splice() through a pipe of the relay's default size,
nothing else: the kernel's price of a zero-copy relay on this machine, measured beside the relay
in the same batch (docs/single-stream.md). Measured on one stream only (contenders.BULK_TUNING).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
PIPE_BYTES = 1 << 20  # the relay's default pipe_size


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def available() -> str | None:
    """None when the floor can be built, else the reason it is skipped."""
    if compiler() is None:
        return "no C compiler (cc) to build bench/competitors/splice_floor.c"
    return None


def build(directory: Path) -> Path:
    """The compiled floor in `directory` (built once); raises RuntimeError with the compiler's words."""
    exe = directory / "splice_floor"
    if exe.exists():
        return exe
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc)")
    done = subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"cc {SOURCE.name} failed: {done.stderr.strip()[:400]}")
    return exe


def argv(exe: Path, backend_port: int) -> list[str]:
    return [str(exe), str(backend_port), str(PIPE_BYTES)]
