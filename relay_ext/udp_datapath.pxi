# Moving datagrams (GIL released): one recvmmsg of up to `batch` datagrams per read, then one
# sendmmsg per destination socket.  Rules written down where they are used:
# - MSG_TRUNC in a message's msg_flags means the datagram was larger than our buffer: the
#   kernel already discarded the tail, so it is dropped and counted, never forwarded cut.
# - On a *connected* UDP socket an ICMP port/host unreachable becomes a pending socket error
#   that the next recv or send returns (ECONNREFUSED ...): the flow ends with reason "error".
#   An unconnected listener never sees those (no IP_RECVERR), so sendto() through it only fails
#   locally.
# - recvmmsg/sendmmsg report an error only when the first message fails; an error after some
#   messages moved stays on the socket for the next call.
# - EAGAIN/ENOBUFS on send: the socket buffer or the device queue is full.  UDP has no flow
#   control to wait on: the datagram is dropped and counted (drop_send), as a router would.

cdef enum:
    READ_ROUNDS = 8             # fairness: at most this many recvmmsg per readiness event


cdef inline bint _key_from_msg(UKey* k, int64_t tag, sockaddr_in6* name, msghdr* m,
                               bint transparent) noexcept nogil:
    cdef sockaddr_in* sin
    cdef cmsghdr* c
    cdef sockaddr_in6 dst
    memset(k, 0, sizeof(UKey))
    k.tag = tag
    if name.sin6_family == AF_INET:
        sin = <sockaddr_in*>name
        k.cfam = 4
        k.cport = sin.sin_port
        memcpy(k.caddr, &sin.sin_addr, 4)
    elif name.sin6_family == AF_INET6:
        k.cfam = 6
        k.cport = name.sin6_port
        k.cscope = name.sin6_scope_id
        memcpy(k.caddr, &name.sin6_addr, 16)
    else:
        return False
    if not transparent:
        return True
    # IP_RECVORIGDSTADDR: the destination the client addressed (before TPROXY diverted it)
    # arrives as a control message carrying a sockaddr_in / sockaddr_in6.
    c = CMSG_FIRSTHDR(m)
    while c != NULL:
        if ((c.cmsg_level == SOL_IP and c.cmsg_type == UDP_IP_ORIGDSTADDR)
                or (c.cmsg_level == SOL_IPV6 and c.cmsg_type == UDP_IPV6_ORIGDSTADDR)):
            memset(&dst, 0, sizeof(dst))
            memcpy(&dst, CMSG_DATA(c), min(<size_t>c.cmsg_len - <size_t>(CMSG_DATA(c) - <unsigned char*>c),
                                           sizeof(dst)))
            if dst.sin6_family == AF_INET:
                sin = <sockaddr_in*>&dst
                k.dfam = 4
                k.dport = sin.sin_port
                memcpy(k.daddr, &sin.sin_addr, 4)
                return True
            if dst.sin6_family == AF_INET6:
                k.dfam = 6
                k.dport = dst.sin6_port
                memcpy(k.daddr, &dst.sin6_addr, 16)
                return True
        c = CMSG_NXTHDR(m, c)
    return False


cdef inline sock_len _client_sockaddr(const UKey* k, sockaddr_in6* out) noexcept nogil:
    cdef sockaddr_in* sin
    memset(out, 0, sizeof(sockaddr_in6))
    if k.cfam == 4:
        sin = <sockaddr_in*>out
        sin.sin_family = AF_INET
        sin.sin_port = k.cport
        memcpy(&sin.sin_addr, k.caddr, 4)
        return sizeof(sockaddr_in)
    out.sin6_family = AF_INET6
    out.sin6_port = k.cport
    out.sin6_scope_id = k.cscope
    memcpy(&out.sin6_addr, k.caddr, 16)
    return sizeof(sockaddr_in6)


cdef int _recv_batch(UdpLoop self, int fd, uint32_t vlen, bint names, bint ctl) noexcept nogil:
    # Returns the number of datagrams (>= 1) or -errno.  recvmmsg(2) writes back, per message,
    # msg_len and msg_flags (outputs only: their old values are never read) and msg_namelen and
    # msg_controllen (in-out: the room we give, then what was used), never the pointers nor the
    # iovecs: those are set once in UdpLoop.__init__.  So each call sets the two lengths again,
    # with the name / control pointers that go with this socket (names, ctl).
    cdef uint32_t i
    cdef msghdr* h
    cdef int n
    for i in range(vlen):
        h = &self.rx[i].msg_hdr
        h.msg_name = &self.rx_names[i] if names else NULL
        h.msg_namelen = sizeof(sockaddr_in6) if names else 0
        h.msg_control = self.rx_ctl + <size_t>i * CTL_SIZE if ctl else NULL
        h.msg_controllen = CTL_SIZE if ctl else 0
    while True:
        n = recvmmsg(fd, self.rx, vlen, MSG_DONTWAIT, NULL)
        if n >= 0 or errno != EINTR:
            break
    if n > 0:
        self.st_recv_calls += 1
        self.st_recv_dgrams += <uint32_t>n
        return n
    if n == 0:
        return -EAGAIN
    return -errno


