"""The listener set: the listening sockets the supervisor binds and every worker inherits.

Bound once, as root, before any worker drops privileges, and kept across reloads: a reload binds
only the listeners that are new, so old and new workers accept from the *same* kernel socket and
no connection is refused, no accept queue dropped. Sockets no generation uses any more are closed
after the old workers are gone.

UDP listeners (docs/udp.md) are SO_REUSEPORT groups, one socket per worker slot, inherited by
that slot's worker of every generation; a reload with more workers grows the group.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from relay.config.model import Config, Listener
from relay.sock import format_local_address

if TYPE_CHECKING:
    from relay.process.generations import Generation

__all__ = ["ListenerKey", "ListenerSet", "listener_key", "listener_text"]

log = logging.getLogger("relay.supervisor")

ListenerKey = tuple[str, str, str]


def listener_key(lst: Listener) -> ListenerKey:
    """A listener's identity across configs: name, address text and mode."""
    return (lst.name, lst.bind, lst.mode)


def listener_text(gen: Generation) -> str:
    """`name=host:port,...` of a generation's listeners (the READY line, the start log)."""
    names = {**gen.sockets, **{n: g[0] for n, g in gen.udp_sockets.items() if g}}
    return ",".join(f"{lst.name}={format_local_address(names[lst.name])}"
                    for lst in gen.cfg.listener if lst.name in names)


class ListenerSet:
    """Every listening socket the supervisor holds, by listener key: `tcp` one socket each,
    `udp` one socket per worker slot."""

    def __init__(self) -> None:
        self.tcp: dict[ListenerKey, socket.socket] = {}
        self.udp: dict[ListenerKey, list[socket.socket]] = {}

    def bind(self, cfg: Config) -> dict[str, socket.socket]:
        """Listening sockets for `cfg` by name: existing ones reused, new ones bound now.

        On any bind error the sockets bound by this call are closed and the error raised.
        """
        from relay.sock import open_listener

        fresh: list[tuple[ListenerKey, socket.socket]] = []
        out: dict[str, socket.socket] = {}
        try:
            for lst in cfg.listener:
                if lst.is_udp:
                    continue
                sock = self._existing(lst, taken=out.values())
                if sock is None:
                    sock = open_listener(lst.bind_address, transparent=lst.transparent,
                                         reuseport=lst.reuseport)
                    fresh.append((listener_key(lst), sock))
                out[lst.name] = sock
        except BaseException:
            for _key, sock in fresh:
                sock.close()
            raise
        for key, sock in fresh:
            self.tcp[key] = sock
        return out

    def bind_udp(self, cfg: Config) -> dict[str, list[socket.socket]]:
        """One SO_REUSEPORT UDP socket per worker slot for each UDP listener of `cfg`: the
        group bound for the same (name, address, mode) earlier is kept and grown if needed."""
        from relay.sock import open_udp_listeners

        size = cfg.relay.resolved_workers
        out: dict[str, list[socket.socket]] = {}
        grown: list[tuple[ListenerKey, list[socket.socket], int]] = []
        try:
            for lst in cfg.listener:
                if not lst.is_udp:
                    continue
                key = listener_key(lst)
                existing = self.udp.get(key, [])
                group = open_udp_listeners(lst.bind_address, size, transparent=lst.transparent,
                                           existing=existing)
                grown.append((key, group, len(existing)))
                out[lst.name] = group
        except BaseException:
            for _key, group, kept in grown:
                for sock in group[kept:]:
                    sock.close()
            raise
        for key, group, _kept in grown:
            have = self.udp.setdefault(key, [])
            have.extend(group[len(have):])
        return out

    def _existing(self, lst: Listener, taken: Iterable[socket.socket]) -> socket.socket | None:
        """The bound socket that already serves `lst`, if any: the one of the same name, address
        text and mode, or, for a fixed port, one bound to that very address with the same
        IP_TRANSPARENT (so "127.0.0.1:0" then "127.0.0.1:40519", a renamed listener, or one
        going from backend to redirect mode keep their socket: without SO_REUSEPORT a second
        socket could not bind there). Port-0 listeners of different names are different
        sockets."""
        busy = {id(s) for s in taken}
        sock = self.tcp.get(listener_key(lst))
        if sock is not None and id(sock) not in busy:
            return sock
        host, port = lst.bind_address
        if not port:
            return None
        for sock in self.tcp.values():
            if id(sock) in busy or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if tuple(sock.getsockname()[:2]) != (host, port):
                continue
            transparent, reuseport = _socket_options(sock)
            if transparent != lst.transparent:
                continue
            if reuseport != lst.reuseport:
                log.warning("listener %s (%s): reuseport = %s applies at the next restart; the "
                            "bound socket is kept", lst.name, lst.bind,
                            "true" if lst.reuseport else "false")
            return sock
        return None

    def close_unused(self, generations: Iterable[Generation]) -> None:
        """Close the sockets no generation uses any more (they left the config)."""
        generations = list(generations)
        used = {id(s) for gen in generations for s in gen.sockets.values()}
        for key, sock in list(self.tcp.items()):
            if id(sock) not in used:
                log.info("listener %s (%s, %s) closed: not in the config any more", *key)
                sock.close()
                del self.tcp[key]
        used_udp = {id(s) for gen in generations for group in gen.udp_sockets.values()
                    for s in group}
        for key, group in list(self.udp.items()):
            keep = [s for s in group if id(s) in used_udp]
            for sock in group:
                if id(sock) not in used_udp:
                    sock.close()
            if keep:
                self.udp[key] = keep
            else:
                log.info("UDP listener %s (%s, %s) closed: not in the config any more", *key)
                del self.udp[key]

    def shut_down(self, keep_listening: bool = False) -> None:
        """Stop accepting for everyone at once, then close ours (relay is stopping)."""
        # shutdown(SHUT_RD) on a listening socket acts on the socket itself, not on this
        # descriptor (inet_shutdown -> tcp_disconnect -> listen stop), so the workers' inherited
        # copies stop listening too. New connections are refused at once (RST), instead of
        # waiting in an accept queue that nobody drains any more.
        for sock in self.tcp.values():
            if not keep_listening:  # after an upgrade the new relay listens on them
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            sock.close()
        self.tcp.clear()
        self.close_udp()

    def close(self) -> None:
        """Close every socket (our descriptors only: inherited copies stay open)."""
        for sock in self.tcp.values():
            sock.close()
        self.tcp.clear()
        self.close_udp()

    def close_udp(self) -> None:
        for group in self.udp.values():
            for sock in group:
                sock.close()
        self.udp.clear()

    def close_in_child(self, keep: Iterable[socket.socket]) -> None:
        """In a fresh worker: close every socket but the ones it inherits (`keep`)."""
        kept = {id(s) for s in keep}
        for sock in self.tcp.values():
            if id(sock) not in kept:
                sock.close()
        for group in self.udp.values():
            for sock in group:
                if id(sock) not in kept:
                    sock.close()


def _socket_options(sock: socket.socket) -> tuple[bool, bool]:
    """(IP_TRANSPARENT, SO_REUSEPORT) of a listening TCP socket."""
    from relay.sock import IP_TRANSPARENT, IPV6_TRANSPARENT

    if sock.family == socket.AF_INET6:
        transparent = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
    else:
        transparent = sock.getsockopt(socket.SOL_IP, IP_TRANSPARENT)
    return bool(transparent), bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
