# The flow table: fixed-size entries in one calloc'd array, found by a packed key through an
# open-addressing hash index (linear probing, backward-shift deletion: no tombstones, so a
# long-running table never degrades), and threaded on one intrusive list per state.  No Python
# object per flow.  Sockets are not known here: this file is pure bookkeeping.

cdef enum:
    ENT_FREE = 0
    ENT_PENDING = 1     # first datagram seen, Python has not decided: datagrams are held
    ENT_ACTIVE = 2      # relaying (add_flow)
    ENT_HOLD = 3        # refused: datagrams of this key are dropped until hold_until

# One list per live state.  ACTIVE is an LRU list (activity moves a flow to the tail), so its
# head is always the flow that expires first: expiry pops the head while it is due and costs
# O(due flows).  PENDING is in arrival order with one fixed timeout, so the same holds.  HOLD
# is in refusal order; hold times may differ, so an entry past its time that is not at the head
# is also expired lazily when its key is looked up (a bounded list: the oldest is evicted).
cdef enum:
    LIST_PENDING = 0
    LIST_ACTIVE = 1
    LIST_HOLD = 2
    N_LISTS = 3

cdef enum:
    NIL = 0xFFFFFFFF


# The packed key: (listener tag, client address, original destination).  Always memset to 0
# before filling, so the padding is zero and memcmp/hash see only the fields.  56 bytes.
cdef struct UKey:
    int64_t tag
    uint32_t cscope         # IPv6 scope id of the client (link-local clients)
    uint16_t cport          # network byte order
    uint16_t dport          # network byte order, 0 when not transparent
    uint8_t cfam            # AF_INET or AF_INET6 (as a byte)
    uint8_t dfam            # 0 when not transparent
    uint8_t pad[6]
    uint8_t caddr[16]
    uint8_t daddr[16]


cdef struct Held:
    char* data
    uint32_t length


cdef struct UFlow:
    UKey key
    uint64_t hash
    uint32_t gen            # bumped every time the entry is freed: stale ids and epoll events miss
    uint8_t state
    uint8_t lst             # which list it is on (N_LISTS = none)
    uint16_t n_held
    uint8_t polled          # its sockets were added to epoll by add_flow (a caller may keep a dup)
    int32_t listener        # listener slot the key came from
    uint32_t prev
    uint32_t next
    uint64_t start_ns
    uint64_t deadline_ns    # PENDING: decide-by time; ACTIVE: last activity; HOLD: hold_until
    Held* held              # PENDING only: max_pending datagrams
    int up_fd               # ACTIVE: connected to the destination
    int reply_fd            # ACTIVE: connected to the client, or -1 (reply through the listener)
    int64_t utag            # the integrator's tag
    uint32_t responses      # 0 = unlimited
    uint64_t answers        # datagrams read from upstream (delivered or dropped on send)
    uint64_t dgrams[2]      # [0] client -> upstream, [1] upstream -> client (delivered)
    uint64_t nbytes[2]


cdef struct UdpTable:
    UFlow* ents
    uint32_t cap
    uint32_t* free_stack
    uint32_t n_free
    uint32_t* index          # entry index + 1, 0 = empty
    uint64_t mask
    uint32_t head[3]
    uint32_t tail[3]
    uint32_t count[3]


