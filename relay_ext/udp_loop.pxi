# class UdpLoop: setup and teardown, the Python API, events out.  The per-datagram work is in
# udp_datapath.pxi and expiry in udp_expiry.pxi (module-level nogil functions over UdpLoop).

cdef enum:
    MAX_LISTENERS = 64
    EPOLL_BATCH = 256
    CTL_SIZE = 128              # per-message control buffer: IP(V6)_ORIGDSTADDR needs 48
    EVQ_MAX = 1 << 20           # events queued between two run() calls; beyond: counted, dropped

# epoll_data.u64 layout (integers only, never pointers):
#   kind (8 bits) | generation (24 bits) | index (32 bits)
cdef enum:
    UK_LISTENER = 1             # index = listener slot
    UK_UPSTREAM = 2             # index = flow entry
    UK_REPLY = 3                # index = flow entry
    UK_TIMER = 4

cdef enum:
    UEV_NEW_FLOW_ = 1
    UEV_FLOW_DONE_ = 2

# Close reasons: the index into UDP_REASONS.
cdef enum:
    R_IDLE_TIMEOUT = 0
    R_RESPONSES = 1
    R_CLOSED = 2
    R_ERROR = 3
    N_REASONS = 4


cdef struct ULsn:
    int fd                      # our dup of the caller's socket: replies of flows that answer
                                # through the listener keep working after the caller closes it
    int64_t tag
    uint32_t gen
    uint32_t refs               # entries (pending, active, hold) that came from this listener
    uint8_t used                # slot taken (reading, or still referenced)
    uint8_t active              # reading
    uint8_t transparent
    uint8_t oneway              # a flow ends once its client datagrams are forwarded
    uint8_t has_backend         # the loop opens new flows itself: a socket connected to backend
    sock_len backend_len
    sockaddr_in6 backend
    uint32_t responses          # of the flows the loop opens (0 = unlimited)


cdef struct UEvent:
    uint8_t kind
    uint8_t reason
    int32_t err
    uint64_t ident
    int64_t tag
    uint64_t dgrams[2]
    uint64_t nbytes[2]
    uint64_t duration_us
    UKey key


cdef object _addr_tuple(uint8_t fam, const uint8_t* addr, uint16_t port_n):
    cdef char buf[64]
    if inet_ntop(AF_INET if fam == 4 else AF_INET6, addr, buf, sizeof(buf)) == NULL:
        return None
    return ((<bytes>buf).decode("ascii"), ntohs(port_n))