cdef inline void _tx_set(UdpLoop self, uint32_t k, void* data, size_t length,
                         sockaddr_in6* name, sock_len namelen) noexcept nogil:
    self.tx_iov[k].iov_base = data
    self.tx_iov[k].iov_len = length
    self.tx[k].msg_hdr.msg_iov = &self.tx_iov[k]
    self.tx[k].msg_hdr.msg_iovlen = 1
    self.tx[k].msg_hdr.msg_name = name
    self.tx[k].msg_hdr.msg_namelen = namelen
    self.tx[k].msg_hdr.msg_control = NULL
    self.tx[k].msg_hdr.msg_controllen = 0
    self.tx[k].msg_hdr.msg_flags = 0


cdef void _send_batch(UdpLoop self, int fd, uint32_t n, uint32_t idx, int d) noexcept nogil:
    # Send tx[0..n) on fd for flow idx in direction d (0: to upstream, 1: to the client).
    # The flow may be finished here (ICMP error on one of its connected sockets).
    cdef UFlow* e = &self.t.ents[idx]
    cdef uint32_t sent = 0, i
    cdef uint64_t nb
    cdef int r, err
    while sent < n:
        r = sendmmsg(fd, self.tx + sent, n - sent, MSG_DONTWAIT)
        if r > 0:
            nb = 0
            for i in range(sent, sent + <uint32_t>r):
                nb += self.tx[i].msg_len
            self.st_send_calls += 1
            self.st_send_dgrams += <uint32_t>r
            self.st_dgrams[d] += <uint32_t>r
            self.st_bytes[d] += nb
            e.dgrams[d] += <uint32_t>r
            e.nbytes[d] += nb
            sent += <uint32_t>r
            continue
        err = errno
        if err == EINTR:
            continue
        if err == EAGAIN or err == ENOBUFS:
            self.st_drop_send += n - sent
            return
        if err == ECONNREFUSED and (fd == e.up_fd or fd == e.reply_fd):
            self.st_drop_send += n - sent
            _flow_finish(self, idx, R_ERROR, err)
            return
        # A local refusal of this one datagram (EMSGSIZE, EPERM from a firewall ...): skip it.
        self.st_errors += 1
        self.st_drop_send += 1
        self.last_errno = err
        sent += 1


cdef inline void _touch(UdpLoop self, uint32_t idx) noexcept nogil:
    self.t.ents[idx].deadline_ns = self.now
    list_touch(&self.t, idx)


cdef void _flush_held(UdpLoop self, uint32_t idx) noexcept nogil:
    # add_flow: the datagrams held while Python decided go upstream first, in arrival order.
    cdef UFlow* e = &self.t.ents[idx]
    cdef uint32_t i, n = e.n_held
    cdef uint32_t gen = e.gen
    for i in range(n):
        _tx_set(self, i, e.held[i].data, e.held[i].length, NULL, 0)
    if n:
        _send_batch(self, e.up_fd, n, idx, 0)
    if e.state == ENT_ACTIVE and e.gen == gen:
        _free_held(self, e)
    # (if the send finished the flow, _entry_release already freed them)


cdef void _hold_datagram(UdpLoop self, UFlow* e, char* data, uint32_t length) noexcept nogil:
    cdef char* copy
    if e.n_held >= self.max_pending or self.pending_bytes + length > self.max_pending_bytes:
        self.st_drop_pending_full += 1
        return
    copy = <char*>malloc(length if length else 1)
    if copy == NULL:
        self.st_errors += 1
        return
    memcpy(copy, data, length)
    e.held[e.n_held].data = copy
    e.held[e.n_held].length = length
    e.n_held += 1
    self.pending_bytes += length


