"""The worker process: one Server on inherited listening sockets, reporting to the supervisor.

Forked by the supervisor before any core Loop or io_uring exists in it. The child:
1. forgets the supervisor's signal handlers and descriptors it must not keep,
2. drops privileges (the listening sockets were bound by root; the ring and the pipes are created
   afterwards, so pipe accounting applies to the unprivileged user),
3. builds `relay.serve.server.Server(cfg, engine, sockets=inherited)`,
4. tells the supervisor it serves (or why it could not boot) over its SOCK_SEQPACKET channel,
5. beats its heartbeat and sends stats snapshots once a second (SIGALRM, main thread),
6. runs `serve_forever()`; SIGTERM drains, SIGINT/SIGQUIT stop fast, SIGUSR1 reopens logs.

Exit codes: 0 stopped, EXIT_BOOT_FAILED (3) could not boot, EXIT_CRASHED (1) died while serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from relay.config.model import Config
from relay.process import handoff
from relay.process.heartbeat import Heartbeat
from relay.process.sessions import SessionResponder, SessionsReply, SessionsRequest

__all__ = [
    "EXIT_BOOT_FAILED",
    "EXIT_CRASHED",
    "BootFailed",
    "Serving",
    "StatsReport",
    "Message",
    "Command",
    "UdpRelease",
    "UdpReleased",
    "UdpStart",
    "decode",
    "decode_command",
    "encode",
    "encode_command",
    "run_worker",
]

EXIT_BOOT_FAILED = 3
EXIT_CRASHED = 1
REPORT_INTERVAL = 1.0  # seconds between heartbeats/stats snapshots

log = logging.getLogger("relay.worker")


class Serving(msgspec.Struct, tag="serving"):
    """The worker built its Server and is about to accept."""

    pid: int
    engine: str
    engine_reason: str = ""


class BootFailed(msgspec.Struct, tag="boot_failed"):
    """The worker could not start; `error` names the problem."""

    pid: int
    error: str


class StatsReport(msgspec.Struct, tag="stats"):
    """A snapshot of `Server.stats()`; `final` on the last one before a clean exit."""

    pid: int
    stats: dict[str, Any]
    final: bool = False


class UdpReleased(msgspec.Struct, tag="udp_released"):
    """The worker stopped reading UDP and closed every UDP flow and egress socket."""

    pid: int


Message = Serving | BootFailed | StatsReport | UdpReleased | SessionsReply


# Supervisor -> worker (docs/udp.md: a generation creates UDP flows only once no other
# generation holds any, so no two flows can ever share an egress 4-tuple).
class UdpStart(msgspec.Struct, tag="udp_start"):
    """Start reading the UDP listeners."""


class UdpRelease(msgspec.Struct, tag="udp_release"):
    """Stop UDP now: end every UDP flow with `reason` ("reload" or "closed"), then answer
    UdpReleased."""

    reason: str = "closed"


Command = UdpStart | UdpRelease | SessionsRequest

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_command_decoder = msgspec.msgpack.Decoder(Command)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


def encode_command(cmd: Command) -> bytes:
    return _encoder.encode(cmd)


def decode_command(data: bytes) -> Command:
    return _command_decoder.decode(data)


def _read_commands(channel: socket.socket, srv: Any, sessions: SessionResponder) -> None:
    """Thread: the one reader of the supervisor's commands (UdpStart, UdpRelease, session
    queries, which it queues for the serving thread; handoff orders with their socket, which
    it gives to srv.handoff, then wakes the serving thread with SIGUSR2). EOF: the supervisor
    is gone, so UDP stops (the parent-death SIGTERM drains TCP)."""
    main_thread = threading.main_thread().ident
    while True:
        try:
            data, fds = handoff.recv_with_fds(channel)
        except InterruptedError:
            continue
        except OSError:
            data, fds = b"", []
        if not data:
            srv.release_udp("closed")
            return
        if fds:
            handoff.apply_order(data, fds, srv.handoff)
            if main_thread is not None:
                signal.pthread_kill(main_thread, signal.SIGUSR2)  # end loop.run()'s wait
            continue
        try:
            cmd = decode_command(data)
        except msgspec.DecodeError as exc:
            log.warning("worker %d: undecodable supervisor command: %s", os.getpid(), exc)
            continue
        if isinstance(cmd, SessionsRequest):
            sessions.submit(cmd)
        elif isinstance(cmd, UdpStart):
            srv.start_udp()
        else:
            srv.release_udp(cmd.reason)


def _send(channel: socket.socket, msg: Message) -> None:
    """Best effort: a full channel (supervisor busy) drops a stats snapshot, never blocks."""
    try:
        channel.send(encode(msg), socket.MSG_DONTWAIT)
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    except OSError as exc:  # EMSGSIZE: a snapshot larger than the socket buffer
        from relay.ops.log import log_every

        log_every(log, "worker channel", 60.0, "worker %d: cannot report to the supervisor: %s",
                  os.getpid(), exc)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # The supervisor handles HUP (reload) for everyone; a HUP sent to the whole process group
    # must not kill the workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGUSR2 (handoff orders) gets its handler once the Server exists; until then a stray one
    # (an upgrade signalled to the whole process group) must not kill the worker.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class _Reporter:
    """Beats the heartbeat and ships a stats snapshot on every SIGALRM (setitimer, 1 s).

    The handler runs in the main thread, the one in serve_forever(): Python runs a signal handler
    only once that thread is back in the interpreter, i.e. once loop.run() returned (the SIGALRM
    ends the wait through the loop's wake-up pipe, whichever thread took it: serve.signalwake).
    A loop stuck inside the core or a main thread blocked anywhere stops the beats, which is
    exactly what the supervisor's heartbeat check has to notice; a reporter thread would go on
    beating for a dead loop.
    """

    def __init__(self, srv: Any, channel: socket.socket, heartbeat: Heartbeat) -> None:
        self._srv = srv
        self._channel = channel
        self._heartbeat = heartbeat

    def report(self, final: bool = False) -> None:
        self._heartbeat.beat()
        try:
            stats = dict(self._srv.stats())
        except Exception as exc:  # stats must never take the worker down
            log.warning("worker %d: stats() failed: %s", os.getpid(), exc)
            return
        _send(self._channel, StatsReport(os.getpid(), stats, final))

    def _on_alarm(self, _signum: int, _frame: Any) -> None:
        self.report()

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, REPORT_INTERVAL, REPORT_INTERVAL)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)


def _import_while_privileged() -> None:
    """Import what the worker needs before it drops privileges.

    After setuid the interpreter may no longer be able to read its own library (a Python
    installed under /root, a 0700 virtualenv): every module the worker will import lazily must be
    loaded now. `encodings.idna` is the classic one: socket.getaddrinfo() imports it on first
    use with a str host.
    """
    import encodings.idna  # noqa: F401

    import relay.engines.aio  # noqa: F401
    import relay.ops.log  # noqa: F401
    import relay.serve.server  # noqa: F401
    import relay.serve.slicecheck  # noqa: F401
    import relay.serve.udp  # noqa: F401

    try:
        import relay_ext._core  # noqa: F401  (importing creates no ring; Server does, later)
        import relay_ext._udp  # noqa: F401
    except (ImportError, OSError):
        pass  # not built or unreadable: the engine selection explains it when the Server starts


def run_worker(
    cfg: Config,
    sockets: dict[str, socket.socket],
    channel: socket.socket,
    heartbeat: Heartbeat,
    privileges: tuple[Any, frozenset[int]],
    close_parent: Callable[[], None],
    supervisor_pid: int,
    slot: tuple[int, int] = (0, 1),
    limits: tuple[Any, int] | None = None,
) -> int:
    """Body of a forked worker; returns its exit code (the caller must os._exit with it).

    `close_parent` closes the supervisor's own objects inherited by the fork (admin sockets,
    other workers' channels and heartbeats, listeners this generation does not use): closing the
    Python objects, not raw fd numbers, so nothing can close a reused descriptor later.
    `slot`: (this worker's slot, workers in its generation): its share of the egress slices
    for UDP flows. UDP starts and stops on the supervisor's commands (docs/udp.md).
    `limits`: the generation's shared connection counters and this worker's slot.
    """
    _reset_signals()
    close_parent()
    # stdout carries the supervisor's READY line to whoever started relay: a worker must not
    # write there, nor keep that pipe open after the supervisor is gone.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    pid = os.getpid()
    try:
        from relay.process import privs

        _import_while_privileged()
        from relay.serve.server import Server

        target, caps = privileges
        privs.drop_privileges(target, caps)
        # An orphaned worker would keep serving forever: drain and leave with the supervisor.
        privs.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != supervisor_pid:
            raise RuntimeError(f"supervisor {supervisor_pid} died while this worker started")
        srv = Server(cfg, engine=cfg.relay.engine, sockets=sockets, udp_slot=slot,
                     udp_supervised=True,
                     udp_on_released=lambda: _send(channel, UdpReleased(os.getpid())),
                     limits=limits)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("worker %d failed to boot: %s", pid, error)
        if not isinstance(exc, (OSError, ValueError, RuntimeError, ImportError)):
            traceback.print_exc()
        _send(channel, BootFailed(pid, error))
        return EXIT_BOOT_FAILED

    def stop_draining(_signum: int, _frame: Any) -> None:
        srv.request_stop(drain=True)  # a reload's HandOver order arrives on the reader thread

    def wake(_signum: int, _frame: Any) -> None:
        pass  # SIGUSR2: only ends loop.run()'s wait, so the serve loop runs the handoff step

    def stop_now(_signum: int, _frame: Any) -> None:
        srv.request_stop(drain=False)

    def reopen_logs(_signum: int, _frame: Any) -> None:
        from relay.ops import log as relay_log

        try:
            relay_log.reopen()
        except OSError as exc:
            log.warning("worker %d: cannot reopen the log file, keeping the old one: %s",
                        os.getpid(), exc)
            return
        srv.reopen_flow_log()  # the writer finishes the old file, then takes the new one

    signal.signal(signal.SIGTERM, stop_draining)
    signal.signal(signal.SIGINT, stop_now)
    signal.signal(signal.SIGQUIT, stop_now)
    signal.signal(signal.SIGUSR1, reopen_logs)
    signal.signal(signal.SIGUSR2, wake)

    sessions = SessionResponder(srv, channel)
    threading.Thread(target=_read_commands, args=(channel, srv, sessions), name="relay-commands",
                     daemon=True).start()
    engine = str(getattr(srv, "engine_name", "") or cfg.relay.engine)
    reason = str(getattr(srv, "engine_reason", ""))
    _send(channel, Serving(pid, engine, reason))
    srv.set_control_hook(sessions.poll)
    reporter = _Reporter(srv, channel, heartbeat)
    reporter.report()
    reporter.start()
    try:
        srv.serve_forever(wake_on_signals=True)  # a signal to any thread ends the wait
    except BaseException as exc:
        log.error("worker %d crashed: %s: %s", pid, type(exc).__name__, exc)
        traceback.print_exc()
        return EXIT_CRASHED
    finally:
        reporter.stop()
    reporter.report(final=True)
    return 0
