"""Socket helpers: constants Python 3.11 lacks, listeners, original destination.

Addresses arrive parsed (relay.config.values): nothing here reads a "HOST:PORT" string.

Everything here runs at start (listeners) or once per accepted connection
(`original_destination`), so it does no DNS and at most one system call per call.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from typing import Any

__all__ = [
    "IP_TRANSPARENT",
    "IP_BIND_ADDRESS_NO_PORT",
    "IP_LOCAL_PORT_RANGE",
    "SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP6T_SO_ORIGINAL_DST",
    "LISTEN_BACKLOG",
    "UNIX_PREFIX",
    "IP_RECVORIGDSTADDR",
    "IPV6_RECVORIGDSTADDR",
    "address_in_use",
    "pack_sockaddr",
    "check_address_free",
    "format_address",
    "format_local_address",
    "make_transparent",
    "open_listener",
    "open_udp_listeners",
    "original_destination",
]

# <linux/in.h>: lets a socket bind to / accept for an address that is not local to this host
# (TPROXY ingress, soft-unicast egress). Needs CAP_NET_ADMIN or CAP_NET_RAW.
IP_TRANSPARENT = 19
# <linux/in.h>: bind() records the address only; the port is chosen at connect() time, when the
# kernel knows the full 4-tuple, so one local port can serve many destinations.
IP_BIND_ADDRESS_NO_PORT = 24
# <linux/in.h> (Linux 6.3+): per-socket ephemeral range, value `hi << 16 | lo` as a u32. The
# kernel silently ignores it when it lies outside net.ipv4.ip_local_port_range.
IP_LOCAL_PORT_RANGE = 51
# <linux/netfilter_ipv4.h>: the pre-NAT destination of a REDIRECTed/DNATed connection (SOL_IP).
SO_ORIGINAL_DST = 80
# <linux/in6.h>: IPv6 twin of IP_TRANSPARENT (SOL_IPV6); both set the same socket flag.
IPV6_TRANSPARENT = 75
# <linux/netfilter_ipv6/ip6_tables.h>: SO_ORIGINAL_DST for IPv6 (SOL_IPV6).
IP6T_SO_ORIGINAL_DST = 80
# <linux/in.h> / <linux/in6.h>: each received datagram carries its original destination in an
# IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message (nft tproxy leaves the header untouched).
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74

LISTEN_BACKLOG = 4096
UNIX_PREFIX = "unix:"

_SOL_IPV6 = socket.IPPROTO_IPV6
_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port (net order), addr, zero pad
_SOCKADDR_IN6 = struct.Struct("=H2sI16sI")  # family, port, flowinfo, addr, scope id


LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0 s}: close() sends an RST, not a FIN
LINGER_OFF = struct.pack("ii", 0, 0)  # SO_LINGER {off}: the default close (FIN after the data)


def arm_reset(sock: socket.socket, armed: bool = True) -> bool:
    """Make the next close() of `sock` send an RST: the peer must see a truncated stream as
    a reset, never as a clean end of data. armed=False: back to the default close (FIN after
    the data). False when the socket is already gone."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST if armed else LINGER_OFF)
    except OSError:
        return False
    return True


def reset_and_close(sock: socket.socket) -> None:
    """Close `sock` with an RST (SO_LINGER {1, 0})."""
    arm_reset(sock)
    sock.close()


