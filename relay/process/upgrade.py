"""Binary upgrade: `relay upgrade` (admin socket) or SIGUSR2 to the supervisor.

The running supervisor (the *old tree*) starts the installed relay again with the same command
line (``sys.orig_argv``; ``RELAY_UPGRADE_COMMAND`` overrides it, e.g. to start a relay installed
elsewhere), passing its listening sockets and one end of a control socketpair:

1. The new supervisor adopts the listening sockets instead of binding (same kernel sockets: no
   connection is refused; each UDP listener's SO_REUSEPORT group, one socket per worker slot,
   too), starts its workers with UDP held, and leaves the admin socket and /metrics to the old
   one for now.
2. Once every new worker serves, it sends ``Ready`` (its pid and workers) on the control socket.
3. The old supervisor answers the `relay upgrade` client, then links each of its workers to a
   new worker (old slot i -> new slot i mod N) with a handoff socketpair: ``HandOver`` to its own
   worker, ``Link`` (with the other end) to the new supervisor, which gives it to that worker as
   an ``Adopt`` order (relay.process.handoff). Established flows move as on a reload.
4. The old supervisor tells its workers to release UDP (as at a reload: their UDP flows end,
   relay.process.udp_sequencing), closes its admin endpoints, sends ``Released`` (the new one
   opens them now), stops its workers without shutting the shared listening sockets down, and
   exits once they are gone: the new tree serves alone.
5. Once none of its workers holds UDP any more (each answered UdpReleased, was SIGKILLed after
   UDP_RELEASE_TIMEOUT, or exited), the old supervisor sends ``UdpReleased``: only then does the
   new tree start UDP, so no two workers ever hold UDP egress ports at once (docs/udp.md).
   Datagrams wait in the shared listener sockets' buffers meanwhile. If the old relay dies or
   closes the control socket first, the new tree starts UDP UDP_RELEASE_TIMEOUT later anyway
   (the old workers release UDP by themselves when their supervisor's channel closes).

If the new relay exits, closes the control socket or is not serving within READY_TIMEOUT, the
old tree kills what it started, keeps serving and says why (log, `relay upgrade` answer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from relay.process.handoff import CAN_HAND_OVER, Adopt, HandOver, send_order
from relay.process.udp_sequencing import UDP_RELEASE_TIMEOUT, release_udp
from relay.serve.handoff_wire import close_fd, fds_of

__all__ = ["ENV_COMMAND", "Inherited", "Released", "UdpReleased", "Upgrade", "upgrade_command"]

log = logging.getLogger("relay.supervisor")

ENV_FD = "RELAY_UPGRADE_FD"  # the new supervisor's end of the control socketpair
ENV_LISTENERS = "RELAY_UPGRADE_LISTENERS"  # JSON [[name, bind, mode, fd], ...]
# JSON [[name, bind, mode, [fd per worker slot, ...]], ...]: a variable of its own, so that a
# relay that does not know it ignores it (and binds, or fails to, as before)
ENV_UDP_LISTENERS = "RELAY_UPGRADE_UDP_LISTENERS"
ENV_COMMAND = "RELAY_UPGRADE_COMMAND"  # the command to start instead of sys.orig_argv
READY_TIMEOUT = 45.0  # seconds for the new tree to serve (its own worker boot timeout is 30 s)

ReplyFn = Callable[[bool, str], None]


class Ready(msgspec.Struct, tag="ready"):
    pid: int
    workers: list[tuple[int, int, str]]  # pid, slot, engine


class Link(msgspec.Struct, tag="link"):
    """With one end of a handoff socketpair: give it to worker `new_pid` (an Adopt order)."""

    old_pid: int
    new_pid: int


class Released(msgspec.Struct, tag="released"):
    """The old supervisor closed its admin endpoints: open yours."""

    links: int


class UdpReleased(msgspec.Struct, tag="udp_released"):
    """No worker of the old tree holds UDP any more: start yours."""


Message = Ready | Link | Released | UdpReleased
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def upgrade_command() -> list[str]:
    override = os.environ.get(ENV_COMMAND, "")
    return shlex.split(override) if override else list(sys.orig_argv)


def _send(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [_encoder.encode(msg)], fds)
    else:
        sock.send(_encoder.encode(msg))


def _recv(sock: socket.socket) -> list[tuple[Message, list[int]]] | None:
    """Queued messages (with their descriptors); None at EOF."""
    out: list[tuple[Message, list[int]]] = []
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(
                65536, socket.CMSG_SPACE(4 * 4), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:
            return None if not out else out
        fds = fds_of(ancdata)
        if not data:
            for fd in fds:
                close_fd(fd)
            return None if not out else out
        try:
            out.append((_decoder.decode(data), fds))
        except msgspec.DecodeError as exc:
            log.warning("upgrade: undecodable control message: %s", exc)
            for fd in fds:
                close_fd(fd)


class Upgrade:
    """The old tree's side: started by `relay upgrade` / SIGUSR2, driven by the supervisor."""

    def __init__(self, sup: Any, reply: ReplyFn | None) -> None:
        self.sup = sup
        self.replies = [reply] if reply is not None else []
        self.pid = 0
        self.ctl: socket.socket | None = None
        self.deadline = time.monotonic() + READY_TIMEOUT
        self.done = False
        self.handed_over = False  # Released sent: UdpReleased follows once we hold no UDP

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listeners = [[key[0], key[1], key[2], sock.fileno()]
                     for key, sock in self.sup.listeners.tcp.items() if sock.fileno() >= 0]
        udp = [[key[0], key[1], key[2], [sock.fileno() for sock in group]]
               for key, group in self.sup.listeners.udp.items()
               if group and all(sock.fileno() >= 0 for sock in group)]
        env = dict(os.environ)
        env[ENV_FD] = str(theirs.fileno())
        env[ENV_LISTENERS] = json.dumps(listeners)
        env[ENV_UDP_LISTENERS] = json.dumps(udp)
        argv = upgrade_command()
        fds = [theirs.fileno(), *(fd for *_k, fd in listeners),
               *(fd for *_k, group_fds in udp for fd in group_fds)]
        try:
            self.pid = _spawn(argv, env, fds)
        except OSError as exc:
            ours.close()
            theirs.close()
            self.fail(f"cannot start {shlex.join(argv)}: {exc}")
            return
        theirs.close()
        ours.setblocking(False)
        self.ctl = ours
        self.sup.selector.register(ours, selectors.EVENT_READ, self.on_control)
        log.info("upgrade: started %s as pid %d; this relay serves until it is ready",
                 shlex.join(argv), self.pid)

    # -- events from the supervisor's loop -------------------------------------------------------

    def on_control(self) -> None:
        assert self.ctl is not None
        msgs = _recv(self.ctl)
        if msgs is None:
            if not self.done:
                self.fail(f"the new relay (pid {self.pid}) {self._exit_status()} before serving")
            else:  # it went away after the hand-over: nobody waits for UdpReleased
                self._close_control()
            return
        for msg, fds in msgs:
            for fd in fds:
                os.close(fd)
            if isinstance(msg, Ready) and not self.done:
                self._hand_over(msg)

    def _exit_status(self) -> str:
        """The control socket closed: most likely the process exited; wait briefly (a failure
        path) to say how, reaping it here (the supervisor's waitpid loop then never sees it)."""
        from relay.process.supervisor import describe_status

        for _ in range(50):
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                return describe_status(status)
            time.sleep(0.02)
        return "closed the control socket"

    def child_exited(self, pid: int, how: str) -> bool:
        """The supervisor reaped `pid`: ours? (then, before Ready, the upgrade failed)."""
        if pid != self.pid:
            return False
        if not self.done:
            self.fail(f"the new relay (pid {pid}) {how} before serving")
        return True

    def tick(self) -> None:
        if not self.done and time.monotonic() > self.deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.fail(f"the new relay (pid {self.pid}) was not serving after "
                      f"{READY_TIMEOUT:.0f}s: killed")

    # -- outcomes ------------------------------------------------------------------------------

    def fail(self, why: str) -> None:
        self.done = True
        log.error("upgrade failed: %s; this relay keeps serving", why)
        self._close_control()
        self.sup.metrics.reloads["upgrade_failed"] = (
            self.sup.metrics.reloads.get("upgrade_failed", 0) + 1)
        for reply in self.replies:
            reply(False, f"upgrade failed: {why}; the running relay keeps serving")
        self.replies.clear()
        self.sup.upgrade = None

    def _hand_over(self, ready: Ready) -> None:
        self.done = True
        assert self.ctl is not None
        for reply in self.replies:
            reply(True, f"upgrade: relay pid {ready.pid} serving; handing over the established "
                        "flows, this relay exits")
        self.replies.clear()
        targets = sorted((w for w in ready.workers if w[2] in CAN_HAND_OVER),
                         key=lambda w: w[1])
        links = 0
        mine = sorted((w for w in self.sup.workers.values() if w.state == "serving"),
                      key=lambda w: w.slot)
        for w in mine:
            if not targets or w.engine not in CAN_HAND_OVER:
                continue
            new_pid = targets[w.slot % len(targets)][0]
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                _send(self.ctl, Link(w.pid, new_pid), [b.fileno()])
                send_order(w.channel, HandOver(new_pid), a)
                links += 1
            except OSError as exc:
                log.warning("upgrade: worker %d not linked to %d (%s): it drains", w.pid,
                            new_pid, exc)
            finally:
                a.close()
                b.close()
        # Under systemd (NotifyAccess=main) only the main process may name a new main PID:
        # say it now, so our exit does not end the service.
        from relay.process import systemd

        systemd.notify(f"MAINPID={ready.pid}\nSTATUS=upgraded: relay pid {ready.pid} serves")
        # UDP flows are not handed over: they end as at a reload, and the new tree starts UDP
        # once none of our workers holds any (udp_progress).
        release_udp(self.sup.workers.values(), "reload", deadline=True)
        self.sup.admin.close()
        with contextlib.suppress(OSError):
            _send(self.ctl, Released(links))
        self.handed_over = True
        log.info("upgrade: relay pid %d serves; %d workers hand their flows over; exiting",
                 ready.pid, links)
        self.sup.metrics.reloads["upgrade_ok"] = self.sup.metrics.reloads.get("upgrade_ok", 0) + 1
        self.udp_progress()
        self.sup.begin_upgrade_exit()

    def udp_progress(self) -> None:
        """After the hand-over, once none of our workers holds UDP (released, killed or gone):
        send UdpReleased, so that the new tree starts UDP, and close the control socket."""
        if not self.handed_over or self.ctl is None:
            return
        if any(w.udp == "started" for w in self.sup.workers.values()):
            return
        with contextlib.suppress(OSError):
            _send(self.ctl, UdpReleased())
        log.info("upgrade: no worker of this relay holds UDP any more: the new relay starts UDP")
        self._close_control()

    def _close_control(self) -> None:
        if self.ctl is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sup.selector.unregister(self.ctl)
            self.ctl.close()
            self.ctl = None


