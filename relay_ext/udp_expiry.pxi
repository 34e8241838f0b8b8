# Expiry in O(due entries): every list is ordered by its deadline (see udp_table.pxi), so each
# pass pops heads while they are due and stops at the first one that is not.  A timerfd in the
# epoll set ticks only while entries exist, so an idle loop sleeps.


cdef void _expire(UdpLoop self) noexcept nogil:
    cdef uint64_t now = self.now
    cdef uint32_t idx
    cdef UFlow* e
    while self.t.head[LIST_ACTIVE] != NIL:
        idx = self.t.head[LIST_ACTIVE]
        if self.t.ents[idx].deadline_ns + self.idle_ns > now:
            break
        _flow_finish(self, idx, R_IDLE_TIMEOUT, 0)
    while self.t.head[LIST_PENDING] != NIL:
        # Python never decided (no add_flow / refuse_flow within the idle timeout).
        idx = self.t.head[LIST_PENDING]
        e = &self.t.ents[idx]
        if e.deadline_ns > now:
            break
        self.st_drop_pending_expired += e.n_held
        _entry_release(self, idx)
    while self.t.head[LIST_HOLD] != NIL:
        idx = self.t.head[LIST_HOLD]
        if self.t.ents[idx].deadline_ns > now:
            break
        _entry_release(self, idx)


cdef void _timer_update(UdpLoop self) noexcept nogil:
    cdef itimerspec spec
    cdef bint want = (self.t.count[LIST_ACTIVE] + self.t.count[LIST_PENDING]
                      + self.t.count[LIST_HOLD]) > 0
    if want == self.timer_armed:
        return
    memset(&spec, 0, sizeof(spec))
    if want:
        spec.it_value.tv_sec = <long>(self.tick_ns // 1000000000ULL)
        spec.it_value.tv_nsec = <long>(self.tick_ns % 1000000000ULL)
        spec.it_interval = spec.it_value
    if timerfd_settime(self.tfd, 0, &spec, NULL) == 0:
        self.timer_armed = want
    else:
        self.st_errors += 1
        self.last_errno = errno
