# Connections: a slot in Loop.conns holds one pair (struct Conn in _core.pxd), two halves, one
# per direction.  Here: resetting a half, arming a side on whichever backend runs, and closing.


cdef inline void half_reset(Half* h) noexcept nogil:
    memset(h, 0, sizeof(Half))
    h.pipe_r = -1
    h.pipe_w = -1


cdef inline void set_linger_zero(int fd) noexcept nogil:
    # close() with SO_LINGER {1, 0} sends an RST instead of a FIN: the peer must see a
    # truncated stream as a reset, never as a clean end of data.  Armed on both sockets for as
    # long as they relay (add_pair), because the kernel closes a dead process's sockets the same
    # way: a worker killed mid-stream (SIGKILL, the OOM killer, the heartbeat) then resets its
    # peers instead of sending them a FIN that looks like the end of the data.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


cdef inline void set_rcvbuf(int fd, int size) noexcept nogil:
    # A fixed SO_RCVBUF turns receive auto-tuning off for this socket.  Measured on loopback
    # (docs/single-stream.md): with auto-tuning the relay drains each write at once and the
    # sender transmits (and runs our socket's receive path in softirq) in its own context, one
    # small burst at a time; with a bounded window the sender's queue fills, and the ACKs our
    # reads send clock its data out in large batches: less CPU per GB end to end.
    # Best effort: a refusal leaves auto-tuning on, which relays all the same.
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size))

cdef inline void lowat_raise(Loop self, Conn* c, int d) noexcept nogil:
    # Low-water mode for a bulk source (the mark: Loop(rcvlowat=)): the kernel wakes our poll
    # only once that much is queued, so the relay reads in large batches and its receive
    # queue runs fuller instead of near empty (docs/single-stream.md).  tcp_set_rcvlowat caps
    # the mark at half of tcp_rmem[2] and may grow sk_rcvbuf to hold it; it never shrinks the
    # window.  Only the uring backend raises it: every poll of such a source carries a linked
    # timeout (uring.pxi) so a tail below the mark waits lowat_wait at most.
    cdef int val = self.rcvlowat
    if setsockopt(c.fd[d], SOL_SOCKET, SO_RCVLOWAT, &val, sizeof(val)) == 0:
        c.half[d].flags |= HF_LOWAT
        self.st_lowat_raised += 1

cdef inline void lowat_drop(Conn* c, int d) noexcept nogil:
    # Back to waking on every byte (the flow turned interactive, or the pair leaves this loop:
    # an importer that does not know of the mark would strand a tail below it).  On a TCP
    # socket SO_RCVLOWAT only fails for a bad fd.
    cdef int one = 1
    setsockopt(c.fd[d], SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one))
    c.half[d].flags &= ~HF_LOWAT


cdef inline void adopt_socket(int fd, int rcvbuf, bint nonblocking, bint armed) noexcept nogil:
    """A relayed socket as the loop wants it: non-blocking, SO_LINGER {1, 0} armed until a
    graceful close (a worker that dies resets its peers), SO_RCVBUF when configured.  For
    add_pair and import_pair alike.  `nonblocking`: the caller knows the fd is O_NONBLOCK
    already (accept4/socket with SOCK_NONBLOCK): no F_GETFL.  `armed`: SO_LINGER {1, 0} is
    set already (accepted from a listener add_listener armed: an accepted TCP socket is a clone
    of its listener and inherits SOCK_LINGER and the linger time)."""
    cdef int flags
    if not nonblocking:
        flags = fcntl(fd, F_GETFL)
        if flags >= 0 and not (flags & O_NONBLOCK):
            fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    if not armed:
        set_linger_zero(fd)
    if rcvbuf:
        set_rcvbuf(fd, rcvbuf)


cdef inline void clear_linger(int fd) noexcept nogil:
    # SO_LINGER {0, 0}: the default again, a close() that sends a FIN after whatever is still
    # queued.  Only just before a graceful close, when both directions are complete.
    cdef linger lg
    lg.l_onoff = 0
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
    _disarm_all(self, c)
    for side in range(2):
        if not reset:
            clear_linger(c.fd[side])    # armed since add_pair: a reset is the default here
        close(c.fd[side])
    if reset:
        self.st_resets_sent += 1
    for i in range(2):
        pipe_put(&self.pipes, &c.half[i], self.now)
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
    self.n_open -= 1
    _free_slot(self, c)


cdef void _free_slot(Loop self, Conn* c) noexcept nogil:
    # Bumping the generation makes completions and ids of the old occupant stale.
    c.state = ST_FREE
    c.gen += 1
    self.free_slots[self.n_free_slots] = <uint32_t>(c - self.conns)
    self.n_free_slots += 1


cdef void _watch_end(Loop self, Conn* c, int kind) noexcept nogil:
    """End watch `c` with event `kind` (0: none, e.g. unwatch); the fd stays the caller's."""
    _disarm_all(self, c)
    if kind:
        _push_event(self, kind, c.tag, c.fd[SIDE_CLIENT])
    self.n_watching -= 1
    _free_slot(self, c)
