"""Host probes: what this machine has and allows, each found out by trying the thing itself.

Small, side-effect-free readers of /proc and sysctls, the effective capability set, and round
trips over loopback (splice through a pipe; a datagram's original destination; UDP port sharing);
``versions()`` (what `relay --version` prints).
relay.host.doctor turns these into PASS/WARN/FAIL checks with the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import select
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

from relay._version import __version__
from relay.procfs import read_proc
from relay.sock import IP_TRANSPARENT, IPV6_TRANSPARENT

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
    "udp_origdst_roundtrip",
    "udp_port_sharing",
    "udp_reuseport",
    "versions",
]

# Capability bits of /proc/self/status CapEff (<linux/capability.h>) the doctor asks about;
# relay.process.privs names the ones workers keep.
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24

PAGE = os.sysconf("SC_PAGE_SIZE")

# <linux/in.h>, <linux/in6.h>: ask for each datagram's original destination as a control message
# (the cmsg type on receive is the same number: IP_ORIGDSTADDR, IPV6_ORIGDSTADDR).
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
_ORIGDST_CMSG_SPACE = socket.CMSG_SPACE(28)  # a sockaddr_in6 (28 bytes) fits either family
_PROBE_TIMEOUT = 2.0


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


@contextlib.contextmanager
def udp_socket(family: socket.AddressFamily = socket.AF_INET) -> Iterator[socket.socket]:
    """A UDP socket closed on exit."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        yield s
    finally:
        s.close()


def _loopback(family: socket.AddressFamily) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def _recv_within(sock: socket.socket, what: str) -> None:
    """Wait until ``sock`` has a datagram; OSError(ETIMEDOUT) naming ``what`` if none comes."""
    if not select.select([sock], [], [], _PROBE_TIMEOUT)[0]:
        raise OSError(errno.ETIMEDOUT, f"no datagram within {_PROBE_TIMEOUT} s ({what})")


def udp_origdst_roundtrip(family: socket.AddressFamily = socket.AF_INET) -> tuple[str, int]:
    """Send one datagram over loopback to a socket with IP_TRANSPARENT and IP_RECVORIGDSTADDR
    (IPv6: the IPV6_ options) and return the original destination its control message names.

    This is exactly what a transparent UDP listener does per datagram. Setting IP_TRANSPARENT
    needs CAP_NET_ADMIN (EPERM otherwise); a missing control message raises ENOMSG."""
    v6 = family == socket.AF_INET6
    level = socket.IPPROTO_IPV6 if v6 else socket.SOL_IP
    host = _loopback(family)
    with udp_socket(family) as listener, udp_socket(family) as sender:
        listener.setsockopt(level, IPV6_TRANSPARENT if v6 else IP_TRANSPARENT, 1)
        listener.setsockopt(level, IPV6_RECVORIGDSTADDR if v6 else IP_RECVORIGDSTADDR, 1)
        listener.bind((host, 0))
        sender.sendto(b"origdst probe", listener.getsockname())
        _recv_within(listener, "loopback datagram to the transparent socket")
        _data, ancillary, _flags, _peer = listener.recvmsg(64, _ORIGDST_CMSG_SPACE)
        for cmsg_level, cmsg_type, cmsg_data in ancillary:
            if cmsg_level != level or cmsg_type != (IPV6_RECVORIGDSTADDR if v6
                                                    else IP_RECVORIGDSTADDR):
                continue
            # struct sockaddr_in / sockaddr_in6: family, port (network order), address
            port = struct.unpack_from("!H", cmsg_data, 2)[0]
            if v6:
                return socket.inet_ntop(socket.AF_INET6, cmsg_data[8:24]), port
            return socket.inet_ntop(socket.AF_INET, cmsg_data[4:8]), port
    raise OSError(errno.ENOMSG, "the datagram came without an ORIGDSTADDR control message")


def udp_port_sharing() -> int:
    """The egress allocator's mechanism on loopback: two UDP sockets with SO_REUSEADDR bound to
    the same (address, port), each connected to a different destination; each destination's
    reply must reach only the socket connected to it. Returns the shared port.

    Linux lets SO_REUSEADDR UDP sockets share a bound port, and a connected socket's 4-tuple
    scores higher than an unconnected one in the lookup, so each reply finds its own socket."""
    host = "127.0.0.1"
    with contextlib.ExitStack() as stack:
        dests = [stack.enter_context(udp_socket()) for _ in range(2)]
        for d in dests:
            d.bind((host, 0))
        first = stack.enter_context(udp_socket())
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind((host, 0))
        port = first.getsockname()[1]
        second = stack.enter_context(udp_socket())
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        second.bind((host, port))  # EADDRINUSE here: the kernel does not share the port
        first.connect(dests[0].getsockname())
        second.connect(dests[1].getsockname())
        for i, (sock, dest) in enumerate(((first, dests[0]), (second, dests[1]))):
            sock.send(b"out %d" % i)
            _recv_within(dest, f"datagram to destination {i}")
            data, source = dest.recvfrom(64)
            dest.sendto(b"back %d" % i, source)
        for i, sock in enumerate((first, second)):
            _recv_within(sock, f"reply of destination {i}")
            got = sock.recv(64)
            if got != b"back %d" % i:
                raise OSError(errno.EIO, f"socket {i} received {got!r}: replies were crossed")
    return port


def udp_reuseport(count: int = 2) -> int:
    """Bind ``count`` UDP sockets with SO_REUSEPORT to one loopback port (what per-worker
    listeners do); returns the port. EADDRINUSE means the kernel refuses to share it."""
    with contextlib.ExitStack() as stack:
        port = 0
        for _ in range(count):
            s = stack.enter_context(udp_socket())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
    return port


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
