# Listeners: arming the accept on whichever backend runs, and what an accept error does.
# The Python API (add_listener, remove_listener, pause/resume) is in loop.pxi.


cdef void _listener_arm(Loop self, int slot) noexcept nogil:
    if self.backend_id == BACKEND_URING:
        _uring_listener_arm(self, slot)
    else:
        _epoll_listener_arm(self, slot)


cdef void _listener_disarm(Loop self, int slot) noexcept nogil:
    if self.backend_id == BACKEND_URING:
        _uring_listener_disarm(self, slot)
    else:
        _epoll_listener_disarm(self, slot)


cdef void _accept_error(Loop self, int slot, int err) noexcept nogil:
    cdef Listener* l = &self.listeners[slot]
    self.st_accept_errors += 1
    if is_accept_pause_errno(err):
        self.st_accept_paused += 1
        l.resume_at = self.now + <uint64_t>l.backoff_ms * 1000000ULL
        if l.backoff_ms < ACCEPT_BACKOFF_MAX_MS:
            l.backoff_ms = min(l.backoff_ms * 2, ACCEPT_BACKOFF_MAX_MS)
        if self.next_scan > l.resume_at:
            self.next_scan = l.resume_at
        _push_event(self, EV_ACCEPT_ERROR_, l.tag, err)
