# The data path: one pump per direction, moving what can move without blocking, and the
# decisions that follow (re-arm, forward a FIN, pass a reset on, close: conn.pxi).


cdef void _start_relay(Loop self, Conn* c) noexcept nogil:
    if _pump(self, c, 0, False) < 0:
        return
    if _pump(self, c, 1, False) < 0:
        return
    _after_pump(self, c)

cdef void _start_fresh(Loop self, Conn* c) noexcept nogil:
    """_start_relay for a pair that has never relayed (add_pair, a finished connect).

    What the client sent while we connected is read and sent; a short read there took all
    there was (a client that sent a request waits for the answer), so no second recv() that
    would return EAGAIN.  The upstream is not read at all: it has just been connected (or
    handed over), and an origin answers what it got, so a read now is an EAGAIN too.  Both
    sides then wait on a level-triggered poll (epoll's registration, io_uring's poll armed
    by _after_pump, which completes at once when bytes or a FIN are already there), so a
    server that speaks first or a client that sent more is not missed: it costs one poll
    round instead of one wasted system call per connection."""
    if _pump(self, c, 0, True) < 0:
        return
    if c.half[1].buf_len == 0 and c.half[1].pipe_len == 0 and not (c.half[1].flags & HF_EOF):
        c.half[1].flags |= HF_WANT_READ
    elif _pump(self, c, 1, False) < 0:
        return
    _after_pump(self, c)

cdef inline void _delivered(Loop self, Conn* c, int d, ssize_t n) noexcept nogil:
    """n bytes of direction d reached the destination socket."""
    c.half[d].nbytes += n
    self.st_bytes_dir[d] += n
    c.last_ns = self.now

# The spliced/copied split counts bytes *delivered* (like nbytes), not bytes read: bytes still
# in a pipe or a copy buffer when a connection is reset never reached anybody.
cdef inline void _delivered_copy(Loop self, Conn* c, int d, ssize_t n) noexcept nogil:
    _delivered(self, c, d, n)
    c.half[d].copied += n
    self.st_bytes_copied += n

cdef inline void _delivered_splice(Loop self, Conn* c, int d, ssize_t n) noexcept nogil:
    _delivered(self, c, d, n)
    c.half[d].spliced += n
    self.st_bytes_spliced += n


