"""Checks of the configuration against this host: users and groups that must exist, and egress
slices the kernel would use as written.

Kernel facts behind the slice checks (docs/kernel-findings.md): IP_LOCAL_PORT_RANGE is honoured
only inside net.ipv4.ip_local_port_range (a slice outside it is *silently ignored*, connect()
then picks any ephemeral port) and skips net.ipv4.ip_local_reserved_ports.  relay.config.validate
calls :func:`check` in the same pass as the schema checks, so ``relay check`` reports both kinds
of problem together; each problem names the key path, the value and the reason.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from relay.config import files
from relay.config.model import EgressSlice, Listener
from relay.config.values import IPAddress
from relay.sock import IP_BIND_ADDRESS_NO_PORT, IP_LOCAL_PORT_RANGE

__all__ = [
    "PROC_PORT_RANGE",
    "PROC_RESERVED_PORTS",
    "Problem",
    "backend_loops",
    "check",
    "check_backends",
    "check_egress",
    "check_log_file",
    "check_users",
    "read_port_range",
    "read_reserved_ports",
]

PROC_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
PROC_RESERVED_PORTS = "/proc/sys/net/ipv4/ip_local_reserved_ports"
_U32 = struct.Struct("=I")


class Problem(NamedTuple):
    """One host problem: the key path, the value as written, the reason."""

    path: str
    value: str
    reason: str


def read_port_range(path: str = PROC_PORT_RANGE) -> tuple[int, int]:
    """net.ipv4.ip_local_port_range of this network namespace (also governs IPv6)."""
    with open(path) as f:
        lo, hi = f.read().split()
    return int(lo), int(hi)


def read_reserved_ports(path: str = PROC_RESERVED_PORTS) -> list[tuple[int, int]]:
    """net.ipv4.ip_local_reserved_ports as ranges ("8080,9000-9010" format; may be empty)."""
    with open(path) as f:
        text = f.read().strip()
    ranges: list[tuple[int, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo_s, _, hi_s = part.partition("-")
        ranges.append((int(lo_s), int(hi_s or lo_s)))
    return ranges


def check_users(user: str, group: str) -> Iterator[Problem]:
    """``relay.user`` / ``relay.group`` must exist here (privileges are dropped to them)."""
    # A NUL byte is refused by the schema checks; getpwnam() would raise ValueError on it.
    if user and "\0" not in user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            yield Problem("relay.user", user, "no such user on this host")
    if group and "\0" not in group:
        try:
            grp.getgrnam(group)
        except KeyError:
            yield Problem("relay.group", group, "no such group on this host")


def check_log_file(path: str, user: str = "", group: str = "") -> Iterator[Problem]:
    """``relay.log_file`` must be safe for root to open (relay.config.files: no link, no special
    file, no directory the worker user can write) and a file relay can append to: its directory
    exists, and the file (or, when it does not exist yet, the directory) is writable. Nothing is
    created."""
    if not path or "\0" in path:
        return
    unsafe = [Problem(*p) for p in files.check_log_file(path, user, group)]
    if unsafe:
        yield from unsafe
        return  # never open what is not safe to open
    key = "relay.log_file"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        yield Problem(key, path, f"directory {directory} does not exist")
        return
    if os.path.isdir(path):
        yield Problem(key, path, "is a directory")
        return
    if os.path.exists(path):
        # Open it the way the log handler will (append, which leaves the content alone):
        # access(2) says yes to root for files that open() refuses (EROFS on a read-only
        # mount, EINVAL from files that cannot seek to their end).
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            yield Problem(key, path, f"cannot be opened for appending: {exc.strerror or exc}")
            return
    elif not os.access(directory, os.W_OK):
        yield Problem(key, path, f"directory {directory} is not writable")


def _is_local_address(ip: IPAddress) -> bool:
    """An address of this host: binding to it works (no IP_TRANSPARENT, no port)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def backend_loops(bind: tuple[str, int], backend: IPAddress, port: int,
                  is_local: Callable[[IPAddress], bool] = _is_local_address) -> bool:
    """Would a connection to ``backend``:``port`` arrive at a listener bound to ``bind``?

    Linux sends a connect() to the unspecified address (0.0.0.0, ::) to the loopback address,
    and a wildcard listener receives connections to every local address of its family.
    """
    host, bind_port = bind
    if not bind_port or port != bind_port:
        return False
    listen_ip = ipaddress.ip_address(host)
    if listen_ip.version != backend.version:
        return False
    if backend.is_unspecified:
        return listen_ip.is_unspecified or listen_ip.is_loopback
    if listen_ip.is_unspecified:
        return is_local(backend)
    return listen_ip == backend


