# The io_uring backend, all of it: ring setup, a multishot POLLIN poll per relaying side (see
# _uring_multishot), one-shot POLL_ADDs for the rest (POLLOUT, watches, connects, listeners,
# low-water mode), submitting, waiting and reaping completions.
# A one-shot poll checks readiness when armed, so it behaves level-triggered: re-arming after
# a partial drain fires at once.  A multishot one does not, and _uring_kick stands in for that.
#
# Readiness only: the bytes move with splice(2)/recv/send issued from this thread.
# IORING_OP_SPLICE always runs on an io-wq worker thread (REQ_F_FORCE_ASYNC), parking one
# kernel thread per pending splice, while a direct splice(2) on a non-blocking socket costs one
# syscall and no thread.  io_uring earns its place for the polls and for batching every
# arm/cancel of a wakeup into one kernel entry.


cdef int _uring_setup(Loop self, int entries) except -1:
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
    # - CQSIZE: a CQ 8x the SQ, because a burst of readiness (every poll of a busy loop)
    #   must not overflow.  Overflow still
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
            return 0
        except OSError as exc:
            params.ptr = NULL
            self.ring = io_uring()
            err = exc.errno or 0
            if err != EINVAL:
                break
    raise OSError(err, f"relay core: io_uring unavailable: {os.strerror(err)} "
                       "(kernel.io_uring_disabled, a seccomp filter, or RLIMIT_MEMLOCK); "
                       "use the epoll engine")


cdef void _uring_flush(Loop self):
    """Submit the SQEs queued so far (epoll has nothing to flush: epoll_ctl acts at once)."""
    if self.backend_id == BACKEND_URING and self.ring_ready:
        if __io_uring_sq_ready(&self.ring.ptr):
            try:
                io_uring_submit(self.ring)
            except OSError as exc:
                self.st_submit_errors += 1
                self.last_submit_errno = exc.errno or 0

cdef __io_uring_sqe* _sqe(Loop self) noexcept nogil:
    cdef __io_uring_sqe* sqe = __io_uring_get_sqe(&self.ring.ptr)
    if sqe == NULL:
        # SQ full mid-batch: submit what we have and take a fresh entry.
        with gil:
            try:
                io_uring_submit(self.ring)
            except OSError as exc:
                self.st_submit_errors += 1
                self.last_submit_errno = exc.errno or 0
        sqe = __io_uring_get_sqe(&self.ring.ptr)
        if sqe == NULL:
            self.st_sqe_starved += 1
    return sqe

# The read side of a relaying pair is watched by one multishot poll (IORING_POLL_ADD_MULTI) for
# as long as it lasts: a 64-byte request/response flow then queues no SQE per message (a one-shot
# poll costs an SQE, a waitqueue add and remove in the kernel per readiness, and made the uring
# engine pay more per small message than epoll: docs/performance.md).  What changes with it:
# - It is edge-like: a CQE (with IORING_CQE_F_MORE) per wakeup that finds POLLIN, none for bytes
#   that were already there and that we left unread.  The pump reads until EAGAIN, except when
#   its fairness limit stops it: _uring_kick then posts a NOP that re-runs the pump, standing in
#   for the one-shot poll's immediate re-fire.  Arming checks readiness once (POLL_ADD is
#   EPOLLET in the kernel: ready at arm time posts at once), so nothing queued before is missed.
# - The kernel ends it with a CQE without F_MORE: our removal (-ECANCELED, only once the slot is
#   freed), or a CQ too full to post into (the CQE goes to the overflow list and the poll stops).
#   That last CQE clears the bits, pumps, and _after_pump arms a fresh one if still wanted.
# - CQEs while the half does not want to read (its bytes wait for the destination, EOF seen)
#   are dropped by _on_ready; the pump that writes the backlog reads on until EAGAIN.
# Watches, connects (POLLOUT) and POLLOUT polls stay one-shot; so does everything in low-water
# mode (Loop(socket_rcvlowat>0)): its polls carry a linked timeout, which needs a one-shot poll.
# Bulk halves (HF_STREAM, moved with splice) keep one-shot polls: a multishot poll posts a CQE
# for every segment that lands, also while the half waits for its destination to drain the pipe
# (nothing to read then); 8 iperf3 streams cost 40-100 % more CPU per GB that way.  A half that
# turns bulk under a multishot poll removes it; the poll's last CQE re-arms a one-shot one.
# That holds for the rest of the half's life once it has spliced: a bulk sender's queue is
# sometimes down to one small segment when we read (the 106-byte tail of iperf3's 128 KiB write
# at loopback's 65,483-byte MSS), the splice comes out below splice_min and the half copies
# again (HF_STREAM off) until its next read; a multishot poll armed then posted a CQE per landed
# segment of the next burst, cost a POLL_REMOVE, and came back at the next small tail: 6.6x
# the CQEs, 2.6x the io_uring_enter and 1.7x the context switches per GB on one iperf3 stream
# (docs/single-stream.md).  A flow that turns interactive after bulk is woken the way it was
# before multishot polls (a POLL_ADD per message).
cdef enum:
    POLL_BIT_MULTI = 4          # uring: the POLLIN poll in flight is multishot
    POLL_BIT_ENDING = 8         # uring: that multishot poll's removal is on its way
    OP_KICK = OP_POLL + 4       # OP_KICK + side: a NOP that re-runs a pump stopped for fairness

