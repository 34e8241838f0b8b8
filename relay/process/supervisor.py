"""The supervisor: binds the listeners, forks and watches the workers, reloads, stops.

Shaped after gunicorn's arbiter: signal handlers only enqueue the signal number (and wake the
main loop through `signal.set_wakeup_fd`); the main loop dispatches to `handle_<signame>`, reaps
children with `waitpid(WNOHANG)` and decodes their status, and checks deadlines and heartbeats.

The supervisor never imports the core or creates an io_uring: it forks before any Loop exists.
Listening sockets are bound here (as root, before any worker drops privileges) and inherited by
every worker of every generation, so during a reload old and new workers accept from the *same*
kernel socket: no connection is refused, no accept queue is dropped. A reload validates the new
config first, binds only listeners that are new, starts a new generation, and only once all of
its workers serve does it SIGTERM (drain) the old generation, SIGKILLing what is left at
`drain_timeout`. Sockets no generation uses any more are closed after the old workers are gone.

A worker that fails before serving is a boot failure: at start it stops the service with the
worker's error (no fork loop); during a reload it aborts the reload (the old generation keeps
serving); for a restarted worker it backs off and gives up after MAX_BOOT_FAILURES in a row.
A worker that dies while serving is restarted at once, then after 1, 2, 4... s (BACKOFF_MAX);
one whose heartbeat stops for relay.heartbeat_timeout is killed and replaced the same way.

UDP listeners (docs/udp.md) are SO_REUSEPORT groups, one socket per worker slot, bound here
and inherited by that slot's worker of every generation. UDP is handed over between generations
by messages on the worker channel, so that no two workers ever hold UDP egress ports at once
unless their slice partitions are disjoint: a new generation starts with UDP held; once it
serves, the old workers get UdpRelease("reload") (they end every UDP flow at once and answer
UdpReleased; one that does not within UDP_RELEASE_TIMEOUT is SIGKILLed), and only then do the
new workers get UdpStart. Datagrams wait in the listener sockets' buffers meanwhile.

Stop: SIGTERM drains (workers finish their transfers up to drain_timeout), SIGINT/SIGQUIT abort;
either way the listening sockets are shut down first so new clients are refused at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from relay.config import files
from relay.config.model import Config, Listener
from relay.ops import nftguard
from relay.process import privs, systemd
from relay.process.heartbeat import Heartbeat
from relay.process.oom import OomCounter
from relay.process.sessions import SessionBroker, SessionsReply
from relay.process.worker import (
    BootFailed,
    Command,
    Serving,
    StatsReport,
    UdpRelease,
    UdpReleased,
    UdpStart,
    decode,
    encode_command,
    run_worker,
)
from relay.serve import limits as serve_limits
from relay.sock import format_local_address

__all__ = ["Supervisor", "run"]

log = logging.getLogger("relay.supervisor")

BOOT_TIMEOUT = 30.0  # seconds a new worker may take to report it serves
FAST_STOP_TIMEOUT = 5.0  # SIGINT/SIGQUIT: seconds before leftover workers get SIGKILL
# A draining worker aborts what is left at drain_timeout itself and then exits; SIGKILL comes
# this much later, only for a worker that cannot.
DRAIN_GRACE = 3.0
STABLE_AFTER = 10.0  # a worker serving this long resets its slot's crash count
BACKOFF_MAX = 30.0
MAX_BOOT_FAILURES = 5
TICK = 0.5  # main loop wake-up for deadlines and heartbeats
# An old worker told to release UDP that has not answered by then is SIGKILLed: its egress
# sockets must be gone before the new generation creates UDP flows (docs/udp.md).
UDP_RELEASE_TIMEOUT = 2.0
SESSIONS_TICK = 0.1  # main loop wake-up while a session query waits for the workers

EXIT_OK = 0
EXIT_FAILED = 1

ReplyFn = Callable[[bool, str], None]


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_status(status: int) -> str:
    """A waitpid status in words: "exited with code 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {_signame(os.WTERMSIG(status))}{core}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"status {status:#x}"


def listener_key(lst: Listener) -> tuple[str, str, str]:
    """A listener's identity across configs: name, address text and mode."""
    return (lst.name, lst.bind, lst.mode)


@dataclasses.dataclass(eq=False)
class Worker:
    pid: int
    generation: Generation
    slot: int
    heartbeat: Heartbeat
    channel: socket.socket
    started: float
    state: str = "booting"  # booting -> serving -> draining
    serving_since: float = 0.0
    engine: str = ""
    engine_reason: str = ""
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    boot_error: str = ""
    kill_at: float | None = None  # SIGKILL deadline once told to stop
    hung: bool = False
    udp: str = "held"  # held -> started (sent UdpStart) -> released (answered UdpReleased)
    udp_kill_at: float | None = None  # SIGKILL deadline for a UdpRelease without an answer


@dataclasses.dataclass(eq=False)
class Generation:
    number: int
    cfg: Config  # as the workers see it (pipe budget applied)
    sockets: dict[str, socket.socket]  # listener name -> listening socket (TCP)
    size: int
    target: privs.Target | None  # who its workers become
    capabilities: frozenset[int]  # what they keep
    budget: str  # fd and pipe budget, in words
    state: str = "starting"  # starting -> serving -> retiring
    workers: dict[int, Worker] = dataclasses.field(default_factory=dict)
    crashes: dict[int, int] = dataclasses.field(default_factory=dict)
    boot_failures: dict[int, int] = dataclasses.field(default_factory=dict)
    restart_at: dict[int, float] = dataclasses.field(default_factory=dict)
    replies: list[ReplyFn] = dataclasses.field(default_factory=list)
    # UDP listener name -> one SO_REUSEPORT socket per worker slot
    udp_sockets: dict[str, list[socket.socket]] = dataclasses.field(default_factory=dict)
    udp_go: bool = False  # its workers may create UDP flows (no other generation holds any)

    def slot_sockets(self, slot: int) -> dict[str, socket.socket]:
        """What slot `slot`'s worker inherits: the TCP listeners and its UDP sockets."""
        out = dict(self.sockets)
        out.update({name: group[slot] for name, group in self.udp_sockets.items()})
        return out
    limits: Any = None  # relay_ext._limits.SharedLimits of its workers (None: not built)


class Supervisor:
    def __init__(
        self, cfg: Config, config_path: str | None, overrides: Mapping[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.started = time.monotonic()
        self.oom = OomCounter()  # workers are forked into our memory cgroup
        self.selector = selectors.DefaultSelector()
        self.signal_queue: deque[int] = deque()
        self.listeners: dict[tuple[str, str, str], socket.socket] = {}
        self.udp_listeners: dict[tuple[str, str, str], list[socket.socket]] = {}
        self.generations: list[Generation] = []
        self.workers: dict[int, Worker] = {}
        self.next_generation = 1
        self.ready = False
        self.stopping: str | None = None  # None | "drain" | "fast"
        self.exit_code = EXIT_OK
        self.fatal_error = ""
        # relay nft's slice guard, if installed
        self.guard = nftguard.GuardCounter(enabled=True, table=cfg.relay.nft_table)
        self.admin: Any = None
        self.upgrade: Any = None  # relay.process.upgrade.Upgrade while `relay upgrade` runs
        self.inherited: Any = None  # relay.process.upgrade.Inherited: started by an upgrade
        self.metrics: Any = None
        self.sessions = SessionBroker(lambda: list(self.workers.values()))
        self._wakeup_r = -1
        self._wakeup_w = -1

    # ------------------------------------------------------------------ start and main loop

    def run(self) -> int:
        try:
            self._start()
        except (OSError, ValueError, privs.PrivilegeError) as exc:
            log.error("relay cannot start: %s", exc)
            self._cleanup()
            return EXIT_FAILED
        try:
            while not (self.stopping and not self.workers):
                self._run_once()
        finally:
            self._cleanup()
        if self.fatal_error:
            log.error("relay stopped: %s", self.fatal_error)
        else:
            log.info("relay stopped")
        return self.exit_code

    def _start(self) -> None:
        from relay.ops.admin import AdminServer
        from relay.ops.metrics import Aggregator

        self.metrics = Aggregator()
        target = privs.resolve_target(self.cfg.relay.user, self.cfg.relay.group)
        if target is None and os.geteuid() == 0:
            log.warning("workers will run as root: set relay.user to drop privileges once the "
                        "listeners are bound")
        self._install_signals()
        self._inherit_from_upgrade()
        sockets = self._bind_listeners(self.cfg)
        udp_sockets = self._bind_udp_listeners(self.cfg)
        gen = self._new_generation(self.cfg, sockets, target, udp_sockets)
        self.admin = AdminServer(self.selector, self.snapshot, self.reload, self.metrics,
                                 sessions=self.sessions.handle, upgrade=self.start_upgrade)
        if self.inherited is None:  # after an upgrade: once the old relay releases them
            self.admin.open(self.cfg)
        log.info(
            "relay supervisor %d: %d workers, engine %s, listeners %s",
            os.getpid(), gen.size, self.cfg.relay.engine, self._listener_text(gen),
        )
        for slot in range(gen.size):
            if gen.state == "starting" and not self.stopping:
                self._spawn(gen, slot)

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, self._enqueue_signal)

    def _enqueue_signal(self, signum: int, _frame: Any) -> None:
        # Only enqueue: the main loop does the work, outside any half-finished state.
        self.signal_queue.append(signum)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup_r, 512):
                pass

    def _run_once(self) -> None:
        timeout = SESSIONS_TICK if self.sessions.pending else TICK
        if self.signal_queue:
            timeout = 0
        for key, _ in self.selector.select(timeout):
            callback = key.data
            callback()
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            handler = getattr(self, "handle_" + _signame(signum)[3:].lower(), None)
            if handler is not None:
                handler()
        self._reap()
        self._check_workers()
        if self.upgrade is not None:
            self.upgrade.tick()
        self.sessions.check()
        if self.admin is not None:
            self.admin.tick()
            self.admin.expire_idle()

    # ------------------------------------------------------------------ signal handlers

    def handle_term(self) -> None:
        log.info("SIGTERM: draining (up to %.0fs)", self.cfg.relay.drain_timeout)
        self._begin_stop(drain=True)

    def handle_int(self) -> None:
        log.info("SIGINT: stopping now")
        self._begin_stop(drain=False)

    def handle_quit(self) -> None:
        log.info("SIGQUIT: stopping now")
        self._begin_stop(drain=False)

    def handle_hup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config_path)
        self.reload(None)

    def handle_usr1(self) -> None:
        from relay.ops import log as relay_log

        try:
            relay_log.reopen()
        except OSError as exc:  # e.g. the file was replaced by a symbolic link (O_NOFOLLOW)
            log.error("SIGUSR1: cannot reopen the log file, keeping the old one: %s", exc)
            return
        for gen in self.generations:
            _give_log_file(gen.cfg, gen.target)
        self._signal_workers(signal.SIGUSR1, list(self.workers.values()))
        log.info("SIGUSR1: log files reopened")

    def handle_chld(self) -> None:
        self._reap()

    def handle_usr2(self) -> None:
        log.info("SIGUSR2: binary upgrade")
        self.start_upgrade(None)

    # ------------------------------------------------------------------ binary upgrade

    def start_upgrade(self, reply: ReplyFn | None) -> None:
        """Start the installed relay again and hand everything to it (relay.process.upgrade);
        `reply(ok, text)` once it serves or failed."""
        from relay.process.upgrade import Upgrade

        why = ("relay is stopping" if self.stopping
               else "an upgrade is already in progress" if self.upgrade is not None
               else "this relay is still taking over from the previous one"
               if self.inherited is not None and not self.inherited.released
               else "a reload is in progress"
               if any(g.state == "starting" for g in self.generations) else "")
        if why:
            log.error("upgrade refused: %s", why)
            if reply is not None:
                reply(False, f"upgrade refused: {why}")
            return
        self.upgrade = Upgrade(self, reply)
        self.upgrade.start()

    def begin_upgrade_exit(self) -> None:
        """The new relay serves: stop our workers (they hand their flows over) and leave,
        without shutting down the listening sockets the new relay shares."""
        self._begin_stop(drain=True, keep_listening=True)

    def _inherit_from_upgrade(self) -> None:
        from relay.process.upgrade import Inherited

        self.inherited = Inherited.from_environ()
        if self.inherited is not None:
            self.listeners.update(self.inherited.listeners)
            inherited = self.inherited
            self.selector.register(inherited.ctl, selectors.EVENT_READ,
                                   lambda: inherited.on_control(self))
            log.info("upgrade: took over %d listening sockets from the previous relay",
                     len(inherited.listeners))

    # ------------------------------------------------------------------ listeners

    def _bind_listeners(self, cfg: Config) -> dict[str, socket.socket]:
        """Listening sockets for `cfg` by name: existing ones reused, new ones bound now.

        On any bind error the sockets bound by this call are closed and the error raised.
        """
        from relay.sock import open_listener

        fresh: list[tuple[tuple[str, str, str], socket.socket]] = []
        out: dict[str, socket.socket] = {}
        try:
            for lst in cfg.listener:
                if lst.is_udp:
                    continue
                sock = self._existing_listener(lst, taken=out.values())
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
            self.listeners[key] = sock
        return out

    def _bind_udp_listeners(self, cfg: Config) -> dict[str, list[socket.socket]]:
        """One SO_REUSEPORT UDP socket per worker slot for each UDP listener of `cfg`: the
        group bound for the same (name, address, mode) earlier is kept and grown if needed."""
        from relay.sock import open_udp_listeners

        size = cfg.relay.resolved_workers
        out: dict[str, list[socket.socket]] = {}
        grown: list[tuple[tuple[str, str, str], list[socket.socket], int]] = []
        try:
            for lst in cfg.listener:
                if not lst.is_udp:
                    continue
                key = listener_key(lst)
                existing = self.udp_listeners.get(key, [])
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
            have = self.udp_listeners.setdefault(key, [])
            have.extend(group[len(have):])
        return out

    def _existing_listener(self, lst: Listener, taken: Iterable[socket.socket]
                           ) -> socket.socket | None:
        """The bound socket that already serves `lst`, if any: the one of the same name, address
        text and mode, or, for a fixed port, one bound to that very address with the same
        IP_TRANSPARENT (so "127.0.0.1:0" then "127.0.0.1:40519", a renamed listener, or one
        going from backend to redirect mode keep their socket: without SO_REUSEPORT a second
        socket could not bind there). Port-0 listeners of different names are different
        sockets."""
        busy = {id(s) for s in taken}
        sock = self.listeners.get(listener_key(lst))
        if sock is not None and id(sock) not in busy:
            return sock
        host, port = lst.bind_address
        if not port:
            return None
        for sock in self.listeners.values():
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

    def _close_unused_listeners(self) -> None:
        used = {id(s) for gen in self.generations for s in gen.sockets.values()}
        for key, sock in list(self.listeners.items()):
            if id(sock) not in used:
                log.info("listener %s (%s, %s) closed: not in the config any more", *key)
                sock.close()
                del self.listeners[key]
        used_udp = {id(s) for gen in self.generations for group in gen.udp_sockets.values()
                    for s in group}
        for key, group in list(self.udp_listeners.items()):
            keep = [s for s in group if id(s) in used_udp]
            for sock in group:
                if id(sock) not in used_udp:
                    sock.close()
            if keep:
                self.udp_listeners[key] = keep
            else:
                log.info("UDP listener %s (%s, %s) closed: not in the config any more", *key)
                del self.udp_listeners[key]

    def _listener_text(self, gen: Generation) -> str:
        names = {**gen.sockets, **{n: g[0] for n, g in gen.udp_sockets.items() if g}}
        return ",".join(f"{lst.name}={format_local_address(names[lst.name])}"
                        for lst in gen.cfg.listener if lst.name in names)

    # ------------------------------------------------------------------ workers

    def _new_generation(
        self, cfg: Config, sockets: dict[str, socket.socket], target: privs.Target | None,
        udp_sockets: dict[str, list[socket.socket]] | None = None,
    ) -> Generation:
        from relay.process.budgets import nofile_needed_for, pipe_budget, raise_nofile

        size = cfg.relay.resolved_workers
        nofile = raise_nofile(nofile_needed_for(cfg.relay, len(cfg.listener), size))
        wanted = cfg.relay.pipes_per_worker(size)
        user = target.user if target is not None and target.uid != 0 else None  # None: exempt
        budget = pipe_budget(user, cfg.relay.pipe_size, wanted, size)
        if budget.per_worker < wanted:
            # max_pipes = 0 means "maxconn / 4", not "none": no pipe at all is splice = false.
            capped = (msgspec.structs.replace(cfg.relay, max_pipes=budget.per_worker)
                      if budget.per_worker else msgspec.structs.replace(cfg.relay, splice=False))
            cfg = dataclasses.replace(cfg, relay=capped)
            if not budget.per_worker:
                log.warning("no full-size splice pipe fits the worker user's budget: workers "
                            "copy instead of splicing")
        text = (
            f"fds: {nofile.message} (soft limit {nofile.soft}, {nofile.needed} needed per worker); "
            f"pipes: {budget.message}"
        )
        log.log(logging.INFO if nofile.ok else logging.WARNING, "budget: %s", text)
        _give_log_file(cfg, target)
        gen = Generation(self.next_generation, cfg, sockets, size, target,
                         privs.needed_capabilities(cfg), text,
                         udp_sockets=dict(udp_sockets or {}),
                         limits=serve_limits.create(cfg.relay, size))
        self.next_generation += 1
        self.generations.append(gen)
        return gen

    def _spawn(self, gen: Generation, slot: int) -> None:
        try:
            heartbeat = Heartbeat("/dev/shm" if os.path.isdir("/dev/shm") else None)
        except OSError as exc:
            self._boot_failed(gen, slot, 0, f"cannot create the heartbeat file: {exc}")
            return
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            heartbeat.close()
            self._boot_failed(gen, slot, 0, f"cannot create the worker channel: {exc}")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            heartbeat.close()
            parent_end.close()
            child_end.close()
            self._boot_failed(gen, slot, 0, f"fork failed: {exc}")
            return
        if pid == 0:
            code = EXIT_FAILED
            try:
                parent_end.close()
                code = run_worker(
                    gen.cfg, gen.slot_sockets(slot), child_end, heartbeat,
                    (gen.target, gen.capabilities),
                    lambda: self._close_in_child(gen, slot),
                    supervisor_pid,
                    (slot, gen.size),
                    (gen.limits, slot) if gen.limits is not None else None,
                )
            finally:
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        worker = Worker(pid, gen, slot, heartbeat, parent_end, time.monotonic())
        gen.workers[pid] = worker
        self.workers[pid] = worker
        self.selector.register(parent_end, selectors.EVENT_READ, lambda: self._on_channel(worker))
        log.info("worker %d started (generation %d, slot %d)", pid, gen.number, slot)

    def _close_in_child(self, gen: Generation, slot: int = 0) -> None:
        """In a fresh worker: close what belongs to the supervisor (objects, not fd numbers)."""
        keep = {id(s) for s in gen.slot_sockets(slot).values()}
        for sock in self.listeners.values():
            if id(sock) not in keep:
                sock.close()
        for group in self.udp_listeners.values():
            for sock in group:
                if id(sock) not in keep:
                    sock.close()
        for other in self.workers.values():
            other.channel.close()
            other.heartbeat.close()
        if self.admin is not None:
            self.admin.close_in_child()
        if self.inherited is not None:
            self.inherited.ctl.close()
        if self.upgrade is not None and self.upgrade.ctl is not None:
            self.upgrade.ctl.close()
        self.selector.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    def _on_channel(self, worker: Worker) -> None:
        while True:
            try:
                data = worker.channel.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(worker.channel)
                return
            try:
                msg = decode(data)
            except msgspec.DecodeError as exc:
                log.warning("worker %d sent an undecodable message: %s", worker.pid, exc)
                continue
            if isinstance(msg, StatsReport):
                worker.stats = msg.stats
            elif isinstance(msg, Serving):
                worker.engine, worker.engine_reason = msg.engine, msg.engine_reason
                if worker.state == "booting":
                    worker.state = "serving"
                    worker.serving_since = time.monotonic()
                    worker.generation.boot_failures.pop(worker.slot, None)
                    log.info("worker %d serving (engine %s%s)", worker.pid, msg.engine,
                             f": {msg.engine_reason}" if msg.engine_reason else "")
                    self._generation_progress(worker.generation)
                    self._udp_progress()
            elif isinstance(msg, BootFailed):
                worker.boot_error = msg.error
            elif isinstance(msg, SessionsReply):
                self.sessions.on_reply(msg)
            elif isinstance(msg, UdpReleased):
                if worker.udp == "started":
                    worker.udp = "released"
                    worker.udp_kill_at = None
                    self._udp_progress()

    def _command(self, worker: Worker, cmd: Command) -> None:
        try:
            worker.channel.send(encode_command(cmd), socket.MSG_DONTWAIT)
        except OSError as exc:  # a dead worker: its reaping does the rest
            log.debug("worker %d: command not sent: %s", worker.pid, exc)

    def _release_udp(self, workers: Iterable[Worker], reason: str, deadline: bool) -> None:
        for w in workers:
            if w.udp == "started":
                self._command(w, UdpRelease(reason))
                if deadline and w.udp_kill_at is None:
                    w.udp_kill_at = time.monotonic() + UDP_RELEASE_TIMEOUT

    def _udp_progress(self) -> None:
        """Let the newest serving generation create UDP flows once no worker of any other
        generation holds UDP (told to start and not yet released or gone); then tell each of
        its serving workers (also ones restarted later) to start."""
        if self.stopping:
            return
        serving = [g for g in self.generations if g.state == "serving"]
        if not serving:
            return
        gen = serving[-1]
        if not gen.udp_go:
            holders = [w for w in self.workers.values()
                       if w.generation is not gen and w.udp == "started"]
            if holders:
                return
            gen.udp_go = True
            if gen.udp_sockets:
                log.info("generation %d: UDP started", gen.number)
        for w in gen.workers.values():
            if w.state == "serving" and w.udp == "held":
                w.udp = "started"
                self._command(w, UdpStart())

    def _signal_workers(self, sig: int, workers: list[Worker]) -> None:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                if self.upgrade is not None:
                    self.upgrade.child_exited(pid, describe_status(status))
                continue
            self._worker_gone(worker, status)

    def _worker_gone(self, worker: Worker, status: int) -> None:
        gen = worker.generation
        gen.workers.pop(worker.pid, None)
        self._on_channel(worker)  # pick up a last BootFailed / final stats
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.channel)
        worker.channel.close()
        worker.heartbeat.close()
        self.metrics.retire(worker.stats)
        worker.udp = "released"  # its sockets died with it
        if gen.limits is not None:
            # Its connections died with it: free their share of the limits before the slot
            # serves again.
            gen.limits.clear_slot(worker.slot)
        how = describe_status(status)
        if (self.oom.moved() and os.WIFSIGNALED(status)
                and os.WTERMSIG(status) == signal.SIGKILL):
            how += " (possibly the OOM killer: the memory cgroup's oom_kill counter went up)"
        if worker.hung:
            how += " (hung: no heartbeat)"
        if self.stopping or worker.state == "draining":
            log.info("worker %d (generation %d) %s", worker.pid, gen.number, how)
        elif worker.state == "booting":
            self._boot_failed(gen, worker.slot, worker.pid, worker.boot_error or how)
        else:
            self._crashed(worker, how)
        self._retire_finished_generations()
        self._udp_progress()

    def _boot_failed(self, gen: Generation, slot: int, pid: int, error: str) -> None:
        log.error("worker %s (generation %d, slot %d) failed to boot: %s",
                  pid or "(not forked)", gen.number, slot, error)
        if gen.state == "starting" and not self.ready:
            self._fatal(f"worker failed to boot: {error}")
        elif gen.state == "starting":
            self._abort_generation(gen, f"new worker failed to boot: {error}")
        else:
            n = gen.boot_failures.get(slot, 0) + 1
            gen.boot_failures[slot] = n
            if n >= MAX_BOOT_FAILURES:
                self._fatal(f"worker failed to boot {n} times in a row: {error}")
            else:
                self._schedule_restart(gen, slot, n)

    def _crashed(self, worker: Worker, how: str) -> None:
        gen = worker.generation
        now = time.monotonic()
        if now - worker.serving_since >= STABLE_AFTER:
            gen.crashes[worker.slot] = 0
        n = gen.crashes.get(worker.slot, 0) + 1
        gen.crashes[worker.slot] = n
        log.warning("worker %d (generation %d) %s while serving", worker.pid, gen.number, how)
        if gen.state == "serving" or gen.state == "starting":
            self._schedule_restart(gen, worker.slot, n)

    def _schedule_restart(self, gen: Generation, slot: int, failures: int) -> None:
        delay = 0.0 if failures <= 1 else min(BACKOFF_MAX, 2.0 ** (failures - 2))
        gen.restart_at[slot] = time.monotonic() + delay
        if delay:
            log.warning("restarting slot %d of generation %d in %.0fs (failure %d in a row)",
                        slot, gen.number, delay, failures)

    def _fatal(self, message: str) -> None:
        if not self.fatal_error:
            self.fatal_error = message
            self.exit_code = EXIT_FAILED
        self._begin_stop(drain=False)

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.udp == "started" and w.udp_kill_at is not None and now >= w.udp_kill_at:
                log.warning("worker %d did not release UDP within %.0fs: SIGKILL (its UDP "
                            "sockets must be gone before the new generation starts UDP)",
                            w.pid, UDP_RELEASE_TIMEOUT)
                w.udp_kill_at = None
                self._signal_workers(signal.SIGKILL, [w])
            elif w.kill_at is not None and now >= w.kill_at:
                log.warning("worker %d still running at its stop deadline: SIGKILL", w.pid)
                w.kill_at = None
                self._signal_workers(signal.SIGKILL, [w])
            elif w.state == "booting" and now - w.started > BOOT_TIMEOUT:
                w.boot_error = f"not serving after {BOOT_TIMEOUT:.0f}s"
                self._signal_workers(signal.SIGKILL, [w])
            elif w.state != "booting" and not w.hung:
                age = w.heartbeat.age()
                if age > self.cfg.relay.heartbeat_timeout:
                    log.error("worker %d hung: no heartbeat for %.1fs: SIGKILL", w.pid, age)
                    w.hung = True
                    self._signal_workers(signal.SIGKILL, [w])
        if self.stopping:
            return
        for gen in self.generations:
            for slot, at in list(gen.restart_at.items()):
                if now >= at and gen.state in ("starting", "serving"):
                    del gen.restart_at[slot]
                    self.metrics.restarts += 1
                    self._spawn(gen, slot)

    # ------------------------------------------------------------------ generations and reload

    def _generation_progress(self, gen: Generation) -> None:
        if gen.state != "starting":
            return
        serving = sum(1 for w in gen.workers.values() if w.state == "serving")
        if serving < gen.size:
            return
        gen.state = "serving"
        old = [g for g in self.generations if g is not gen and g.state != "retiring"]
        if not self.ready:
            self.ready = True
            line = f"READY pid={os.getpid()} listeners={self._listener_text(gen)}"
            print(line, flush=True)
            if self.inherited is not None:
                self.inherited.send_ready([(w.pid, w.slot, w.engine)
                                           for w in gen.workers.values()])
            systemd.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving, "
                           f"{gen.size} workers")
        else:
            for g in old:
                self._retire(g, successor=gen)
            old_cfg, self.cfg = self.cfg, gen.cfg
            self._apply_logging(old_cfg)
            text = (f"generation {gen.number} serving with {gen.size} workers; "
                    f"generation(s) {', '.join(str(g.number) for g in old) or 'none'} draining")
            log.info("reload done: %s", text)
            systemd.notify(f"READY=1\nSTATUS=serving, generation {gen.number}")
            self.metrics.reloads["ok"] += 1
            for reply in gen.replies:
                reply(True, text)
            gen.replies.clear()
            self._apply_admin(old_cfg)

    def _apply_logging(self, old: Config) -> None:
        """The supervisor's own log settings follow the new config; on error the old ones stay."""
        from relay.ops import log as relay_log

        r_old, r_new = old.relay, self.cfg.relay
        if (r_old.log_format, r_old.log_level, r_old.log_file) == (
                r_new.log_format, r_new.log_level, r_new.log_file):
            return
        try:
            relay_log.setup_from_settings(r_new)
        except (OSError, ValueError) as exc:
            log.error("reload: cannot switch logging (%s); keeping the previous log settings",
                      exc)

    def _apply_admin(self, old: Config) -> None:
        """Rebind the admin socket / metrics listener if the new config moved them."""
        if (old.relay.admin_socket, old.relay.metrics_listen) == (
                self.cfg.relay.admin_socket, self.cfg.relay.metrics_listen):
            return
        self.admin.close()
        try:
            self.admin.open(self.cfg)
        except OSError as exc:
            log.error("reload: admin endpoints not moved (%s); reopening the previous ones", exc)
            self.admin.close()
            try:
                self.admin.open(old)
            except OSError as exc2:
                log.error("admin endpoints unavailable: %s", exc2)

    def _retire(self, gen: Generation, successor: Generation | None = None) -> None:
        if successor is not None and successor.cfg.relay.handoff:
            from relay.process.handoff import connect_generations

            connect_generations(list(gen.workers.values()), list(successor.workers.values()))
        gen.state = "retiring"
        gen.restart_at.clear()
        deadline = time.monotonic() + gen.cfg.relay.drain_timeout + DRAIN_GRACE
        for w in gen.workers.values():
            if w.state != "draining":
                w.state = "draining"
                w.kill_at = deadline
        self._release_udp(gen.workers.values(), "reload", deadline=True)
        self._signal_workers(signal.SIGTERM, list(gen.workers.values()))
        log.info("generation %d draining (%d workers, up to %.0fs)",
                 gen.number, len(gen.workers), gen.cfg.relay.drain_timeout)

    def _abort_generation(self, gen: Generation, error: str) -> None:
        log.error("reload aborted, generation %d keeps serving: %s",
                  self._serving_generation_number(), error)
        self.metrics.reloads["failed"] += 1
        gen.state = "retiring"
        gen.restart_at.clear()
        for w in gen.workers.values():
            w.state = "draining"
            w.kill_at = time.monotonic()
        self._signal_workers(signal.SIGKILL, list(gen.workers.values()))
        for reply in gen.replies:
            reply(False, f"reload failed: {error}; the previous configuration keeps serving")
        gen.replies.clear()
        systemd.notify(f"READY=1\nSTATUS=reload failed: {error}")
        self._retire_finished_generations()

    def _serving_generation_number(self) -> int:
        serving = [g.number for g in self.generations if g.state == "serving"]
        return serving[-1] if serving else 0

    def _retire_finished_generations(self) -> None:
        before = len(self.generations)
        self.generations = [
            g for g in self.generations if g.workers or g.state != "retiring"
        ]
        if len(self.generations) != before and not self.stopping:
            self._close_unused_listeners()

    def reload(self, reply: ReplyFn | None) -> None:
        """Validate the config file, then start a new generation; `reply(ok, text)` at the end."""
        from relay.config import ConfigError, load

        def answer(ok: bool, text: str) -> None:
            if not ok:
                self.metrics.reloads["failed"] += 1
            if reply is not None:
                reply(ok, text)

        if self.stopping:
            answer(False, "reload refused: relay is stopping")
            return
        if self.config_path is None:
            answer(False, "reload refused: relay was started without a config file")
            log.error("reload refused: relay was started without a config file")
            return
        if any(g.state == "starting" for g in self.generations):
            answer(False, "reload refused: a reload is already in progress")
            return
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            cfg = load(self.config_path, check_kernel=True, overrides=self.overrides)
            target = privs.resolve_target(cfg.relay.user, cfg.relay.group)
            sockets = self._bind_listeners(cfg)
            try:
                udp_sockets = self._bind_udp_listeners(cfg)
            except BaseException:
                self._close_unused_listeners()
                raise
        except ConfigError as exc:
            problems = "\n".join(exc.problems)
            log.error("reload refused, the running configuration stays:\n%s", problems)
            systemd.notify("READY=1\nSTATUS=reload refused: invalid configuration")
            answer(False, f"reload refused: invalid configuration:\n{problems}")
            return
        except (OSError, ValueError, privs.PrivilegeError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            systemd.notify(f"READY=1\nSTATUS=reload refused: {exc}")
            answer(False, f"reload refused: {exc}")
            return
        gen = self._new_generation(cfg, sockets, target, udp_sockets)
        if reply is not None:
            gen.replies.append(reply)
        log.info("reload: starting generation %d (%d workers)", gen.number, gen.size)
        for slot in range(gen.size):
            if gen.state == "starting" and not self.stopping:
                self._spawn(gen, slot)

    # ------------------------------------------------------------------ stop

    def _begin_stop(self, drain: bool, keep_listening: bool = False) -> None:
        if self.stopping == "fast" or (self.stopping == "drain" and drain):
            return
        self.stopping = "drain" if drain else "fast"
        systemd.notify("STOPPING=1")
        # Stop accepting for everyone at once: shutdown(SHUT_RD) on a listening socket acts on
        # the socket itself, not on this descriptor (inet_shutdown -> tcp_disconnect -> listen
        # stop), so the workers' inherited copies stop listening too. New connections are refused
        # at once (RST), instead of waiting in an accept queue that nobody drains any more.
        for sock in self.listeners.values():
            if not keep_listening:  # after an upgrade the new relay listens on them
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            sock.close()
        self.listeners.clear()
        for group in self.udp_listeners.values():
            for sock in group:
                sock.close()
        self.udp_listeners.clear()
        self._release_udp(self.workers.values(), "closed", deadline=False)
        timeout = self.cfg.relay.drain_timeout + DRAIN_GRACE if drain else FAST_STOP_TIMEOUT
        deadline = time.monotonic() + timeout
        for gen in self.generations:
            gen.restart_at.clear()
            for reply in gen.replies:
                reply(False, "reload abandoned: relay is stopping")
            gen.replies.clear()
        for w in self.workers.values():
            w.kill_at = deadline if w.kill_at is None else min(w.kill_at, deadline)
            if w.state != "draining":
                w.state = "draining"
        self._signal_workers(signal.SIGTERM if drain else signal.SIGINT,
                             list(self.workers.values()))

    def _cleanup(self) -> None:
        if self.admin is not None:
            self.admin.close()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        for group in self.udp_listeners.values():
            for sock in group:
                sock.close()
        self.udp_listeners.clear()
        for w in list(self.workers.values()):
            # Only reached on a start failure or an exception in the loop: leave no orphan.
            self._signal_workers(signal.SIGKILL, [w])
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup_w)
            os.close(self._wakeup_r)
            self._wakeup_w = self._wakeup_r = -1
        self.selector.close()

    # ------------------------------------------------------------------ introspection

    def snapshot(self) -> dict[str, Any]:
        """Everything `relay stats` and /metrics show, as plain data."""
        now = time.monotonic()
        workers = []
        for w in self.workers.values():
            workers.append({
                "pid": w.pid,
                "generation": w.generation.number,
                "slot": w.slot,
                "state": w.state,
                "engine": w.engine,
                "heartbeat_age": round(w.heartbeat.age(), 3) if w.state != "booting" else None,
                "uptime": round(now - w.started, 3),
                "iowq_threads": iowq_threads(w.pid),
                "stats": w.stats,
            })
        serving = [g for g in self.generations if g.state == "serving"]
        current = serving[-1] if serving else (self.generations[-1] if self.generations else None)
        return {
            "pid": os.getpid(),
            "ready": self.ready,
            "stopping": self.stopping or "",
            "uptime": round(now - self.started, 3),
            "config": self.config_path or "",
            "generation": current.number if current else 0,
            "engine": self.cfg.relay.engine,
            "engines": sorted({w["engine"] for w in workers if w["engine"]}),
            "listeners": (
                {name: format_local_address(s) for name, s in current.slot_sockets(0).items()
                 if s.fileno() >= 0} if current else {}
            ),
            "admin": self.admin.addresses() if self.admin is not None else {},
            "budget": current.budget if current else "",
            "workers": workers,
            "retired": self.metrics.retired_totals() if self.metrics is not None else {},
            "restarts": self.metrics.restarts if self.metrics is not None else 0,
            # Only with egress: None = relay nft's guard is not installed in this namespace.
            **({"guard_dropped_packets": self.guard.get()} if self.cfg.egress else {}),
            "reloads": dict(self.metrics.reloads) if self.metrics is not None else {},
        }