cdef class UdpLoop:
    """The UDP datagram loop of one worker: listeners, a flow table, epoll.

    Use from one thread only.  See docs/udp-core.md for the contract.
    """
    cdef bint closed
    cdef int epfd
    cdef int tfd
    cdef bint timer_armed
    cdef uint64_t tick_ns
    cdef UdpTable t
    cdef ULsn lsn[64]
    cdef int n_lsn
    # limits
    cdef uint32_t max_flows
    cdef uint32_t max_pending
    cdef uint32_t max_pending_flows
    cdef uint32_t max_holds
    cdef uint32_t batch
    cdef uint32_t bufsize
    cdef uint64_t max_pending_bytes
    cdef uint64_t pending_bytes
    cdef uint64_t idle_ns
    cdef uint64_t now
    # I/O scratch: one batch of receive buffers, reused by every read (each read is forwarded
    # before the next one, so nothing stays in them)
    cdef char* bufs
    cdef char* rx_ctl
    cdef mmsghdr* rx
    cdef iovec* rx_iov
    cdef sockaddr_in6* rx_names
    cdef mmsghdr* tx
    cdef iovec* tx_iov
    cdef sockaddr_in6 tx_name
    cdef epoll_event* epevents
    # events for Python
    cdef UEvent* evq
    cdef uint32_t evq_len
    cdef uint32_t evq_cap
    # counters
    cdef uint64_t st_flows_total
    cdef uint64_t st_dgrams[2]
    cdef uint64_t st_bytes[2]
    cdef uint64_t st_drop_pending_full
    cdef uint64_t st_drop_no_flow_slot
    cdef uint64_t st_drop_truncated
    cdef uint64_t st_drop_refused
    cdef uint64_t st_drop_send
    cdef uint64_t st_drop_no_origdst
    cdef uint64_t st_drop_pending_expired
    cdef uint64_t st_errors
    cdef int last_errno
    cdef uint64_t st_recv_calls
    cdef uint64_t st_recv_dgrams
    cdef uint64_t st_send_calls
    cdef uint64_t st_send_dgrams
    cdef uint64_t st_wakeups
    cdef uint64_t st_events_dropped
    cdef uint64_t st_closes[4]

    def __cinit__(self):
        self.closed = True
        self.epfd = -1
        self.tfd = -1
        memset(&self.t, 0, sizeof(UdpTable))
        memset(self.lsn, 0, sizeof(self.lsn))
        self.bufs = NULL
        self.rx_ctl = NULL
        self.rx = NULL
        self.rx_iov = NULL
        self.rx_names = NULL
        self.tx = NULL
        self.tx_iov = NULL
        self.epevents = NULL
        self.evq = NULL

    def __init__(self, *, int max_flows=65536, int idle_timeout_ms=60_000, int batch=32,
                 int max_pending=8, int max_pending_flows=1024, int max_holds=4096,
                 int max_pending_bytes=4 << 20, int max_datagram=65536):
        if max_flows < 1 or max_flows > 8_000_000:
            raise ValueError(f"relay udp core: max_flows={max_flows}: must be 1..8000000")
        if idle_timeout_ms <= 0:
            raise ValueError(f"relay udp core: idle_timeout_ms={idle_timeout_ms}: must be > 0")
        if batch < 1 or batch > 1024:
            raise ValueError(f"relay udp core: batch={batch}: must be 1..1024")
        if max_pending < 1 or max_pending > 1024:
            raise ValueError(f"relay udp core: max_pending={max_pending}: must be 1..1024")
        if max_pending_flows < 1:
            raise ValueError(f"relay udp core: max_pending_flows={max_pending_flows}: must be >= 1")
        if max_holds < 1 or max_holds > 8_000_000:
            raise ValueError(f"relay udp core: max_holds={max_holds}: must be 1..8000000")
        if max_pending_bytes < 1:
            raise ValueError(f"relay udp core: max_pending_bytes={max_pending_bytes}: must be >= 1")
        if max_datagram < 512 or max_datagram > 65536:
            raise ValueError(f"relay udp core: max_datagram={max_datagram}: must be 512..65536")
        self.max_flows = max_flows
        self.max_pending = max_pending
        self.max_pending_flows = min(max_pending_flows, max_flows)
        self.max_holds = max_holds
        self.max_pending_bytes = max_pending_bytes
        self.batch = batch
        self.bufsize = max_datagram
        self.idle_ns = <uint64_t>idle_timeout_ms * 1000000ULL
        # Expiry tick: a tenth of the idle timeout, 5 ms .. 1 s.  Only armed while entries exist.
        self.tick_ns = <uint64_t>max(5, min(1000, idle_timeout_ms // 10)) * 1000000ULL
        # Pending entries reserve a flow slot (add_flow can then never fail for room); holds
        # have their own budget so a flood of refused keys cannot take flow slots.
        if table_init(&self.t, max_flows + max_holds) != 0:
            raise MemoryError("relay udp core: cannot allocate the flow table")
        self.bufs = <char*>malloc(<size_t>batch * max_datagram)
        self.rx_ctl = <char*>malloc(<size_t>batch * CTL_SIZE)
        self.rx = <mmsghdr*>calloc(batch, sizeof(mmsghdr))
        self.rx_iov = <iovec*>calloc(batch, sizeof(iovec))
        self.rx_names = <sockaddr_in6*>calloc(batch, sizeof(sockaddr_in6))
        self.tx = <mmsghdr*>calloc(max(batch, max_pending), sizeof(mmsghdr))
        self.tx_iov = <iovec*>calloc(max(batch, max_pending), sizeof(iovec))
        self.epevents = <epoll_event*>malloc(EPOLL_BATCH * sizeof(epoll_event))
        self.evq_cap = 256
        self.evq = <UEvent*>malloc(self.evq_cap * sizeof(UEvent))
        if not (self.bufs and self.rx_ctl and self.rx and self.rx_iov and self.rx_names
                and self.tx and self.tx_iov and self.epevents and self.evq):
            self._free_memory()
            raise MemoryError("relay udp core: cannot allocate the datagram buffers")
        # The receive vector's fixed part: message i always lands in buffer i (_recv_batch sets
        # the rest per call; the kernel never writes back msg_iov or the iovecs).
        cdef int i
        for i in range(batch):
            self.rx_iov[i].iov_base = self.bufs + <size_t>i * <size_t>max_datagram
            self.rx_iov[i].iov_len = <size_t>max_datagram
            self.rx[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx[i].msg_hdr.msg_iovlen = 1
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            err = errno
            self._free_memory()
            raise OSError(err, f"relay udp core: epoll_create1: {os.strerror(err)}")
        # A timerfd in the epoll set makes fileno() readable when expiry is due, so an embedder
        # that only watches fileno() still expires idle flows.
        self.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = pack_ud(UK_TIMER, 0, 0)
        if self.tfd < 0 or epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.tfd, &ev) != 0:
            err = errno
            close(self.epfd)
            self.epfd = -1
            if self.tfd >= 0:
                close(self.tfd)
                self.tfd = -1
            self._free_memory()
            raise OSError(err, f"relay udp core: timerfd: {os.strerror(err)}")
        self.now = mono_ns()
        self.closed = False

    cdef void _free_memory(self) noexcept:
        table_free(&self.t)
        free(self.bufs)
        free(self.rx_ctl)
        free(self.rx)
        free(self.rx_iov)
        free(self.rx_names)
        free(self.tx)
        free(self.tx_iov)
        free(self.epevents)
        free(self.evq)
        self.bufs = NULL
        self.rx_ctl = NULL
        self.rx = NULL
        self.rx_iov = NULL
        self.rx_names = NULL
        self.tx = NULL
        self.tx_iov = NULL
        self.epevents = NULL
        self.evq = NULL
        self.evq_len = 0

    def close(self):
        """Close every flow's sockets, drop held datagrams, release epoll.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        cdef uint32_t i
        for i in range(self.t.cap):
            if self.t.ents[i].state == ENT_ACTIVE:
                _flow_finish(self, i, R_CLOSED, 0)
            elif self.t.ents[i].state != ENT_FREE:
                _entry_release(self, i)
        self.evq_len = 0        # nobody will read them
        for i in range(MAX_LISTENERS):
            if self.lsn[i].used:
                close(self.lsn[i].fd)
                self.lsn[i].used = 0
                self.lsn[i].active = 0
        close(self.epfd)
        close(self.tfd)
        self.epfd = -1
        self.tfd = -1
        self._free_memory()

    def __dealloc__(self):
        if not self.closed:
            warnings.warn(f"unclosed relay UdpLoop with {self.t.count[LIST_ACTIVE]} open flows",
                          ResourceWarning)
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    cdef _ensure_alive(self):
        if self.closed:
            raise RuntimeError("relay udp core: the loop is closed")

    # ---------------------------------------------------------------- Python API

    def fileno(self):
        """The epoll descriptor: readable when run(0) has work (for loop.add_reader)."""
        self._ensure_alive()
        return self.epfd

    def add_listener(self, int fd, int64_t tag, bint transparent, *, backend=None,
                     int responses=0, bint oneway=False):
        """Read datagrams from `fd` (a bound UDP socket, not owned) under `tag`.

        backend=(ip, port[, flowinfo, scope_id]) (numeric, not transparent): the loop opens
        each new flow itself (a socket connected to backend, kernel-chosen source, `responses`
        as in add_flow) with no UEV_NEW_FLOW; if that fails it asks Python as usual.
        oneway: a flow ends (reason "responses") as soon as its client datagrams are forwarded;
        its upstream socket is never read.
        """
        self._ensure_alive()
        cdef int i, slot = -1, stype = 0, dupfd
        cdef sock_len optlen = sizeof(stype)
        cdef epoll_event ev
        cdef sockaddr_in6 baddr
        cdef sockaddr_in* bsin = <sockaddr_in*>&baddr
        cdef sock_len blen = 0
        memset(&baddr, 0, sizeof(baddr))
        if responses < 0:
            raise ValueError(f"relay udp core: responses={responses}: must be >= 0")
        if backend is not None:
            if transparent:
                raise ValueError("relay udp core: a transparent listener cannot have a backend")
            host = str(backend[0]).encode("ascii")
            port = int(backend[1])
            if not 0 < port < 65536:
                raise ValueError(f"relay udp core: backend port {port}: must be 1..65535")
            if inet_pton(AF_INET, host, &bsin.sin_addr) == 1:
                bsin.sin_family = AF_INET
                bsin.sin_port = htons(<uint16_t>port)
                blen = sizeof(sockaddr_in)
            elif inet_pton(AF_INET6, host, &baddr.sin6_addr) == 1:
                baddr.sin6_family = AF_INET6
                baddr.sin6_port = htons(<uint16_t>port)
                if len(backend) >= 4:
                    baddr.sin6_flowinfo = <uint32_t>int(backend[2])
                    baddr.sin6_scope_id = <uint32_t>int(backend[3])
                blen = sizeof(sockaddr_in6)
            else:
                raise ValueError(f"relay udp core: backend {backend!r}: not a numeric address")
        for i in range(MAX_LISTENERS):
            if self.lsn[i].active and self.lsn[i].tag == tag:
                raise ValueError(f"relay udp core: listener tag {tag} already added")
            if not self.lsn[i].used and slot < 0:
                slot = i
        if slot < 0:
            raise ValueError(f"relay udp core: more than {MAX_LISTENERS} listeners")
        if getsockopt(fd, SOL_SOCKET, SO_TYPE, &stype, &optlen) != 0:
            err = errno
            raise OSError(err, f"relay udp core: listener fd {fd}: {os.strerror(err)}")
        if stype != SOCK_DGRAM:
            raise ValueError(f"relay udp core: listener fd {fd}: not a datagram socket")
        dupfd = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if dupfd < 0:
            err = errno
            raise OSError(err, f"relay udp core: dup listener fd {fd}: {os.strerror(err)}")
        ev.events = EPOLLIN
        ev.data.u64 = pack_ud(UK_LISTENER, self.lsn[slot].gen, slot)
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, dupfd, &ev) != 0:
            err = errno
            close(dupfd)
            raise OSError(err, f"relay udp core: epoll add listener: {os.strerror(err)}")
        self.lsn[slot].fd = dupfd
        self.lsn[slot].tag = tag
        self.lsn[slot].refs = 0
        self.lsn[slot].transparent = transparent
        self.lsn[slot].oneway = oneway
        self.lsn[slot].has_backend = blen != 0
        self.lsn[slot].backend = baddr
        self.lsn[slot].backend_len = blen
        self.lsn[slot].responses = <uint32_t>responses
        self.lsn[slot].active = 1
        self.lsn[slot].used = 1
        if slot >= self.n_lsn:
            self.n_lsn = slot + 1

    def remove_listener(self, int64_t tag):
        """Stop reading the listener `tag`; its flows go on (replies still leave through it)."""
        self._ensure_alive()
        cdef int i
        for i in range(self.n_lsn):
            if self.lsn[i].active and self.lsn[i].tag == tag:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.lsn[i].fd, NULL)
                self.lsn[i].active = 0
                _listener_unref(self, i, 0)
                return
        raise KeyError(f"relay udp core: no listener with tag {tag}")

    def add_flow(self, uint64_t pending_id, int upstream_fd, int reply_fd, int responses,
                 int64_t tag):
        """Relay the pending flow: takes ownership of upstream_fd and reply_fd (-1: none).

        Raises LookupError when pending_id is not pending (expired, refused, already added):
        the caller keeps its fds then.  Sends the held datagrams upstream, returns the flow id.
        """
        self._ensure_alive()
        cdef uint32_t idx = entry_by_id(&self.t, pending_id, ENT_PENDING)
        cdef epoll_event ev
        cdef UFlow* e
        cdef bint oneway
        cdef uint32_t gen
        if idx == NIL:
            raise LookupError(f"relay udp core: {pending_id} is not a pending flow")
        if upstream_fd < 0 or reply_fd < -1 or upstream_fd == reply_fd:
            raise ValueError(f"relay udp core: bad fds upstream={upstream_fd} reply={reply_fd}")
        if responses < 0:
            raise ValueError(f"relay udp core: responses={responses}: must be >= 0")
        e = &self.t.ents[idx]
        oneway = self.lsn[e.listener].oneway
        # No O_NONBLOCK on the flow's sockets: every recvmmsg/sendmmsg on them passes
        # MSG_DONTWAIT (udp_datapath.pxi), which makes that one call non-blocking whatever the
        # file's flags say, and nothing else reads or writes them (two fcntl calls per flow saved).
        # A one-way flow ends right after the held datagrams went out: never polled.
        ev.events = EPOLLIN
        ev.data.u64 = pack_ud(UK_UPSTREAM, e.gen, idx)
        if not oneway and epoll_ctl(self.epfd, EPOLL_CTL_ADD, upstream_fd, &ev) != 0:
            err = errno
            raise OSError(err, f"relay udp core: epoll add upstream fd: {os.strerror(err)}")
        if reply_fd >= 0 and not oneway:
            ev.data.u64 = pack_ud(UK_REPLY, e.gen, idx)
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, reply_fd, &ev) != 0:
                err = errno
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, upstream_fd, NULL)
                raise OSError(err, f"relay udp core: epoll add reply fd: {os.strerror(err)}")
        # From here on nothing raises: the flow owns the fds.
        self.now = mono_ns()
        e.up_fd = upstream_fd
        e.reply_fd = reply_fd
        e.responses = responses
        e.utag = tag
        e.state = ENT_ACTIVE
        e.polled = not oneway
        e.deadline_ns = self.now
        list_unlink(&self.t, idx)
        list_append(&self.t, idx, LIST_ACTIVE)
        self.st_flows_total += 1
        fid = entry_id(&self.t, idx)
        gen = e.gen
        _flush_held(self, idx)
        if oneway and e.state == ENT_ACTIVE and e.gen == gen:
            _flow_finish(self, idx, R_RESPONSES, 0)
        _timer_update(self)
        return fid

    def refuse_flow(self, uint64_t pending_id, int hold_ms):
        """Drop the held datagrams; drop (and count) the key's datagrams for hold_ms more."""
        self._ensure_alive()
        cdef uint32_t idx = entry_by_id(&self.t, pending_id, ENT_PENDING)
        cdef UFlow* e
        if idx == NIL:
            raise LookupError(f"relay udp core: {pending_id} is not a pending flow")
        e = &self.t.ents[idx]
        self.st_drop_refused += e.n_held
        _free_held(self, e)
        if hold_ms <= 0:
            _entry_release(self, idx)
            return
        self.now = mono_ns()
        if self.t.count[LIST_HOLD] >= self.max_holds:
            _entry_release(self, self.t.head[LIST_HOLD])     # evict the oldest hold
        e.state = ENT_HOLD
        e.deadline_ns = self.now + <uint64_t>hold_ms * 1000000ULL
        list_unlink(&self.t, idx)
        list_append(&self.t, idx, LIST_HOLD)

    def close_flow(self, uint64_t fid):
        """Close an active flow now (UEV_FLOW_DONE reason "closed"); False if it is not open."""
        self._ensure_alive()
        cdef uint32_t idx = entry_by_id(&self.t, fid, ENT_ACTIVE)
        if idx == NIL:
            return False
        self.now = mono_ns()
        _flow_finish(self, idx, R_CLOSED, 0)
        return True

    def close_flows(self):
        """Close every active flow now (UEV_FLOW_DONE reason "closed", also for the flows the
        loop opened itself); returns how many."""
        self._ensure_alive()
        cdef uint32_t i, n = 0
        self.now = mono_ns()
        for i in range(self.t.cap):
            if self.t.ents[i].state == ENT_ACTIVE:
                _flow_finish(self, i, R_CLOSED, 0)
                n += 1
        return n

    def run(self, int timeout_ms=0):
        """Wait up to timeout_ms (0 = poll), move datagrams, expire; return the events."""
        self._ensure_alive()
        if self.evq_len:
            timeout_ms = 0
        with nogil:
            _udp_poll(self, timeout_ms)
        return self._take_events()

    cdef list _take_events(self):
        cdef list out = []
        cdef uint32_t i
        cdef UEvent* ev
        for i in range(self.evq_len):
            ev = &self.evq[i]
            if ev.kind == UEV_NEW_FLOW_:
                out.append((UEV_NEW_FLOW_, ev.tag, ev.ident,
                            _addr_tuple(ev.key.cfam, ev.key.caddr, ev.key.cport),
                            _addr_tuple(ev.key.dfam, ev.key.daddr, ev.key.dport)
                            if ev.key.dfam else None))
            else:
                out.append((UEV_FLOW_DONE_, ev.ident, ev.tag, ev.reason,
                            ev.dgrams[0], ev.nbytes[0], ev.dgrams[1], ev.nbytes[1],
                            ev.duration_us, ev.err,
                            _addr_tuple(ev.key.cfam, ev.key.caddr, ev.key.cport)))
        self.evq_len = 0
        return out

    def stats(self):
        """Counters as a dict of ints (safe after close())."""
        listeners = 0
        for i in range(MAX_LISTENERS):
            listeners += self.lsn[i].active
        return {
            "flows_open": self.t.count[LIST_ACTIVE],
            "flows_total": self.st_flows_total,
            "pending_flows": self.t.count[LIST_PENDING],
            "pending_bytes": self.pending_bytes,
            "holds": self.t.count[LIST_HOLD],
            "listeners": listeners,
            "dgrams_c2s": self.st_dgrams[0],
            "bytes_c2s": self.st_bytes[0],
            "dgrams_s2c": self.st_dgrams[1],
            "bytes_s2c": self.st_bytes[1],
            "drop_pending_full": self.st_drop_pending_full,
            "drop_no_flow_slot": self.st_drop_no_flow_slot,
            "drop_truncated": self.st_drop_truncated,
            "drop_refused": self.st_drop_refused,
            "drop_send": self.st_drop_send,
            "drop_no_origdst": self.st_drop_no_origdst,
            "drop_pending_expired": self.st_drop_pending_expired,
            "errors": self.st_errors,
            "last_errno": self.last_errno,
            "recv_calls": self.st_recv_calls,
            "recv_dgrams": self.st_recv_dgrams,
            "send_calls": self.st_send_calls,
            "send_dgrams": self.st_send_dgrams,
            "wakeups": self.st_wakeups,
            "events_dropped": self.st_events_dropped,
            "closed_idle_timeout": self.st_closes[R_IDLE_TIMEOUT],
            "closed_responses": self.st_closes[R_RESPONSES],
            "closed_closed": self.st_closes[R_CLOSED],
            "closed_error": self.st_closes[R_ERROR],
        }


cdef bint _push_event(UdpLoop self, UEvent** out) noexcept nogil:
    cdef UEvent* grown
    cdef uint32_t cap
    if self.evq_len == self.evq_cap:
        cap = self.evq_cap * 2
        grown = NULL if cap > EVQ_MAX else <UEvent*>realloc(self.evq, cap * sizeof(UEvent))
        if grown == NULL:
            self.st_events_dropped += 1
            return False
        self.evq = grown
        self.evq_cap = cap
    out[0] = &self.evq[self.evq_len]
    self.evq_len += 1
    memset(out[0], 0, sizeof(UEvent))
    return True


cdef void _listener_unref(UdpLoop self, int slot, uint32_t n) noexcept nogil:
    # The dup is closed once the listener is removed and no entry replies through it.
    cdef ULsn* l = &self.lsn[slot]
    l.refs -= n
    if not l.active and l.refs == 0 and l.used:
        close(l.fd)
        l.fd = -1
        l.used = 0
        l.gen = (l.gen + 1) & GEN_MASK


cdef void _free_held(UdpLoop self, UFlow* e) noexcept nogil:
    cdef uint32_t i
    if e.held == NULL:
        return
    for i in range(e.n_held):
        self.pending_bytes -= e.held[i].length
        free(e.held[i].data)
    free(e.held)
    e.held = NULL
    e.n_held = 0


cdef void _entry_release(UdpLoop self, uint32_t idx) noexcept nogil:
    # Forget a pending, hold or (already closed) active entry.
    cdef UFlow* e = &self.t.ents[idx]
    _free_held(self, e)
    table_remove(&self.t, idx)
    _listener_unref(self, e.listener, 1)


cdef void _flow_finish(UdpLoop self, uint32_t idx, int reason, int err) noexcept nogil:
    cdef UFlow* e = &self.t.ents[idx]
    cdef UEvent* ev
    if _push_event(self, &ev):
        ev.kind = UEV_FLOW_DONE_
        ev.reason = <uint8_t>reason
        ev.err = err
        ev.ident = entry_id(&self.t, idx)
        ev.tag = e.utag
        ev.dgrams[0] = e.dgrams[0]
        ev.dgrams[1] = e.dgrams[1]
        ev.nbytes[0] = e.nbytes[0]
        ev.nbytes[1] = e.nbytes[1]
        ev.duration_us = (self.now - e.start_ns) // 1000 if self.now > e.start_ns else 0
        memcpy(&ev.key, &e.key, sizeof(UKey))
    self.st_closes[reason] += 1
    if err:
        self.last_errno = err
    # close() removes a descriptor from epoll only when no other descriptor shares its file;
    # delete explicitly in case the caller kept a dup (the sockets the loop opened have none,
    # and a one-way flow's were never added).
    if e.polled:
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, e.up_fd, NULL)
    close(e.up_fd)
    e.up_fd = -1
    if e.reply_fd >= 0:
        if e.polled:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, e.reply_fd, NULL)
        close(e.reply_fd)
        e.reply_fd = -1
    _entry_release(self, idx)