cdef inline bint _half_went_bulk(Conn* c, int side) noexcept nogil:
    """Bulk now (HF_STREAM) or ever moved with splice: one-shot polls only."""
    return (c.half[side].flags & HF_STREAM) != 0 or c.half[side].spliced != 0

cdef inline bint _uring_multishot(Loop self, Conn* c, int side) noexcept nogil:
    return self.rcvlowat == 0 and c.state == ST_RELAY and not _half_went_bulk(c, side)

cdef void _uring_end_multishot(Loop self, Conn* c, int side) noexcept nogil:
    cdef __io_uring_sqe* sqe
    if c.polled[side] & POLL_BIT_ENDING:
        return
    sqe = _sqe(self)
    if sqe == NULL:
        return                  # tried again at its next CQE
    __io_uring_prep_poll_remove(sqe, pack_ud(OP_POLL + side * 2, c.gen,
                                             <uint32_t>(c - self.conns)))
    __io_uring_sqe_set_data64(sqe, pack_ud(OP_IGNORE, 0, 0))
    c.polled[side] |= POLL_BIT_ENDING
    self.st_multishot_ended += 1

cdef void _uring_kick(Loop self, Conn* c, int side) noexcept nogil:
    # Side `side` still has bytes queued but its pump stopped (fairness).  A one-shot poll
    # re-armed now fires at once; a multishot one already armed would not fire again until
    # new bytes arrive (a sender that waits for an answer never sends them).
    cdef __io_uring_sqe* sqe
    if not (c.polled[side] & POLL_BIT_MULTI):
        return
    sqe = _sqe(self)
    if sqe != NULL:
        __io_uring_prep_nop(sqe)
        __io_uring_sqe_set_data64(sqe, pack_ud(OP_KICK + side, c.gen,
                                               <uint32_t>(c - self.conns)))

cdef inline void _uring_on_readable(Loop self, Conn* c, int side, int mask) noexcept nogil:
    # A multishot poll's readiness.  A copy read shorter than asked for took all the socket
    # held (tcp_recvmsg drains the receive queue and the backlog), so the pump stops there
    # instead of paying a recv() that returns EAGAIN, one system call per small message:
    # bytes that come later wake the poll again, and so does a FIN that comes after the
    # mask was taken.  A FIN already seen (POLLRDHUP in the mask) may have been eaten by that
    # short read with its data (the next read returns 0, and no wakeup would tell us), and
    # an error or hang-up wants the read that reports it: those pump on to EAGAIN/EOF.
    if _half_went_bulk(c, side):
        _uring_end_multishot(self, c, side)
    if (c.state == ST_RELAY and (c.half[side].flags & HF_WANT_READ)
            and not (mask & (POLLRDHUP | POLLHUP | POLLERR))):
        if _pump(self, c, side, True) < 0:
            return
        _after_pump(self, c)
        return
    _on_ready(self, c, side, True, False)

