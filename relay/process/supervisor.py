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
by messages on the worker channel (relay.process.udp_sequencing), so that no two workers ever
hold UDP egress ports at once unless their slice partitions are disjoint.

The pieces live beside this arbiter loop: relay.process.listeners (the listener set: binding,
reuse across reloads, closing), relay.process.generations (the Worker and Generation records,
the budget of a new generation, restart backoff), relay.process.udp_sequencing (UDP hold,
release and start between generations), relay.process.handoff and upgrade (flows and the whole
relay handed over), relay.process.sessions (the session table across workers).

Stop: SIGTERM drains (workers finish their transfers up to drain_timeout), SIGINT/SIGQUIT abort;
either way the listening sockets are shut down first so new clients are refused at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgspec

from relay.config.model import Config
from relay.ops import nftguard
from relay.process import privs, systemd
from relay.process.generations import (
    Generation,
    ReplyFn,
    Worker,
    give_log_file,
    new_generation,
    restart_delay,
    serving_generation_number,
)
from relay.process.heartbeat import Heartbeat
from relay.process.listeners import ListenerSet, listener_text
from relay.process.oom import OomCounter
from relay.process.sessions import SessionBroker, SessionsReply
from relay.process.udp_sequencing import (
    UDP_RELEASE_TIMEOUT,
    release_udp,
    udp_progress,
    udp_released,
)
from relay.process.worker import (
    BootFailed,
    Serving,
    StatsReport,
    UdpReleased,
    decode,
    run_worker,
)
from relay.sock import format_local_address

__all__ = ["Supervisor", "run"]

log = logging.getLogger("relay.supervisor")

BOOT_TIMEOUT = 30.0  # seconds a new worker may take to report it serves
FAST_STOP_TIMEOUT = 5.0  # SIGINT/SIGQUIT: seconds before leftover workers get SIGKILL
# A draining worker aborts what is left at drain_timeout itself and then exits; SIGKILL comes
# this much later, only for a worker that cannot.
DRAIN_GRACE = 3.0
STABLE_AFTER = 10.0  # a worker serving this long resets its slot's crash count
MAX_BOOT_FAILURES = 5
TICK = 0.5  # main loop wake-up for deadlines and heartbeats
SESSIONS_TICK = 0.1  # main loop wake-up while a session query waits for the workers

EXIT_OK = 0
EXIT_FAILED = 1

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
        self.listeners = ListenerSet()
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
        sockets = self.listeners.bind(self.cfg)
        udp_sockets = self.listeners.bind_udp(self.cfg)
        gen = self._new_generation(self.cfg, sockets, target, udp_sockets)
        if self.inherited is not None:  # inherited sockets the new config does not use
            self.listeners.close_unused(self.generations)
        self.admin = AdminServer(self.selector, self.snapshot, self.reload, self.metrics,
                                 sessions=self.sessions.handle, upgrade=self.start_upgrade)
        if self.inherited is None:  # after an upgrade: once the old relay releases them
            self.admin.open(self.cfg)
        log.info(
            "relay supervisor %d: %d workers, engine %s, listeners %s",
            os.getpid(), gen.size, self.cfg.relay.engine, listener_text(gen),
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
        if self.inherited is not None:
            self.inherited.tick(self)
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
            give_log_file(gen.cfg, gen.target)
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
               if self.inherited is not None and self.inherited.taking_over
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
            self.listeners.tcp.update(self.inherited.listeners)
            self.listeners.udp.update(self.inherited.udp_listeners)
            inherited = self.inherited
            self.selector.register(inherited.ctl, selectors.EVENT_READ,
                                   lambda: inherited.on_control(self))
            log.info("upgrade: took over %d listening sockets and %d UDP listener groups from "
                     "the previous relay", len(inherited.listeners),
                     len(inherited.udp_listeners))

    # ------------------------------------------------------------------ workers

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
        self.listeners.close_in_child(gen.slot_sockets(slot).values())
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
                if udp_released(worker):
                    self._udp_progress()

    def _new_generation(
        self, cfg: Config, sockets: dict[str, socket.socket], target: privs.Target | None,
        udp_sockets: dict[str, list[socket.socket]] | None = None,
    ) -> Generation:
        gen = new_generation(self.next_generation, cfg, sockets, target, udp_sockets)
        self.next_generation += 1
        self.generations.append(gen)
        return gen

    def _udp_progress(self) -> None:
        if self.upgrade is not None:  # the old tree: tell the new one once it holds no UDP
            self.upgrade.udp_progress()
        if self.stopping or (self.inherited is not None and not self.inherited.udp_released):
            return  # the new tree: UDP waits until the old one released it
        udp_progress(self.generations, self.workers.values())

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
        delay = restart_delay(failures)
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
            line = f"READY pid={os.getpid()} listeners={listener_text(gen)}"
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
        release_udp(gen.workers.values(), "reload", deadline=True)
        self._signal_workers(signal.SIGTERM, list(gen.workers.values()))
        log.info("generation %d draining (%d workers, up to %.0fs)",
                 gen.number, len(gen.workers), gen.cfg.relay.drain_timeout)

    def _abort_generation(self, gen: Generation, error: str) -> None:
        log.error("reload aborted, generation %d keeps serving: %s",
                  serving_generation_number(self.generations), error)
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

    def _retire_finished_generations(self) -> None:
        before = len(self.generations)
        self.generations = [
            g for g in self.generations if g.workers or g.state != "retiring"
        ]
        if len(self.generations) != before and not self.stopping:
            self.listeners.close_unused(self.generations)

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
            sockets = self.listeners.bind(cfg)
            try:
                udp_sockets = self.listeners.bind_udp(cfg)
            except BaseException:
                self.listeners.close_unused(self.generations)
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
        # Stop accepting for everyone at once (shutdown acts on the socket the workers share).
        self.listeners.shut_down(keep_listening)
        release_udp(self.workers.values(), "closed", deadline=False)
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
        self.listeners.close()
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
