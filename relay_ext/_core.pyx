# cython: language_level=3
"""relay's zero-copy core: one loop per worker, io_uring (or epoll) for readiness, splice(2)
through pooled pipes for bulk flows, recv/send for small ones.  Mechanism only, no policy.

Table of contents.  One compilation unit; _core.pxd declares the constants, the structs, the
Loop's fields and the functions the fragments call in one another, so the order below is by
concern, not by dependency:
  _core.pxd              the layout: constants, structs, class Loop's fields, shared signatures
  includes/system.pxi    the system calls and constants we use (included by _core.pxd)
  constants.pxi          events, close reasons, accept back-off, errno -> reason: Python's names
  userdata.pxi           user_data / connection id packing: op | generation | slot
  conn.pxi               a connection pair: arm a side, close it (reset or FIN), report it
  connect.pxi            starting a pair; the core opening and connecting an upstream itself
  pipes.pxi              the bounded pipe pool
  events.pxi             the event queue handed to Python by run()
  listeners.pxi          accepting: arm on the backend, a bounded accept4() batch, back-off
  datapath.pxi           _pump per direction; FIN, reset and close decisions
  timers.pxi             connect / idle / half-close timeouts, resuming paused listeners
  pairinfo.pxi           looking at open pairs from Python: bytes, age, idle time (session table)
  uring.pxi              the io_uring backend: ring setup, polls, submit, wait, reap
  epoll.pxi              the epoll backend: the same readiness contract without io_uring
  wakeup.pxi             the signal wake-up pipe: any signal ends run()'s wait (not a slot)
  loop.pxi               class Loop: the Python API
  handoff.pxi            export / import of an established pair (reload without cutting it)
"""

import os
import warnings

# Written by setup.py's build_ext: Cython is a build-time tool, absent where relay is installed.
from relay_ext._build_info import CYTHON_VERSION

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

# python-liburing: header-inline helpers and structs from its .pxd (no linking needed) ...
from liburing.lib.uring cimport (
    __io_uring, __io_uring_params, __io_uring_sqe, __io_uring_cqe, __io_uring_get_sqe, __io_uring_sq_ready,
    __io_uring_cq_ready, __io_uring_cq_advance, __io_uring_prep_poll_add,
    __io_uring_prep_poll_remove, __io_uring_prep_link_timeout, __IOSQE_IO_LINK,
    __io_uring_sqe_set_data64, __IORING_SETUP_CQSIZE,
    __IORING_SETUP_COOP_TASKRUN, __IORING_SETUP_SUBMIT_ALL, __IORING_SQ_CQ_OVERFLOW,
    __io_uring_prep_poll_multishot, __io_uring_prep_nop, __IORING_CQE_F_MORE,
)
# ... and its cpdef functions, called through Cython's cross-module C API at C speed.
from liburing.queue cimport (
    io_uring, io_uring_params, io_uring_cqe, sigset as uring_sigset,
    io_uring_queue_init_params, io_uring_queue_exit, io_uring_submit,
    io_uring_submit_and_wait_timeout, io_uring_submit_and_get_events,
)
from liburing.register cimport io_uring_register_eventfd
from liburing.time cimport timespec as uring_timespec

cdef extern from "uring_version_check.h":
    int RELAY_LIBURING_VERSION_MAJOR
    int RELAY_LIBURING_VERSION_MINOR

include "constants.pxi"
include "userdata.pxi"
include "conn.pxi"
include "connect.pxi"
include "pipes.pxi"
include "events.pxi"
include "listeners.pxi"
include "datapath.pxi"
include "timers.pxi"
include "pairinfo.pxi"
include "uring.pxi"
include "epoll.pxi"
include "wakeup.pxi"
include "loop.pxi"
include "handoff.pxi"

LIBURING_HEADERS = f"{RELAY_LIBURING_VERSION_MAJOR}.{RELAY_LIBURING_VERSION_MINOR}"

__all__ = ["Loop", "REASONS", "EV_ACCEPT", "EV_ACCEPT_ERROR", "EV_DONE",
           "EV_READABLE", "EV_WATCH_TIMEOUT", "EV_PAIR",
           "ACCEPT_PAUSE_ERRNOS", "ACCEPT_BACKOFF_FIRST_S", "ACCEPT_BACKOFF_MAX_S",
           "CONNECT_ERRNO_REASONS", "CYTHON_VERSION", "LIBURING_HEADERS"]
