"""Per-listener routing: for each accepted client, open the upstream socket it is relayed to.

    router = Router(listener, cfg, own_addresses)   # relay.config.model Listener and Config
    try:
        up = router.open_upstream(client_sock)       # client_sock: the accepted socket
    except Denied as exc:                            # exc.reason: why (see DENY_REASONS)
        reset the client (SO_LINGER {1,0} + close); count/log exc.reason
    except OSError:                                  # socket/bind/connect failed otherwise
        reset the client
    else:
        loop.add_pair(client_fd, up.fd, tag, connecting=up.connecting, prefix=up.prefix)
        # from here the core owns up.fd

Modes (listener.mode):
- backend: connect to listener.backend_address (TCP (host, port), resolved once here, or a unix
  path).
- tproxy: the destination is the accepted socket's local address (TPROXY keeps it).
- redirect: the destination is SO_ORIGINAL_DST (NAT rewrote it to us; conntrack remembers).
In tproxy/redirect the destination goes through relay.serve.policy, then leaves through the
relay.serve.egress soft-unicast slice chosen by destination (none matching: the default route). The
port the kernel picked is checked after connect(); outside the slice -> Denied, never a retry.

PROXY protocol v2: with proxy_protocol = "v2" the upstream first receives a header naming the
client and the address it connected to. Clients whose source is in trusted_proxies must start
with a PROXY v2 header themselves (`needs_header`): it is read (only its exact length, so no
payload byte is consumed, `proxyproto.HeaderReader`), parsed strictly, and its addresses are
forwarded instead of the proxy's. Bytes from any other source are never parsed. The server reads
it without waiting (a connection whose header is incomplete is parked in the engine loop until
readable, relay.serve.proxywait) and passes it to open_upstream(..., header=info,
header_read=True); a caller without a loop lets open_upstream read it, waiting up to
`proxy_header_timeout` seconds.

Each open_upstream is a few system calls: no DNS, no allocation beyond the socket, tables built
in the constructor.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from relay.config.model import Config, Listener
from relay.ops.log import log_every
from relay.serve import proxyproto, slicecheck
from relay.serve.egress import Egress, EgressTable, SliceViolation, bind_upstream, check_local_port
from relay.serve.policy import POLICY_DENY_REASONS, NetworkSet, Policy
from relay.sock import UNIX_PREFIX, original_destination, pack_sockaddr, reset_and_close

__all__ = ["DENY_REASONS", "Denied", "Router", "SliceExhausted", "Upstream"]

log = logging.getLogger("relay.routing")

# The deny vocabulary: every Denied.reason (the flow log writes "denied_<reason>" for TCP, the
# stats' "denied" keys): the relay.serve.policy reasons, then the router's own.
DENY_REASONS: tuple[str, ...] = (
    *POLICY_DENY_REASONS,
    "loop",  # the client is this relay's own egress (address and slice port): a routing loop
    "slice_exhausted",  # no free port in the slice for this destination (EADDRNOTAVAIL)
    "slice_violation",  # the kernel picked a local address/port outside the slice
    "slice_unusable",  # the slice no longer fits ip_local_port_range / reserved ports
    "no_original_destination",  # redirect mode: conntrack knows no pre-NAT destination
    "proxy_header_invalid",  # trusted source sent a malformed or truncated PROXY v2 header
    "proxy_header_timeout",  # trusted source sent no complete header in time
    "proxy_header_overflow",  # too many connections already waiting for their header
)

_EXHAUSTED_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})
_CONNECT_PENDING = frozenset({0, errno.EINPROGRESS})
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_MAPPED_V4_PREFIX = "::ffff:"
_LOG_INTERVAL = 1.0  # seconds between two log lines of the same kind (relay.ops.log.log_every)


class Denied(Exception):
    """The connection must not be relayed; `reason` is one of DENY_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SliceExhausted(Denied):
    """Every port of the egress slice is in use towards this destination."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("slice_exhausted", detail)


@dataclass(slots=True)
class Upstream:
    """An upstream socket being connected; the caller hands `fd` to the core.

    fd: non-blocking TCP or unix stream socket, owned by the caller (then the core).
    connecting: connect() returned EINPROGRESS (pass to add_pair; False = already connected).
    prefix: bytes to send upstream before any client byte (PROXY v2 header or b"").
    dest: (ip, port) connected to; ("unix:/path", 0) for a unix backend.
    egress: local (ip, port) of the upstream socket when an egress slice was used, else None.
    egress_address: the egress address used, or None (default route / backend mode).
    """

    fd: int
    connecting: bool
    prefix: bytes
    dest: tuple
    egress: tuple | None = None
    egress_address: str | None = None


def _unmap(ip: str) -> str:
    """'::ffff:1.2.3.4' -> '1.2.3.4': connect IPv4 destinations from an IPv4 socket."""
    if ip.startswith(_MAPPED_V4_PREFIX) and "." in ip:
        return ip[len(_MAPPED_V4_PREFIX) :]
    return ip


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


class Router:
    """Decides and opens the upstream for one listener. Build one per listener per config
    (generation); not thread-safe (one per worker loop). Raises ValueError for a listener that
    cannot work (unknown mode, backend that is the listener itself, unresolvable backend)."""

    def __init__(
        self,
        listener: Listener,
        cfg: Config,
        own_addresses: set[str],
        *,
        proxy_header_timeout: float = 0.5,
    ) -> None:
        self.name = listener.name
        self.mode = listener.mode
        self.proxy_v2 = listener.proxy_protocol == "v2"
        self.proxy_header_timeout = proxy_header_timeout
        # What open_upstream needs beyond the client's peer address: its local address (tproxy's
        # original destination, a PROXY v2 header's destination), or the socket itself
        # (redirect asks conntrack through it).
        self.wants_local = self.mode == "tproxy" or (self.mode == "backend" and self.proxy_v2)
        self.needs_socket = self.mode == "redirect"
        self.trusted = NetworkSet(listener.trusted_networks)
        self.any_trusted = bool(self.trusted)  # per connection: a bool, not a __bool__ call
        self.closed = False

        listener_binds: set[tuple[str, int]] = {
            lst.bind_address for lst in (*cfg.listener, listener)
        }
        self._backend_unix: str | None = None
        self._backend_addr: tuple[str, int] | None = None
        self._backend_family = socket.AF_UNSPEC
        # An IP backend packed for the core (Loop.add_pair_connect: the loop opens and connects
        # the upstream itself), and the flow log's destination for it.
        self.backend_sockaddr: bytes | None = None
        self.backend_dest: tuple[str, int] | None = None
        if self.mode == "backend":
            self._setup_backend(listener, listener_binds, own_addresses)

        self.egress = EgressTable(cfg.egress)
        own = set(own_addresses) | self.egress.addresses()
        own |= {ip for ip, _port in listener_binds}
        self.own_addresses = frozenset(own)
        self.policy = Policy(cfg.policy, own)
        # A client coming *from* one of our egress (address, slice) pairs is our own upstream
        # connection routed back into a listener: a loop.
        self._egress_slices: dict[str, tuple[tuple[int, int], ...]] = {}
        for e in self.egress.entries:
            self._egress_slices[e.address] = self._egress_slices.get(e.address, ()) + (
                (e.lo, e.hi),
            )

    # ------------------------------------------------------------------ construction helpers

    def _setup_backend(
        self, listener: Listener, listener_binds: set[tuple[str, int]], own: set[str]
    ) -> None:
        backend = listener.backend_address
        if backend is None:
            raise ValueError(f"listener {self.name}: mode backend needs a backend")
        if isinstance(backend, str):
            self._backend_unix = backend
            self._backend_family = socket.AF_UNIX
            return
        host, port = backend
        # Resolved once per config: open_upstream must never do DNS.
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"listener {self.name}: backend {backend}: {exc}") from None
        family, _t, _p, _c, sockaddr = infos[0]
        addr = (str(sockaddr[0]), int(sockaddr[1]))
        for bind_ip, bind_port in listener_binds:
            wildcard = bind_ip in ("0.0.0.0", "::")
            local = (
                addr[0] in own
                or addr[0].startswith("127.")
                or addr[0] in ("::1", "0.0.0.0", "::")  # connect() to 0.0.0.0/:: is this host
            )
            if bind_port == addr[1] and (bind_ip == addr[0] or (wildcard and local)):
                raise ValueError(
                    f"listener {self.name}: backend {backend} is a listener of this relay (loop)"
                )
        self._backend_addr = addr
        self._backend_family = family
        self.backend_sockaddr = pack_sockaddr(family, sockaddr)
        self.backend_dest = addr

    # ------------------------------------------------------------------ per connection

    def needs_header(self, client: socket.socket | None, peer: tuple | None) -> bool:
        """Must this client send a PROXY v2 header first (its source is a trusted proxy)?
        `client` None: an IP client whose `peer` is given."""
        if not self.any_trusted or (client is not None and client.family == socket.AF_UNIX):
            return False
        if peer is None:
            assert client is not None
            peer = client.getpeername()
        return peer[0] in self.trusted

    def open_upstream(
        self,
        client: socket.socket | None,
        peer: tuple | None = None,
        header: proxyproto.ProxyInfo | None = None,
        header_read: bool = False,
        local: tuple | None = None,
    ) -> Upstream:
        """Open (start connecting) the upstream for accepted socket `client`.

        `peer`: client.getpeername() if the caller already has it (saves a system call).
        `local`: client.getsockname() if the caller already has it (likewise).
        `client` may be None for an IP client when the caller gives `peer`, `local` if
        `wants_local`, header_read=True, and the router does not `needs_socket`: the engine's
        accept already told it all (no socket object, no system call).
        `header_read`: the caller already read the client's PROXY v2 header (`header`, or None
        when the client needs none); otherwise a trusted client's header is read here, waiting
        up to proxy_header_timeout (never from an event loop: see the module docstring).
        Raises Denied (reason in DENY_REASONS; SliceExhausted for "slice_exhausted") when the
        connection must be refused, OSError when a socket call fails. Either way nothing is
        left open; the caller resets the client.
        """
        if self.closed:
            raise RuntimeError(f"router for listener {self.name} is closed")
        info = header
        if not header_read and self.needs_header(client, peer):
            assert client is not None
            info = self._read_proxy_header(client)
        if self.mode == "backend":
            return self._open_backend(client, peer, info, local)
        return self._open_transparent(client, peer, info, local)

    def backend_prefix(
        self,
        client: socket.socket | None,
        peer: tuple | None,
        info: proxyproto.ProxyInfo | None,
        local: tuple | None,
    ) -> bytes:
        """What _open_backend sends upstream first (b"" without PROXY v2), for a caller that
        has the core connect `backend_sockaddr` itself. OSError as open_upstream."""
        return self._prefix(client, peer, info, local) if self.proxy_v2 else b""

    def _prefix(
        self,
        client: socket.socket | None,
        peer: tuple | None,
        info: proxyproto.ProxyInfo | None,
        dest: tuple | None = None,
    ) -> bytes:
        """PROXY v2 header (or b""): the trusted proxy's view if it sent one, else the real
        client and the address it connected to (`dest`, default the accepted socket's local)."""
        if not self.proxy_v2:
            return b""
        if info is not None and info.command == "PROXY":
            return proxyproto.build(info.src, info.dst)
        if client is not None and client.family == socket.AF_UNIX:
            return proxyproto.build_local()
        if peer is None or dest is None:
            assert client is not None
            peer = peer if peer is not None else client.getpeername()
            dest = dest if dest is not None else client.getsockname()
        return proxyproto.build(peer, dest)

    def _open_backend(
        self,
        client: socket.socket | None,
        peer: tuple | None,
        info: proxyproto.ProxyInfo | None,
        local: tuple | None,
    ) -> Upstream:
        prefix = self._prefix(client, peer, info, local) if self.proxy_v2 else b""
        # The upstream is detached at once: the C socket type (_socket.socket) does what the
        # socket.socket subclass does here without its Python-level __init__/detach.
        if self._backend_unix is not None:
            sock = _socket.socket(socket.AF_UNIX, _STREAM_NONBLOCK)
            target: Any = self._backend_unix
            dest: tuple = (UNIX_PREFIX + self._backend_unix, 0)
        else:
            assert self._backend_addr is not None
            sock = _socket.socket(self._backend_family, _STREAM_NONBLOCK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see relay/sock.py
            target = dest = self._backend_addr
        try:
            rc = sock.connect_ex(target)
            if rc not in _CONNECT_PENDING:
                # unix sockets: EAGAIN = backlog full; both: ECONNREFUSED, ENOENT, ...
                raise OSError(rc, f"connect to backend {dest[0]}:{dest[1]}: {os.strerror(rc)}")
        except BaseException:
            sock.close()
            raise
        return Upstream(sock.detach(), rc == errno.EINPROGRESS, prefix, dest)

    def _open_transparent(
        self,
        client: socket.socket | None,
        peer: tuple | None,
        info: proxyproto.ProxyInfo | None,
        local: tuple | None,
    ) -> Upstream:
        try:
            if local is not None and self.mode == "tproxy":
                ip, port = local[0], local[1]  # TPROXY kept the destination: see sock.py
            else:
                assert client is not None
                ip, port = original_destination(client, self.mode)
        except OSError as exc:
            # ENOENT: conntrack has no NAT entry for it; ENOPROTOOPT: nf_conntrack not loaded.
            if self.mode == "redirect" and exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
                raise Denied("no_original_destination", "connection was not NATed") from None
            raise
        ip = _unmap(ip)
        reason = self.policy.check(ip, port)
        if reason is not None:
            raise Denied(reason, f"destination {ip}:{port}")
        if self._egress_slices:
            if peer is None:
                assert client is not None
                peer = client.getpeername()
            slices = self._egress_slices.get(_unmap(peer[0]))
            if slices is not None and any(lo <= peer[1] <= hi for lo, hi in slices):
                raise Denied("loop", f"client {peer[0]}:{peer[1]} is this relay's egress")
        prefix = self._prefix(client, peer, info, (ip, port))
        egress = self.egress.lookup(ip)
        if egress is not None:
            unusable = slicecheck.WATCH.problem(egress.lo, egress.hi)
            if unusable is not None:
                log_every(
                    log, f"slice_unusable {egress.address}", _LOG_INTERVAL,
                    "egress %s ports %d-%d unusable: %s (the kernel would ignore the slice); "
                    "clients reset before connect()", egress.address, egress.lo, egress.hi,
                    unusable,
                )
                raise Denied("slice_unusable", f"egress {egress.address}: {unusable}")
        sock = socket.socket(_family(ip), socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see relay/sock.py
        try:
            if egress is not None:
                bind_upstream(sock, egress)
            rc = sock.connect_ex((ip, port))
            if rc not in _CONNECT_PENDING:
                if egress is not None and rc in _EXHAUSTED_ERRNOS:
                    self._log_exhausted(egress, ip, port)
                    raise SliceExhausted(
                        f"egress {egress.address} ports {egress.lo}-{egress.hi} "
                        f"to {ip}:{port}"
                    )
                raise OSError(rc, f"connect to {ip}:{port}: {os.strerror(rc)}")
            local = None
            if egress is not None:
                # With IP_BIND_ADDRESS_NO_PORT the port is assigned inside connect(), so it
                # is known now even though the handshake is still in flight.
                try:
                    local = check_local_port(sock, egress)
                except SliceViolation as exc:
                    log_every(
                        log, f"slice_violation {egress.address}", _LOG_INTERVAL,
                        "egress slice violation: %s; client reset", exc,
                    )
                    reset_and_close(sock)
                    raise Denied("slice_violation", str(exc)) from None
            elif sock.getsockname()[0] == ip:
                # The kernel sources a connection to one of this host's own addresses from
                # that same address (its local route's preferred source): the destination is
                # this host, e.g. a wildcard listener's port. Relaying would loop.
                reset_and_close(sock)
                raise Denied("own_address", f"destination {ip}:{port} is this host")
        except BaseException:
            sock.close()
            raise
        return Upstream(
            sock.detach(),
            rc == errno.EINPROGRESS,
            prefix,
            (ip, port),
            local,
            egress.address if egress is not None else None,
        )

    def _log_exhausted(self, egress: Egress, ip: str, port: int) -> None:
        log_every(
            log, f"slice_exhausted {egress.address}", _LOG_INTERVAL,
            "egress slice exhausted: %s ports %d-%d has no free port towards %s:%d; client reset",
            egress.address, egress.lo, egress.hi, ip, port,
        )

    def _read_proxy_header(self, client: socket.socket) -> proxyproto.ProxyInfo:
        """Read exactly one PROXY v2 header from a trusted client, waiting up to
        proxy_header_timeout for the rest of it (blocking: for callers without a loop)."""
        deadline = time.monotonic() + self.proxy_header_timeout
        reader = proxyproto.HeaderReader()
        poller = select.poll()
        poller.register(client.fileno(), select.POLLIN)
        while True:
            try:
                info = reader.read_from(client)
            except proxyproto.ProxyProtocolError as exc:
                raise Denied("proxy_header_invalid", str(exc)) from None
            if info is not None:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Denied("proxy_header_timeout",
                             f"{len(reader.buf)} of {reader.need} bytes in time")
            poller.poll(max(1, int(remaining * 1000)))

    def close(self) -> None:
        """Release the router; idempotent. It holds no sockets between calls, so this only
        makes later open_upstream calls fail loudly (a retired config generation)."""
        self.closed = True