cdef void _uring_arm(Loop self, Conn* c, int side, uint8_t want) noexcept nogil:
    cdef uint8_t missing = want & ~c.polled[side]
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef __io_uring_sqe* sqe
    if missing & POLL_BIT_IN:
        sqe = _sqe(self)
        if sqe != NULL:
            if _uring_multishot(self, c, side):
                __io_uring_prep_poll_multishot(sqe, c.fd[side], POLLIN | POLLRDHUP)
                c.polled[side] |= POLL_BIT_MULTI
            else:
                __io_uring_prep_poll_add(sqe, c.fd[side], POLLIN)
            __io_uring_sqe_set_data64(sqe, pack_ud(OP_POLL + side * 2, c.gen, idx))
            c.polled[side] |= POLL_BIT_IN
            if (c.half[side].flags & HF_LOWAT) and _uring_link_timeout(self, sqe) < 0:
                lowat_drop(c, side)
    if missing & POLL_BIT_OUT:
        sqe = _sqe(self)
        if sqe != NULL:
            __io_uring_prep_poll_add(sqe, c.fd[side], POLLOUT)
            __io_uring_sqe_set_data64(sqe, pack_ud(OP_POLL + side * 2 + 1, c.gen, idx))
            c.polled[side] |= POLL_BIT_OUT

cdef inline int _uring_link_timeout(Loop self, __io_uring_sqe* poll) noexcept nogil:
    # A source in low-water mode (SO_RCVLOWAT, datapath.pxi) only wakes its poll once the mark
    # is queued (or at FIN, an error, a nearly closed window or memory pressure: tcp_data_ready).
    # A tail below the mark would wait for the next byte: an IORING_OP_LINK_TIMEOUT linked to
    # the poll cancels it after lowat_wait, and the -ECANCELED completion pumps what is there.
    # The SQ must hold both entries back to back (a link spans consecutive SQEs): when it has
    # no room for the second, the poll goes without the timer and the mark is dropped instead.
    cdef __io_uring_sqe* sqe = __io_uring_get_sqe(&self.ring.ptr)
    if sqe == NULL:
        return -1
    poll.flags |= __IOSQE_IO_LINK
    __io_uring_prep_link_timeout(sqe, &self.lowat_wait, 0)
    __io_uring_sqe_set_data64(sqe, pack_ud(OP_IGNORE, 0, 0))
    return 0

cdef inline int _lowat_inq(int fd) noexcept nogil:
    cdef int inq = 0
    ioctl(fd, SIOCINQ, &inq)
    return inq

cdef void _uring_disarm(Loop self, Conn* c) noexcept nogil:
    # A pending poll holds a reference to the socket's file: close() alone would keep the
    # socket alive (and delay the RST of SO_LINGER 0) until the poll fired.  Remove each
    # one by its exact user_data; the generation in it keeps a reused slot safe.
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef int side
    cdef __io_uring_sqe* sqe
    for side in range(2):
        if c.polled[side] & POLL_BIT_IN:
            sqe = _sqe(self)
            if sqe != NULL:
                __io_uring_prep_poll_remove(sqe, pack_ud(OP_POLL + side * 2, c.gen, idx))
                __io_uring_sqe_set_data64(sqe, pack_ud(OP_IGNORE, 0, 0))
        if c.polled[side] & POLL_BIT_OUT:
            sqe = _sqe(self)
            if sqe != NULL:
                __io_uring_prep_poll_remove(sqe, pack_ud(OP_POLL + side * 2 + 1, c.gen, idx))
                __io_uring_sqe_set_data64(sqe, pack_ud(OP_IGNORE, 0, 0))
        c.polled[side] = 0

cdef void _uring_listener_arm(Loop self, int slot) noexcept nogil:
    cdef Listener* l = &self.listeners[slot]
    cdef __io_uring_sqe* sqe
    if l.armed or not l.active:
        return
    sqe = _sqe(self)
    if sqe == NULL:
        _listener_resume_at(self, l, self.now + 10000000ULL)     # retry in 10 ms
        return
    # A one-shot POLLIN poll, not IORING_OP_ACCEPT: io_uring arms an accept's internal poll as
    # an exclusive (wake-one) waiter, so with workers sharing the socket the first one took
    # every connection; a POLL_ADD without EPOLLEXCLUSIVE wakes every worker and their
    # accept4() calls race (listeners.pxi).  One-shot, re-armed after each accept batch: it
    # checks readiness when armed, so connections a capped batch left behind fire it at once
    # (a multishot poll only posts on a new wakeup and would strand them).
    __io_uring_prep_poll_add(sqe, l.fd, POLLIN)
    __io_uring_sqe_set_data64(sqe, pack_ud(OP_ACCEPT, l.gen, slot))
    l.armed = 1

