"""UDP between generations (docs/udp.md): no two workers ever hold UDP egress ports at once.

A new generation starts with UDP held; once it serves, the old workers get UdpRelease("reload")
(they end every UDP flow at once and answer UdpReleased; one that does not within
UDP_RELEASE_TIMEOUT is SIGKILLed by the supervisor), and only then do the new workers get
UdpStart. Datagrams wait in the listener sockets' buffers meanwhile. A worker's `udp` goes
held -> started (sent UdpStart) -> released (answered UdpReleased, or gone).

A binary upgrade does the same between two process trees (relay.process.upgrade): the new
supervisor holds its generation until the old one says, on the upgrade control socket, that none
of its workers holds UDP any more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from relay.process.generations import Generation, Worker, send_command
from relay.process.worker import UdpRelease, UdpStart

__all__ = ["UDP_RELEASE_TIMEOUT", "release_udp", "udp_progress", "udp_released"]

log = logging.getLogger("relay.supervisor")

# An old worker told to release UDP that has not answered by then is SIGKILLed: its egress
# sockets must be gone before the new generation creates UDP flows (docs/udp.md).
UDP_RELEASE_TIMEOUT = 2.0


def release_udp(workers: Iterable[Worker], reason: str, deadline: bool) -> None:
    """Tell the workers that hold UDP to release it; with `deadline`, SIGKILL the ones that do
    not answer within UDP_RELEASE_TIMEOUT (the supervisor's check)."""
    for w in workers:
        if w.udp == "started":
            send_command(w, UdpRelease(reason))
            if deadline and w.udp_kill_at is None:
                w.udp_kill_at = time.monotonic() + UDP_RELEASE_TIMEOUT


def udp_released(worker: Worker) -> bool:
    """The worker answered UdpReleased: True if that changed anything (call udp_progress)."""
    if worker.udp != "started":
        return False
    worker.udp = "released"
    worker.udp_kill_at = None
    return True


def udp_progress(generations: Iterable[Generation], workers: Iterable[Worker]) -> None:
    """Let the newest serving generation create UDP flows once no worker of any other
    generation holds UDP (told to start and not yet released or gone); then tell each of
    its serving workers (also ones restarted later) to start."""
    serving = [g for g in generations if g.state == "serving"]
    if not serving:
        return
    gen = serving[-1]
    if not gen.udp_go:
        holders = [w for w in workers if w.generation is not gen and w.udp == "started"]
        if holders:
            return
        gen.udp_go = True
        if gen.udp_sockets:
            log.info("generation %d: UDP started", gen.number)
    for w in gen.workers.values():
        if w.state == "serving" and w.udp == "held":
            w.udp = "started"
            send_command(w, UdpStart())
