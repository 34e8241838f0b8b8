# The epoll backend, all of it, for kernels and containers without io_uring
# (kernel.io_uring_disabled, Docker's default seccomp profile).  Level-triggered, one
# registration per socket whose mask follows what the two halves want; a socket nobody waits on
# is removed so EPOLLHUP on a finished socket cannot spin the loop.


cdef int _epoll_setup(Loop self) except -1:
    self.epfd = epoll_create1(EPOLL_CLOEXEC)
    if self.epfd < 0:
        err = errno
        raise OSError(err, f"relay core: epoll_create1: {os.strerror(err)}")
    self.epevents = <epoll_event*>malloc(EPOLL_BATCH * sizeof(epoll_event))
    if self.epevents == NULL:
        raise MemoryError("relay core: cannot allocate epoll events")
    return 0


cdef void _epoll_arm(Loop self, Conn* c, int side, uint8_t want) noexcept nogil:
    cdef epoll_event ev
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef int op
    if c.in_epoll[side] and want == c.polled[side]:
        return
    if want == 0:
        if c.in_epoll[side]:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd[side], NULL)
            c.in_epoll[side] = 0
        c.polled[side] = 0
        return
    ev.events = 0
    if want & POLL_BIT_IN:
        ev.events |= EPOLLIN | EPOLLRDHUP     # RDHUP: a FIN is known before reading (below)
    if want & POLL_BIT_OUT:
        ev.events |= EPOLLOUT
    ev.data.u64 = pack_ud(OP_POLL + side, c.gen, idx)
    op = EPOLL_CTL_MOD if c.in_epoll[side] else EPOLL_CTL_ADD
    if epoll_ctl(self.epfd, op, c.fd[side], &ev) == 0:
        c.in_epoll[side] = 1
        c.polled[side] = want
    else:
        self.st_submit_errors += 1

cdef void _epoll_disarm(Loop self, Conn* c) noexcept nogil:
    cdef int side
    for side in range(2):
        if c.in_epoll[side]:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, c.fd[side], NULL)
            c.in_epoll[side] = 0
        c.polled[side] = 0

cdef void _epoll_listener_arm(Loop self, int slot) noexcept nogil:
    cdef Listener* l = &self.listeners[slot]
    cdef epoll_event ev
    if l.armed or not l.active:
        return
    # Level-triggered and without EPOLLEXCLUSIVE: every worker sharing the socket is woken
    # and their accept4() calls race (listeners.pxi says why); a stopped worker steals nothing.
    ev.events = EPOLLIN
    ev.data.u64 = pack_ud(OP_ACCEPT, l.gen, slot)
    if epoll_ctl(self.epfd, EPOLL_CTL_ADD, l.fd, &ev) == 0:
        l.armed = 1
    else:
        _accept_pause(self, slot, errno)

cdef void _epoll_listener_disarm(Loop self, int slot) noexcept nogil:
    cdef Listener* l = &self.listeners[slot]
    if l.armed:
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, l.fd, NULL)
        l.armed = 0

cdef void _epoll_on_accept(Loop self, uint32_t slot, uint32_t gen) noexcept nogil:
    cdef Listener* l
    if slot >= <uint32_t>self.n_listener_slots:
        return
    l = &self.listeners[slot]
    if not l.active or not gen_matches(l.gen, gen) or l.user_paused:
        return
    if _accept_batch(self, slot) < 0:
        _epoll_listener_disarm(self, slot)      # paused: _resume_listeners registers it again

cdef void _epoll_poll(Loop self, int timeout_ms) noexcept nogil:
    cdef int n = epoll_wait(self.epfd, self.epevents, EPOLL_BATCH, timeout_ms)
    cdef int i
    cdef uint64_t ud
    cdef uint32_t evs, op, gen, idx
    cdef Conn* c
    cdef int side
    if n <= 0:
        if n < 0 and errno == EINTR:
            self.interrupted = True
        return
    self.st_wakeups += 1
    self.now = now_ns()
    for i in range(n):
        ud = self.epevents[i].data.u64
        evs = self.epevents[i].events
        op = ud_op(ud)
        gen = ud_gen(ud)
        idx = ud_slot(ud)
        if op == OP_ACCEPT:
            _epoll_on_accept(self, idx, gen)
            continue
        if op == OP_WAKEUP:
            _wakeup_ready(self)
            continue
        if op < OP_POLL or op > OP_POLL + 1 or idx >= self.high_water:
            continue
        c = &self.conns[idx]
        if c.state == ST_FREE or not gen_matches(c.gen, gen):
            continue
        side = op - OP_POLL
        _epoll_on_ready(self, c, side,
                        (evs & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0
                        and (c.polled[side] & POLL_BIT_IN) != 0,
                        (evs & (EPOLLOUT | EPOLLERR | EPOLLHUP)) != 0
                        and (c.polled[side] & POLL_BIT_OUT) != 0,
                        (evs & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0)

cdef inline void _epoll_on_ready(Loop self, Conn* c, int side, bint readable, bint writable,
                                 bint fin_or_error) noexcept nogil:
    # As the uring engine's multishot polls (uring.pxi, _uring_on_readable): a copy read shorter
    # than asked for took all the socket held (tcp_recvmsg drains the receive queue and the
    # backlog), so the pump stops there instead of paying a recv() that returns EAGAIN, one
    # system call per small message.  The registration is level-triggered: bytes that came
    # after that read, or a FIN, are reported by the next epoll_wait.  A FIN already seen
    # (EPOLLRDHUP: the short read may have taken its data) is read on to the 0 that reports
    # it now rather than one wait later, and an error or hang-up wants the read that reports
    # it: those pump on to EAGAIN/EOF, as before.
    if (readable and not fin_or_error and c.state == ST_RELAY
            and (c.half[side].flags & HF_WANT_READ)):
        if _pump(self, c, side, True) < 0:
            return
        if writable and (c.half[1 - side].flags & HF_WANT_WRITE):
            if _pump(self, c, 1 - side, False) < 0:
                return
        _after_pump(self, c)
        return
    _on_ready(self, c, side, readable, writable)
