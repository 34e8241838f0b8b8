# Handing an established pair from one loop to another (issue 11: reload without cutting flows).
#
# export: stop watching the pair and give everything it is made of to the caller, closing and
# resetting nothing.  import: take the same back (in this loop or another process's, after the
# descriptors travelled with SCM_RIGHTS) and go on relaying from the exact point export left.
#
# Why one call is a consistent point: the core never has a read or a write in flight.  A uring
# poll or an epoll registration only reports readiness; every byte moves by a synchronous
# recv/send/splice from the loop thread.  So once the polls are removed (epoll_ctl DEL acts at
# once; the uring poll removals are submitted before export returns, and a completion that still
# arrives carries the slot's old generation and is dropped) nothing reads or writes these
# sockets here any more, and what was read but not yet written sits in one of two places:
#   * the half's pipe: a pipe is a pair of descriptors, its contents travel with them;
#   * the half's copy buffer: returned as bytes, written first by the importer.
# Bytes still in the sockets' kernel queues stay there and are read by the importer.
#
# Timers keep their deadlines: the start and last-activity times are CLOCK_MONOTONIC
# nanoseconds, one clock for every process of a host (per boot), so the importer measures idle
# and half-close time from the same instant the exporter would have.


cdef dict _half_export(Loop self, Half* h):
    cdef dict out
    cdef int pipe_r = -1, pipe_w = -1
    cdef uint32_t pipe_len = 0
    if h.pipe_r >= 0:
        if h.pipe_len == 0:
            pipe_put(&self.pipes, h, self.now)  # empty: it stays in our pool
        else:
            # The pipe leaves the pool with its bytes; the importer's pool counts it.
            pipe_r, pipe_w, pipe_len = h.pipe_r, h.pipe_w, h.pipe_len
            self.pipes.n_in_use -= 1
            h.pipe_r = -1
            h.pipe_w = -1
            h.pipe_len = 0
    buf = b""
    if h.buf != NULL:
        if h.buf_off < h.buf_len:
            buf = (h.buf + h.buf_off)[:h.buf_len - h.buf_off]
        free(h.buf)
        h.buf = NULL
        h.buf_off = 0
        h.buf_len = 0
    out = {
        "pipe_r": pipe_r, "pipe_w": pipe_w, "pipe_len": pipe_len, "buf": buf,
        "eof": bool(h.flags & HF_EOF), "shut": bool(h.flags & HF_SHUT),
        "stream": bool(h.flags & HF_STREAM), "no_splice": bool(h.flags & HF_NO_SPLICE),
        "nbytes": h.nbytes, "spliced": h.spliced, "copied": h.copied,
    }
    return out


cdef dict _handoff_export(Loop self, Conn* c):
    """The pair's state; the slot is freed, its descriptors now belong to the caller."""
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef int d
    _disarm_all(self, c)
    for d in range(2):
        if c.half[d].flags & HF_LOWAT:
            lowat_drop(c, d)    # the importer knows nothing of the mark: never leave it up
    self.now = now_ns()
    out = {
        "client_fd": c.fd[SIDE_CLIENT], "upstream_fd": c.fd[SIDE_UPSTREAM], "tag": c.tag,
        "start_ns": c.start_ns, "last_ns": c.last_ns, "connect_us": c.connect_us,
        "export_ns": self.now,
        "halves": (_half_export(self, &c.half[0]), _half_export(self, &c.half[1])),
    }
    c.fd[0] = -1
    c.fd[1] = -1
    self.n_open -= 1
    _free_slot(self, c)
    return out


cdef int _half_import(Loop self, Half* h, dict st) except -1:
    cdef uint32_t flags = 0
    half_reset(h)
    if st["eof"]:
        flags |= HF_EOF
    if st["shut"]:
        flags |= HF_SHUT | HF_EOF
    if st["no_splice"]:
        flags |= HF_NO_SPLICE
    elif st["stream"] and self.splice_enabled:
        flags |= HF_STREAM
    h.flags = flags
    h.nbytes = st["nbytes"]
    h.spliced = st["spliced"]
    h.copied = st["copied"]
    cdef bytes buf = st["buf"]
    cdef Py_ssize_t n = len(buf)
    if n:
        h.buf = <char*>malloc(n)
        if h.buf == NULL:
            raise MemoryError("relay core: import_pair: copy buffer")
        memcpy(h.buf, <char*>buf, n)
        h.buf_len = <uint32_t>n
    if st["pipe_len"]:
        h.pipe_r = st["pipe_r"]
        h.pipe_w = st["pipe_w"]
        h.pipe_len = st["pipe_len"]
        self.pipes.n_in_use += 1                # pipe_put returns it to the pool or closes it
        if self.pipes.size_granted == 0:
            # The pump reads into a pipe at most size_granted bytes at a time, and a
            # 0-byte splice returns 0, which reads as EOF: learn the size from this pipe.
            self.pipes.size_granted = max(fcntl(h.pipe_w, F_GETPIPE_SZ), 4096)
    return 0


cdef int64_t _handoff_import(Loop self, dict st, int64_t tag) except -1:
    cdef int cfd = st["client_fd"]
    cdef int ufd = st["upstream_fd"]
    cdef tuple halves = st["halves"]
    cdef int d
    if cfd < 0 or ufd < 0 or cfd == ufd:
        raise ValueError(f"relay core: import_pair: bad fds {cfd}, {ufd}")
    if len(halves) != 2:
        raise ValueError("relay core: import_pair: 'halves' must hold two directions")
    for d in range(2):
        if halves[d]["pipe_len"] and (halves[d]["pipe_r"] < 0 or halves[d]["pipe_w"] < 0):
            raise ValueError(f"relay core: import_pair: half {d} holds bytes but no pipe")
        if halves[d]["pipe_len"] and halves[d]["buf"]:
            raise ValueError(f"relay core: import_pair: half {d} has a pipe and a buffer")
    cdef Conn* c = self._take_slot()
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef uint32_t gen = c.gen
    half_reset(&c.half[0])
    half_reset(&c.half[1])
    try:
        for d in range(2):
            _half_import(self, &c.half[d], halves[d])
    except BaseException:
        for d in range(2):
            if c.half[d].buf != NULL:
                free(c.half[d].buf)
            if c.half[d].pipe_r >= 0:
                self.pipes.n_in_use -= 1        # the caller still owns the descriptors
        _free_slot(self, c)
        raise
    c.fd[SIDE_CLIENT] = cfd
    c.fd[SIDE_UPSTREAM] = ufd
    c.tag = tag
    c.start_ns = st["start_ns"]
    c.last_ns = st["last_ns"]
    c.connect_us = st["connect_us"]
    adopt_socket(cfd, self.socket_rcvbuf, False, False)    # from another process: check all
    adopt_socket(ufd, self.socket_rcvbuf, False, False)
    self.now = now_ns()
    c.state = ST_RELAY
    self.n_open += 1
    cdef int64_t cid = pack_cid(gen, idx)
    with nogil:
        # Pending bytes go out first (the pump writes the buffer, then the pipe, before it
        # reads); a half whose FIN was forwarded is left alone; both done closes at once.
        _start_relay(self, c)
    _uring_flush(self)
    return cid