cdef inline uint64_t key_hash(const UKey* k) noexcept nogil:
    cdef const uint64_t* w = <const uint64_t*>k
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    for i in range(<int>(sizeof(UKey) // 8)):
        h = (h ^ w[i]) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
    return h


cdef int table_init(UdpTable* t, uint32_t cap) noexcept:
    cdef uint64_t size = 16
    cdef uint32_t i
    memset(t, 0, sizeof(UdpTable))
    while size < <uint64_t>cap * 2:
        size <<= 1
    # calloc'd pages stay untouched (no RSS) until used: entries are handed out low-first.
    t.ents = <UFlow*>calloc(cap, sizeof(UFlow))
    t.free_stack = <uint32_t*>malloc(cap * sizeof(uint32_t))
    t.index = <uint32_t*>calloc(size, sizeof(uint32_t))
    if t.ents == NULL or t.free_stack == NULL or t.index == NULL:
        table_free(t)
        return -1
    t.cap = cap
    t.mask = size - 1
    for i in range(cap):
        t.free_stack[i] = cap - 1 - i
        t.ents[i].lst = N_LISTS
    t.n_free = cap
    for i in range(N_LISTS):
        t.head[i] = NIL
        t.tail[i] = NIL
    return 0


cdef void table_free(UdpTable* t) noexcept:
    free(t.ents)
    free(t.free_stack)
    free(t.index)
    t.ents = NULL
    t.free_stack = NULL
    t.index = NULL
    t.cap = 0
    t.n_free = 0


cdef inline uint32_t table_find(UdpTable* t, const UKey* k, uint64_t h) noexcept nogil:
    cdef uint64_t pos = h & t.mask
    cdef uint32_t v
    cdef UFlow* e
    while True:
        v = t.index[pos]
        if v == 0:
            return NIL
        e = &t.ents[v - 1]
        if e.hash == h and memcmp(&e.key, k, sizeof(UKey)) == 0:
            return v - 1
        pos = (pos + 1) & t.mask


cdef inline void table_index_put(UdpTable* t, uint32_t idx) noexcept nogil:
    cdef uint64_t pos = t.ents[idx].hash & t.mask
    while t.index[pos] != 0:
        pos = (pos + 1) & t.mask
    t.index[pos] = idx + 1


cdef void table_index_del(UdpTable* t, uint32_t idx) noexcept nogil:
    # Backward-shift deletion: move later members of the probe run into the hole when their
    # home slot does not lie cyclically in (hole, their position].
    cdef uint64_t i = t.ents[idx].hash & t.mask
    cdef uint64_t j, home
    while t.index[i] != idx + 1:
        i = (i + 1) & t.mask
    j = i
    while True:
        j = (j + 1) & t.mask
        if t.index[j] == 0:
            break
        home = t.ents[t.index[j] - 1].hash & t.mask
        if ((j - home) & t.mask) >= ((j - i) & t.mask):
            t.index[i] = t.index[j]
            i = j
    t.index[i] = 0


cdef inline void list_unlink(UdpTable* t, uint32_t idx) noexcept nogil:
    cdef UFlow* e = &t.ents[idx]
    cdef uint8_t l = e.lst
    if l >= N_LISTS:
        return
    if e.prev != NIL:
        t.ents[e.prev].next = e.next
    else:
        t.head[l] = e.next
    if e.next != NIL:
        t.ents[e.next].prev = e.prev
    else:
        t.tail[l] = e.prev
    t.count[l] -= 1
    e.lst = N_LISTS
    e.prev = NIL
    e.next = NIL


cdef inline void list_append(UdpTable* t, uint32_t idx, uint8_t l) noexcept nogil:
    cdef UFlow* e = &t.ents[idx]
    e.lst = l
    e.next = NIL
    e.prev = t.tail[l]
    if t.tail[l] != NIL:
        t.ents[t.tail[l]].next = idx
    else:
        t.head[l] = idx
    t.tail[l] = idx
    t.count[l] += 1


cdef inline void list_touch(UdpTable* t, uint32_t idx) noexcept nogil:
    # Activity: to the tail of its list (O(1); a no-op when it is already the tail).
    cdef uint8_t l = t.ents[idx].lst
    if l < N_LISTS and t.tail[l] != idx:
        list_unlink(t, idx)
        list_append(t, idx, l)


cdef uint32_t table_insert(UdpTable* t, const UKey* k, uint64_t h, uint8_t state,
                           uint8_t l) noexcept nogil:
    # The caller checked the per-state limits; NIL only if the entry array is exhausted.
    cdef uint32_t idx
    cdef UFlow* e
    cdef uint32_t gen
    if t.n_free == 0:
        return NIL
    t.n_free -= 1
    idx = t.free_stack[t.n_free]
    e = &t.ents[idx]
    gen = e.gen
    memset(e, 0, sizeof(UFlow))
    e.gen = gen
    memcpy(&e.key, k, sizeof(UKey))
    e.hash = h
    e.state = state
    e.up_fd = -1
    e.reply_fd = -1
    e.lst = N_LISTS
    e.prev = NIL
    e.next = NIL
    table_index_put(t, idx)
    list_append(t, idx, l)
    return idx


cdef void table_remove(UdpTable* t, uint32_t idx) noexcept nogil:
    cdef UFlow* e = &t.ents[idx]
    list_unlink(t, idx)
    table_index_del(t, idx)
    e.state = ENT_FREE
    e.gen = (e.gen + 1) & GEN_MASK
    t.free_stack[t.n_free] = idx
    t.n_free += 1


cdef inline uint64_t entry_id(UdpTable* t, uint32_t idx) noexcept nogil:
    return <uint64_t>pack_cid(t.ents[idx].gen, idx)


cdef inline uint32_t entry_by_id(UdpTable* t, uint64_t ident, uint8_t state) noexcept nogil:
    cdef uint32_t idx = ud_slot(ident)
    if ud_op(ident) != 0 or idx >= t.cap:
        return NIL
    if t.ents[idx].state != state or not gen_matches(t.ents[idx].gen, ud_gen(ident)):
        return NIL
    return idx
