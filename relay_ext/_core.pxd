# cython: language_level=3
# The layout every fragment of _core.pyx shares: the constants, the structs, the Loop's fields and
# the cdef functions one fragment calls in another.  Declared here once, so the fragments can be
# grouped by concern in _core.pyx and included in any order (uvloop's loop.pxd does the same).

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from liburing.lib.uring cimport __io_uring_sqe
from liburing.lib.type cimport __kernel_timespec
from liburing.queue cimport io_uring, io_uring_cqe, sigset as uring_sigset
from liburing.time cimport timespec as uring_timespec

from relay_ext._limits cimport SharedLimits

include "includes/system.pxi"


# ------------------------------------------------------------------ constants (Python names: constants.pxi)

# Close reasons: the index into REASONS and into Loop.st_closes.
cdef enum:
    R_EOF = 0
    R_RESET_CLIENT = 1
    R_RESET_ORIGIN = 2
    R_REFUSED = 3
    R_UNREACHABLE = 4
    R_CONNECT_TIMEOUT = 5
    R_IDLE_TIMEOUT = 6
    R_ABORTED = 7
    R_ERROR = 8
    R_HALF_CLOSE_TIMEOUT = 9
    R_KILLED = 10               # reset at an operator's request (`relay kill`): Loop.kill()
    N_REASONS = 11

# Event kinds handed to Python by run().
cdef enum:
    EV_ACCEPT_ = 1
    EV_ACCEPT_ERROR_ = 2
    # 3 was EV_CONNECTED (one per pair): the connect-time histogram is counted in the core now
    EV_DONE_ = 4
    EV_READABLE_ = 5        # a watched fd turned readable (or hung up): loop.watch()
    EV_WATCH_TIMEOUT_ = 6   # a watched fd stayed silent until its deadline
    EV_PAIR_ = 7            # a connect_to listener accepted, admitted and connected a pair

# Accept back-off after EMFILE & co: first pause, doubling up to the cap.
cdef enum:
    ACCEPT_BACKOFF_FIRST_MS = 100
    ACCEPT_BACKOFF_MAX_MS = 1000
    # A connect_to listener's worker over its share sits out this long (listeners.pxi): long
    # enough for a sibling woken by the same connection to be scheduled and accept it.
    ACCEPT_YIELD_US = 1000

# Upper bounds of the connect-time histogram (Loop.set_connect_buckets), +Inf not included.
cdef enum:
    MAX_CONNECT_BUCKETS = 32

cdef enum:
    BACKEND_URING = 0
    BACKEND_EPOLL = 1

cdef enum:
    MAX_LISTENERS = 64
    SCRATCH_SIZE = 65536        # copy path buffer: one per loop, bytes never stay in it
    STREAM_MIN = 16384          # a recv this large marks a bulk flow: splice from now on
    PUMP_ROUNDS = 16            # fairness: at most this many reads per readiness event
    EPOLL_BATCH = 256
    REAP_BATCH = 256            # CQEs dispatched per loop round at most (uring.pxi)
    ACCEPT_BATCH = 16           # accept4() calls per listener wakeup (listeners.pxi)
    SHRINK_BATCH = 64           # idle pipes closed per timer scan at most (pipes.pxi)
    LOWAT_KEEP_FRACTION = 4     # a low-water timeout with 1/4 of the mark queued keeps the mark


# ------------------------------------------------------------------ user_data (userdata.pxi)

# 64 bits, integers only, never pointers:  op (8 bits) | generation (24 bits) | slot (32 bits).
# A connection id handed to Python is the same without the op: generation << 32 | slot.
# GEN_MASK and the packing helpers are in userdata.pxi, shared with the UDP core (_udp.pyx).
cdef enum:
    OP_ACCEPT = 1               # a listener's readiness: uring POLLIN poll / epoll registration
    OP_POLL = 2                 # OP_POLL + side * 2 + (1 if POLLOUT else 0): 2..5 (epoll: 2..3)
    OP_IGNORE = 8               # completions of our own cancels
    OP_WAKEUP = 9               # the signal wake-up pipe (wakeup.pxi): not a slot


# ------------------------------------------------------------------ connections (conn.pxi)

# One connection = two halves, one per direction.  Half d reads side d and writes side 1-d:
# half 0 is client -> upstream (c2s), half 1 is upstream -> client (s2c).
cdef enum:
    SIDE_CLIENT = 0
    SIDE_UPSTREAM = 1