cdef void _new_pending(UdpLoop self, int slot, UKey* k, uint64_t h, char* data,
                       uint32_t length) noexcept nogil:
    cdef uint32_t idx
    cdef UFlow* e
    cdef UEvent* ev
    if self.t.count[LIST_ACTIVE] + self.t.count[LIST_PENDING] >= self.max_flows:
        self.st_drop_no_flow_slot += 1
        return
    if self.t.count[LIST_PENDING] >= self.max_pending_flows:
        self.st_drop_pending_full += 1
        return
    idx = table_insert(&self.t, k, h, ENT_PENDING, LIST_PENDING)
    if idx == NIL:
        self.st_drop_no_flow_slot += 1
        return
    e = &self.t.ents[idx]
    e.listener = slot
    self.lsn[slot].refs += 1
    e.start_ns = self.now
    e.deadline_ns = self.now + self.idle_ns
    e.held = <Held*>malloc(self.max_pending * sizeof(Held))
    if e.held == NULL or not _push_event(self, &ev):
        self.st_errors += 1
        _entry_release(self, idx)
        return
    ev.kind = UEV_NEW_FLOW_
    ev.ident = entry_id(&self.t, idx)
    ev.tag = self.lsn[slot].tag
    memcpy(&ev.key, k, sizeof(UKey))
    _hold_datagram(self, e, data, length)


cdef uint32_t _open_backend_flow(UdpLoop self, int slot, UKey* k, uint64_t h) noexcept nogil:
    # A new key on a listener with a backend: the flow's decision is the same for every client
    # (a socket connected to the backend, the kernel picks the source port), so the loop makes
    # it here with no Python call.  NIL when it could not (counted; the caller hands the key to
    # Python, which refuses it with the error, logs it and holds it).
    cdef ULsn* l = &self.lsn[slot]
    cdef uint32_t idx
    cdef UFlow* e
    cdef int fd
    cdef epoll_event ev
    fd = socket(l.backend.sin6_family, SOCK_DGRAM | SOCK_CLOEXEC, 0)
    if fd < 0:
        self.st_errors += 1
        self.last_errno = errno
        return NIL
    # connect() on UDP only sets the peer (and autobinds the source): it never waits.
    if connect(fd, <sockaddr*>&l.backend, l.backend_len) != 0:
        self.st_errors += 1
        self.last_errno = errno
        close(fd)
        return NIL
    idx = table_insert(&self.t, k, h, ENT_ACTIVE, LIST_ACTIVE)
    if idx == NIL:                      # (the pending path counts it)
        close(fd)
        return NIL
    e = &self.t.ents[idx]
    if not l.oneway:
        # No EPOLL_CTL_DEL at the end (polled = 0): nobody else holds this socket.
        ev.events = EPOLLIN
        ev.data.u64 = pack_ud(UK_UPSTREAM, e.gen, idx)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
            self.st_errors += 1
            self.last_errno = errno
            close(fd)
            table_remove(&self.t, idx)
            return NIL
    e.listener = slot
    l.refs += 1
    e.start_ns = self.now
    e.deadline_ns = self.now
    e.up_fd = fd
    e.reply_fd = -1
    e.responses = l.responses
    e.utag = l.tag
    self.st_flows_total += 1
    return idx


cdef void _flush_run(UdpLoop self, uint32_t idx, uint32_t n) noexcept nogil:
    # A listener's consecutive datagrams of one active flow: upstream in one sendmmsg.  A
    # one-way flow ends once they are out.
    cdef UFlow* e = &self.t.ents[idx]
    cdef uint32_t gen = e.gen
    _send_batch(self, e.up_fd, n, idx, 0)
    if self.lsn[e.listener].oneway and e.state == ENT_ACTIVE and e.gen == gen:
        _flow_finish(self, idx, R_RESPONSES, 0)


cdef void _read_listener(UdpLoop self, int slot) noexcept nogil:
    cdef ULsn* l = &self.lsn[slot]
    cdef int n, i, rounds
    cdef uint32_t idx, run_idx, run_n
    cdef UKey k
    cdef uint64_t h
    cdef UFlow* e
    cdef msghdr* m
    cdef uint32_t length
    for rounds in range(READ_ROUNDS):
        n = _recv_batch(self, l.fd, self.batch, True, l.transparent)
        if n < 0:
            if n != -EAGAIN:
                self.st_errors += 1
                self.last_errno = -n
            return
        # Consecutive datagrams of one active flow go out in one sendmmsg.
        run_idx = NIL
        run_n = 0
        for i in range(n):
            m = &self.rx[i].msg_hdr
            length = self.rx[i].msg_len
            if m.msg_flags & MSG_TRUNC:
                self.st_drop_truncated += 1
                continue
            if not _key_from_msg(&k, l.tag, &self.rx_names[i], m, l.transparent):
                self.st_drop_no_origdst += 1
                continue
            h = key_hash(&k)
            idx = table_find(&self.t, &k, h)
            if idx != NIL and self.t.ents[idx].state == ENT_HOLD \
                    and self.t.ents[idx].deadline_ns <= self.now:
                _entry_release(self, idx)       # a hold past its time, not yet at the head
                idx = NIL
            if idx == NIL and l.has_backend \
                    and self.t.count[LIST_ACTIVE] + self.t.count[LIST_PENDING] < self.max_flows:
                # Send the run first: a one-way flow it ends frees its entry and socket.
                if run_n:
                    _flush_run(self, run_idx, run_n)
                    run_n = 0
                    run_idx = NIL
                idx = _open_backend_flow(self, slot, &k, h)
            if idx == NIL:
                _new_pending(self, slot, &k, h, <char*>self.rx_iov[i].iov_base, length)
                continue
            e = &self.t.ents[idx]
            if e.state == ENT_PENDING:
                _hold_datagram(self, e, <char*>self.rx_iov[i].iov_base, length)
                continue
            if e.state == ENT_HOLD:
                self.st_drop_refused += 1
                continue
            # ACTIVE: a client datagram that reached the listener (no reply socket, or before
            # the connected reply socket captured the flow): upstream.
            if idx != run_idx:
                if run_n:
                    _flush_run(self, run_idx, run_n)
                run_idx = idx
                run_n = 0
            _tx_set(self, run_n, self.rx_iov[i].iov_base, length, NULL, 0)
            run_n += 1
            _touch(self, idx)
        if run_n:
            _flush_run(self, run_idx, run_n)
        if <uint32_t>n < self.batch:
            return


