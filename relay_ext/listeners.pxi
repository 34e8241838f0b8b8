# Listeners: waiting for a listening socket to turn readable on whichever backend runs, then
# accepting a bounded batch with accept4() from this thread; what an accept error does.
# The Python API (add_listener, remove_listener, pause/resume) is in loop.pxi.
#
# Why readiness + accept4() and not io_uring's IORING_OP_ACCEPT: several worker processes share
# one inherited listening socket, and the kernel decides which of them hears about a connection.
# io_uring arms its internal poll for an accept as an *exclusive* waiter (opdef poll_exclusive
# -> EPOLLEXCLUSIVE, wake-one): each arriving connection wakes only the first exclusive waiter
# on the socket's wait queue, and a multishot accept stays queued there, so the first worker
# took every connection (1,651 of 1,651 with 2 workers), and a stopped or draining worker
# swallowed wakeups nobody else saw.  A plain POLLIN poll (io_uring POLL_ADD without
# EPOLLEXCLUSIVE, or an epoll registration without it) is a non-exclusive waiter: every
# worker is woken and the accept4() calls race, so whichever is free takes the connection and a
# stopped worker steals nothing.  The batch is capped (ACCEPT_BATCH) so that in a burst a
# sibling gets its share; what is left keeps the socket readable, and the level-triggered poll
# (re-armed one-shot on io_uring, a registration on epoll) brings this loop back for it.


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


