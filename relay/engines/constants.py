"""Event kinds and close reasons shared by every engine.

The values are the contract of ``relay_ext._core`` (docs/architecture.md): the pure-Python engine
and the server use these so that an event tuple means the same thing whichever engine produced it.
This module is Python's copy (the asyncio engine runs without a built core): the core defines each
value once (relay_ext/_core.pxd, constants.pxi) and tests/engines/test_core_constants.py pins every name
and value here to the core's exports.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from types import MappingProxyType

EV_ACCEPT = 1  # (EV_ACCEPT, listener_tag, fd, peer, local): (ip, port) or None
EV_ACCEPT_ERROR = 2  # (EV_ACCEPT_ERROR, listener_tag, errno)
# 3 was EV_CONNECTED: connect times are counted in the loop (set_connect_buckets)
EV_DONE = 4  # (EV_DONE, cid, tag, reason, c2s, s2c, spliced, copied, duration_us, errno)
EV_READABLE = 5  # (EV_READABLE, tag, fd): a watched fd turned readable (loop.watch)
EV_WATCH_TIMEOUT = 6  # (EV_WATCH_TIMEOUT, tag, fd): a watched fd stayed silent until its deadline
EV_PAIR = 7  # (EV_PAIR, cid, tag, peer): a connect_to listener's pair, relayed by the core engines

# How a relayed connection ended (EV_DONE's reason int indexes this tuple): the flow log's
# reason for a TCP connection that reached the engine, and the ``closed_<reason>`` counters.
CLOSE_REASONS: tuple[str, ...] = (
    "eof",
    "reset_client",
    "reset_origin",
    "refused",
    "unreachable",
    "connect_timeout",
    "idle_timeout",
    "aborted",
    "error",
    "half_close_timeout",
    "killed",
)
CLOSE_REASON_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLOSE_REASONS)}

R_EOF = CLOSE_REASON_INDEX["eof"]
R_RESET_CLIENT = CLOSE_REASON_INDEX["reset_client"]
R_RESET_ORIGIN = CLOSE_REASON_INDEX["reset_origin"]
R_REFUSED = CLOSE_REASON_INDEX["refused"]
R_UNREACHABLE = CLOSE_REASON_INDEX["unreachable"]
R_CONNECT_TIMEOUT = CLOSE_REASON_INDEX["connect_timeout"]
R_IDLE_TIMEOUT = CLOSE_REASON_INDEX["idle_timeout"]
R_ABORTED = CLOSE_REASON_INDEX["aborted"]
R_ERROR = CLOSE_REASON_INDEX["error"]
R_HALF_CLOSE_TIMEOUT = CLOSE_REASON_INDEX["half_close_timeout"]
R_KILLED = CLOSE_REASON_INDEX["killed"]  # reset by an operator (`relay kill`), not by the relay

# The keyword defaults of the core's Loop(), written once for Python: the asyncio engine, the
# embedding API and the config's defaults read them here (tests/engines/test_core_constants.py
# pins them to relay_ext._core.Loop's signature).
LOOP_DEFAULTS: Mapping[str, int] = MappingProxyType({
    "pipe_size": 1 << 20,  # bytes requested per splice pipe (F_SETPIPE_SZ)
    "max_pipes": 256,  # pipe pool cap (idle + in use)
    "max_conns": 65536,  # connection table size (pairs)
    "splice_min": 4096,  # bytes pending below which a transfer is copied, not spliced
    "splice": True,  # false: always copy
    "connect_timeout_ms": 5000,
    "idle_timeout_ms": 300_000,
    "half_close_timeout_ms": 60_000,
    "ring_entries": 1024,  # io_uring submission queue entries (uring backend only)
    "pipes_keep_idle": 8,
    "pipe_release_ms": 10_000,
    "socket_rcvbuf": 0,  # SO_RCVBUF of relayed sockets; 0 = kernel auto-tuning
    "socket_rcvlowat": 0,  # SO_RCVLOWAT of bulk sources (uring only); 0 = never raised
    "rcvlowat_wait_us": 1000,  # a low-water poll's timeout: the longest a tail waits
})

# accept(2) errors that mean "out of a resource": retrying at once would spin, so the listener is
# paused and resumed after a backoff (100 ms doubling to 1 s).
ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_FIRST_S = 0.1
ACCEPT_BACKOFF_MAX_S = 1.0

# connect(2) / SO_ERROR results that have a reason of their own; anything else is "error".
CONNECT_ERRNO_REASONS: dict[int, int] = {
    errno.ECONNREFUSED: R_REFUSED,
    errno.ENETUNREACH: R_UNREACHABLE,
    errno.EHOSTUNREACH: R_UNREACHABLE,
    errno.ENETDOWN: R_UNREACHABLE,
    errno.EHOSTDOWN: R_UNREACHABLE,
    errno.ETIMEDOUT: R_CONNECT_TIMEOUT,
    errno.ENOENT: R_REFUSED,  # unix-socket backend whose path does not exist
}


def connect_failure_reason(err: int) -> int:
    """Reason index for a failed upstream connect with errno ``err``."""
    return CONNECT_ERRNO_REASONS.get(err, R_ERROR)
