# Connections: a slot in Loop.conns holds one pair (struct Conn in _core.pxd), two halves, one
# per direction.  Here: resetting a half, arming a side on whichever backend runs, and closing.


cdef inline void half_reset(Half* h) noexcept nogil:
    memset(h, 0, sizeof(Half))
    h.pipe_r = -1
    h.pipe_w = -1


cdef inline void set_linger_zero(int fd) noexcept nogil:
    # close() with SO_LINGER {1, 0} sends an RST instead of a FIN: the peer must see a
    # truncated stream as a reset, never as a clean end of data.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef inline int64_t _cid(Loop self, Conn* c) noexcept nogil:
    return pack_cid(c.gen, <uint32_t>(c - self.conns))


cdef void _arm_side(Loop self, Conn* c, int side, uint8_t want) noexcept nogil:
    if self.backend_id == BACKEND_URING:
        _uring_arm(self, c, side, want)
    else:
        _epoll_arm(self, c, side, want)


cdef void _disarm_all(Loop self, Conn* c) noexcept nogil:
    if self.backend_id == BACKEND_URING:
        _uring_disarm(self, c)
    else:
        _epoll_disarm(self, c)


cdef void _close_conn(Loop self, Conn* c, int reason, int err, bint reset) noexcept nogil:
    cdef int side, i
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    _disarm_all(self, c)
    for side in range(2):
        if reset:
            set_linger_zero(c.fd[side])
        close(c.fd[side])
    if reset:
        self.st_resets_sent += 1
    for i in range(2):
        pipe_put(&self.pipes, &c.half[i])
        if c.half[i].buf != NULL:
            free(c.half[i].buf)
            c.half[i].buf = NULL
    self.st_closes[reason] += 1
    cdef Event* ev = _push_event(self, EV_DONE_, _cid(self, c), c.tag)
    if ev != NULL:
        ev.v[0] = reason
        ev.v[1] = <int64_t>c.half[0].nbytes
        ev.v[2] = <int64_t>c.half[1].nbytes
        ev.v[3] = <int64_t>(c.half[0].spliced + c.half[1].spliced)
        ev.v[4] = <int64_t>(c.half[0].copied + c.half[1].copied)
        ev.v[5] = <int64_t>((self.now - c.start_ns) // 1000)
        ev.v[6] = err
    c.state = ST_FREE
    c.gen += 1
    self.free_slots[self.n_free_slots] = idx
    self.n_free_slots += 1
    self.n_open -= 1