cdef void _uring_listener_disarm(Loop self, int slot) noexcept nogil:
    # The removal is asynchronous: the poll's completion (-ECANCELED, or readiness that
    # raced the removal) still arrives and clears `armed`; nothing is accepted meanwhile,
    # connections stay queued in the kernel for the next accept (here or in a sibling).
    cdef Listener* l = &self.listeners[slot]
    cdef __io_uring_sqe* sqe
    if not l.armed:
        return
    sqe = _sqe(self)
    if sqe != NULL:
        __io_uring_prep_poll_remove(sqe, pack_ud(OP_ACCEPT, l.gen, slot))
        __io_uring_sqe_set_data64(sqe, pack_ud(OP_IGNORE, 0, 0))

cdef void _uring_on_listener(Loop self, uint32_t slot, uint32_t gen, int res) noexcept nogil:
    cdef Listener* l
    if slot >= <uint32_t>self.n_listener_slots:
        return
    l = &self.listeners[slot]
    if not gen_matches(l.gen, gen):
        return                  # removed since (the slot may be reused): that poll is over
    l.armed = 0
    if not l.active or l.user_paused or l.resume_at:
        return                  # resume_accept / _resume_listeners arms it again
    if res < 0:
        if res != -ECANCELED:   # -ECANCELED: paused and resumed before the removal landed
            _accept_pause(self, slot, -res)
            return
    elif _accept_batch(self, slot) < 0:
        return
    _uring_listener_arm(self, slot)

cdef void _uring_dispatch(Loop self, uint64_t ud, int res, uint32_t flags) noexcept nogil:
    cdef uint32_t op = ud_op(ud)
    cdef uint32_t gen = ud_gen(ud)
    cdef uint32_t idx = ud_slot(ud)
    cdef Conn* c
    cdef uint32_t rel
    cdef int side
    cdef bint out
    if op == OP_ACCEPT:
        _uring_on_listener(self, idx, gen, res)
        return
    if op == OP_WAKEUP:
        _wakeup_ready(self)
        return
    if op < OP_POLL or op > OP_KICK + 1 or idx >= self.high_water:
        return
    c = &self.conns[idx]
    if c.state == ST_FREE or not gen_matches(c.gen, gen):
        return                  # completion of a pair that is gone (or a reused slot)
    if op >= OP_KICK:
        _on_ready(self, c, op - OP_KICK, True, False)
        return
    rel = op - OP_POLL
    side = rel >> 1
    out = rel & 1
    if not out and (c.polled[side] & POLL_BIT_MULTI):
        if flags & __IORING_CQE_F_MORE:
            _uring_on_readable(self, c, side, res)
            return
        # The multishot poll is over (see _uring_multishot): pump, then arm a new one.
        c.polled[side] &= ~(POLL_BIT_IN | POLL_BIT_MULTI | POLL_BIT_ENDING)
        _on_ready(self, c, side, True, False)
        return
    c.polled[side] &= ~(POLL_BIT_OUT if out else POLL_BIT_IN)
    if res == -ECANCELED:
        # Our own removals only come with a slot that is freed (stale generation above): a
        # poll of a live pair cancelled here is a low-water poll whose linked timeout fired.
        # Less than the mark arrived in that time: move what is queued now.  A bulk sender
        # that was only descheduled for a moment left a good part of the mark; a flow with
        # a small tail (or request/response) did not: wake on every byte again for it.
        if out or not (c.half[side].flags & HF_LOWAT):
            return
        self.st_lowat_timeouts += 1
        if _lowat_inq(c.fd[side]) * LOWAT_KEEP_FRACTION < self.rcvlowat:
            lowat_drop(c, side)
    _on_ready(self, c, side, not out, out)

