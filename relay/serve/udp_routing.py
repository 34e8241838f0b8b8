"""Per-listener UDP routing: for each new flow, the sockets the UDP core relays it through.

    router = UdpRouter(listener, cfg, own_addresses, ports)   # ports: this worker's allocator
    try:
        flow = router.open_flow(client, orig_dst)   # orig_dst: None unless the listener is tproxy
    except Denied as exc:                           # policy, loop, slice exhausted/unusable
        loop.refuse_flow(pending_id, hold_ms)
    except OSError:                                 # a socket call failed: refuse, count "error"
        ...
    else:
        fid = loop.add_flow(pending_id, flow.upstream_fd, flow.reply_fd, responses, tag)
        # from here the core owns both fds; on UEV_FLOW_DONE: router.release(flow)

backend mode: the upstream is a UDP socket connected to the backend (resolved once, here); the
kernel picks its source; replies go out through the listener socket (reply_fd = -1).

tproxy mode: the destination is the datagram's original destination. It goes through
relay.serve.policy and the loop guard like a TCP connection, then leaves through the egress
slice matching it (relay.serve.egress.EgressTable): bound to (egress address, a port from
relay.serve.udp_ports, never another) with SO_REUSEADDR (the port is shared with flows to other
destinations) and IP_TRANSPARENT when the address is not local, then connected. No slice
matches: the default route, as for TCP. The reply socket is bound to the original destination
(IP_TRANSPARENT + SO_REUSEADDR: the address is not ours, and every flow to that destination
binds it) and connected to the client: the client hears from the address it addressed, and nft
tproxy's socket lookup finds connected sockets first, so the flow's next datagrams arrive there.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from relay.config.model import Config, Listener
from relay.serve import slicecheck
from relay.serve.egress import Egress, EgressTable
from relay.serve.policy import Policy
from relay.serve.routing import Denied, SliceExhausted, _family, _unmap
from relay.serve.udp_ports import PortAllocator, SlicePorts
from relay.sock import make_transparent

__all__ = ["UdpFlow", "UdpRouter"]

_BIND_RETRIES = 8  # ports tried when bind() finds one taken by a socket that is not ours


@dataclass(slots=True)
class UdpFlow:
    """The sockets of one flow (fds owned by the caller until add_flow takes them)."""

    upstream_fd: int
    reply_fd: int  # -1: replies go out through the listener socket
    dest: tuple[str, int]
    egress: tuple[str, int] | None = None  # (egress address, slice port) when a slice is used
    slice: SlicePorts | None = None


def _drop_foreign(sock: socket.socket, peer: tuple[str, int]) -> int:
    """Drop the datagrams queued from anyone but ``peer``; returns how many.

    Between bind() and connect() a socket is an unconnected socket on its (address, port): the
    kernel's UDP lookup (and nft tproxy's, for a transparent reply socket bound to the original
    destination) may queue on it a datagram of *another* client or origin, and connect() does
    not purge the queue. Those must never reach the core as this flow's datagrams. The peer's
    own datagrams stay (the first one from the peer ends the scan: anything queued after it
    arrived in the same microseconds, and arrives after connect() only from the peer).
    """
    dropped = 0
    while True:
        try:
            _data, src = sock.recvfrom(1, socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return dropped
        except OSError:  # a queued ICMP error: the core reports it as the flow's error
            return dropped
        if _unmap(str(src[0])) == _unmap(peer[0]) and src[1] == peer[1]:
            return dropped
        try:
            sock.recv(1, socket.MSG_DONTWAIT)
        except OSError:
            return dropped
        dropped += 1


def _is_local(address: str) -> bool:
    """True when this host owns ``address`` (a plain bind works without IP_TRANSPARENT)."""
    try:
        with socket.socket(_family(address), socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


class UdpRouter:
    """Decides and opens the sockets of new UDP flows for one listener; one per listener per
    worker, used from the UDP loop's thread only. ValueError for a listener that cannot work."""

    def __init__(self, listener: Listener, cfg: Config, own_addresses: set[str],
                 ports: PortAllocator, egress: EgressTable | None = None) -> None:
        self.name = listener.name
        self.mode = listener.mode
        self.responses = listener.udp_responses
        self.oneway = listener.udp_oneway
        self.ports = ports
        # backend mode: the numeric backend sockaddr; the UDP core opens these flows itself
        # (the decision is the same for every client), Python only when that fails.
        self.core_backend: tuple[str | int, ...] | None = None
        self._backend: tuple[str, int] | None = None
        self._backend_family = socket.AF_UNSPEC
        if self.mode == "backend":
            backend = listener.backend_address
            if backend is None or isinstance(backend, str):
                raise ValueError(f"listener {self.name}: a UDP backend must be HOST:PORT")
            try:
                infos = socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                raise ValueError(f"listener {self.name}: backend {backend}: {exc}") from None
            family, _t, _p, _c, sockaddr = infos[0]
            self._backend = (str(sockaddr[0]), int(sockaddr[1]))
            self._backend_family = family
            # IPv6: (ip, port, flowinfo, scope_id), the scope matters for a link-local backend
            self.core_backend = (*self._backend, *(int(x) for x in sockaddr[2:4]))
        elif self.mode != "tproxy":
            raise ValueError(f"listener {self.name}: mode {self.mode!r} cannot carry UDP")
        self.egress = egress if egress is not None else EgressTable(cfg.egress)
        own = set(own_addresses) | self.egress.addresses()
        own |= {lst.bind_address.host for lst in cfg.listener}
        self.policy = Policy(cfg.policy, own)
        self._local: dict[str, bool] = {}
        self.foreign_dropped = 0  # datagrams queued in the bind()-connect() window (others')
        self._slices: dict[str, tuple[tuple[int, int], ...]] = {}
        for e in self.egress.entries:
            self._slices[e.address] = self._slices.get(e.address, ()) + ((e.lo, e.hi),)

    @property
    def core_dest(self) -> tuple[str, int] | None:
        """The destination of the flows the core opens (the backend), for the flow log."""
        return self._backend

    def open_flow(self, client: tuple[str, int], orig_dst: tuple[str, int] | None) -> UdpFlow:
        """Open the sockets of a new flow; raises Denied (SliceExhausted) or OSError, leaving
        nothing open."""
        if self._backend is not None:
            sock = socket.socket(self._backend_family, socket.SOCK_DGRAM)
            try:
                sock.connect(self._backend)
            except BaseException:
                sock.close()
                raise
            return UdpFlow(sock.detach(), -1, self._backend)
        if orig_dst is None:
            raise OSError(0, f"listener {self.name}: a tproxy datagram without its destination")
        ip, port = _unmap(orig_dst[0]), orig_dst[1]
        reason = self.policy.check(ip, port)
        if reason is not None:
            raise Denied(reason, f"destination {ip}:{port}")
        slices = self._slices.get(_unmap(client[0]))
        if slices is not None and any(lo <= client[1] <= hi for lo, hi in slices):
            raise Denied("loop", f"client {client[0]}:{client[1]} is this relay's egress")
        egress = self.egress.lookup(ip)
        flow = self._open_upstream(ip, port, egress)
        try:
            flow.reply_fd = self._open_reply(orig_dst, client)
        except BaseException:
            self.close_unused(flow)
            raise
        return flow

    def _open_upstream(self, ip: str, port: int, egress: Egress | None) -> UdpFlow:
        dest = (ip, port)
        if egress is None:
            # No slice for this destination: the default route, like a TCP connection.
            sock = socket.socket(_family(ip), socket.SOCK_DGRAM)
            try:
                sock.connect(dest)
                if sock.getsockname()[0] == ip:
                    # The kernel sources traffic to this host's own address from that address.
                    raise Denied("own_address", f"destination {ip}:{port} is this host")
            except BaseException:
                sock.close()
                raise
            return UdpFlow(sock.detach(), -1, dest)
        # Explicit bind() never lets the kernel pick outside the slice, but a slice that no
        # longer fits the port sysctls is refused for UDP as for TCP (relay.serve.slicecheck).
        unusable = slicecheck.WATCH.problem(egress.lo, egress.hi)
        if unusable is not None:
            raise Denied("slice_unusable", f"egress {egress.address}: {unusable}")
        share = self.ports.slice_of(egress)
        skip: set[int] = set()
        for _attempt in range(_BIND_RETRIES):
            chosen = share.take(dest, frozenset(skip))
            if chosen is None:
                break
            sock = socket.socket(egress.family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if not self._address_is_local(egress.address):
                    make_transparent(sock, f"egress {egress.address}")
                sock.bind((egress.address, chosen))
                sock.connect(dest)
                self.foreign_dropped += _drop_foreign(sock, dest)
            except OSError as exc:
                sock.close()
                share.give_back(dest, chosen)
                if exc.errno == errno.EADDRINUSE:  # a socket not ours holds it without REUSEADDR
                    skip.add(chosen)
                    continue
                raise
            except BaseException:
                sock.close()
                share.give_back(dest, chosen)
                raise
            return UdpFlow(sock.detach(), -1, dest, (egress.address, chosen), share)
        raise SliceExhausted(
            f"egress {egress.address} ports {egress.lo}-{egress.hi} "
            f"(worker share {len(share.ports)}) towards {ip}:{port}"
        )

    def _open_reply(self, orig_dst: tuple[str, int], client: tuple[str, int]) -> int:
        sock = socket.socket(_family(orig_dst[0]), socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            make_transparent(sock, f"reply socket {orig_dst[0]}:{orig_dst[1]}")
            sock.bind(orig_dst)
            sock.connect(client)
            self.foreign_dropped += _drop_foreign(sock, client)
        except BaseException:
            sock.close()
            raise
        return sock.detach()

    def _address_is_local(self, address: str) -> bool:
        local = self._local.get(address)
        if local is None:
            local = self._local[address] = _is_local(address)
        return local

    def release(self, flow: UdpFlow) -> None:
        """The flow ended (the core closed its sockets): its slice port is free again."""
        if flow.slice is not None and flow.egress is not None:
            flow.slice.give_back(flow.dest, flow.egress[1])
            flow.slice = None

    def close_unused(self, flow: UdpFlow) -> None:
        """The flow never reached the core: close its fds and give its port back."""
        for fd in (flow.upstream_fd, flow.reply_fd):
            if fd >= 0:
                socket.socket(fileno=fd).close()
        flow.upstream_fd = flow.reply_fd = -1
        self.release(flow)
