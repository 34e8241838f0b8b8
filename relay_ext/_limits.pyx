# cython: language_level=3
"""Connection counters shared by the worker processes of one generation: exact ``maxconn`` and
``maxconn_per_source`` however the kernel spreads the accepts.  Mechanism only: the caller
(relay.serve.limits) decides the key of a source (IPv4 address, IPv6 prefix).

One anonymous shared mapping (mmap MAP_SHARED | MAP_ANONYMOUS) made by the supervisor before it
forks the workers, so every worker of the generation sees the same memory:

    header   a process-shared, *robust* pthread mutex and the table's bookkeeping
    open[s]  connections admitted by worker slot s (u32 per slot)
    table    open addressing, linear probing: state, key (4 or 16 bytes), count per slot

Why a mutex and not lock-free atomics: admission is check-then-increment over two counters (the
global one and the source's), which needs both to move together; a critical section is a few
dozen instructions (one hash probe, a sum over the slots) and is never held across a system
call.  Why *robust*: a worker killed while holding it (SIGKILL, OOM) would otherwise block its
siblings forever; the next locker gets EOWNERDEAD and makes it consistent.  Why counts per
slot and no total: every write is one u32 of the writer's own column, so a worker dying between
two writes leaves nothing to repair, and the supervisor zeroes a dead worker's column
(``clear_slot``) before the slot serves again.  The only multi-write step, compacting
tombstones, sets ``dirty`` first; an owner dying inside it leaves the per-source table wiped
(per-source counts restart at zero, the global ones are intact) rather than corrupt.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap

cdef extern from "<errno.h>":
    int EOWNERDEAD

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutexattr_t:
        pass
    int PTHREAD_PROCESS_SHARED
    int PTHREAD_MUTEX_ROBUST
    int pthread_mutexattr_init(pthread_mutexattr_t*)
    int pthread_mutexattr_destroy(pthread_mutexattr_t*)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t*, int)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t*, int)
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_mutex_consistent(pthread_mutex_t*)

ADMITTED = 0
OVER_MAXCONN = 1
OVER_PER_SOURCE = 2
TABLE_FULL = 3
MAX_KEY = 16
MAX_SLOTS = 4096

cdef enum:
    EMPTY = 0
    USED = 1
    TOMB = 2

# Header (the mapping's head) and the class's fields: _limits.pxd.

# One table entry: state (1), key length (1), 2 pad, key (16), then u32 count per slot.
DEF ENTRY_HEAD = 20


cdef inline uint64_t _hash(const uint8_t* key, int n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL ^ <uint64_t>n  # FNV-1a
    cdef int i
    for i in range(n):
        h = (h ^ key[i]) * 1099511628211ULL
    return h ^ (h >> 29)


cdef class SharedLimits:
    """The counters of one generation. Create in the supervisor before fork; every method is
    safe from any process that inherited the mapping."""

    def __cinit__(self, int slots, int maxconn, int per_source, int capacity=0):
        self.base = NULL
        if slots < 1 or slots > MAX_SLOTS:
            raise ValueError(f"relay limits: slots={slots}: must be 1..{MAX_SLOTS}")
        if maxconn < 0 or per_source < 0:
            raise ValueError("relay limits: limits must be >= 0")
        cdef uint32_t cap = 0
        if per_source:
            want = max(64, 2 * (capacity or maxconn or 65536))
            cap = 64
            while cap < want:
                cap <<= 1
        self.slots = slots
        self.entry_size = ENTRY_HEAD + 4 * <size_t>slots
        cdef size_t head = (sizeof(Header) + 4 * <size_t>slots + 63) & ~(<size_t>63)
        self.size = head + <size_t>cap * self.entry_size
        cdef void* p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                            -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f"relay limits: mmap of {self.size} bytes failed")
        self.base = <char*>p  # zero-filled by the kernel: every entry EMPTY, every count 0
        self.hdr = <Header*>p
        self.open_ = <uint32_t*>(self.base + sizeof(Header))
        self.table = self.base + head
        self.hdr.slots = slots
        self.hdr.capacity = cap
        self.hdr.maxconn = maxconn
        self.hdr.per_source = per_source
        cdef pthread_mutexattr_t attr
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
        rc = pthread_mutex_init(&self.hdr.lock, &attr)
        pthread_mutexattr_destroy(&attr)
        if rc != 0:
            munmap(self.base, self.size)
            self.base = NULL
            raise OSError(rc, "relay limits: pthread_mutex_init failed")

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    # ------------------------------------------------------------------ locking

    cdef void _lock(self) noexcept nogil:
        cdef int rc = pthread_mutex_lock(&self.hdr.lock)
        if rc == EOWNERDEAD:
            # The previous owner died inside a critical section. Single-u32 writes left
            # nothing half done, except a compaction (dirty): wipe the per-source table.
            self.hdr.recovered += 1
            if self.hdr.dirty:
                memset(self.table, 0, <size_t>self.hdr.capacity * self.entry_size)
                self.hdr.used = 0
                self.hdr.tombs = 0
                self.hdr.dirty = 0
                self.hdr.wipes += 1
            pthread_mutex_consistent(&self.hdr.lock)

    cdef void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.hdr.lock)

    # ------------------------------------------------------------------ table

    cdef char* _entry(self, uint32_t i) noexcept:
        return self.table + <size_t>i * self.entry_size

    cdef uint32_t* _counts(self, char* e) noexcept:
        return <uint32_t*>(e + ENTRY_HEAD)

    cdef uint32_t _sum(self, uint32_t* counts) noexcept nogil:
        cdef uint32_t s = 0, i
        for i in range(self.slots):
            s += counts[i]
        return s

    cdef long _find(self, const uint8_t* key, int n, long* free_at) noexcept:
        """Index of the key's entry or -1; ``free_at``: where it would be inserted (-1: full)."""
        cdef uint32_t cap = self.hdr.capacity
        cdef uint32_t mask = cap - 1
        cdef uint32_t i = <uint32_t>(_hash(key, n) & mask)
        cdef uint32_t probes
        cdef char* e
        free_at[0] = -1
        for probes in range(cap):
            e = self._entry(i)
            if e[0] == EMPTY:
                if free_at[0] < 0:
                    free_at[0] = i
                return -1
            if e[0] == TOMB:
                if free_at[0] < 0:
                    free_at[0] = i
            elif <uint8_t>e[1] == n and memcmp(e + 4, key, n) == 0:
                return i
            i = (i + 1) & mask
        return -1

    cdef void _compact(self) noexcept:
        """Rehash the live entries so no tombstone lengthens a probe (under the lock)."""
        cdef uint32_t cap = self.hdr.capacity
        cdef size_t bytes_ = <size_t>cap * self.entry_size
        cdef char* copy = <char*>malloc(bytes_)
        cdef uint32_t i
        cdef long free_at
        cdef char* e
        if copy == NULL:
            return  # keep the tombstones: slower probes, still correct
        memcpy(copy, self.table, bytes_)
        self.hdr.dirty = 1
        memset(self.table, 0, bytes_)
        for i in range(cap):
            e = copy + <size_t>i * self.entry_size
            if e[0] == USED:
                self._find(<const uint8_t*>(e + 4), <uint8_t>e[1], &free_at)
                memcpy(self._entry(<uint32_t>free_at), e, self.entry_size)
        self.hdr.tombs = 0
        self.hdr.dirty = 0
        free(copy)

    # ------------------------------------------------------------------ the API

    def acquire(self, int slot, bytes key=None) -> int:
        """Admit one connection of worker ``slot`` from source ``key`` (None: no per-source
        limit): ADMITTED, or why not (OVER_MAXCONN, OVER_PER_SOURCE, TABLE_FULL)."""
        if slot < 0 or <uint32_t>slot >= self.slots:
            raise ValueError(f"relay limits: slot {slot} out of range")
        cdef const uint8_t* k = NULL
        cdef int n = 0
        if key is not None:
            n = len(key)
            if n < 1 or n > MAX_KEY:
                raise ValueError("relay limits: a key is 1..16 bytes")
            k = <const uint8_t*><char*>key
        cdef long idx, free_at
        cdef char* e
        cdef uint32_t* counts
        self._lock()
        try:
            if self.hdr.maxconn and self._sum(self.open_) >= self.hdr.maxconn:
                return OVER_MAXCONN
            if k != NULL and self.hdr.per_source and self.hdr.capacity:
                idx = self._find(k, n, &free_at)
                if idx >= 0:
                    e = self._entry(<uint32_t>idx)
                    counts = self._counts(e)
                    if self._sum(counts) >= self.hdr.per_source:
                        return OVER_PER_SOURCE
                    counts[slot] += 1
                else:
                    if free_at < 0:
                        return TABLE_FULL
                    e = self._entry(<uint32_t>free_at)
                    if e[0] == TOMB:
                        self.hdr.tombs -= 1
                    memset(e, 0, self.entry_size)
                    e[1] = <char>n
                    memcpy(e + 4, k, n)
                    self._counts(e)[slot] = 1
                    e[0] = USED  # last: the entry is complete before it counts as used
                    self.hdr.used += 1
            self.open_[slot] += 1
            return ADMITTED
        finally:
            self._unlock()

    cdef bint admit_global(self, uint32_t slot) noexcept nogil:
        """acquire(slot) without a source key, for C callers (the core's accept-and-connect
        listeners): True when admitted.  `slot` must be < slots."""
        cdef bint ok
        self._lock()
        ok = not (self.hdr.maxconn and self._sum(self.open_) >= self.hdr.maxconn)
        if ok:
            self.open_[slot] += 1
        self._unlock()
        return ok

    cdef void release_global(self, uint32_t slot) noexcept nogil:
        """release(slot) without a source key, for C callers."""
        self._lock()
        if self.open_[slot]:
            self.open_[slot] -= 1
        self._unlock()

    cdef bint above_share(self, uint32_t slot) noexcept nogil:
        """Does worker `slot` hold more than one connection over the workers' average? Read
        without the lock: a hint for who should accept next, not a count anything relies on."""
        return <uint64_t>self.open_[slot] * self.slots > <uint64_t>self._sum(self.open_) + self.slots

    def release(self, int slot, bytes key=None) -> None:
        """One connection of worker ``slot`` (admitted with ``key``) ended."""
        if slot < 0 or <uint32_t>slot >= self.slots:
            raise ValueError(f"relay limits: slot {slot} out of range")
        cdef long idx, free_at
        cdef char* e
        cdef uint32_t* counts
        self._lock()
        try:
            if self.open_[slot]:
                self.open_[slot] -= 1
            if key is not None and self.hdr.capacity and 1 <= len(key) <= MAX_KEY:
                idx = self._find(<const uint8_t*><char*>key, len(key), &free_at)
                if idx >= 0:
                    e = self._entry(<uint32_t>idx)
                    counts = self._counts(e)
                    if counts[slot]:
                        counts[slot] -= 1
                    if self._sum(counts) == 0:
                        e[0] = TOMB
                        self.hdr.used -= 1
                        self.hdr.tombs += 1
                        if (self.hdr.used + self.hdr.tombs) * 4 > self.hdr.capacity * 3:
                            self._compact()
        finally:
            self._unlock()

    def clear_slot(self, int slot) -> int:
        """Forget every connection of worker ``slot`` (it died: its connections died with it);
        returns how many it held."""
        if slot < 0 or <uint32_t>slot >= self.slots:
            raise ValueError(f"relay limits: slot {slot} out of range")
        cdef uint32_t i, held
        cdef char* e
        cdef uint32_t* counts
        self._lock()
        try:
            held = self.open_[slot]
            self.open_[slot] = 0
            for i in range(self.hdr.capacity):
                e = self._entry(i)
                if e[0] == USED:
                    counts = self._counts(e)
                    counts[slot] = 0
                    if self._sum(counts) == 0:
                        e[0] = TOMB
                        self.hdr.used -= 1
                        self.hdr.tombs += 1
            if self.hdr.capacity and (self.hdr.used + self.hdr.tombs) * 4 > self.hdr.capacity * 3:
                self._compact()
            return held
        finally:
            self._unlock()

    def source_count(self, bytes key) -> int:
        """Connections open from ``key`` over all workers."""
        cdef long idx, free_at
        if not self.hdr.capacity or not 1 <= len(key) <= MAX_KEY:
            return 0
        self._lock()
        try:
            idx = self._find(<const uint8_t*><char*>key, len(key), &free_at)
            return 0 if idx < 0 else self._sum(self._counts(self._entry(<uint32_t>idx)))
        finally:
            self._unlock()

    def stats(self) -> dict:
        """{"open": n, "open_by_slot": [...], "sources": n, "capacity": n, "tombstones": n,
        "recovered": n, "wipes": n}"""
        self._lock()
        try:
            return {
                "open": self._sum(self.open_),
                "open_by_slot": [self.open_[i] for i in range(self.slots)],
                "sources": self.hdr.used,
                "capacity": self.hdr.capacity,
                "tombstones": self.hdr.tombs,
                "recovered": self.hdr.recovered,
                "wipes": self.hdr.wipes,
            }
        finally:
            self._unlock()


__all__ = ["ADMITTED", "OVER_MAXCONN", "OVER_PER_SOURCE", "TABLE_FULL", "SharedLimits"]