def _spawn(argv: list[str], env: dict[str, str], fds: list[int]) -> int:
    """fork + exec with exactly `fds` inherited (besides 0-2); the supervisor reaps the child
    in its own waitpid loop, so no subprocess.Popen (whose own wait would race it)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawnp(argv[0], argv, env, setsigdef=_default_signals())
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def _default_signals() -> list[int]:
    return [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGCHLD, signal.SIGALRM]


class Inherited:
    """The new tree's side: the sockets and the control socket the old supervisor passed."""

    def __init__(self, ctl: socket.socket, listeners: dict[tuple[str, str, str], socket.socket],
                 udp_listeners: dict[tuple[str, str, str], list[socket.socket]] | None = None):
        self.ctl = ctl
        self.listeners = listeners
        self.udp_listeners = dict(udp_listeners or {})
        self.released = False  # the admin endpoints are ours
        self.udp_released = False  # no old worker holds UDP: ours may start it
        self.udp_at: float | None = None  # the old relay vanished: start UDP then anyway

    @property
    def taking_over(self) -> bool:
        """The old relay has not released everything yet (admin endpoints or UDP)."""
        return not (self.released and self.udp_released)

    @classmethod
    def from_environ(cls) -> Inherited | None:
        fd_text = os.environ.pop(ENV_FD, "")
        spec = os.environ.pop(ENV_LISTENERS, "[]")
        udp_spec = os.environ.pop(ENV_UDP_LISTENERS, "[]")
        if not fd_text:
            return None
        ctl = socket.socket(fileno=int(fd_text))
        ctl.setblocking(False)
        listeners = {}
        for name, bind, mode, fd in json.loads(spec):
            listeners[(name, bind, mode)] = socket.socket(fileno=int(fd))
        udp_listeners = {}
        for name, bind, mode, fds in json.loads(udp_spec):
            group = [socket.socket(fileno=int(fd)) for fd in fds]
            for sock in group:
                sock.setblocking(False)
            udp_listeners[(name, bind, mode)] = group
        return cls(ctl, listeners, udp_listeners)

    def send_ready(self, workers: list[tuple[int, int, str]]) -> None:
        try:
            _send(self.ctl, Ready(os.getpid(), workers))
        except OSError as exc:
            log.error("upgrade: cannot tell the old relay we serve: %s", exc)

    def on_control(self, sup: Any) -> None:
        msgs = _recv(self.ctl)
        for msg, fds in msgs or []:
            if isinstance(msg, Link) and fds:
                sock = socket.socket(fileno=fds[0])
                for extra in fds[1:]:
                    os.close(extra)
                worker = sup.workers.get(msg.new_pid)
                try:
                    if worker is None:
                        raise OSError(f"no worker {msg.new_pid}")
                    send_order(worker.channel, Adopt(msg.old_pid), sock)
                    os.kill(worker.pid, signal.SIGUSR2)
                except OSError as exc:
                    log.warning("upgrade: flows of old worker %d not adopted (%s)",
                                msg.old_pid, exc)
                finally:
                    sock.close()
            elif isinstance(msg, Released):
                self._open_admin(sup)
            elif isinstance(msg, UdpReleased):
                self._start_udp(sup, "the previous relay released its UDP ports")
            else:
                for fd in fds:
                    os.close(fd)
        if msgs is None:
            with contextlib.suppress(KeyError, ValueError):
                sup.selector.unregister(self.ctl)
            self.ctl.close()
            if not self.released:
                self._open_admin(sup)  # the old relay died: take the endpoints anyway
            if not self.udp_released and self.udp_at is None:
                # ... and UDP, a little later: its workers release UDP by themselves when their
                # supervisor's channel closes (relay.process.worker), within about a second.
                self.udp_at = time.monotonic() + UDP_RELEASE_TIMEOUT
                log.warning("upgrade: the previous relay closed the control socket before "
                            "releasing UDP: UDP starts here in %.0fs", UDP_RELEASE_TIMEOUT)

    def tick(self, sup: Any) -> None:
        if self.udp_at is not None and time.monotonic() >= self.udp_at:
            self._start_udp(sup, "the previous relay is gone")

    def _start_udp(self, sup: Any, why: str) -> None:
        if self.udp_released:
            return
        self.udp_released = True
        if self.udp_listeners:
            log.info("upgrade: %s: UDP starts here", why)
        sup._udp_progress()  # (the supervisor's own UDP sequencing step)

    def _open_admin(self, sup: Any) -> None:
        if self.released:
            return
        self.released = True
        try:
            sup.admin.open(sup.cfg)
        except OSError as exc:
            log.error("upgrade: admin endpoints unavailable: %s", exc)
        from relay.process import systemd

        systemd.notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS=serving (upgraded)")
        log.info("upgrade done: this relay (pid %d) serves alone", os.getpid())