cdef enum:
    ST_FREE = 0
    ST_CONNECTING = 1
    ST_RELAY = 2
    ST_WATCH = 3        # not a pair: one caller-owned fd watched for readability (loop.watch)

cdef enum:
    HF_EOF = 1          # the source sent FIN (read returned 0)
    HF_SHUT = 2         # we forwarded that FIN: shutdown(dst, SHUT_WR), or the close() right after
    HF_STREAM = 4       # a bulk flow: move it with splice through a pipe
    HF_WANT_READ = 8    # waiting for the source to become readable
    HF_WANT_WRITE = 16  # bytes pending for the destination, waiting for it to drain
    HF_NO_SPLICE = 32   # splice(2) refused these sockets (EINVAL/ENOSYS): always copy
    HF_LOWAT = 64       # SO_RCVLOWAT raised on the source (bulk): its polls carry a timeout

cdef enum:
    POLL_BIT_IN = 1
    POLL_BIT_OUT = 2

cdef struct Half:
    int pipe_r              # -1: no pipe held
    int pipe_w
    uint32_t pipe_len       # bytes sitting in the pipe, not yet written to dst
    uint32_t flags
    char* buf               # copied bytes not yet written to dst (malloc'd only while pending)
    uint32_t buf_off
    uint32_t buf_len
    uint64_t nbytes         # bytes delivered to dst
    uint64_t spliced
    uint64_t copied

cdef struct Conn:
    int fd[2]
    Half half[2]
    uint32_t gen            # bumped on free: stale completions carry the old generation
    uint8_t state
    uint8_t polled[2]       # uring: POLL_IN/POLL_OUT bits in flight per side; epoll: registered mask
    uint8_t in_epoll[2]     # epoll: the side's fd is registered
    int err
    int64_t tag
    uint64_t start_ns
    uint64_t last_ns        # last byte moved either way
    uint64_t connect_us
    uint32_t outq_seen      # both send queues' bytes (SIOCOUTQ) at the last sample ...
    uint64_t outq_ns        # ... taken at this time: a change while idle is the peer draining
    uint64_t deadline_ns    # ST_WATCH: when EV_WATCH_TIMEOUT fires


# ------------------------------------------------------------------ pipes (pipes.pxi)

cdef struct PipePool:
    int* free_r
    int* free_w
    int n_free
    int n_in_use
    int max_pipes
    int size_requested
    int size_granted          # F_GETPIPE_SZ of the last pipe made
    uint64_t created
    uint64_t refused          # pipe2 failed, or the kernel granted a uselessly small pipe
    uint64_t setsz_denied     # F_SETPIPE_SZ refused (EPERM past pipe-user-pages-soft)
    uint64_t killed           # closed while still holding bytes
    uint64_t cooldown_until   # after a refusal, copy for a while instead of retrying each read
    uint64_t* free_since      # when each idle pipe was put back (oldest at index 0)
    int keep_idle             # idle pipes kept whatever their age (low-water mark) ...
    uint64_t release_after_ns # ... the rest are closed once idle this long
    uint64_t released         # idle pipes closed by the shrinking


# ------------------------------------------------------------------ events (events.pxi)

cdef struct Event:
    int kind
    int64_t a               # listener tag / conn id
    int64_t b               # fd / errno / tag
    int64_t v[8]            # EV_ACCEPT: v[0:4] the peer's, v[4:8] the local sockaddr (listeners.pxi)
                            # EV_PAIR: v[0:4] the peer's


# ------------------------------------------------------------------ listeners (listeners.pxi)

cdef struct Listener:
    int fd
    int64_t tag
    uint32_t gen
    uint8_t active
    uint8_t user_paused
    uint8_t armed               # uring: a POLLIN poll is in flight; epoll: registered
    uint8_t want_local          # EV_ACCEPT carries the accepted socket's local address
    sock_len connect_len        # > 0: accept-and-connect to connect_to (connect.pxi) ...
    sockaddr_in6 connect_to     # ... a packed sockaddr_in / sockaddr_in6
    uint8_t yielded             # connect_to: the last wakeup was left to a lighter sibling
    uint64_t resume_at          # paused after EMFILE & co until this time (0 = not paused)
    uint32_t backoff_ms


# ------------------------------------------------------------------ the loop (loop.pxi)

