# user_data (io_uring) / epoll_data (epoll) and connection ids: packed integers, never pointers.
#   user_data:     op (8 bits) | generation (24 bits) | slot (32 bits)
#   connection id:               generation (24 bits) | slot (32 bits)
# A slot's generation is bumped when it is freed, so a completion or an id that outlived its
# connection (or listener) no longer matches and is dropped.
# Shared by both cores: _core.pyx (TCP) and _udp.pyx (UDP flows, ops UK_*) include this file.

cdef enum:
    GEN_MASK = 0xFFFFFF         # the generation bits kept in a user_data / connection id


cdef inline uint64_t pack_ud(uint64_t op, uint32_t gen, uint32_t idx) noexcept nogil:
    return (op << 56) | ((<uint64_t>(gen & GEN_MASK)) << 32) | <uint64_t>idx


cdef inline uint32_t ud_op(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud >> 56)


cdef inline uint32_t ud_gen(uint64_t ud) noexcept nogil:
    return <uint32_t>((ud >> 32) & GEN_MASK)


cdef inline uint32_t ud_slot(uint64_t ud) noexcept nogil:
    return <uint32_t>(ud & 0xFFFFFFFFULL)


cdef inline bint gen_matches(uint32_t current, uint32_t packed) noexcept nogil:
    """Does a generation carried in a user_data or id name the slot's current occupant?"""
    return (current & GEN_MASK) == packed


cdef inline int64_t pack_cid(uint32_t gen, uint32_t idx) noexcept nogil:
    return (<int64_t>(gen & GEN_MASK) << 32) | <int64_t>idx