def check_backends(listeners: Sequence[tuple[int, Listener]]) -> Iterator[Problem]:
    """Backends that cannot work: a host name that does not resolve, an address that reaches a
    listener of this relay (every client would make the relay connect to itself until maxconn;
    the workers refuse such a backend at start too)."""
    for i, lst in listeners:
        addr = lst.backend_address
        if lst.mode != "backend" or addr is None or isinstance(addr, str):
            continue
        key = f"listener[{i}].backend"
        try:
            ips = [ipaddress.ip_address(addr.host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
                yield Problem(key, lst.backend, f"host name does not resolve: {reason}")
                continue
            ips = [ipaddress.ip_address(info[4][0]) for info in infos
                   if info[0] in (socket.AF_INET, socket.AF_INET6)]
        loop = next(((ip, j, other) for ip in ips for j, other in listeners
                     if backend_loops(other.bind_address, ip, addr.port)), None)
        if loop is not None:
            ip, j, other = loop
            shown = "" if str(ip) == addr.host else f" ({ip})"
            which = "this listener itself" if j == i else f"listener[{j}] of this relay"
            yield Problem(key, lst.backend,
                          f"reaches {which}{shown} at {other.bind}: every connection would "
                          "loop back into the relay")


def _probe_option(family: int) -> str | None:
    """Set IP_LOCAL_PORT_RANGE and IP_BIND_ADDRESS_NO_PORT on a scratch socket and read them
    back: the only reliable test that this kernel implements them (no version checks)."""
    probe_value = (40001 << 16) | 40000
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            if s.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT) != 1:
                return "kernel ignores IP_BIND_ADDRESS_NO_PORT"
            s.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, _U32.pack(probe_value))
            got = _U32.unpack(s.getsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, 4))[0]
            if got != probe_value:
                return f"kernel IP_LOCAL_PORT_RANGE read back {got:#x}, expected {probe_value:#x}"
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return "kernel lacks IP_LOCAL_PORT_RANGE (Linux 6.3+ needed)"
        if exc.errno == errno.EAFNOSUPPORT:
            return "address family not supported by this kernel"
        return f"probing IP_LOCAL_PORT_RANGE failed: {exc}"
    return None


def check_egress(egress: Sequence[tuple[int, EgressSlice]]) -> Iterator[Problem]:
    """Every reason the (index, slice) entries cannot be used safely on this host.

    The kernel supports the options (per family used); each slice lies inside
    net.ipv4.ip_local_port_range; no slice touches net.ipv4.ip_local_reserved_ports; slices of
    the same address do not overlap.
    """
    if not egress:
        return
    first_of: dict[int, tuple[int, EgressSlice]] = {}
    for i, e in egress:
        first_of.setdefault(e.family, (i, e))
    for family, (i, e) in sorted(first_of.items()):
        reason = _probe_option(family)
        if reason is not None:
            yield Problem(f"egress[{i}].address", e.address, reason)

    i0, e0 = egress[0]
    try:
        sys_lo, sys_hi = read_port_range()
    except (OSError, ValueError) as exc:
        yield Problem(f"egress[{i0}].ports", e0.ports, f"cannot read {PROC_PORT_RANGE}: {exc}")
        sys_lo, sys_hi = 0, -1
    try:
        reserved = read_reserved_ports()
    except (OSError, ValueError) as exc:
        yield Problem(f"egress[{i0}].ports", e0.ports, f"cannot read {PROC_RESERVED_PORTS}: {exc}")
        reserved = []

    for i, e in egress:
        lo, hi = e.port_range
        if sys_hi >= sys_lo and not (sys_lo <= lo and hi <= sys_hi):
            yield Problem(
                f"egress[{i}].ports",
                e.ports,
                f"outside net.ipv4.ip_local_port_range {sys_lo}-{sys_hi} "
                "(the kernel would silently ignore the slice)",
            )
        for r_lo, r_hi in reserved:
            if r_lo <= hi and lo <= r_hi:
                text = f"{r_lo}" if r_lo == r_hi else f"{r_lo}-{r_hi}"
                yield Problem(
                    f"egress[{i}].ports", e.ports, f"overlaps net.ipv4.ip_local_reserved_ports {text}"
                )
    for n, (i, a) in enumerate(egress):
        for j, b in egress[n + 1 :]:
            if a.ip == b.ip and a.port_range[0] <= b.port_range[1] and b.port_range[0] <= a.port_range[1]:
                yield Problem(
                    f"egress[{j}].ports",
                    b.ports,
                    f"overlaps egress[{i}] ports {a.ports} on address {a.address}",
                )


def check(
    user: str,
    group: str,
    egress: Sequence[tuple[int, EgressSlice]],
    admin_socket: str = "",
    log_file: str = "",
) -> list[Problem]:
    """All host problems of these settings and egress entries (and of the admin socket and log
    file paths, relay.config.files)."""
    return [
        *check_users(user, group),
        *check_egress(egress),
        *(Problem(*p) for p in files.check_admin_socket(admin_socket)),
        *check_log_file(log_file, user, group),
    ]
