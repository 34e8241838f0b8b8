# The C the UDP core calls, declared with exact libc.stdint types: batched datagram system
# calls, control messages, addresses, epoll and a timerfd.  Self-contained (the UDP core is its
# own compilation unit and does not include the TCP core's system.pxi).

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        ENOBUFS
        ENOMEM
        ECONNREFUSED
        EBADF

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_DUPFD_CLOEXEC
    int fcntl(int fd, int cmd, ...)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t count)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t sock_len "socklen_t"
    ctypedef uint16_t sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct msghdr:
        void* msg_name
        sock_len msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    enum:
        AF_INET
        AF_INET6
        SOL_SOCKET
        SO_TYPE
        SOCK_DGRAM
        SOCK_CLOEXEC
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_CTRUNC
    cmsghdr* CMSG_FIRSTHDR(msghdr* m)
    cmsghdr* CMSG_NXTHDR(msghdr* m, cmsghdr* c)
    unsigned char* CMSG_DATA(cmsghdr* c)
    size_t CMSG_SPACE(size_t n)
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, sock_len addrlen)
    int getsockname(int fd, sockaddr* addr, sock_len* addrlen)
    int getsockopt(int fd, int level, int optname, void* optval, sock_len* optlen)
    # Both return how many messages moved; recvmmsg fills msg_len and msg_flags per message.
    # An error after the first message is kept on the socket and reported by the next call.
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    enum:
        SOL_IP
        SOL_IPV6
        INET6_ADDRSTRLEN
    uint16_t ntohs(uint16_t)
    uint16_t htons(uint16_t)

# Linux values (include/uapi/linux/in.h, in6.h); glibc's headers do not all carry them.
cdef enum:
    UDP_IP_ORIGDSTADDR = 20         # cmsg type on SOL_IP: the datagram's original destination
    UDP_IPV6_ORIGDSTADDR = 74       # cmsg type on SOL_IPV6 (same number as IPV6_RECVORIGDSTADDR)

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, sock_len size)
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)

cdef extern from "<time.h>" nogil:
    ctypedef struct udp_timespec "struct timespec":
        long tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, udp_timespec* ts)

cdef extern from "<sys/timerfd.h>" nogil:
    struct itimerspec:
        udp_timespec it_interval
        udp_timespec it_value
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec* new_value, itimerspec* old_value)


cdef inline uint64_t mono_ns() noexcept nogil:
    cdef udp_timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec
