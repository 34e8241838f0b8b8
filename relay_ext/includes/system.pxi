# The C we call directly, declared with exact libc.stdint types.  Everything here is a plain
# system call or constant; nothing from liburing (that comes through its own .pxd files).

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        ECONNRESET
        EPIPE
        ECONNREFUSED
        EHOSTUNREACH
        ENETUNREACH
        ETIMEDOUT
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        ECANCELED
        EINPROGRESS
        ENOENT
        EALREADY
        EINVAL
        EPERM
        ENOSYS
        ETIME
        ECONNABORTED
        EHOSTDOWN
        ENETDOWN
        ENOTCONN

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        F_GETFL
        F_SETFL
        O_NONBLOCK
        O_CLOEXEC
        SPLICE_F_NONBLOCK
        SPLICE_F_MOVE
    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, int64_t* off_in, int fd_out, int64_t* off_out,
                   size_t length, unsigned int flags)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)
    int pipe2(int* fds, int flags)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t sock_len "socklen_t"
    struct sockaddr:
        pass
    struct linger:
        int l_onoff
        int l_linger
    enum:
        SOL_SOCKET
        SO_LINGER
        SO_RCVBUF
        SO_RCVLOWAT
        SO_ERROR
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_DONTWAIT
        MSG_NOSIGNAL
        SHUT_WR
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int optname, const void* optval, sock_len optlen)
    int getsockopt(int fd, int level, int optname, void* optval, sock_len* optlen)
    int accept4(int fd, sockaddr* addr, sock_len* addrlen, int flags)
    int getsockname(int fd, sockaddr* addr, sock_len* addrlen)
    ctypedef unsigned short sa_family_t
    enum:
        AF_INET
        AF_INET6

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
        INET6_ADDRSTRLEN
    uint16_t ntohs(uint16_t)

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, sock_len size)

cdef extern from "<net/if.h>" nogil:
    enum:
        IF_NAMESIZE
    char* if_indextoname(unsigned int ifindex, char* ifname)

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
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<poll.h>" nogil:
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLRDHUP

cdef extern from "<time.h>" nogil:
    ctypedef struct c_timespec "struct timespec":
        long tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, c_timespec* ts)


cdef inline uint64_t now_ns() noexcept nogil:
    cdef c_timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ        # bytes in a socket's send queue not yet acknowledged
        SIOCINQ         # bytes in a TCP socket's receive queue not yet read
