# Bounded pipe pool (HAProxy src/pipe.c in spirit).
#
# A pipe is the kernel-side buffer splice(2) moves page references through.  Pipes are made
# lazily, capped at `max_pipes` (in use + idle), sized with F_SETPIPE_SZ and the granted size
# read back with F_GETPIPE_SZ: for a non-root user past fs.pipe-user-pages-soft the kernel
# silently hands out one-page pipes and F_SETPIPE_SZ fails with EPERM.  Such a pipe is not worth
# splicing through, so it is closed and the connection copies instead (never stalls).
# A pipe that still holds bytes is closed, never returned: its contents belong to a dead flow.
# The pool shrinks after a burst: idle pipes above the low-water mark (`keep_idle`, or as many as
# are in use if more) are closed once they sat unused for `release_after_ns`, a bounded number
# per timer scan, so a burst that returns soon still finds most of them.  The free list is a
# stack, so its bottom holds the pipes idle longest; each remembers when it was put back.

# struct PipePool: _core.pxd.


cdef int pipe_pool_init(PipePool* pp, int max_pipes, int size, int keep_idle,
                        uint64_t release_after_ns) except -1:
    memset(pp, 0, sizeof(PipePool))
    pp.max_pipes = max_pipes if max_pipes > 0 else 0
    pp.size_requested = size
    pp.size_granted = 0
    pp.keep_idle = keep_idle if keep_idle > 0 else 0
    pp.release_after_ns = release_after_ns
    if pp.max_pipes:
        pp.free_r = <int*>calloc(pp.max_pipes, sizeof(int))
        pp.free_w = <int*>calloc(pp.max_pipes, sizeof(int))
        pp.free_since = <uint64_t*>calloc(pp.max_pipes, sizeof(uint64_t))
        if pp.free_r == NULL or pp.free_w == NULL or pp.free_since == NULL:
            raise MemoryError("relay: cannot allocate the pipe pool")
    return 0


cdef void pipe_pool_destroy(PipePool* pp) noexcept nogil:
    cdef int i
    for i in range(pp.n_free):
        close(pp.free_r[i])
        close(pp.free_w[i])
    pp.n_free = 0
    pp.max_pipes = 0            # pipe_get refuses from now on: nothing to put back into
    free(pp.free_r)
    free(pp.free_w)
    free(pp.free_since)
    pp.free_r = NULL
    pp.free_w = NULL
    pp.free_since = NULL


cdef int pipe_get(PipePool* pp, Half* h, uint64_t now) noexcept nogil:
    """Give half `h` a pipe; 0 on success, -1 when it must copy instead."""
    cdef int fds[2]
    cdef int granted
    if pp.n_free > 0:
        pp.n_free -= 1
        h.pipe_r = pp.free_r[pp.n_free]
        h.pipe_w = pp.free_w[pp.n_free]
        pp.n_in_use += 1
        return 0
    if pp.n_in_use >= pp.max_pipes or now < pp.cooldown_until:
        return -1
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        pp.refused += 1
        pp.cooldown_until = now + 1000000000ULL
        return -1
    if pp.size_requested > 0 and fcntl(fds[1], F_SETPIPE_SZ, pp.size_requested) < 0:
        pp.setsz_denied += 1
    granted = fcntl(fds[1], F_GETPIPE_SZ)
    if granted < 16384:
        # One-page pipes (pipe-user-pages-soft exhausted): a 4-8 KiB pipe turns every skb
        # into its own splice round trip.  Copying is cheaper; back off and retry later.
        close(fds[0])
        close(fds[1])
        pp.refused += 1
        pp.cooldown_until = now + 1000000000ULL
        return -1
    pp.size_granted = granted
    pp.created += 1
    pp.n_in_use += 1
    h.pipe_r = fds[0]
    h.pipe_w = fds[1]
    return 0


cdef void pipe_put(PipePool* pp, Half* h, uint64_t now) noexcept nogil:
    if h.pipe_r < 0:
        return
    pp.n_in_use -= 1
    if h.pipe_len == 0 and pp.n_free < pp.max_pipes:
        pp.free_r[pp.n_free] = h.pipe_r
        pp.free_w[pp.n_free] = h.pipe_w
        pp.free_since[pp.n_free] = now
        pp.n_free += 1
    else:
        if h.pipe_len:
            pp.killed += 1
        close(h.pipe_r)
        close(h.pipe_w)
    h.pipe_r = -1
    h.pipe_w = -1
    h.pipe_len = 0


cdef void pipe_pool_shrink(PipePool* pp, uint64_t now) noexcept nogil:
    """Close idle pipes above max(keep_idle, in use) that were unused for release_after_ns."""
    cdef int keep = pp.keep_idle if pp.keep_idle > pp.n_in_use else pp.n_in_use
    cdef int k = 0, i
    while (k < pp.n_free - keep and k < SHRINK_BATCH
           and now - pp.free_since[k] >= pp.release_after_ns):
        k += 1
    if k == 0:
        return
    for i in range(k):
        close(pp.free_r[i])
        close(pp.free_w[i])
    pp.n_free -= k
    memmove(pp.free_r, pp.free_r + k, pp.n_free * sizeof(int))
    memmove(pp.free_w, pp.free_w + k, pp.n_free * sizeof(int))
    memmove(pp.free_since, pp.free_since + k, pp.n_free * sizeof(uint64_t))
    pp.released += k
