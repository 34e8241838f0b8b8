# Timers: one coarse scan over the table (connect, idle and half-close timeouts), which also
# resumes listeners whose accept back-off (listeners.pxi) has run out.


cdef void _scan_timers(Loop self) noexcept nogil:
    cdef uint32_t i
    cdef Conn* c
    cdef uint64_t now = self.now
    cdef uint64_t idle
    cdef bint one_done
    self.next_scan = now + self.scan_interval_ns
    for i in range(self.high_water):
        c = &self.conns[i]
        if c.state == ST_FREE:
            continue
        if c.state == ST_CONNECTING:
            if now - c.start_ns >= self.connect_timeout_ns:
                _close_conn(self, c, R_CONNECT_TIMEOUT, ETIMEDOUT, True)
            continue
        idle = now - c.last_ns if now > c.last_ns else 0
        if (idle >= self.idle_timeout_ns or idle >= self.half_close_timeout_ns) \
                and _kernel_still_sending(self, c):
            # Everything we read was handed to the kernel, but a slow peer is still
            # draining our socket's send queue: that is progress, not idleness.
            c.last_ns = now
            continue
        if idle >= self.idle_timeout_ns:
            _close_conn(self, c, R_IDLE_TIMEOUT, ETIMEDOUT, True)
            continue
        one_done = ((c.half[0].flags & HF_SHUT) != 0) != ((c.half[1].flags & HF_SHUT) != 0)
        if one_done and idle >= self.half_close_timeout_ns:
            _close_conn(self, c, R_HALF_CLOSE_TIMEOUT, ETIMEDOUT, True)
    for i in range(self.n_listener_slots):
        if (self.listeners[i].active and self.listeners[i].resume_at
                and now >= self.listeners[i].resume_at):
            self.listeners[i].resume_at = 0
            if not self.listeners[i].user_paused:
                _listener_arm(self, i)

cdef bint _kernel_still_sending(Loop self, Conn* c) noexcept nogil:
    cdef int q0 = 0, q1 = 0
    cdef uint32_t total
    ioctl(c.fd[0], SIOCOUTQ, &q0)
    ioctl(c.fd[1], SIOCOUTQ, &q1)
    total = <uint32_t>(q0 + q1)
    if total == 0 or total == c.outq_seen:
        c.outq_seen = total
        return False
    c.outq_seen = total
    return True