cdef class Loop:
    cdef int backend_id
    cdef bint closed
    # io_uring (uring.pxi)
    cdef io_uring ring
    cdef io_uring_cqe cqe_holder
    cdef uring_timespec wait_ts
    cdef uring_sigset no_sigmask
    cdef bint ring_ready
    # epoll (epoll.pxi)
    cdef int epfd
    cdef epoll_event* epevents
    # embedding: readable when run(0) has work
    cdef int efd
    # signal wake-up pipe (wakeup.pxi): not a connection, no slot
    cdef int wake_r
    cdef int wake_w
    cdef bint wake_armed
    cdef uint64_t st_signal_wakeups   # waits ended by a byte in the wake-up pipe
    # connections
    cdef Conn* conns
    cdef uint32_t max_conns
    cdef uint32_t* free_slots
    cdef uint32_t n_free_slots
    cdef uint32_t high_water
    cdef uint32_t n_open
    cdef uint32_t n_watching    # slots in ST_WATCH (not pairs: not in n_open)
    # listeners
    cdef Listener listeners[MAX_LISTENERS]
    cdef int n_listener_slots
    # bytes
    cdef PipePool pipes
    cdef char* scratch
    cdef uint32_t splice_min
    cdef bint splice_enabled
    cdef int socket_rcvbuf      # SO_RCVBUF of relayed sockets; 0 = kernel auto-tuning
    cdef int rcvlowat           # SO_RCVLOWAT of bulk sources (uring only); 0 = never raised
    cdef __kernel_timespec lowat_wait   # the linked timeout of a low-water poll
    cdef uint64_t st_lowat_raised       # bulk sources switched to the low-water mark ...
    cdef uint64_t st_lowat_timeouts     # ... and low-water polls ended by the timeout
    # timers
    cdef uint64_t connect_timeout_ns
    cdef uint64_t idle_timeout_ns
    cdef uint64_t half_close_timeout_ns
    cdef uint64_t scan_interval_ns
    cdef uint64_t outq_sample_ns    # how often an idle pair's send queues are sampled
    cdef uint64_t next_scan
    cdef uint64_t next_resume   # earliest listener resume_at (0: none): run() wakes for it
    cdef uint64_t now
    cdef bint interrupted       # a signal cut the wait short: return so Python can run it
    # events for Python
    cdef Event* evq
    cdef uint32_t evq_len
    cdef uint32_t evq_cap
    # counters
    cdef uint64_t st_conns_total
    cdef uint64_t st_bytes_spliced
    cdef uint64_t st_bytes_copied
    cdef uint64_t st_bytes_dir[2]     # bytes delivered: [0] client->upstream, [1] back
    cdef uint64_t st_accepts
    cdef uint64_t st_accept_errors
    cdef uint64_t st_accept_paused
    cdef uint64_t st_resets_sent
    cdef uint64_t st_sqe_starved
    cdef uint64_t st_submit_errors
    cdef int last_submit_errno
    cdef uint64_t st_wakeups
    cdef uint64_t st_reaps_cut
    cdef uint64_t st_multishot_ended
    cdef uint64_t st_cq_overflows
    cdef uint64_t st_events_dropped
    cdef uint64_t st_watches
    cdef uint64_t st_watch_timeouts
    cdef uint64_t st_closes[N_REASONS]
    # Connect time of every pair the core saw connect (_finish_connect): counts per bucket
    # (not cumulative; [n_connect_bounds] is +Inf), their sum and number, in microseconds.
    cdef uint64_t connect_bounds_us[MAX_CONNECT_BUCKETS]
    cdef uint64_t connect_counts[MAX_CONNECT_BUCKETS + 1]
    cdef int n_connect_bounds
    cdef uint64_t connect_sum_us
    cdef uint64_t connect_n
    cdef dict final_stats       # stats() as they were when close() ran
    # Admission of connect_to listeners' clients (set_limits): None admits every client.
    cdef SharedLimits limits
    cdef uint32_t limits_slot
    cdef uint64_t st_accept_connects  # pairs a connect_to listener started in the core
    cdef uint64_t st_accept_yields    # wakeups a connect_to listener left to its siblings

    cdef _ensure_alive(self)
    cdef bint _reset_pair(self, int64_t cid, int reason)
    cdef int _listener_slot(self, int64_t tag) except -1
    cdef Conn* _take_slot(self) except NULL
    cdef int _probe_pipe_size(self)
    cdef dict _counters(self)
    cdef void _free_memory(self) noexcept
    cdef void _drain_eventfd(self) noexcept


