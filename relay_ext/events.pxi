# Events for Python: queued without the GIL while the loop runs (struct Event, _core.pxd),
# turned into tuples by run() at the end.  The kinds and their tuple shapes: constants.pxi and
# _core.pyi.


cdef Event* _push_event(Loop self, int kind, int64_t a, int64_t b) noexcept nogil:
    """Queue an event for Python; NULL (and counted) when memory ran out."""
    cdef Event* grown
    if self.evq_len == self.evq_cap:
        grown = <Event*>realloc(self.evq, self.evq_cap * 2 * sizeof(Event))
        if grown == NULL:
            self.st_events_dropped += 1
            if kind == EV_ACCEPT_:
                close(<int>b)       # nobody could own it: don't leak it
            return NULL
        self.evq = grown
        self.evq_cap *= 2
    cdef Event* ev = &self.evq[self.evq_len]
    self.evq_len += 1
    ev.kind = kind
    ev.a = a
    ev.b = b
    return ev


cdef list _take_events(Loop self):
    cdef list out = []
    cdef uint32_t i
    cdef Event* ev
    for i in range(self.evq_len):
        ev = &self.evq[i]
        if ev.kind == EV_ACCEPT_:
            out.append((EV_ACCEPT_, ev.a, ev.b, _sockaddr_tuple(&ev.v[0]),
                        _sockaddr_tuple(&ev.v[4])))
        elif ev.kind == EV_PAIR_:
            out.append((EV_PAIR_, ev.a, ev.b, _sockaddr_tuple(&ev.v[0])))
        elif ev.kind == EV_DONE_:
            out.append((EV_DONE_, ev.a, ev.b, ev.v[0], ev.v[1], ev.v[2], ev.v[3],
                        ev.v[4], ev.v[5], ev.v[6]))
        else:
            out.append((ev.kind, ev.a, ev.b))
    self.evq_len = 0
    if self.evq_cap > 4096:
        # a burst grew the queue: give the memory back
        free(self.evq)
        self.evq_cap = 256
        self.evq = <Event*>malloc(self.evq_cap * sizeof(Event))
    return out
