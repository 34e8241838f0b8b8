"""The supervisor's records: a Generation (one config's workers) and its Workers.

A reload starts a new generation on the same listening sockets (relay.process.listeners); its
state goes starting -> serving (all its workers serve) -> retiring (a newer one serves, or it
failed to start). A worker goes booting -> serving -> draining. A crashed worker's slot restarts
at once, then after 1, 2, 4... s (BACKOFF_MAX).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from relay.config import files
from relay.config.model import Config
from relay.process import privs
from relay.process.heartbeat import Heartbeat
from relay.process.worker import Command, encode_command
from relay.serve import limits as serve_limits

__all__ = [
    "BACKOFF_MAX",
    "Generation",
    "ReplyFn",
    "Worker",
    "give_log_file",
    "new_generation",
    "restart_delay",
    "send_command",
    "serving_generation_number",
]

log = logging.getLogger("relay.supervisor")

BACKOFF_MAX = 30.0

ReplyFn = Callable[[bool, str], None]


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


def new_generation(
    number: int, cfg: Config, sockets: dict[str, socket.socket], target: privs.Target | None,
    udp_sockets: dict[str, list[socket.socket]] | None = None,
) -> Generation:
    """Generation `number` of `cfg`: the fd limit raised for it, the pipe budget of its worker
    user applied to its config, the log file handed to that user, its shared limits built."""
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
    give_log_file(cfg, target)
    return Generation(number, cfg, sockets, size, target,
                      privs.needed_capabilities(cfg), text,
                      udp_sockets=dict(udp_sockets or {}),
                      limits=serve_limits.create(cfg.relay, size))


def serving_generation_number(generations: Iterable[Generation]) -> int:
    """The newest serving generation's number, 0 if none serves."""
    serving = [g.number for g in generations if g.state == "serving"]
    return serving[-1] if serving else 0


def restart_delay(failures: int) -> float:
    """Seconds before a slot restarts after `failures` failures in a row: 0, 1, 2, 4 ... 30."""
    return 0.0 if failures <= 1 else min(BACKOFF_MAX, 2.0 ** (failures - 2))


def send_command(worker: Worker, cmd: Command) -> None:
    """A supervisor -> worker command, never blocking."""
    try:
        worker.channel.send(encode_command(cmd), socket.MSG_DONTWAIT)
    except OSError as exc:  # a dead worker: its reaping does the rest
        log.debug("worker %d: command not sent: %s", worker.pid, exc)


def give_log_file(cfg: Config, target: privs.Target | None) -> None:
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
