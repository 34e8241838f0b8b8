# class Loop: the Python API.  Construction and teardown, listeners, pairs, run() and stats().
# The fields are declared in _core.pxd; the mechanism lives in the fragments _core.pyx lists.
# Every public method but close() and stats() raises RuntimeError once the loop is closed.


cdef class Loop:
    """One relay loop: listeners, connection pairs, a pipe pool and a ring (or epoll).

    Use from one thread only.  See docs/architecture.md for the contract.
    """
    def __cinit__(self):
        self.closed = True
        self.epfd = -1
        self.efd = -1
        self.wake_r = -1
        self.wake_w = -1
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
                 int half_close_timeout_ms=60000, int ring_entries=1024,
                 int pipes_keep_idle=8, int pipe_release_ms=10000, int socket_rcvbuf=0,
                 int socket_rcvlowat=0, int rcvlowat_wait_us=1000):
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
        if pipes_keep_idle < 0 or pipe_release_ms <= 0:
            raise ValueError(f"relay core: pipes_keep_idle={pipes_keep_idle}, "
                             f"pipe_release_ms={pipe_release_ms}: must be >= 0 and > 0")
        if socket_rcvbuf < 0:
            raise ValueError(f"relay core: socket_rcvbuf={socket_rcvbuf}: must be >= 0")
        if socket_rcvlowat < 0 or rcvlowat_wait_us < 1 or rcvlowat_wait_us > 1000000:
            raise ValueError(f"relay core: socket_rcvlowat={socket_rcvlowat}, rcvlowat_wait_us="
                             f"{rcvlowat_wait_us}: must be >= 0 and 1..1000000")
        self.backend_id = BACKEND_URING if backend == "uring" else BACKEND_EPOLL
        # Low-water mode needs the linked poll timeout only io_uring offers (datapath.pxi):
        # epoll would strand a tail below the mark, so it never raises the mark.
        self.rcvlowat = socket_rcvlowat if self.backend_id == BACKEND_URING else 0
        self.lowat_wait.tv_sec = rcvlowat_wait_us // 1000000
        self.lowat_wait.tv_nsec = (rcvlowat_wait_us % 1000000) * 1000
        self.socket_rcvbuf = socket_rcvbuf
        self.max_conns = max_conns
        self.splice_min = max(splice_min, 1)
        self.splice_enabled = splice and max_pipes > 0
        self.connect_timeout_ns = <uint64_t>connect_timeout_ms * 1000000ULL
        self.idle_timeout_ns = <uint64_t>idle_timeout_ms * 1000000ULL
        self.half_close_timeout_ns = <uint64_t>half_close_timeout_ms * 1000000ULL
        shortest = min(connect_timeout_ms, idle_timeout_ms, half_close_timeout_ms,
                       pipe_release_ms)
        self.scan_interval_ns = <uint64_t>max(5, min(200, shortest // 10)) * 1000000ULL
        # An idle pair's send queues are sampled about 8 times per timeout (timers.pxi).
        self.outq_sample_ns = max(self.scan_interval_ns,
                                  <uint64_t>min(idle_timeout_ms, half_close_timeout_ms)
                                  * 1000000ULL // 8)
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
        pipe_pool_init(&self.pipes, max_pipes if self.splice_enabled else 0, pipe_size,
                       pipes_keep_idle, <uint64_t>pipe_release_ms * 1000000ULL)
        try:
            if self.backend_id == BACKEND_URING:
                _uring_setup(self, ring_entries)
            else:
                _epoll_setup(self)
        except BaseException:
            self._free_memory()
            raise
        self.now = now_ns()
        self.next_scan = self.now + self.scan_interval_ns
        self.closed = False

    # ---------------------------------------------------------------- setup / teardown

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
            if c.state == ST_WATCH:
                _watch_end(self, c, 0)      # the fd is the caller's: left open
            elif c.state != ST_FREE:
                _close_conn(self, c, R_ABORTED, 0, True)
        self.evq_len = 0        # nobody will read them; accepted fds were closed below
        for i in range(self.n_listener_slots):
            self.listeners[i].active = 0
        self.final_stats = self._counters()
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
        _wakeup_close(self)
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

    def wakeup_fd(self):
        """The write end of the loop's signal wake-up pipe, for signal.set_wakeup_fd(): a byte
        written to it makes run() return (wakeup.pxi).  Not a connection: no slot is taken.
        The loop owns it and close() closes it: reset the wakeup fd before closing the loop."""
        self._ensure_alive()
        return _wakeup_open(self)

    def add_listener(self, int fd, int64_t tag, bint local_address=False, bytes connect_to=None):
        """Accept on `fd` (non-blocking listening socket, not owned) under `tag`.

        Each EV_ACCEPT carries the peer (from accept4() itself) and, with `local_address`,
        the accepted socket's local address (one getsockname() here, none in Python).

        `connect_to` (a packed sockaddr_in / sockaddr_in6, as add_pair_connect's): accept and
        connect in the core.  Each accepted client that set_limits' counters admit, whose
        upstream socket()/connect() started and that fits in the table is relayed to that
        address at once (as add_pair_connect(client, connect_to, tag) would) and reported as
        (EV_PAIR, id, tag, peer); any other is reported as an ordinary EV_ACCEPT, with no
        count held, for the caller to decide."""
        self._ensure_alive()
        if connect_to is not None:
            _check_sockaddr(connect_to)
        cdef int i, slot = -1
        for i in range(self.n_listener_slots):
            if self.listeners[i].active and self.listeners[i].tag == tag:
                raise ValueError(f"relay core: listener tag {tag} already added")
            if not self.listeners[i].active and slot < 0:
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
        l.want_local = local_address
        l.connect_len = 0
        l.yielded = 0
        if connect_to is not None:
            memcpy(&l.connect_to, <const char*>connect_to, len(connect_to))
            l.connect_len = <sock_len>len(connect_to)
        l.resume_at = 0
        l.backoff_ms = ACCEPT_BACKOFF_FIRST_MS
        # Every socket accepted from it starts with SO_LINGER {1, 0} (add_pair's
        # client_accepted); on the listener itself linger changes nothing: closing a
        # listening socket resets its unaccepted connections either way.
        set_linger_zero(fd)
        _listener_arm(self, slot)
        _uring_flush(self)

    def set_limits(self, SharedLimits limits, int slot=0):
        """Admit connect_to listeners' clients through `limits` (relay_ext._limits.SharedLimits,
        as worker `slot`: one count each, without a source key, given back by the caller's
        release(slot) when the pair is over); None: admit every one (the table bounds it)."""
        self._ensure_alive()
        if limits is not None and (slot < 0 or <uint32_t>slot >= limits.slots):
            raise ValueError(f"relay core: limits slot {slot} out of range")
        self.limits = limits
        self.limits_slot = <uint32_t>slot if limits is not None else 0

    def remove_listener(self, int64_t tag):
        """Stop accepting on `tag`.  Connections still queued on the socket stay there, for
        whoever accepts on it next; the fd is not closed (the loop never owned it)."""
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        _listener_disarm(self, slot)
        self.listeners[slot].active = 0
        self.listeners[slot].armed = 0
        self.listeners[slot].gen += 1      # a completion still in flight is now stale
        _uring_flush(self)

    def pause_accept(self, int64_t tag):
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        self.listeners[slot].user_paused = 1
        _listener_disarm(self, slot)
        _uring_flush(self)

    def resume_accept(self, int64_t tag):
        self._ensure_alive()
        cdef int slot = self._listener_slot(tag)
        self.listeners[slot].user_paused = 0
        if self.listeners[slot].resume_at == 0:
            _listener_arm(self, slot)
        _uring_flush(self)

    cdef int _listener_slot(self, int64_t tag) except -1:
        cdef int i
        for i in range(self.n_listener_slots):
            if self.listeners[i].active and self.listeners[i].tag == tag:
                return i
        raise KeyError(f"relay core: no listener with tag {tag}")

    def add_pair(self, int client_fd, int upstream_fd, int64_t tag=0, bint connecting=False,
                 bytes prefix=b"", *, bint client_accepted=False,
                 bint upstream_nonblocking=False):
        """Relay between two sockets; the loop owns both fds from now on.  Returns the id.

        client_accepted: client_fd is exactly as this loop's EV_ACCEPT delivered it (already
        O_NONBLOCK, SO_LINGER {1, 0} inherited from the listener): two system calls fewer.
        upstream_nonblocking: upstream_fd was made with SOCK_NONBLOCK: one fewer."""
        self._ensure_alive()
        if client_fd < 0 or upstream_fd < 0 or client_fd == upstream_fd:
            raise ValueError(f"relay core: bad fds {client_fd}, {upstream_fd}")
        return _open_pair(self, client_fd, upstream_fd, tag, connecting, prefix,
                          client_accepted, upstream_nonblocking)

    def add_pair_connect(self, int client_fd, bytes sockaddr, int64_t tag=0, bytes prefix=b"",
                         *, bint client_accepted=False):
        """add_pair with an upstream the loop opens itself: a TCP socket (non-blocking,
        TCP_NODELAY) connecting to `sockaddr` (a packed sockaddr_in / sockaddr_in6, checked),
        relayed as add_pair(..., connecting=True) once connect() started.  Returns the id, or
        -errno when socket() or connect() failed at once (nothing opened; client_fd is still
        the caller's).  Raises as add_pair does (client_fd still the caller's)."""
        self._ensure_alive()
        if client_fd < 0:
            raise ValueError(f"relay core: bad fd {client_fd}")
        _check_sockaddr(sockaddr)
        cdef bint connecting = False
        cdef const char* addr = <const char*>sockaddr
        cdef sock_len addrlen = <sock_len>len(sockaddr)
        cdef int up
        with nogil:     # the SYN's work on loopback: other threads (the flow log writer) run
            up = _connect_upstream(addr, addrlen, &connecting)
        if up < 0:
            return up
        try:
            return _open_pair(self, client_fd, up, tag, connecting, prefix, client_accepted,
                              True)
        except BaseException:
            close(up)
            raise

    cdef Conn* _take_slot(self) except NULL:
        """A zeroed slot (generation kept) for a pair or a watch; OSError when full."""
        cdef Conn* c = _try_take_slot(self)
        if c == NULL:
            raise OSError(EMFILE, f"relay core: connection table full ({self.max_conns})")
        return c

    def watch(self, int fd, int64_t tag, int timeout_ms):
        """Report once when `fd` turns readable (or hangs up): (EV_READABLE, tag, fd); or, if
        it stays silent for timeout_ms, (EV_WATCH_TIMEOUT, tag, fd).  No byte is read and the
        fd stays the caller's (it must stay open until the event or unwatch()).  One event per
        watch: watch again for more.  Returns an id for unwatch().  For a connection that must
        say something before it is relayed (a PROXY header), without blocking the loop."""
        self._ensure_alive()
        if fd < 0:
            raise ValueError(f"relay core: bad fd {fd}")
        if timeout_ms < 0:
            timeout_ms = 0
        cdef Conn* c = self._take_slot()
        c.fd[SIDE_CLIENT] = fd
        c.tag = tag
        self.now = now_ns()
        c.start_ns = self.now
        c.deadline_ns = self.now + <uint64_t>timeout_ms * 1000000ULL
        c.state = ST_WATCH
        self.n_watching += 1
        self.st_watches += 1
        if self.next_scan > c.deadline_ns:
            self.next_scan = c.deadline_ns
        with nogil:
            _arm_side(self, c, SIDE_CLIENT, POLL_BIT_IN)
        _uring_flush(self)
        return pack_cid(c.gen, <uint32_t>(c - self.conns))

    def unwatch(self, int64_t wid):
        """Cancel watch `wid` without an event (the fd stays open).  False if it is over."""
        self._ensure_alive()
        cdef uint32_t idx = ud_slot(<uint64_t>wid)
        if idx >= self.high_water:
            return False
        cdef Conn* c = &self.conns[idx]
        if c.state != ST_WATCH or not gen_matches(c.gen, ud_gen(<uint64_t>wid)):
            return False
        _watch_end(self, c, 0)
        _uring_flush(self)
        return True

    def abort(self, int64_t cid):
        """Reset both sides of pair `cid` now (reason "aborted").  Unknown ids are ignored."""
        self._ensure_alive()
        return self._reset_pair(cid, R_ABORTED)

    cdef bint _reset_pair(self, int64_t cid, int reason):
        cdef Conn* c = _conn_by_id(self, cid)
        if c == NULL:
            return False
        _close_conn(self, c, reason, 0, True)
        _uring_flush(self)
        return True

    def export_pair(self, int64_t cid):
        """Stop relaying pair `cid` and hand it over (handoff.pxi): a dict of its descriptors,
        pending bytes, per-direction state, counters and times.  The descriptors now belong to
        the caller; nothing was closed or reset.  Raises KeyError for an unknown id and
        ValueError for a pair still connecting (it has nothing to hand over yet)."""
        self._ensure_alive()
        cdef Conn* c = _conn_by_id(self, cid)
        if c == NULL:
            raise KeyError(f"relay core: no pair {cid}")
        if c.state != ST_RELAY:
            raise ValueError(f"relay core: pair {cid} is still connecting")
        state = _handoff_export(self, c)
        _uring_flush(self)
        return state

    def import_pair(self, dict state, tag=None):
        """Resume relaying a pair exported by export_pair() (here or in another process);
        the loop owns its descriptors from now on.  Returns the new id."""
        self._ensure_alive()
        return _handoff_import(self, state, state["tag"] if tag is None else tag)
    def kill(self, int64_t cid):
        """Like abort(), at an operator's request: reset both sides, reason "killed".  Returns
        False for an id whose pair is already gone."""
        self._ensure_alive()
        return self._reset_pair(cid, R_KILLED)

    def pair_info(self, int64_t cid):
        """(cid, tag, connecting, c2s_bytes, s2c_bytes, age_us, idle_us) or None (pairinfo.pxi)."""
        self._ensure_alive()
        cdef Conn* c = _conn_by_id(self, cid)
        return None if c == NULL else _pair_tuple(self, c, now_ns())

    def pairs(self):
        """pair_info() of every open pair, in slot order."""
        self._ensure_alive()
        return _pair_list(self)

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
        if self.wake_r >= 0 and not self.wake_armed:
            _wakeup_arm(self)       # a starved SQ left it unarmed: the flush below submits it
        while True:
            self.now = now_ns()
            wait_ns = 0
            if not self.evq_len and self.now < deadline:
                wait_ns = deadline - self.now
                if self.next_scan <= self.now:
                    wait_ns = 0
                elif self.next_scan - self.now < wait_ns:
                    wait_ns = self.next_scan - self.now
                if self.next_resume:
                    if self.next_resume <= self.now:
                        wait_ns = 0
                    elif self.next_resume - self.now < wait_ns:
                        wait_ns = self.next_resume - self.now
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
            elif self.next_resume and self.now >= self.next_resume:
                with nogil:
                    _resume_listeners(self)
            if self.evq_len or self.interrupted or self.now >= deadline:
                break
            # Going round again: _uring_wait submits what this round queued in the same
            # io_uring_enter that waits (a submit here was a second system call per wakeup).
        _uring_flush(self)
        _uring_keep_notified(self)
        return _take_events(self)

    def set_connect_buckets(self, bounds_us):
        """Upper bounds (microseconds, increasing, at most 32; +Inf is implied) of the
        connect-time histogram the core keeps of every pair it sees connect.  Resets the counts:
        call it once, before the first pair."""
        self._ensure_alive()
        cdef list bounds = [int(b) for b in bounds_us]
        if len(bounds) > MAX_CONNECT_BUCKETS:
            raise ValueError(f"relay core: set_connect_buckets: {len(bounds)} bounds: "
                             f"at most {MAX_CONNECT_BUCKETS}")
        if any(b < 0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"relay core: set_connect_buckets: {bounds}: "
                             "must be >= 0 and strictly increasing")
        cdef int i
        for i in range(len(bounds)):
            self.connect_bounds_us[i] = bounds[i]
        self.n_connect_bounds = len(bounds)
        memset(self.connect_counts, 0, sizeof(self.connect_counts))
        self.connect_sum_us = 0
        self.connect_n = 0

    def connect_histogram(self):
        """(counts, sum_us, n): counts per bucket of set_connect_buckets' bounds, not cumulative,
        the last one +Inf; the sum of the connect times (us) and their number.  Also after
        close()."""
        cdef int i
        counts = [self.connect_counts[i] for i in range(self.n_connect_bounds + 1)]
        return counts, self.connect_sum_us, self.connect_n

    def stats(self):
        """Counters as a flat dict of ints.  After close(): the counters as close() left them
        (zeros if the loop never started)."""
        if self.closed:
            return dict(self.final_stats) if self.final_stats is not None else self._counters()
        d = self._counters()
        if not d["pipe_size_granted"]:
            d["pipe_size_granted"] = self._probe_pipe_size()
        return d

    cdef dict _counters(self):
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
            "pipes_released": self.pipes.released,
            "pipe_refused": self.pipes.refused,
            "pipe_resize_denied": self.pipes.setsz_denied,
            "pipe_size_requested": self.pipes.size_requested,
            "pipe_size_granted": self.pipes.size_granted,
            "accepts": self.st_accepts,
            "accept_errors": self.st_accept_errors,
            "accept_paused": self.st_accept_paused,
            "accept_connects": self.st_accept_connects,
            "accept_yields": self.st_accept_yields,
            "resets_sent": self.st_resets_sent,
            "sqe_starved": self.st_sqe_starved,
            "submit_errors": self.st_submit_errors,
            "submit_last_errno": self.last_submit_errno,
            "events_dropped": self.st_events_dropped,
            "conn_slots_used": self.high_water,
            "watching": self.n_watching,
            "watches": self.st_watches,
            "watch_timeouts": self.st_watch_timeouts,
            "lowat_raised": self.st_lowat_raised,
            "lowat_timeouts": self.st_lowat_timeouts,
            "reaps_cut": self.st_reaps_cut,
            "multishot_ended": self.st_multishot_ended,
            "cq_overflows": self.st_cq_overflows,
            "signal_wakeups": self.st_signal_wakeups,
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
            pipe_put(&self.pipes, &tmp, now_ns())
        return self.pipes.size_granted

    cdef void _drain_eventfd(self) noexcept:
        cdef uint64_t value
        read(self.efd, &value, sizeof(value))