def format_address(address: tuple[Any, ...] | str | None) -> str:
    """An address as people write it: "1.2.3.4:80", "[2001:db8::1]:80" (any IPv6 sockaddr
    tuple), a unix path as is, "-" for none."""
    if address is None:
        return "-"
    if isinstance(address, str):
        return address or "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def format_local_address(sock: socket.socket) -> str:
    """``sock``'s own address as format_address writes it; a unix socket's as "unix:/path"."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return UNIX_PREFIX + (name if isinstance(name, str) else name.decode(errors="replace"))
    return format_address(name)


def address_in_use(what: str, kind: int = socket.SOCK_STREAM) -> OSError:
    """The refusal of an address another socket already serves (EADDRINUSE), in one line.
    Only a TCP listener may share its address on purpose (reuseport = true): a UDP listener's
    sockets always set SO_REUSEPORT among themselves, so no setting would help there."""
    if kind == socket.SOCK_DGRAM:
        return OSError(errno.EADDRINUSE,
                       f"{what}: address already in use: another process already serves this "
                       "UDP address")
    return OSError(
        errno.EADDRINUSE,
        f"{what}: address already in use: another process (a second relay?) serves it; "
        "set reuseport = true on every listener meant to share it",
    )


def check_address_free(address: tuple[str, int], kind: int = socket.SOCK_STREAM,
                       what: str = "") -> None:
    """Raise `address_in_use` when any socket of this host is bound to `address` (IP literal,
    port) for `kind` (SOCK_STREAM or SOCK_DGRAM), reuseport or not.

    For callers that must set SO_REUSEPORT on their own sockets (one per worker): the kernel
    lets every socket with SO_REUSEPORT (same user) join a port, so it would never refuse a
    second relay. A scratch socket *without* SO_REUSEPORT cannot bind a port that any other
    socket holds: its bind is the probe. (TCP keeps SO_REUSEADDR so that connections in
    TIME_WAIT do not count; UDP must not set it: there it means sharing.)
    """
    host, port = address
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise address_in_use(what or format_address(address), kind) from None
            # EADDRNOTAVAIL and friends: the caller's own bind reports them


def make_transparent(sock: socket.socket, what: str, recv_origdst: bool = False) -> None:
    """IP_TRANSPARENT / IPV6_TRANSPARENT (bind to and receive for addresses that are not local:
    TPROXY listeners, soft-unicast egress, UDP reply sockets); with recv_origdst also
    IP(V6)_RECVORIGDSTADDR, each datagram's original destination in a cmsg. A refusal raises
    OSError (PermissionError for EPERM) naming `what` and the capability it needs."""
    v6 = sock.family == socket.AF_INET6
    level = _SOL_IPV6 if v6 else socket.SOL_IP
    try:
        sock.setsockopt(level, IPV6_TRANSPARENT if v6 else IP_TRANSPARENT, 1)
    except OSError as exc:
        raise OSError(exc.errno, f"{what}: IP_TRANSPARENT refused ({exc.strerror}); "
                      "it needs CAP_NET_ADMIN or CAP_NET_RAW") from None
    if recv_origdst:
        sock.setsockopt(level, IPV6_RECVORIGDSTADDR if v6 else IP_RECVORIGDSTADDR, 1)


def open_listener(address: tuple[str, int] | str, *, transparent: bool = False,
                  reuseport: bool = False) -> socket.socket:
    """Bind and listen on `address`: (IP literal, port) for TCP, a str path for a unix socket.

    TCP: SO_REUSEADDR, IPV6_V6ONLY on IPv6 binds (an IPv6 wildcard must not swallow IPv4),
    IP_TRANSPARENT / IPV6_TRANSPARENT when `transparent` (tproxy mode: TPROXY delivers
    connections addressed to non-local destinations). SO_REUSEPORT only with `reuseport`:
    workers inherit this one socket and need no option to share it; without SO_REUSEPORT the
    kernel refuses (EADDRINUSE) a second relay started on an address already served, instead of
    silently splitting its traffic. With `reuseport` any process of the same user that also
    sets it may join the port: the operator asked for that.
    A unix path: a stream unix socket; a stale socket file at that path is replaced, any other
    kind of file is an error. The socket is non-blocking with a backlog of 4096.
    """
    if isinstance(address, str):
        return _open_unix_listener(address)
    host, port = address
    shown = format_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # host is a normalised IP
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # TCP_NODELAY: a relay writes what it read, when it read it; Nagle would hold the short
        # tail of a response (a 64 KiB body is one loopback MSS + a few hundred bytes) until the
        # client ACKs the full segment before it, and a client in delayed-ACK mode waits 40 ms
        # (TCP_DELACK_MIN) to do so: p99 40 ms for every keep-alive response of that shape.
        # Accepted sockets inherit the option from the listener (the child is a clone of the
        # listening socket), so it costs no system call per connection on this side; upstream
        # sockets set it themselves (relay/serve/routing.py).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            make_transparent(sock, f"listener {shown}")
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise address_in_use(f"listener {shown}") from None
            raise OSError(exc.errno, f"listener {shown}: bind failed: {exc.strerror}") from None
        _listen(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp_listeners(
    address: tuple[str, int],
    count: int,
    *,
    transparent: bool = False,
    existing: list[socket.socket] | None = None,
) -> list[socket.socket]:
    """``count`` UDP sockets bound to ``address`` in one SO_REUSEPORT group (one per worker
    slot): the kernel hashes each datagram's 4-tuple over the group, so a flow always reaches
    the same socket, also through nft tproxy's socket lookup.

    ``existing``: the group bound earlier (a reload): they are kept, in order, and only the
    missing ones are bound (to the port of the first). Otherwise a probe bind without
    SO_REUSEPORT first: when another process already serves that UDP address, EADDRINUSE with a
    clear message rather than silently sharing its datagrams. ``transparent``: IP_TRANSPARENT and
    IP_RECVORIGDSTADDR (IPv6: IPV6_TRANSPARENT, IPV6_RECVORIGDSTADDR). Non-blocking; IPv6 binds
    are IPV6_V6ONLY.
    """
    host, port = address
    shown = format_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    group = list(existing or [])
    if group:
        port = group[0].getsockname()[1]
    else:
        check_address_free((host, port), socket.SOCK_DGRAM, f"UDP listener {shown}")
    fresh: list[socket.socket] = []
    try:
        while len(group) + len(fresh) < count:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            fresh.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 1)
            if transparent:
                make_transparent(sock, f"UDP listener {shown}", recv_origdst=True)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise OSError(exc.errno, f"UDP listener {shown}: bind failed: {exc.strerror}"
                              ) from None
            port = sock.getsockname()[1]
            sock.setblocking(False)
    except BaseException:
        for sock in fresh:
            sock.close()
        raise
    return (group + fresh)[:count]


def _open_unix_listener(path: str) -> socket.socket:
    if not path:
        raise ValueError("unix listener: empty path")
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"unix listener {path}: exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        _listen(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen(sock: socket.socket) -> None:
    """The last step of every listener: listen with our backlog, then non-blocking."""
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)


def original_destination(sock: socket.socket, mode: str) -> tuple[str, int]:
    """Where the client meant to go, as (ip, port).

    tproxy (and backend): TPROXY leaves the destination untouched, so it is the accepted
    socket's local address. redirect: NAT rewrote the destination to us; conntrack still knows
    the original, which SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6) reports. Raises OSError
    (ENOENT) when conntrack has no entry, i.e. the connection was not NATed.
    """
    if mode != "redirect":
        local = sock.getsockname()
        return local[0], local[1]
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        _fam, port_b, _flow, addr6, _scope = _SOCKADDR_IN6.unpack(raw)
        return socket.inet_ntop(socket.AF_INET6, addr6), int.from_bytes(port_b, "big")
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    _fam, port_b, addr4 = _SOCKADDR_IN.unpack(raw)
    return socket.inet_ntop(socket.AF_INET, addr4), int.from_bytes(port_b, "big")


def pack_sockaddr(family: int, sockaddr: tuple) -> bytes | None:
    """A getaddrinfo() address as the kernel's struct sockaddr_in / sockaddr_in6, for the
    core's ``Loop.add_pair_connect`` (packed once, not per connection). None for what that path
    does not take: another family, or an IPv6 flow label."""
    if family == socket.AF_INET:
        return _SOCKADDR_IN.pack(socket.AF_INET, sockaddr[1].to_bytes(2, "big"),
                                 socket.inet_pton(socket.AF_INET, sockaddr[0]))
    if family == socket.AF_INET6 and not sockaddr[2]:
        return _SOCKADDR_IN6.pack(socket.AF_INET6, sockaddr[1].to_bytes(2, "big"), 0,
                                  socket.inet_pton(socket.AF_INET6, sockaddr[0].split("%")[0]),
                                  sockaddr[3])
    return None