# ------------------------------------------------------------------ what one fragment calls in another

# constants.pxi
cdef bint is_accept_pause_errno(int err) noexcept nogil
cdef int connect_reason(int err) noexcept nogil

# conn.pxi
cdef void _arm_side(Loop self, Conn* c, int side, uint8_t want) noexcept nogil
cdef void _disarm_all(Loop self, Conn* c) noexcept nogil
cdef void _close_conn(Loop self, Conn* c, int reason, int err, bint reset) noexcept nogil
cdef void _free_slot(Loop self, Conn* c) noexcept nogil
cdef void _watch_end(Loop self, Conn* c, int kind) noexcept nogil

# pipes.pxi
cdef int pipe_pool_init(PipePool* pp, int max_pipes, int size, int keep_idle,
                        uint64_t release_after_ns) except -1
cdef void pipe_pool_destroy(PipePool* pp) noexcept nogil
cdef int pipe_get(PipePool* pp, Half* h, uint64_t now) noexcept nogil
cdef void pipe_put(PipePool* pp, Half* h, uint64_t now) noexcept nogil
cdef void pipe_pool_shrink(PipePool* pp, uint64_t now) noexcept nogil

# events.pxi
cdef Event* _push_event(Loop self, int kind, int64_t a, int64_t b) noexcept nogil
cdef list _take_events(Loop self)

# listeners.pxi
cdef void _listener_arm(Loop self, int slot) noexcept nogil
cdef void _listener_disarm(Loop self, int slot) noexcept nogil
cdef int _accept_batch(Loop self, int slot) noexcept nogil
cdef void _accept_pause(Loop self, int slot, int err) noexcept nogil

# connect.pxi
cdef Conn* _try_take_slot(Loop self) noexcept nogil
cdef bint _accept_connect(Loop self, Listener* l, int fd, sockaddr_in6* peer,
                          sock_len peer_len) noexcept nogil

# datapath.pxi
cdef void _start_relay(Loop self, Conn* c) noexcept nogil
cdef void _start_fresh(Loop self, Conn* c) noexcept nogil
cdef void _on_ready(Loop self, Conn* c, int side, bint readable, bint writable) noexcept nogil

# timers.pxi
cdef void _scan_timers(Loop self) noexcept nogil

# pairinfo.pxi
cdef Conn* _conn_by_id(Loop self, int64_t cid) noexcept nogil
cdef tuple _pair_tuple(Loop self, Conn* c, uint64_t now)
cdef list _pair_list(Loop self)

# uring.pxi
cdef int _uring_setup(Loop self, int entries) except -1
cdef void _uring_arm(Loop self, Conn* c, int side, uint8_t want) noexcept nogil
cdef void _uring_kick(Loop self, Conn* c, int side) noexcept nogil
cdef void _uring_disarm(Loop self, Conn* c) noexcept nogil
cdef void _uring_listener_arm(Loop self, int slot) noexcept nogil
cdef void _uring_listener_disarm(Loop self, int slot) noexcept nogil
cdef void _uring_wait(Loop self, int timeout_ms)
cdef void _uring_reap(Loop self) noexcept nogil
cdef void _uring_keep_notified(Loop self) noexcept nogil
cdef void _uring_flush(Loop self)

# epoll.pxi
cdef int _epoll_setup(Loop self) except -1
cdef void _epoll_arm(Loop self, Conn* c, int side, uint8_t want) noexcept nogil
cdef void _epoll_disarm(Loop self, Conn* c) noexcept nogil
cdef void _epoll_listener_arm(Loop self, int slot) noexcept nogil
cdef void _epoll_listener_disarm(Loop self, int slot) noexcept nogil
cdef void _epoll_poll(Loop self, int timeout_ms) noexcept nogil

# wakeup.pxi
cdef int _wakeup_open(Loop self) except -1
cdef void _wakeup_arm(Loop self) noexcept nogil
cdef void _wakeup_ready(Loop self) noexcept nogil
cdef void _wakeup_close(Loop self) noexcept nogil

# handoff.pxi
cdef dict _handoff_export(Loop self, Conn* c)
cdef int64_t _handoff_import(Loop self, dict st, int64_t tag) except -1
