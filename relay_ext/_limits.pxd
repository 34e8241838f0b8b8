# cython: language_level=3
# SharedLimits' layout, declared for the core (relay_ext/_core): its accept-and-connect path
# admits a connection from C, under the same lock, without the GIL (listeners.pxi).

from libc.stdint cimport uint8_t, uint32_t

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass

ctypedef struct Header:
    pthread_mutex_t lock
    uint32_t slots
    uint32_t capacity     # entries, a power of two (0: no per-source table)
    uint32_t used
    uint32_t tombs
    uint32_t maxconn      # 0: no global limit
    uint32_t per_source   # 0: no per-source limit
    uint32_t dirty        # set while compacting: the table is not to be trusted if we die
    uint32_t wipes        # times the table was wiped after an owner died mid-compaction
    uint32_t recovered    # times a dead owner's lock was taken over (EOWNERDEAD)


cdef class SharedLimits:
    cdef char* base
    cdef size_t size
    cdef Header* hdr
    cdef uint32_t* open_
    cdef char* table
    cdef size_t entry_size
    cdef readonly uint32_t slots

    cdef void _lock(self) noexcept nogil
    cdef void _unlock(self) noexcept nogil
    cdef char* _entry(self, uint32_t i) noexcept
    cdef uint32_t* _counts(self, char* e) noexcept
    cdef uint32_t _sum(self, uint32_t* counts) noexcept nogil
    cdef long _find(self, const uint8_t* key, int n, long* free_at) noexcept
    cdef void _compact(self) noexcept
    cdef bint admit_global(self, uint32_t slot) noexcept nogil
    cdef void release_global(self, uint32_t slot) noexcept nogil
    cdef bint above_share(self, uint32_t slot) noexcept nogil
