# Looking at open pairs from Python (the session table: `relay sessions`, `relay kill`).  Read
# only, apart from Loop.kill(): one pass over the table up to its high-water mark, no locks (a
# Loop is used from one thread), nothing kept between calls.  A pair is described as
#   (cid, tag, connecting, c2s_bytes, s2c_bytes, age_us, idle_us)
# with bytes *delivered* to the other side (what EV_DONE reports) and idle counted from the last
# byte moved either way (what the idle timeout counts).


cdef Conn* _conn_by_id(Loop self, int64_t cid) noexcept nogil:
    """The pair a connection id names, or NULL when that pair is gone (its slot reused) or
    the slot holds a watch (Loop.watch: not a pair, its fd is the caller's)."""
    if cid < 0:
        return NULL
    cdef uint32_t idx = ud_slot(<uint64_t>cid)
    if idx >= self.high_water:
        return NULL
    cdef Conn* c = &self.conns[idx]
    if c.state == ST_FREE or c.state == ST_WATCH or not gen_matches(c.gen, ud_gen(<uint64_t>cid)):
        return NULL
    return c


cdef tuple _pair_tuple(Loop self, Conn* c, uint64_t now):
    cdef uint64_t age = now - c.start_ns if now > c.start_ns else 0
    cdef uint64_t idle = now - c.last_ns if now > c.last_ns else 0
    return (_cid(self, c), c.tag, c.state == ST_CONNECTING, c.half[0].nbytes,
            c.half[1].nbytes, age // 1000, idle // 1000)


cdef list _pair_list(Loop self):
    cdef list out = []
    cdef uint32_t i
    cdef uint64_t now = now_ns()
    for i in range(self.high_water):
        if self.conns[i].state != ST_FREE and self.conns[i].state != ST_WATCH:
            out.append(_pair_tuple(self, &self.conns[i], now))
    return out
