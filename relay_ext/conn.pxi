# One connection = two halves, one per direction.  Half d reads side d and writes side 1-d:
# half 0 is client -> upstream (c2s), half 1 is upstream -> client (s2c).

cdef enum:
    SIDE_CLIENT = 0
    SIDE_UPSTREAM = 1

cdef enum:
    ST_FREE = 0
    ST_CONNECTING = 1
    ST_RELAY = 2

cdef enum:
    HF_EOF = 1          # the source sent FIN (read returned 0)
    HF_SHUT = 2         # we forwarded that FIN: shutdown(dst, SHUT_WR) done
    HF_STREAM = 4       # a bulk flow: move it with splice through a pipe
    HF_WANT_READ = 8    # waiting for the source to become readable
    HF_WANT_WRITE = 16  # bytes pending for the destination, waiting for it to drain
    HF_NO_SPLICE = 32   # splice(2) refused these sockets (EINVAL/ENOSYS): always copy

# Close reasons: the index into REASONS.
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

REASONS = ("eof", "reset_client", "reset_origin", "refused", "unreachable",
           "connect_timeout", "idle_timeout", "aborted", "error", "half_close_timeout")

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
    uint32_t outq_seen      # send-queue bytes at the last timeout check (progress detector)

cdef enum:
    POLL_BIT_IN = 1
    POLL_BIT_OUT = 2


cdef inline void half_reset(Half* h) noexcept nogil:
    memset(h, 0, sizeof(Half))
    h.pipe_r = -1
    h.pipe_w = -1


# Events handed back to Python by run(): filled without the GIL, turned into tuples after.
cdef enum:
    EV_ACCEPT_ = 1
    EV_ACCEPT_ERROR_ = 2
    EV_CONNECTED_ = 3
    EV_DONE_ = 4

EV_ACCEPT = EV_ACCEPT_
EV_ACCEPT_ERROR = EV_ACCEPT_ERROR_
EV_CONNECTED = EV_CONNECTED_
EV_DONE = EV_DONE_

cdef struct Event:
    int kind
    int64_t a               # listener tag / conn id
    int64_t b               # fd / errno / tag
    int64_t v[8]
