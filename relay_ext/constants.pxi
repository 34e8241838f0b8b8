# The core's vocabulary as Python sees it.  The C values are declared once, in _core.pxd; the
# names below are built from them, and relay/engines/constants.py (the copy the asyncio engine
# uses without a built core) is pinned to these by tests/engines/test_core_constants.py.

import errno as _errno

EV_ACCEPT = EV_ACCEPT_
EV_ACCEPT_ERROR = EV_ACCEPT_ERROR_
EV_DONE = EV_DONE_
EV_READABLE = EV_READABLE_
EV_WATCH_TIMEOUT = EV_WATCH_TIMEOUT_
EV_PAIR = EV_PAIR_

_REASON_NAMES = {
    R_EOF: "eof",
    R_RESET_CLIENT: "reset_client",
    R_RESET_ORIGIN: "reset_origin",
    R_REFUSED: "refused",
    R_UNREACHABLE: "unreachable",
    R_CONNECT_TIMEOUT: "connect_timeout",
    R_IDLE_TIMEOUT: "idle_timeout",
    R_ABORTED: "aborted",
    R_ERROR: "error",
    R_HALF_CLOSE_TIMEOUT: "half_close_timeout",
    R_KILLED: "killed",
}
REASONS = tuple(_REASON_NAMES[i] for i in range(N_REASONS))

# accept(2) errors that mean "out of a resource": the listener pauses and resumes by itself.
ACCEPT_PAUSE_ERRNOS = frozenset(
    e for e in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM)
    if is_accept_pause_errno(e))
ACCEPT_BACKOFF_FIRST_S = ACCEPT_BACKOFF_FIRST_MS / 1000.0
ACCEPT_BACKOFF_MAX_S = ACCEPT_BACKOFF_MAX_MS / 1000.0

# connect(2) / SO_ERROR results with a close reason of their own (anything else: "error").
CONNECT_ERRNO_REASONS = {
    e: connect_reason(e)
    for e in (_errno.ECONNREFUSED, _errno.ENOENT, _errno.ENETUNREACH, _errno.EHOSTUNREACH,
              _errno.ENETDOWN, _errno.EHOSTDOWN, _errno.ETIMEDOUT)
}


cdef bint is_accept_pause_errno(int err) noexcept nogil:
    # Out of descriptors or memory: accepting again right away would spin.  Pause this
    # listener and retry later; connections already relaying are not affected.
    return err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM


cdef int connect_reason(int err) noexcept nogil:
    if err == ECONNREFUSED:
        return R_REFUSED
    if err == ENOENT:
        return R_REFUSED        # a unix-socket backend whose path does not exist
    if err == EHOSTUNREACH or err == ENETUNREACH or err == EHOSTDOWN or err == ENETDOWN:
        return R_UNREACHABLE
    if err == ETIMEDOUT:
        return R_CONNECT_TIMEOUT
    return R_ERROR