cdef void _uring_reap(Loop self) noexcept nogil:
    # At most REAP_BATCH completions per round, like epoll_wait's EPOLL_BATCH.  Draining "until
    # the CQ is empty" never ends on a saturated loop: every recv/send/splice we issue returns
    # to user mode through io_uring's task work, which posts the completions of polls woken
    # meanwhile, and a full SQ submitted mid-batch posts those of re-armed ready sockets at
    # once.  Measured at 1,000 busy connections: single drains of 15-27k CQEs lasting 0.3-0.4 s,
    # during which run() could not return, so accepted connections waited in the event queue
    # (their clients' first requests with them), SQEs re-arming polls waited for the SQ to
    # fill, and the timer scan did not run.  What is left stays in the CQ in order (the next
    # round enters the kernel without waiting for it): FIFO fairness between pairs is kept.
    cdef __io_uring* r = &self.ring.ptr
    cdef unsigned int head, mask, n, i
    cdef unsigned int budget = REAP_BATCH
    cdef __io_uring_cqe* cqe
    while budget:
        n = __io_uring_cq_ready(r)
        if n == 0:
            break
        if n > budget:
            n = budget
        budget -= n
        head = r.cq.khead[0]
        mask = r.cq.ring_mask
        for i in range(n):
            cqe = &r.cq.cqes[(head + i) & mask]
            _uring_dispatch(self, cqe.user_data, cqe.res, cqe.flags)
        __io_uring_cq_advance(r, n)
        self.st_wakeups += 1
    if budget == 0 and __io_uring_cq_ready(r):
        self.st_reaps_cut += 1
    if r.sq.kflags[0] & __IORING_SQ_CQ_OVERFLOW:
        # The CQ was full: the kernel parked completions in its overflow list (IORING_FEAT_NODROP
        # loses none); the next io_uring_enter with GETEVENTS, which _uring_wait always does,
        # moves them into the CQ.  Counted: a CQ too small for the polls armed costs syscalls.
        self.st_cq_overflows += 1

cdef void _uring_keep_notified(Loop self) noexcept nogil:
    # fileno()'s eventfd is signalled when a completion is posted, and run() drains it.  A round
    # cut short by REAP_BATCH (or completions parked in the overflow list) leaves work that no
    # new signal announces: an embedder waiting on fileno() would sleep on it until its next
    # tick.  Signal it ourselves, as epoll's fd stays readable while events are pending.
    cdef uint64_t one = 1
    if self.efd < 0 or not self.ring_ready:
        return
    if __io_uring_cq_ready(&self.ring.ptr) or (self.ring.ptr.sq.kflags[0] & __IORING_SQ_CQ_OVERFLOW):
        write(self.efd, &one, sizeof(one))

cdef void _uring_wait(Loop self, int timeout_ms):
    # python-liburing raises OSError(errno) when errno is set, and only else the code that
    # io_uring_enter returned (liburing's raw syscall never sets errno): a stale EAGAIN left by
    # a non-blocking read turned -EINTR into a benign-looking EAGAIN, and a signal delivered to
    # this very thread no longer ended run().  Clear it before each entry.
    global errno
    errno = 0
    if timeout_ms <= 0 or __io_uring_cq_ready(&self.ring.ptr):
        # Enter once even when not waiting: submits our SQEs and, with COOP_TASKRUN, runs
        # the completion work the kernel deferred until we next entered.
        try:
            with nogil:
                io_uring_submit_and_get_events(self.ring)
        except InterruptedError:
            self.interrupted = True
        except OSError as exc:
            self.st_submit_errors += 1
            self.last_submit_errno = exc.errno or 0
        return
    self.wait_ts.ptr.tv_sec = timeout_ms // 1000
    self.wait_ts.ptr.tv_nsec = (timeout_ms % 1000) * 1000000
    try:
        with nogil:
            io_uring_submit_and_wait_timeout(self.ring, self.cqe_holder, 1, self.wait_ts,
                                             self.no_sigmask)
    except OSError as exc:
        # -ETIME: nothing happened in time; -EINTR: a signal for Python to handle;
        # -EAGAIN: liburing entered the kernel but no completion was there to return.
        if exc.errno == EINTR:
            self.interrupted = True
        elif exc.errno != ETIME and exc.errno != EAGAIN:
            self.st_submit_errors += 1
            self.last_submit_errno = exc.errno or 0