cdef void _read_flow(UdpLoop self, uint32_t idx, bint from_upstream) noexcept nogil:
    # from_upstream: upstream_fd -> client (reply_fd, or sendto through the listener).
    # otherwise: reply_fd (the client's datagrams once the connected socket captured them)
    # -> upstream_fd.
    cdef UFlow* e = &self.t.ents[idx]
    cdef uint32_t gen = e.gen
    cdef int n, i, rounds, in_fd, out_fd, d
    cdef uint32_t vlen, k
    cdef sock_len namelen = 0
    cdef sockaddr_in6* name = NULL
    for rounds in range(READ_ROUNDS):
        vlen = self.batch
        if from_upstream:
            in_fd = e.up_fd
            d = 1
            if e.responses:
                # read no more than the responses still allowed: the rest stay unread
                vlen = <uint32_t>min(<uint64_t>vlen, e.responses - e.answers)
            if e.reply_fd >= 0:
                out_fd = e.reply_fd
            else:
                out_fd = self.lsn[e.listener].fd
                namelen = _client_sockaddr(&e.key, &self.tx_name)
                name = &self.tx_name
        else:
            in_fd = e.reply_fd
            out_fd = e.up_fd
            d = 0
        n = _recv_batch(self, in_fd, vlen, False, False)
        if n < 0:
            if n != -EAGAIN:
                # ECONNREFUSED & co: an ICMP error for this connected socket.
                _flow_finish(self, idx, R_ERROR, -n)
            return
        if from_upstream:
            e.answers += <uint32_t>n
        k = 0
        for i in range(n):
            if self.rx[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.st_drop_truncated += 1
                continue
            _tx_set(self, k, self.rx_iov[i].iov_base, self.rx[i].msg_len, name, namelen)
            k += 1
        _touch(self, idx)
        if k:
            _send_batch(self, out_fd, k, idx, d)
            if e.state != ENT_ACTIVE or e.gen != gen:
                return
        if from_upstream and e.responses and e.answers >= e.responses:
            _flow_finish(self, idx, R_RESPONSES, 0)
            return
        if <uint32_t>n < vlen:
            return


cdef void _udp_poll(UdpLoop self, int timeout_ms) noexcept nogil:
    cdef int n = epoll_wait(self.epfd, self.epevents, EPOLL_BATCH, timeout_ms)
    cdef int i
    cdef uint64_t ud, ticks
    cdef uint32_t kind, gen, idx
    self.now = mono_ns()
    if n > 0:
        self.st_wakeups += 1
    for i in range(n):
        ud = self.epevents[i].data.u64
        kind = ud_op(ud)
        gen = ud_gen(ud)
        idx = ud_slot(ud)
        if kind == UK_LISTENER:
            if idx < MAX_LISTENERS and self.lsn[idx].active and gen_matches(self.lsn[idx].gen, gen):
                _read_listener(self, <int>idx)
        elif kind == UK_UPSTREAM or kind == UK_REPLY:
            # A stale event (the flow ended earlier in this batch, maybe the slot was reused)
            # misses on the generation.
            if idx < self.t.cap and self.t.ents[idx].state == ENT_ACTIVE \
                    and gen_matches(self.t.ents[idx].gen, gen):
                _read_flow(self, idx, kind == UK_UPSTREAM)
        elif kind == UK_TIMER:
            read(self.tfd, &ticks, sizeof(ticks))
    _expire(self)
    _timer_update(self)