cdef int _pump(Loop self, Conn* c, int d, bint stop_short) noexcept nogil:
    """Move what can move in direction d without blocking.  -1: the pair was closed.

    stop_short: a copy read shorter than the buffer ends the round (wait for readiness)."""
    cdef Half* h = &c.half[d]
    cdef int src = c.fd[d]
    cdef int dst = c.fd[1 - d]
    cdef ssize_t n, m
    cdef int rounds = PUMP_ROUNDS
    cdef size_t cap
    h.flags &= ~(HF_WANT_READ | HF_WANT_WRITE)
    if h.flags & HF_SHUT:
        return 0
    while True:
        # 1. Bytes already read go out first, in order: the copy buffer, then the pipe.
        if h.buf_off < h.buf_len:
            n = send(dst, h.buf + h.buf_off, h.buf_len - h.buf_off,
                     MSG_DONTWAIT | MSG_NOSIGNAL)
            if n < 0:
                if errno == EAGAIN:
                    h.flags |= HF_WANT_WRITE
                    return 0
                if errno == EINTR:
                    continue
                return _fail_write(self, c, d, errno)
            h.buf_off += n
            _delivered_copy(self, c, d, n)
            if h.buf_off < h.buf_len:
                h.flags |= HF_WANT_WRITE
                return 0
            free(h.buf)
            h.buf = NULL
            h.buf_off = 0
            h.buf_len = 0
        if h.pipe_len:
            n = splice(h.pipe_r, NULL, dst, NULL, h.pipe_len,
                       SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
            if n < 0:
                if errno == EAGAIN:
                    # Never read more while the pipe holds bytes: wait for dst to drain.
                    h.flags |= HF_WANT_WRITE
                    return 0
                if errno == EINTR:
                    continue
                return _fail_write(self, c, d, errno)
            h.pipe_len -= n
            _delivered_splice(self, c, d, n)
            if h.pipe_len:
                h.flags |= HF_WANT_WRITE
                return 0
        # 2. Nothing pending for dst.  Forward the FIN only now: read side at EOF *and*
        #    the pipe/buffer empty, or the last bytes would be cut off.
        if h.flags & HF_EOF:
            if h.pipe_r >= 0:
                pipe_put(&self.pipes, h, self.now)
            # With the other direction's FIN already forwarded, _after_pump closes the pair
            # as soon as this pump returns, and close() sends this FIN itself: dst has read
            # its peer's FIN (nothing unread, so tcp_close() sends a FIN, not an RST) and
            # its linger is cleared first (_close_conn).  A shutdown() here is one system
            # call per short connection for nothing.  While the other direction is still
            # open, the half-close must go out now.
            if not (c.half[1 - d].flags & HF_SHUT):
                shutdown(dst, SHUT_WR)
            h.flags |= HF_SHUT
            return 0
        if rounds == 0:
            # Fairness: let other pairs run; the level-triggered poll fires again at once
            # (uring's multishot poll does not: a NOP re-runs this pump instead).
            h.flags |= HF_WANT_READ
            if self.backend_id == BACKEND_URING:
                _uring_kick(self, c, d)
            return 0
        rounds -= 1
        # 3. Read more: splice for bulk flows, copy for small or interactive ones.
        if (h.flags & HF_STREAM) and (h.pipe_r >= 0
                                      or pipe_get(&self.pipes, h, self.now) == 0):
            cap = <size_t>self.pipes.size_granted
            n = splice(src, NULL, h.pipe_w, NULL, cap, SPLICE_F_NONBLOCK | SPLICE_F_MOVE)
            if n > 0:
                h.pipe_len += n
                c.last_ns = self.now
                if <size_t>n < self.splice_min:
                    h.flags &= ~HF_STREAM       # the flow slowed down: copy again
                elif (self.rcvlowat and n >= self.rcvlowat
                        and not (h.flags & (HF_LOWAT | HF_EOF))):
                    # One read found the whole mark queued: a bulk flow, wake on the mark
                    # from now on (conn.pxi lowat_raise; dropped by the poll's timeout).
                    lowat_raise(self, c, d)
                continue
            if n == 0:
                h.flags |= HF_EOF
                continue
            if errno == EAGAIN:
                # EAGAIN from splice(socket -> pipe) means "socket empty" *or* "pipe
                # full" (16+ skb fragments can fill it far below its byte size).  The
                # pipe was flushed to empty above, so here it means the socket is empty.
                # Give the pipe back: an idle connection holds no pipe.
                pipe_put(&self.pipes, h, self.now)
                h.flags |= HF_WANT_READ
                return 0
            if errno == EINTR:
                continue
            if errno == EINVAL or errno == ENOSYS:
                # splice unsupported for this socket type: copy for the rest of this flow.
                h.flags = (h.flags & ~HF_STREAM) | HF_NO_SPLICE
                pipe_put(&self.pipes, h, self.now)
                continue
            return _fail_read(self, c, d, errno)
        n = recv(src, self.scratch, SCRATCH_SIZE, MSG_DONTWAIT)
        if n > 0:
            c.last_ns = self.now
            if (self.splice_enabled and not (h.flags & HF_NO_SPLICE) and n >= STREAM_MIN
                    and <size_t>n >= self.splice_min):
                h.flags |= HF_STREAM
            m = send(dst, self.scratch, n, MSG_DONTWAIT | MSG_NOSIGNAL)
            if m < 0:
                if errno != EAGAIN and errno != EINTR:
                    return _fail_write(self, c, d, errno)
                m = 0
            _delivered_copy(self, c, d, m)
            if m < n:
                h.buf = <char*>malloc(n - m)
                if h.buf == NULL:
                    _close_conn(self, c, R_ERROR, ENOMEM, True)
                    return -1
                memcpy(h.buf, self.scratch + m, n - m)
                h.buf_off = 0
                h.buf_len = <uint32_t>(n - m)
                h.flags |= HF_WANT_WRITE
                return 0
            if stop_short and <size_t>n < SCRATCH_SIZE:
                h.flags |= HF_WANT_READ
                return 0
            continue
        if n == 0:
            h.flags |= HF_EOF
            continue
        if errno == EAGAIN:
            h.flags |= HF_WANT_READ
            return 0
        if errno == EINTR:
            continue
        return _fail_read(self, c, d, errno)

cdef int _fail_read(Loop self, Conn* c, int d, int err) noexcept nogil:
    # Reading side d failed: ECONNRESET means that peer reset us; pass the reset on.
    cdef int reason
    if err == ECONNRESET or err == EPIPE or err == ECONNABORTED:
        reason = R_RESET_CLIENT if d == SIDE_CLIENT else R_RESET_ORIGIN
    else:
        reason = R_ERROR
    _close_conn(self, c, reason, err, True)
    return -1

cdef int _fail_write(Loop self, Conn* c, int d, int err) noexcept nogil:
    # Writing to side 1-d failed: EPIPE/ECONNRESET mean that peer is gone.
    cdef int reason
    if err == ECONNRESET or err == EPIPE or err == ECONNABORTED:
        reason = R_RESET_ORIGIN if d == SIDE_CLIENT else R_RESET_CLIENT
    else:
        reason = R_ERROR
    _close_conn(self, c, reason, err, True)
    return -1

cdef void _after_pump(Loop self, Conn* c) noexcept nogil:
    if (c.half[0].flags & HF_SHUT) and (c.half[1].flags & HF_SHUT):
        _close_conn(self, c, R_EOF, 0, False)
        return
    _arm_side(self, c, SIDE_CLIENT, _wanted(self, c, SIDE_CLIENT))
    _arm_side(self, c, SIDE_UPSTREAM, _wanted(self, c, SIDE_UPSTREAM))

cdef inline uint8_t _wanted(Loop self, Conn* c, int side) noexcept nogil:
    cdef uint8_t want = 0
    if c.half[side].flags & HF_WANT_READ:
        want |= POLL_BIT_IN
    if c.half[1 - side].flags & HF_WANT_WRITE:
        want |= POLL_BIT_OUT
    return want

cdef void _on_ready(Loop self, Conn* c, int side, bint readable, bint writable) noexcept nogil:
    if c.state == ST_WATCH:
        if readable:
            _watch_end(self, c, EV_READABLE_)
        return
    if c.state == ST_CONNECTING:
        if side == SIDE_UPSTREAM and writable:
            _finish_connect(self, c)
        return
    if c.state != ST_RELAY:
        return
    if readable and (c.half[side].flags & HF_WANT_READ):
        if _pump(self, c, side, False) < 0:
            return
    if writable and (c.half[1 - side].flags & HF_WANT_WRITE):
        if _pump(self, c, 1 - side, False) < 0:
            return
    _after_pump(self, c)

cdef void _finish_connect(Loop self, Conn* c) noexcept nogil:
    cdef int err = 0
    cdef sock_len errlen = sizeof(err)
    if getsockopt(c.fd[SIDE_UPSTREAM], SOL_SOCKET, SO_ERROR, &err, &errlen) < 0:
        err = errno
    if err == EINPROGRESS or err == EALREADY:
        _arm_side(self, c, SIDE_UPSTREAM, POLL_BIT_OUT)
        return
    if err != 0:
        _close_conn(self, c, connect_reason(err), err, True)
        return
    c.state = ST_RELAY
    c.connect_us = (self.now - c.start_ns) // 1000
    c.last_ns = self.now
    _count_connect(self, c.connect_us)
    _start_fresh(self, c)

cdef inline void _count_connect(Loop self, uint64_t us) noexcept nogil:
    # Once per pair: an exported pair has connected (export_pair refuses a connecting one) and
    # an imported one starts relaying, so a pair handed over is counted by its first loop only.
    cdef int i = 0
    while i < self.n_connect_bounds and us > self.connect_bounds_us[i]:
        i += 1
    self.connect_counts[i] += 1
    self.connect_sum_us += us
    self.connect_n += 1