def _socket_options(sock: socket.socket) -> tuple[bool, bool]:
    """(IP_TRANSPARENT, SO_REUSEPORT) of a listening TCP socket."""
    from relay.sock import IP_TRANSPARENT, IPV6_TRANSPARENT

    if sock.family == socket.AF_INET6:
        transparent = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
    else:
        transparent = sock.getsockopt(socket.SOL_IP, IP_TRANSPARENT)
    return bool(transparent), bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _give_log_file(cfg: Config, target: privs.Target | None) -> None:
    """Let unprivileged workers reopen the log file on SIGUSR1 (they cannot open root's file)."""
    from relay.ops import log as relay_log

    path = cfg.relay.log_file
    if path and target is not None and target.uid != 0:
        # Checked again on every hand-over (start, SIGUSR1): the directory may have changed.
        unsafe = [p.reason for p in files.check_log_file(path, cfg.relay.user, cfg.relay.group)]
        if unsafe:
            log.error("log file %s: not handed to user %s: %s", path, target.user,
                      "; ".join(unsafe))
            return
        try:
            relay_log.give_to(target.uid, target.gid)  # fchown of the open file, not the path
        except OSError as exc:
            log.warning("log file %s: cannot hand it to user %s: %s", path, target.user, exc)


def iowq_threads(pid: int) -> int:
    """io_uring worker threads ("iou-wrk-*") of a process, from /proc/PID/task/*/comm."""
    count = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("iou-wrk"):
                    count += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH):
                raise
    return count


def run(cfg: Config, config_path: str | None, overrides: Mapping[str, Any] | None = None) -> int:
    """`relay run`: supervise workers until stopped; returns the process exit code.

    `overrides` are the command-line settings, applied again on every reload.
    """
    from relay.ops import log as relay_log

    try:
        relay_log.setup_from_settings(cfg.relay)
    except OSError as exc:  # `relay check` reports these first (relay.config.host)
        print(f"relay run: relay.log_file {cfg.relay.log_file}: cannot open: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    return Supervisor(cfg, config_path, overrides).run()
