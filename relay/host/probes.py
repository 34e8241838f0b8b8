"""Host probes: what this machine has and allows, each found out by trying the thing itself.

Small, side-effect-free readers of /proc and sysctls, the effective capability set, and round
trips over loopback (splice through a pipe); ``versions()`` (what `relay --version` prints).
relay.host.doctor turns these into PASS/WARN/FAIL checks with the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from relay._version import __version__
from relay.procfs import read_proc

__all__ = [
    "CAP_SYS_ADMIN",
    "CAP_SYS_RESOURCE",
    "PAGE",
    "capabilities",
    "format_versions",
    "has_capability",
    "port_range_sysctl",
    "splice_roundtrip",
    "tcp_socket",
    "versions",
]

# Capability bits of /proc/self/status CapEff (<linux/capability.h>) the doctor asks about;
# relay.process.privs names the ones workers keep.
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24

PAGE = os.sysconf("SC_PAGE_SIZE")


def capabilities() -> int:
    """This process's effective capability set (CapEff) as a bit mask."""
    status = read_proc("/proc/self/status") or ""
    match = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return int(match.group(1), 16) if match else 0


def has_capability(cap: int) -> bool:
    """True if this process holds ``cap`` in its effective set."""
    return bool(capabilities() >> cap & 1)


@contextlib.contextmanager
def tcp_socket(family: socket.AddressFamily = socket.AF_INET) -> Iterator[socket.socket]:
    """A TCP socket closed on exit."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        yield s
    finally:
        s.close()


def port_range_sysctl() -> tuple[int, int] | None:
    """net.ipv4.ip_local_port_range as (lo, hi); None when unreadable."""
    text = read_proc("/proc/sys/net/ipv4/ip_local_port_range")
    try:
        lo, hi = (int(x) for x in (text or "").split())
    except ValueError:
        return None
    return lo, hi


def splice_roundtrip(size: int) -> int:
    """Move ``size`` bytes TCP socket -> pipe -> TCP socket with os.splice on loopback."""
    payload = os.urandom(size)
    received = bytearray()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(tcp_socket())
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(5)
        src_client = stack.enter_context(socket.create_connection(server.getsockname(), 5))
        src = stack.enter_context(server.accept()[0])
        dst = stack.enter_context(socket.create_connection(server.getsockname(), 5))
        dst_peer = stack.enter_context(server.accept()[0])
        src.setblocking(True)
        dst.setblocking(True)
        dst_peer.settimeout(5)

        def reader() -> None:
            with contextlib.suppress(OSError):
                while chunk := dst_peer.recv(65536):
                    received.extend(chunk)

        def writer() -> None:
            with contextlib.suppress(OSError):
                src_client.sendall(payload)
                src_client.shutdown(socket.SHUT_WR)

        threads = [threading.Thread(target=f, daemon=True) for f in (reader, writer)]
        for t in threads:
            t.start()
        r, w = os.pipe()
        stack.callback(os.close, r)
        stack.callback(os.close, w)
        while True:
            n = os.splice(src.fileno(), w, 65536)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
        dst.shutdown(socket.SHUT_WR)
        for t in threads:
            t.join(5)
    if bytes(received) != payload:
        raise OSError(errno.EIO, f"data differs after splice ({len(received)} of {size} bytes)")
    return size


def header_liburing_version() -> str | None:
    try:
        import liburing
    except ImportError:
        return None
    path = os.path.join(
        os.path.dirname(liburing.__file__), "include", "liburing", "io_uring_version.h"
    )
    text = read_proc(path) or ""
    major = re.search(r"IO_URING_VERSION_MAJOR\s+(\d+)", text)
    minor = re.search(r"IO_URING_VERSION_MINOR\s+(\d+)", text)
    return f"{major.group(1)}.{minor.group(1)}" if major and minor else None


def versions() -> dict[str, Any]:
    """What `relay --version` prints: relay, Python, Cython, liburing, kernel, engines."""
    out: dict[str, Any] = {
        "relay": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
    }
    try:
        from relay_ext import _core

        out["cython"] = f"{_core.CYTHON_VERSION} (built the core)"
    except (ImportError, AttributeError):
        try:
            import Cython

            out["cython"] = f"{Cython.__version__} (installed; core not built)"
        except ImportError:
            out["cython"] = "not installed (core not built)"
    try:
        import liburing

        header = header_liburing_version()
        out["liburing"] = f"python-liburing {liburing.__version__}, liburing headers {header}"
    except ImportError as exc:
        out["liburing"] = f"not installed ({exc})"
    out["kernel"] = platform.release()
    try:
        from relay.engines import available

        out["engines"] = {k: (v or "usable") for k, v in available().items()}
    except ImportError as exc:
        out["engines"] = {"error": f"relay.engines: {exc}"}
    return out


def format_versions(info: dict[str, Any]) -> str:
    lines = [f"relay {info['relay']}"]
    for key in ("python", "cython", "liburing", "kernel"):
        lines.append(f"  {key}: {info[key]}")
    lines.append("  engines:")
    for name, why in info["engines"].items():
        lines.append(f"    {name}: {why}")
    return "\n".join(lines) + "\n"