cdef int _accept_batch(Loop self, int slot) noexcept nogil:
    """The listener is readable: accept4() up to ACCEPT_BATCH connections, each an EV_ACCEPT
    (or, on a connect_to listener, an EV_PAIR when the core could relay it at once).

    0: keep waiting on the listener; -1: it was paused for a back-off or a yield
    (_resume_listeners arms it again) and must be disarmed."""
    cdef Listener* l = &self.listeners[slot]
    cdef int fd, k, err
    cdef Event* ev
    cdef sockaddr_in6 peer
    cdef sock_len peer_len
    # Every worker waiting on a shared listener is woken (non-exclusive) and the accept4()
    # calls race.  A connect_to listener's accept path never leaves the core, so when both
    # workers are idle the one that accepted last is back first and a trickle of connections
    # (one after another, each kept open) went 185 / 15 to one worker.  A worker holding more
    # than its share of the workers' open connections leaves every other wakeup to the others
    # (nginx's accept_disabled idea): it stops watching the listener for ACCEPT_YIELD_US.
    # Returning at once was not enough: the re-armed poll fired again within microseconds,
    # before the sibling woken by the same connection was even scheduled (164 / 36 on an idle
    # machine).  The wakeup after the pause is taken whatever the shares, so a stopped or
    # busy sibling delays a connection by ACCEPT_YIELD_US and strands nothing.
    if l.connect_len and self.limits is not None:
        if not l.yielded and self.limits.above_share(self.limits_slot):
            l.yielded = 1
            self.st_accept_yields += 1
            _listener_resume_at(self, l, self.now + <uint64_t>ACCEPT_YIELD_US * 1000ULL)
            return -1
        l.yielded = 0
    for k in range(ACCEPT_BATCH):
        # accept4() fills in the peer for free; Python would ask again with getpeername().
        peer_len = sizeof(peer)
        fd = accept4(l.fd, <sockaddr*>&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd >= 0:
            self.st_accepts += 1
            l.backoff_ms = ACCEPT_BACKOFF_FIRST_MS
            if l.connect_len and _accept_connect(self, l, fd, &peer, peer_len):
                continue        # relayed: Python hears of it as one EV_PAIR
            ev = _push_event(self, EV_ACCEPT_, l.tag, fd)
            if ev != NULL:
                _store_sockaddr(&ev.v[0], &peer, peer_len)
                if l.want_local:
                    _store_local(fd, &ev.v[4])
                else:
                    memset(&ev.v[4], 0, sizeof(sockaddr_in6))
            continue
        err = errno
        if err == EAGAIN:
            return 0            # drained (or a sibling worker took the rest)
        if err == EINTR or err == ECONNABORTED:
            continue            # that client is gone; the next one may be waiting
        _accept_pause(self, slot, err)
        return -1
    return 0


cdef void _accept_pause(Loop self, int slot, int err) noexcept nogil:
    """accept failed with `err`: pause this listener for its back-off, doubling each time.

    EMFILE & co (out of descriptors or memory) are reported to Python as EV_ACCEPT_ERROR:
    accepting again at once would spin.  Anything else is counted only; backing off keeps a
    persistent error from spinning the loop too.  Connections already relaying go on."""
    cdef Listener* l = &self.listeners[slot]
    self.st_accept_errors += 1
    _listener_resume_at(self, l, self.now + <uint64_t>l.backoff_ms * 1000000ULL)
    if l.backoff_ms < ACCEPT_BACKOFF_MAX_MS:
        l.backoff_ms = min(l.backoff_ms * 2, ACCEPT_BACKOFF_MAX_MS)
    if is_accept_pause_errno(err):
        self.st_accept_paused += 1
        _push_event(self, EV_ACCEPT_ERROR_, l.tag, err)


cdef inline void _listener_resume_at(Loop self, Listener* l, uint64_t at) noexcept nogil:
    """Leave listener `l` unwatched until `at` (its caller disarms it or does not re-arm)."""
    l.resume_at = at
    if self.next_resume == 0 or at < self.next_resume:
        self.next_resume = at


cdef void _resume_listeners(Loop self) noexcept nogil:
    """Arm every listener whose pause (back-off, yield) is over; note the next one due.
    Called by run() when next_resume has come, apart from the timer scan, which walks the
    whole connection table: a yield every millisecond must not cost a scan each.  An arm that
    finds the SQ full pauses its listener again (_uring_listener_arm), folded in like the rest."""
    cdef int i
    cdef Listener* l
    self.next_resume = 0
    for i in range(self.n_listener_slots):
        l = &self.listeners[i]
        if not l.active or l.resume_at == 0:
            continue
        if self.now >= l.resume_at:
            l.resume_at = 0
            if not l.user_paused:
                _listener_arm(self, i)
        else:
            _listener_resume_at(self, l, l.resume_at)


# EV_ACCEPT's addresses travel in the Event's v[] as raw sockaddrs (an IPv4 or IPv6 one fits in
# 32 bytes); a unix peer (its sockaddr_un is longer) or a failed getsockname is stored as family
# 0 and becomes None.

cdef inline void _store_sockaddr(int64_t* slot, sockaddr_in6* sa, sock_len n) noexcept nogil:
    if n <= sizeof(sockaddr_in6) and (sa.sin6_family == AF_INET or sa.sin6_family == AF_INET6):
        memcpy(slot, sa, sizeof(sockaddr_in6))
    else:
        memset(slot, 0, sizeof(sockaddr_in6))


cdef inline void _store_local(int fd, int64_t* slot) noexcept nogil:
    cdef sockaddr_in6 local
    cdef sock_len n = sizeof(local)
    if getsockname(fd, <sockaddr*>&local, &n) == 0:
        _store_sockaddr(slot, &local, n)
    else:
        memset(slot, 0, sizeof(sockaddr_in6))


cdef object _sockaddr_tuple(const int64_t* slot):
    """A stored sockaddr as Python's socket module gives its first two fields: (ip, port),
    the IPv6 scope as "%ifname" like getnameinfo(NI_NUMERICHOST); None when none was stored."""
    cdef const sockaddr_in6* sa6 = <const sockaddr_in6*>slot
    cdef const sockaddr_in* sa4
    cdef char buf[INET6_ADDRSTRLEN + 1 + IF_NAMESIZE]
    cdef char ifname[IF_NAMESIZE]
    if sa6.sin6_family == AF_INET:
        sa4 = <const sockaddr_in*>slot
        if inet_ntop(AF_INET, &sa4.sin_addr, buf, sizeof(buf)) == NULL:
            return None
        return (buf.decode("ascii"), ntohs(sa4.sin_port))
    if sa6.sin6_family != AF_INET6:
        return None
    if inet_ntop(AF_INET6, &sa6.sin6_addr, buf, sizeof(buf)) == NULL:
        return None
    ip = buf.decode("ascii")
    if sa6.sin6_scope_id:
        if if_indextoname(sa6.sin6_scope_id, ifname) != NULL:
            ip = f"{ip}%{ifname.decode('ascii', 'replace')}"
        else:
            ip = f"{ip}%{sa6.sin6_scope_id}"
    return (ip, ntohs(sa6.sin6_port))
