# The per-worker loop: readiness from io_uring (or epoll), bytes moved by splice(2)/recv/send
# issued from this thread.  docs/kernel-notes.md has the measurements: IORING_OP_SPLICE always runs on an
# io-wq worker thread (REQ_F_FORCE_ASYNC), parking one kernel thread per pending splice, while
# a direct splice(2) on a non-blocking socket costs one syscall and no thread.  io_uring earns
# its place for multishot accept, one-shot polls and batching every arm/cancel into one enter.

cdef enum:
    BACKEND_URING = 0
    BACKEND_EPOLL = 1

cdef enum:
    MAX_LISTENERS = 64
    SCRATCH_SIZE = 65536        # copy path buffer: one per loop, bytes never stay in it
    STREAM_MIN = 16384          # a recv this large marks a bulk flow: splice from now on
    PUMP_ROUNDS = 16            # fairness: at most this many reads per readiness event
    EPOLL_BATCH = 256
    ACCEPT_BATCH = 128

# user_data layout (64 bits, integers only, never pointers):
#   op (8 bits) | generation (24 bits) | slot index (32 bits)
cdef enum:
    OP_ACCEPT = 1
    OP_POLL = 2                 # OP_POLL + side * 2 + (1 if POLLOUT else 0): 2..5
    OP_IGNORE = 8               # completions of our own cancels

cdef struct Listener:
    int fd
    int64_t tag
    uint32_t gen
    uint8_t active
    uint8_t user_paused
    uint8_t armed               # uring: a multishot accept is in flight; epoll: registered
    uint8_t removing            # uring: removed, but its cancelled accept has not ended yet
    uint64_t resume_at          # paused after EMFILE & co until this time (0 = not paused)
    uint32_t backoff_ms


cdef inline uint64_t pack_ud(uint64_t op, uint32_t gen, uint32_t idx) noexcept nogil:
    return (op << 56) | ((<uint64_t>(gen & 0xFFFFFF)) << 32) | <uint64_t>idx


cdef inline bint is_accept_pause_errno(int err) noexcept nogil:
    # Out of descriptors or memory: accepting again right away would spin.  Pause this
    # listener and retry later; connections already relaying are not affected.
    return err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM


cdef inline int connect_reason(int err) noexcept nogil:
    if err == ECONNREFUSED:
        return R_REFUSED
    if err == EHOSTUNREACH or err == ENETUNREACH or err == EHOSTDOWN or err == ENETDOWN:
        return R_UNREACHABLE
    if err == ETIMEDOUT:
        return R_CONNECT_TIMEOUT
    return R_ERROR


