# The signal wake-up pipe: Loop.wakeup_fd() hands its write end to signal.set_wakeup_fd().
#
# A process-directed signal goes to any thread that does not block it.  Only the thread that
# receives it sees EINTR; when that is another thread (the flow-log writer, a reader thread),
# the loop thread's io_uring_enter / epoll_wait goes on sleeping until its timeout, and the
# Python handler (which only runs in the main thread, once run() is back in the interpreter)
# waits with it.  CPython's C-level handler writes one byte (the signal number) to the wakeup
# fd in whichever thread received the signal, so watching the read end here ends the wait for
# any signal, wherever it landed.
#
# Not a connection: the pipe holds no slot of the connection table (maxconn is unchanged), its
# user_data / epoll tag is OP_WAKEUP, never a slot, and nothing that walks the pairs (close,
# export, pairs()) sees it.  It is made on the first wakeup_fd() call (an embedder that never
# asks pays nothing), O_CLOEXEC (a fork keeps both ends, an exec none) and O_NONBLOCK (Python
# refuses a blocking wakeup fd; a full pipe must drop the byte, not block a signal handler).
# close() closes both ends: whoever called set_wakeup_fd() must reset it first, or a signal
# arriving later writes into a closed (or reused) descriptor number.


cdef int _wakeup_open(Loop self) except -1:
    cdef int fds[2]
    if self.wake_w >= 0:
        return self.wake_w
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
        err = errno
        raise OSError(err, f"relay core: wake-up pipe: {os.strerror(err)}")
    self.wake_r = fds[0]
    self.wake_w = fds[1]
    self.wake_armed = 0
    _wakeup_arm(self)
    _uring_flush(self)
    if self.backend_id == BACKEND_EPOLL and not self.wake_armed:
        err = errno
        _wakeup_close(self)
        raise OSError(err, f"relay core: wake-up pipe: epoll_ctl: {os.strerror(err)}")
    return self.wake_w


cdef void _wakeup_arm(Loop self) noexcept nogil:
    # uring: a one-shot POLL_ADD, re-armed after each completion (a one-shot poll checks
    # readiness when armed, so bytes written meanwhile fire it at once).  epoll: one
    # level-triggered registration for the life of the loop.
    cdef __io_uring_sqe* sqe
    cdef epoll_event ev
    if self.wake_r < 0 or self.wake_armed:
        return
    if self.backend_id == BACKEND_URING:
        sqe = _sqe(self)
        if sqe == NULL:
            return          # SQ starved: run() tries again before its next wait
        __io_uring_prep_poll_add(sqe, self.wake_r, POLLIN)
        __io_uring_sqe_set_data64(sqe, pack_ud(OP_WAKEUP, 0, 0))
        self.wake_armed = 1
    else:
        ev.events = EPOLLIN
        ev.data.u64 = pack_ud(OP_WAKEUP, 0, 0)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake_r, &ev) == 0:
            self.wake_armed = 1


cdef void _wakeup_ready(Loop self) noexcept nogil:
    """The pipe turned readable: a signal arrived.  Drain it and make run() return."""
    cdef char buf[64]
    if self.wake_r < 0:
        return
    if self.backend_id == BACKEND_URING:
        self.wake_armed = 0
    while read(self.wake_r, buf, sizeof(buf)) > 0:
        pass
    self.interrupted = True
    self.st_signal_wakeups += 1
    _wakeup_arm(self)       # uring: submitted by run()'s flush right after the reap


cdef void _wakeup_close(Loop self) noexcept nogil:
    # Called after the ring (or the epoll fd) is gone: no poll holds the pipe any more.
    if self.wake_r >= 0:
        close(self.wake_r)
    if self.wake_w >= 0:
        close(self.wake_w)
    self.wake_r = -1
    self.wake_w = -1
    self.wake_armed = 0
