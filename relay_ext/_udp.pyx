# cython: language_level=3
"""relay's UDP datagram core: one epoll loop per worker, recvmmsg/sendmmsg batches, a C flow
table with O(due) idle expiry.  Mechanism only: Python decides when a flow starts (policy,
egress) and learns when it ends.  See docs/udp-core.md.

Table of contents (one compilation unit, fragments in dependency order):
  includes/udp_system.pxi  the system calls and constants we use
  userdata.pxi             the TCP core's epoll_data packing: kind | generation | slot, flow ids
  udp_table.pxi            packed flow key, hash index, per-state intrusive lists (no sockets)
  udp_loop.pxi             class UdpLoop: setup, the Python API, events out, flow teardown
  udp_datapath.pxi         recvmmsg/sendmmsg: listener, upstream and reply sockets; epoll dispatch
  udp_expiry.pxi           idle / pending / hold expiry and the timerfd tick
"""

import os
import warnings

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

include "includes/udp_system.pxi"
include "userdata.pxi"
include "udp_table.pxi"
include "udp_loop.pxi"
include "udp_datapath.pxi"
include "udp_expiry.pxi"

UEV_NEW_FLOW = UEV_NEW_FLOW_
UEV_FLOW_DONE = UEV_FLOW_DONE_
UDP_REASONS = ("idle_timeout", "responses", "closed", "error")

__all__ = ["UdpLoop", "UEV_NEW_FLOW", "UEV_FLOW_DONE", "UDP_REASONS"]