cdef inline void set_linger_zero(int fd) noexcept nogil:
    # close() with SO_LINGER {1, 0} sends an RST instead of a FIN: the peer must see a
    # truncated stream as a reset, never as a clean end of data.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef class Loop:
    """One relay loop: listeners, connection pairs, a pipe pool and a ring (or epoll).

    Use from one thread only.  See docs/architecture.md for the contract.
    """
    cdef int backend_id
    cdef bint closed
    cdef object owner_warned
    # io_uring
    cdef io_uring ring
    cdef io_uring_cqe cqe_holder
    cdef uring_timespec wait_ts
    cdef uring_sigset no_sigmask
    cdef bint ring_ready
    # epoll
    cdef int epfd
    cdef epoll_event* epevents
    # embedding: readable when run(0) has work
    cdef int efd
    # connections
    cdef Conn* conns
    cdef uint32_t max_conns
    cdef uint32_t* free_slots
    cdef uint32_t n_free_slots
    cdef uint32_t high_water
    cdef uint32_t n_open
    # listeners
    cdef Listener listeners[64]
    cdef int n_listener_slots
    # bytes
    cdef PipePool pipes
    cdef char* scratch
    cdef uint32_t splice_min
    cdef bint splice_enabled
    # timers
    cdef uint64_t connect_timeout_ns
    cdef uint64_t idle_timeout_ns
    cdef uint64_t half_close_timeout_ns
    cdef uint64_t scan_interval_ns
    cdef uint64_t next_scan
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
    cdef uint64_t st_events_dropped
    cdef uint64_t st_closes[10]

    def __cinit__(self):
        self.closed = True
        self.epfd = -1
        self.efd = -1
        self.conns = NULL
        self.free_slots = NULL
        self.scratch = NULL
        self.evq = NULL
        self.epevents = NULL
        self.ring_ready = False
        memset(&self.pipes, 0, sizeof(PipePool))
        memset(self.listeners, 0, sizeof(self.listeners))

    def __init__(self, str backend="uring", *, int pipe_size=1 << 20, int max_pipes=256,
                 int max_conns=65536, int splice_min=4096, bint splice=True,
                 int connect_timeout_ms=5000, int idle_timeout_ms=300000,
                 int half_close_timeout_ms=60000, int ring_entries=1024):
        if backend not in ("uring", "epoll"):
            raise ValueError(f"relay core: backend must be 'uring' or 'epoll', not {backend!r}")
        if max_conns < 1 or max_conns > 16_000_000:
            raise ValueError(f"relay core: max_conns={max_conns}: must be 1..16000000")
        if pipe_size < 4096:
            raise ValueError(f"relay core: pipe_size={pipe_size}: must be >= 4096")
        if min(connect_timeout_ms, idle_timeout_ms, half_close_timeout_ms) <= 0:
            raise ValueError("relay core: timeouts must be > 0 ms")
        if ring_entries < 8 or ring_entries > 32768:
            raise ValueError(f"relay core: ring_entries={ring_entries}: must be 8..32768")
        self.backend_id = BACKEND_URING if backend == "uring" else BACKEND_EPOLL
        self.max_conns = max_conns
        self.splice_min = max(splice_min, 1)
        self.splice_enabled = splice and max_pipes > 0
        self.connect_timeout_ns = <uint64_t>connect_timeout_ms * 1000000ULL
        self.idle_timeout_ns = <uint64_t>idle_timeout_ms * 1000000ULL
        self.half_close_timeout_ns = <uint64_t>half_close_timeout_ms * 1000000ULL
        shortest = min(connect_timeout_ms, idle_timeout_ms, half_close_timeout_ms)
        self.scan_interval_ns = <uint64_t>max(5, min(200, shortest // 10)) * 1000000ULL
        # calloc'd pages stay untouched (no RSS) until a slot is first used: slots are
        # handed out low-first, so memory follows the peak number of open pairs.
        self.conns = <Conn*>calloc(max_conns, sizeof(Conn))
        self.free_slots = <uint32_t*>calloc(max_conns, sizeof(uint32_t))
        self.scratch = <char*>malloc(SCRATCH_SIZE)
        self.evq_cap = 256
        self.evq = <Event*>malloc(self.evq_cap * sizeof(Event))
        if not (self.conns and self.free_slots and self.scratch and self.evq):
            self._free_memory()
            raise MemoryError("relay core: cannot allocate the connection table")
        pipe_pool_init(&self.pipes, max_pipes if self.splice_enabled else 0, pipe_size)
        try:
            if self.backend_id == BACKEND_URING:
                self._ring_setup(ring_entries)
            else:
                self._epoll_setup()
        except BaseException:
            self._free_memory()
            raise
        self.now = now_ns()
        self.next_scan = self.now + self.scan_interval_ns
        self.closed = False

    # ---------------------------------------------------------------- setup / teardown

    cdef _ring_setup(self, int entries):
        # python-liburing 2024.5.3 declares io_uring_params but never allocates its struct:
        # point it at one of ours.
        cdef __io_uring_params raw
        cdef io_uring_params params
        cdef int err = 0
        self.ring = io_uring()
        self.cqe_holder = io_uring_cqe()
        self.wait_ts = uring_timespec()
        self.no_sigmask = uring_sigset()    # ptr stays NULL: no signal mask change on wait
        # Setup flags, each one deliberate:
        # - CQSIZE: a CQ 8x the SQ, because one arm (SQE) can complete with several CQEs
        #   (multishot accept) and a burst of readiness must not overflow.  Overflow still
        #   loses nothing (IORING_FEAT_NODROP keeps it in the kernel until we reap).
        # - COOP_TASKRUN: completions run when we enter the kernel, not via an IPI that
        #   interrupts us mid-batch; we enter once per batch anyway.
        # - SUBMIT_ALL: one bad SQE must not stop the rest of the batch.
        # No SQPOLL (a spinning kernel thread per worker on a 2-vCPU box costs more than it
        # saves) and no SINGLE_ISSUER/DEFER_TASKRUN (embedders may create the loop in one
        # thread and drive it from another; DEFER_TASKRUN would also delay eventfd wakeups).
        for flags in ((__IORING_SETUP_CQSIZE | __IORING_SETUP_COOP_TASKRUN
                       | __IORING_SETUP_SUBMIT_ALL),
                      __IORING_SETUP_CQSIZE, 0):
            memset(&raw, 0, sizeof(raw))
            params = io_uring_params()
            params.ptr = &raw
            params.ptr.flags = flags
            params.ptr.cq_entries = entries * 8
            try:
                io_uring_queue_init_params(entries, self.ring, params)
                params.ptr = NULL
                self.ring_ready = True
                return
            except OSError as exc:
                params.ptr = NULL
                self.ring = io_uring()
                err = exc.errno or 0
                if err != EINVAL:
                    break
        raise OSError(err, f"relay core: io_uring unavailable: {os.strerror(err)} "
                           "(kernel.io_uring_disabled, a seccomp filter, or RLIMIT_MEMLOCK); "
                           "use the epoll engine")

    cdef _epoll_setup(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            err = errno
            raise OSError(err, f"relay core: epoll_create1: {os.strerror(err)}")
        self.epevents = <epoll_event*>malloc(EPOLL_BATCH * sizeof(epoll_event))
        if self.epevents == NULL:
            raise MemoryError("relay core: cannot allocate epoll events")

    cdef void _free_memory(self) noexcept:
        free(self.conns)
        free(self.free_slots)
        free(self.scratch)
        free(self.evq)
        free(self.epevents)
        self.conns = NULL
        self.free_slots = NULL
        self.scratch = NULL
        self.evq = NULL
        self.epevents = NULL

    def close(self):
        """Reset every open pair, stop accepting and release the ring.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        cdef uint32_t i
        cdef Conn* c
        for i in range(self.high_water):
            c = &self.conns[i]
            if c.state != ST_FREE:
                _close_conn(self, c, R_ABORTED, 0, True)
        self.evq_len = 0        # nobody will read them; accepted fds were closed below
        for i in range(self.n_listener_slots):
            self.listeners[i].active = 0
        pipe_pool_destroy(&self.pipes)
        if self.ring_ready:
            self.ring_ready = False
            io_uring_queue_exit(self.ring)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1
        if self.efd >= 0:
            close(self.efd)
            self.efd = -1
        self._free_memory()

    def __dealloc__(self):
        if not self.closed:
            warnings.warn(f"unclosed relay core Loop with {self.n_open} open pairs",
                          ResourceWarning)
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef _ensure_alive(self):
        if self.closed:
            raise RuntimeError("relay core: the loop is closed")

    # ---------------------------------------------------------------- Python API

    @property
    def backend(self):
        return "uring" if self.backend_id == BACKEND_URING else "epoll"

    def fileno(self):
        """A descriptor that turns readable when run(0) has work (for loop.add_reader)."""
        self._ensure_alive()
        if self.backend_id == BACKEND_EPOLL:
            return self.epfd
        if self.efd < 0:
            fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            if fd < 0:
                err = errno
                raise OSError(err, f"relay core: eventfd: {os.strerror(err)}")
            try:
                io_uring_register_eventfd(self.ring, fd)
            except OSError:
                close(fd)
                raise
            self.efd = fd
        return self.efd

    def add_listener(self, int fd, int64_t tag):
        """Accept on `fd` (non-blocking listening socket, not owned) under `tag`."""
        self._ensure_alive()
        cdef int i, slot = -1
        for i in range(self.n_listener_slots):
            if self.listeners[i].active and self.listeners[i].tag == tag:
                raise ValueError(f"relay core: listener tag {tag} already added")
            if not self.listeners[i].active and not self.listeners[i].removing and slot < 0:
                slot = i
        if slot < 0:
            if self.n_listener_slots >= MAX_LISTENERS:
                raise ValueError(f"relay core: at most {MAX_LISTENERS} listeners per loop")
            slot = self.n_listener_slots
            self.n_listener_slots += 1
        cdef Listener* l = &self.listeners[slot]
        l.gen += 1
        l.fd = fd
        l.tag = tag
        l.active = 1
        l.user_paused = 0
        l.armed = 0
        l.resume_at = 0
        l.backoff_ms = 100
        self._listener_arm(slot)
        self._flush()

    def remove_listener(self, int64_t tag):
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        self._listener_disarm(slot)
        self.listeners[slot].active = 0
        if self.listeners[slot].armed and self.backend_id == BACKEND_URING:
            # The cancel is asynchronous: the kernel may complete accepts until it lands.
            # Those clients are real (their handshake is done): deliver them under this
            # tag; the slot is retired when the final completion arrives.
            self.listeners[slot].removing = 1
        else:
            self.listeners[slot].gen += 1
        self._flush()

    def pause_accept(self, int64_t tag):
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        self.listeners[slot].user_paused = 1
        self._listener_disarm(slot)
        self._flush()

    def resume_accept(self, int64_t tag):
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        self.listeners[slot].user_paused = 0
        if self.listeners[slot].resume_at == 0:
            self._listener_arm(slot)
        self._flush()

    cdef int _listener_slot(self, int64_t tag) except -1:
        cdef int i
        for i in range(self.n_listener_slots):
            if self.listeners[i].active and self.listeners[i].tag == tag:
                return i
        raise KeyError(f"relay core: no listener with tag {tag}")

    def add_pair(self, int client_fd, int upstream_fd, int64_t tag=0, bint connecting=False,
                 bytes prefix=b""):
        """Relay between two sockets; the loop owns both fds from now on.  Returns the id."""
        self._ensure_alive()
        if client_fd < 0 or upstream_fd < 0 or client_fd == upstream_fd:
            raise ValueError(f"relay core: bad fds {client_fd}, {upstream_fd}")
        if self.n_free_slots == 0 and self.high_water >= self.max_conns:
            raise OSError(EMFILE, f"relay core: connection table full ({self.max_conns})")
        cdef uint32_t idx
        if self.n_free_slots:
            self.n_free_slots -= 1
            idx = self.free_slots[self.n_free_slots]
        else:
            idx = self.high_water
            self.high_water += 1
        cdef Conn* c = &self.conns[idx]
        cdef uint32_t gen = c.gen
        memset(c, 0, sizeof(Conn))
        c.gen = gen
        c.fd[SIDE_CLIENT] = client_fd
        c.fd[SIDE_UPSTREAM] = upstream_fd
        half_reset(&c.half[0])
        half_reset(&c.half[1])
        c.tag = tag
        self.now = now_ns()
        c.start_ns = self.now
        c.last_ns = self.now
        for fd in (client_fd, upstream_fd):
            flags = fcntl(fd, F_GETFL)
            if flags >= 0 and not (flags & O_NONBLOCK):
                fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        cdef Py_ssize_t plen = len(prefix)
        if plen:
            c.half[0].buf = <char*>malloc(plen)
            if c.half[0].buf == NULL:
                raise MemoryError("relay core: prefix")
            memcpy(c.half[0].buf, <char*>prefix, plen)
            c.half[0].buf_len = plen
        self.n_open += 1
        self.st_conns_total += 1
        cdef int64_t cid = (<int64_t>(gen & 0xFFFFFF) << 32) | idx
        with nogil:
            if connecting:
                c.state = ST_CONNECTING
                self._arm_side(c, SIDE_UPSTREAM, POLL_BIT_OUT)
            else:
                c.state = ST_RELAY
                _start_relay(self, c)
        self._flush()
        return cid

    def abort(self, int64_t cid):
        """Reset both sides of pair `cid` now (reason "aborted").  Unknown ids are ignored."""
        self._ensure_alive()
        cdef uint32_t idx = cid & 0xFFFFFFFFULL
        cdef uint32_t gen = (cid >> 32) & 0xFFFFFF
        if idx >= self.high_water:
            return False
        cdef Conn* c = &self.conns[idx]
        if c.state == ST_FREE or (c.gen & 0xFFFFFF) != gen:
            return False
        _close_conn(self, c, R_ABORTED, 0, True)
        self._flush()
        return True

    def run(self, int timeout_ms=0):
        """Wait up to timeout_ms (0: don't wait), move bytes, return the events (tuples).

        While there is nothing for Python (no accept, no finished pair) it keeps relaying
        without returning, until the timeout passes or a signal interrupts the wait: a busy
        relay pays no interpreter round trip per wakeup.
        """
        self._ensure_alive()
        if timeout_ms < 0:
            timeout_ms = 0
        cdef uint64_t deadline = now_ns() + <uint64_t>timeout_ms * 1000000ULL
        cdef uint64_t wait_ns
        cdef int wait_ms
        self.interrupted = False
        while True:
            self.now = now_ns()
            wait_ns = 0
            if not self.evq_len and self.now < deadline:
                wait_ns = deadline - self.now
                if self.next_scan <= self.now:
                    wait_ns = 0
                elif self.next_scan - self.now < wait_ns:
                    wait_ns = self.next_scan - self.now
            wait_ms = <int>((wait_ns + 999999ULL) // 1000000ULL)
            if self.backend_id == BACKEND_URING:
                _uring_wait(self, wait_ms)
                self.now = now_ns()     # the wait may have blocked: bytes move at this time
                with nogil:
                    _uring_reap(self)
            else:
                with nogil:
                    _epoll_poll(self, wait_ms)
            if self.efd >= 0:
                self._drain_eventfd()
            self.now = now_ns()
            if self.now >= self.next_scan:
                with nogil:
                    _scan_timers(self)
            self._flush()
            if self.evq_len or self.interrupted or self.now >= deadline:
                break
        return self._take_events()

    def stats(self):
        """Counters as a flat dict of ints."""
        d = {
            "conns_open": self.n_open,
            "conns_total": self.st_conns_total,
            "bytes_spliced": self.st_bytes_spliced,
            "bytes_copied": self.st_bytes_copied,
            "bytes_c2s": self.st_bytes_dir[0],
            "bytes_s2c": self.st_bytes_dir[1],
            "pipes_in_use": self.pipes.n_in_use,
            "pipes_free": self.pipes.n_free,
            "pipes_max": self.pipes.max_pipes,
            "pipes_created": self.pipes.created,
            "pipes_killed": self.pipes.killed,
            "pipe_refused": self.pipes.refused,
            "pipe_resize_denied": self.pipes.setsz_denied,
            "pipe_size_requested": self.pipes.size_requested,
            "pipe_size_granted": self.pipes.size_granted or self._probe_pipe_size(),
            "accepts": self.st_accepts,
            "accept_errors": self.st_accept_errors,
            "accept_paused": self.st_accept_paused,
            "resets_sent": self.st_resets_sent,
            "sqe_starved": self.st_sqe_starved,
            "submit_errors": self.st_submit_errors,
            "submit_last_errno": self.last_submit_errno,
            "events_dropped": self.st_events_dropped,
            "conn_slots_used": self.high_water,
        }
        for i, name in enumerate(REASONS):
            d["closed_" + name] = self.st_closes[i]
        return d

    cdef int _probe_pipe_size(self):
        # Before the first pipe exists, report what the kernel would grant: make one,
        # size it, read it back, and keep it in the pool.
        cdef Half tmp
        half_reset(&tmp)
        if self.pipes.max_pipes == 0:
            return 0
        if pipe_get(&self.pipes, &tmp, now_ns()) == 0:
            pipe_put(&self.pipes, &tmp)
        return self.pipes.size_granted

    # ---------------------------------------------------------------- events out

    cdef Event* _push_event(self, int kind, int64_t a, int64_t b) noexcept nogil:
        """Queue an event for Python; NULL (and counted) when memory ran out."""
        cdef Event* grown
        if self.evq_len == self.evq_cap:
            grown = <Event*>realloc(self.evq, self.evq_cap * 2 * sizeof(Event))
            if grown == NULL:
                self.st_events_dropped += 1
                if kind == EV_ACCEPT_:
                    close(<int>b)       # nobody could own it: don't leak it
                return NULL
            self.evq = grown
            self.evq_cap *= 2
        cdef Event* ev = &self.evq[self.evq_len]
        self.evq_len += 1
        ev.kind = kind
        ev.a = a
        ev.b = b
        return ev

    cdef list _take_events(self):
        cdef list out = []
        cdef uint32_t i
        cdef Event* ev
        for i in range(self.evq_len):
            ev = &self.evq[i]
            if ev.kind == EV_ACCEPT_:
                out.append((EV_ACCEPT_, ev.a, ev.b))
            elif ev.kind == EV_DONE_:
                out.append((EV_DONE_, ev.a, ev.b, ev.v[0], ev.v[1], ev.v[2], ev.v[3],
                            ev.v[4], ev.v[5], ev.v[6]))
            elif ev.kind == EV_CONNECTED_:
                out.append((EV_CONNECTED_, ev.a, ev.b, ev.v[0]))
            else:
                out.append((ev.kind, ev.a, ev.b))
        self.evq_len = 0
        if self.evq_cap > 4096:
            # a burst grew the queue: give the memory back
            free(self.evq)
            self.evq_cap = 256
            self.evq = <Event*>malloc(self.evq_cap * sizeof(Event))
        return out

    cdef void _drain_eventfd(self) noexcept:
        cdef uint64_t value
        read(self.efd, &value, sizeof(value))

    # ---------------------------------------------------------------- backend dispatch

    cdef void _arm_side(self, Conn* c, int side, uint8_t want) noexcept nogil:
        if self.backend_id == BACKEND_URING:
            _uring_arm(self, c, side, want)
        else:
            _epoll_arm(self, c, side, want)

    cdef void _disarm_all(self, Conn* c) noexcept nogil:
        if self.backend_id == BACKEND_URING:
            _uring_disarm(self, c)
        else:
            _epoll_disarm(self, c)

    cdef void _listener_arm(self, int slot) noexcept nogil:
        if self.backend_id == BACKEND_URING:
            _uring_listener_arm(self, slot)
        else:
            _epoll_listener_arm(self, slot)

    cdef void _listener_disarm(self, int slot) noexcept nogil:
        if self.backend_id == BACKEND_URING:
            _uring_listener_disarm(self, slot)
        else:
            _epoll_listener_disarm(self, slot)

    cdef void _flush(self):
        if self.backend_id == BACKEND_URING and self.ring_ready:
            if __io_uring_sq_ready(&self.ring.ptr):
                try:
                    io_uring_submit(self.ring)
                except OSError as exc:
                    self.st_submit_errors += 1
                    self.last_submit_errno = exc.errno or 0

