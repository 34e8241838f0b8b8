# The core opening and connecting an upstream itself: one C call per connection instead of a
# Python socket object, its setsockopt and connect_ex and a detach.  Mechanism only: the address
# comes from Python (the router decided it; the core never chooses a route).

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
    cdef uint32_t idx = <uint32_t>(c - self.conns)
    cdef uint32_t gen = c.gen
    cdef Py_ssize_t plen = len(prefix)
    cdef char* buf = NULL
    if plen:
        buf = <char*>malloc(plen)
        if buf == NULL:
            _free_slot(self, c)
            raise MemoryError("relay core: prefix")
        memcpy(buf, <char*>prefix, plen)
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
    if plen:
        c.half[0].buf = buf
        c.half[0].buf_len = plen
    self.n_open += 1
    self.st_conns_total += 1
    cdef int64_t cid = pack_cid(gen, idx)
    with nogil:
        if connecting:
            c.state = ST_CONNECTING
            _arm_side(self, c, SIDE_UPSTREAM, POLL_BIT_OUT)
        else:
            c.state = ST_RELAY
            _start_fresh(self, c)
    _uring_flush(self)
    return cid


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
