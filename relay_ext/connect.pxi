# The core opening and connecting an upstream itself: one C call per connection instead of a
# Python socket object, its setsockopt and connect_ex and a detach (add_pair_connect), or no
# Python call at all for a listener added with connect_to (accept-and-connect: _accept_connect).
# Mechanism only: the address comes from Python (the router decided it; the core never chooses
# a route), and so does the limit (set_limits: the workers' shared counters).

cdef extern from "<sys/socket.h>" nogil:
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, sock_len addrlen)
    enum:
        SOCK_STREAM

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef int64_t _open_pair(Loop self, int client_fd, int upstream_fd, int64_t tag, bint connecting,
                        bytes prefix, bint client_accepted,
                        bint upstream_nonblocking) except -1:
    """add_pair's work once the fds are checked: the loop owns both fds when this returns.
    Raises (OSError: table full, MemoryError) with both fds still the caller's."""
    cdef Conn* c = self._take_slot()
    cdef Py_ssize_t plen = len(prefix)
    cdef char* buf = NULL
    if plen:
        buf = <char*>malloc(plen)
        if buf == NULL:
            _free_slot(self, c)
            raise MemoryError("relay core: prefix")
        memcpy(buf, <char*>prefix, plen)
    _init_pair(self, c, client_fd, upstream_fd, tag, client_accepted, upstream_nonblocking)
    if plen:
        c.half[0].buf = buf
        c.half[0].buf_len = plen
    cdef int64_t cid = _cid(self, c)
    with nogil:
        _begin_pair(self, c, connecting)
    _uring_flush(self)
    return cid


cdef Conn* _try_take_slot(Loop self) noexcept nogil:
    """A zeroed slot (generation kept) for a pair or a watch; NULL when the table is full."""
    if self.n_free_slots == 0 and self.high_water >= self.max_conns:
        return NULL
    cdef uint32_t idx
    if self.n_free_slots:
        self.n_free_slots -= 1
        idx = self.free_slots[self.n_free_slots]
    else:
        idx = self.high_water
        self.high_water += 1
    cdef Conn* c = &self.conns[idx]
    cdef uint32_t gen = c.gen
    memset(c, 0, sizeof(Conn))
    c.gen = gen
    c.fd[SIDE_CLIENT] = -1
    c.fd[SIDE_UPSTREAM] = -1
    return c


cdef void _init_pair(Loop self, Conn* c, int client_fd, int upstream_fd, int64_t tag,
                     bint client_accepted, bint upstream_nonblocking) noexcept nogil:
    """A taken slot becomes a pair of these fds (owned by the loop from now on)."""
    c.fd[SIDE_CLIENT] = client_fd
    c.fd[SIDE_UPSTREAM] = upstream_fd
    half_reset(&c.half[0])
    half_reset(&c.half[1])
    c.tag = tag
    self.now = now_ns()
    c.start_ns = self.now
    c.last_ns = self.now
    adopt_socket(client_fd, self.socket_rcvbuf, client_accepted, client_accepted)
    adopt_socket(upstream_fd, self.socket_rcvbuf, upstream_nonblocking, False)
    self.n_open += 1
    self.st_conns_total += 1


cdef void _begin_pair(Loop self, Conn* c, bint connecting) noexcept nogil:
    if connecting:
        c.state = ST_CONNECTING
        _arm_side(self, c, SIDE_UPSTREAM, POLL_BIT_OUT)
    else:
        c.state = ST_RELAY
        _start_fresh(self, c)


cdef bint _accept_connect(Loop self, Listener* l, int fd, sockaddr_in6* peer,
                          sock_len peer_len) noexcept nogil:
    """A connect_to listener accepted `fd`: admit it (set_limits), open and connect its
    upstream, start the pair and queue one EV_PAIR, all here; Python only tracks the pair.
    False, with nothing held and fd untouched, when any step says no (table full, over the
    limit, socket() or connect() failed at once): the caller reports fd as an ordinary
    EV_ACCEPT and Python's own path decides what happens to it (reject, reset, log), as it
    would without connect_to.  Its polls are submitted with the loop's next wait, not one
    io_uring_enter per pair as add_pair's are."""
    cdef bint connecting = False
    cdef bint limited = self.limits is not None
    cdef int up = -1
    cdef uint32_t at
    cdef Conn* c = _try_take_slot(self)
    if c == NULL:
        return False
    if limited and not self.limits.admit_global(self.limits_slot):
        _free_slot(self, c)
        return False
    up = _connect_upstream(<const char*>&l.connect_to, l.connect_len, &connecting)
    # The event is queued before the pair starts (filled in below, by index: starting the pair
    # may queue more and move the queue): a pair whose EV_PAIR could not be queued would be
    # nobody's.
    if up < 0 or _push_event(self, EV_PAIR_, 0, l.tag) == NULL:
        if up >= 0:
            close(up)
        if limited:
            self.limits.release_global(self.limits_slot)
        _free_slot(self, c)
        return False
    at = self.evq_len - 1
    _store_sockaddr(&self.evq[at].v[0], peer, peer_len)
    _init_pair(self, c, fd, up, l.tag, True, True)
    self.st_accept_connects += 1
    self.evq[at].a = _cid(self, c)
    _begin_pair(self, c, connecting)
    return True


cdef int _connect_upstream(const char* addr, sock_len addrlen, bint* connecting) noexcept nogil:
    """socket() + TCP_NODELAY + a connect() that does not wait: the fd, or -errno (nothing left
    open).  `connecting`: the handshake is still in flight (EINPROGRESS)."""
    cdef const sockaddr_in* sa = <const sockaddr_in*>addr
    cdef int one = 1
    cdef int err
    cdef int fd = socket(sa.sin_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -errno
    # Nagle would hold a response's tail for the client's delayed ACK (docs/performance.md);
    # listeners set it for the client side, which accepted sockets inherit.
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    if connect(fd, <const sockaddr*>addr, addrlen) == 0:
        connecting[0] = False
        return fd
    err = errno
    if err == EINPROGRESS:
        connecting[0] = True
        return fd
    close(fd)
    return -err


cdef int _check_sockaddr(bytes addr) except -1:
    cdef Py_ssize_t n = len(addr)
    cdef const sockaddr_in* sa = <const sockaddr_in*><const char*>addr
    if n == sizeof(sockaddr_in) and sa.sin_family == AF_INET:
        return 0
    if n == sizeof(sockaddr_in6) and sa.sin_family == AF_INET6:
        return 0
    raise ValueError(f"relay core: not a packed sockaddr_in/sockaddr_in6 ({n} bytes)")
