# Timers: one coarse scan over the table (connect, idle and half-close timeouts, watch
# deadlines), which also resumes listeners whose pause (listeners.pxi) has run out and shrinks
# the pipe pool (pipes.pxi).  run() resumes listeners in between when next_resume comes.


cdef void _scan_timers(Loop self) noexcept nogil:
    cdef uint32_t i
    cdef Conn* c
    cdef uint64_t now = self.now
    cdef uint64_t idle, limit
    cdef bint one_done
    self.next_scan = now + self.scan_interval_ns
    for i in range(self.high_water):
        c = &self.conns[i]
        if c.state == ST_FREE:
            continue
        if c.state == ST_WATCH:
            if now >= c.deadline_ns:
                self.st_watch_timeouts += 1
                _watch_end(self, c, EV_WATCH_TIMEOUT_)
            continue
        if c.state == ST_CONNECTING:
            if now - c.start_ns >= self.connect_timeout_ns:
                _close_conn(self, c, R_CONNECT_TIMEOUT, ETIMEDOUT, True)
            continue
        idle = now - c.last_ns if now > c.last_ns else 0
        if idle < self.scan_interval_ns:
            continue            # bytes moved since the last scan: busy, nothing to sample
        one_done = ((c.half[0].flags & HF_SHUT) != 0) != ((c.half[1].flags & HF_SHUT) != 0)
        limit = self.idle_timeout_ns
        if one_done and self.half_close_timeout_ns < limit:
            limit = self.half_close_timeout_ns
        if _peer_draining(self, c, idle >= limit):
            # Everything we read was handed to the kernel, but a slow peer is still
            # draining our socket's send queue: that is progress, not idleness.
            c.last_ns = now
            continue
        if idle >= self.idle_timeout_ns:
            _close_conn(self, c, R_IDLE_TIMEOUT, ETIMEDOUT, True)
        elif idle >= limit:
            _close_conn(self, c, R_HALF_CLOSE_TIMEOUT, ETIMEDOUT, True)
    _resume_listeners(self)
    pipe_pool_shrink(&self.pipes, now)

cdef bint _peer_draining(Loop self, Conn* c, bint at_deadline) noexcept nogil:
    """Did the kernel move queued bytes to a peer since the last sample of this idle pair?

    SIOCOUTQ (bytes sent but not yet acknowledged) only shrinks while nothing is sent, so a
    change between two samples of an idle pair is the peer reading.  The first sample after
    bytes moved is a baseline, taken a scan after the pair fell idle; then one sample every
    outq_sample_ns and one at each deadline.  A peer that stopped reading keeps its queue
    constant from the baseline on, so a timeout fires within one scan of its deadline; a
    peer still reading is seen within one sample interval of its last progress.
    """
    cdef int q0 = 0, q1 = 0
    cdef uint32_t total
    cdef bint baseline = c.outq_ns < c.last_ns
    if not baseline and not at_deadline and now_since(self, c.outq_ns) < self.outq_sample_ns:
        return False
    ioctl(c.fd[0], SIOCOUTQ, &q0)
    ioctl(c.fd[1], SIOCOUTQ, &q1)
    total = <uint32_t>(q0 + q1)
    c.outq_ns = self.now
    if baseline:
        c.outq_seen = total
        # No sample since the last byte moved: progress unknown.  At a deadline (only when no
        # scan ran between the activity and it) count it as progress once rather than cut a
        # pair that may be draining; the baseline is set for the next scan.
        return at_deadline
    if total == c.outq_seen:
        return False
    c.outq_seen = total
    return True

cdef inline uint64_t now_since(Loop self, uint64_t t) noexcept nogil:
    return self.now - t if self.now > t else 0
