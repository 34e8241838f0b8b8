"""Type stubs for relay's Cython core (relay_ext/_core.pyx)."""

from types import TracebackType
from typing import Any, Final

from relay_ext._limits import SharedLimits

EV_ACCEPT: Final[int]
EV_ACCEPT_ERROR: Final[int]
EV_DONE: Final[int]
EV_READABLE: Final[int]
EV_WATCH_TIMEOUT: Final[int]
EV_PAIR: Final[int]
REASONS: Final[tuple[str, ...]]
ACCEPT_PAUSE_ERRNOS: Final[frozenset[int]]
ACCEPT_BACKOFF_FIRST_S: Final[float]
ACCEPT_BACKOFF_MAX_S: Final[float]
CONNECT_ERRNO_REASONS: Final[dict[int, int]]
CYTHON_VERSION: Final[str]
LIBURING_HEADERS: Final[str]

# run() returns tuples of these shapes:
#   (EV_ACCEPT, listener_tag, fd, peer, local)   fd: O_NONBLOCK, SO_LINGER {1, 0} inherited
#       from the listener; peer: (ip, port) as accept4() gave it, None for a unix peer; local:
#       (ip, port) of the accepted socket when add_listener(local_address=True), else None
#   (EV_ACCEPT_ERROR, listener_tag, errno)
#   (EV_DONE, conn_id, tag, reason, c2s_bytes, s2c_bytes, spliced, copied, duration_us, errno)
#   (EV_READABLE, watch_tag, fd)        a watched fd turned readable (or hung up)
#   (EV_WATCH_TIMEOUT, watch_tag, fd)   a watched fd stayed silent until its deadline
#   (EV_PAIR, conn_id, listener_tag, peer)   a connect_to listener's client, admitted
#       (set_limits), connected and relayed by the loop itself; peer as EV_ACCEPT's
Event = tuple[int, ...]
# pair_info() / pairs(): (cid, tag, connecting, c2s_bytes, s2c_bytes, age_us, idle_us)
PairInfo = tuple[int, int, bool, int, int, int, int]

class Loop:
    def __init__(
        self,
        backend: str = "uring",
        *,
        pipe_size: int = 1048576,
        max_pipes: int = 256,
        max_conns: int = 65536,
        splice_min: int = 4096,
        splice: bool = True,
        connect_timeout_ms: int = 5000,
        idle_timeout_ms: int = 300000,
        half_close_timeout_ms: int = 60000,
        ring_entries: int = 1024,
        pipes_keep_idle: int = 8,
        pipe_release_ms: int = 10000,
        socket_rcvbuf: int = 0,
        socket_rcvlowat: int = 0,
        rcvlowat_wait_us: int = 1000,
    ) -> None: ...
    @property
    def backend(self) -> str: ...
    def fileno(self) -> int: ...
    def wakeup_fd(self) -> int:
        """The write end of the loop's signal wake-up pipe (non-blocking), for
        signal.set_wakeup_fd(): any byte written to it ends run()'s wait. Made on the first
        call, owned by the loop (close() closes it), takes no connection slot."""
    def add_listener(self, fd: int, tag: int, local_address: bool = False,
                     connect_to: bytes | None = None) -> None:
        """connect_to (packed sockaddr_in/sockaddr_in6): accept-and-connect in the core; each
        client admitted, connected and fitting the table is one EV_PAIR, any other an
        ordinary EV_ACCEPT (no count held)."""
    def set_limits(self, limits: SharedLimits | None, slot: int = 0) -> None:
        """Admit connect_to listeners' clients through `limits` as worker `slot` (one count
        each, no source key; the caller releases it); None admits every one."""
    def remove_listener(self, tag: int) -> None: ...
    def pause_accept(self, tag: int) -> None: ...
    def resume_accept(self, tag: int) -> None: ...
    def add_pair(
        self,
        client_fd: int,
        upstream_fd: int,
        tag: int = 0,
        connecting: bool = False,
        prefix: bytes = b"",
        *,
        client_accepted: bool = False,
        upstream_nonblocking: bool = False,
    ) -> int:
        """client_accepted: client_fd is as this loop's EV_ACCEPT gave it (non-blocking,
        SO_LINGER {1, 0} inherited from the listener); upstream_nonblocking: upstream_fd was
        made with SOCK_NONBLOCK. Each skips the checks (system calls) it makes redundant."""
    def add_pair_connect(
        self,
        client_fd: int,
        sockaddr: bytes,
        tag: int = 0,
        prefix: bytes = b"",
        *,
        client_accepted: bool = False,
    ) -> int:
        """add_pair with an upstream the loop opens itself: a non-blocking TCP socket with
        TCP_NODELAY connecting to `sockaddr` (a packed sockaddr_in / sockaddr_in6:
        relay.sock.pack_sockaddr; ValueError otherwise), relayed as add_pair(...,
        connecting=True). Returns the id, or -errno when socket() or connect() failed at once
        (nothing opened, client_fd still the caller's); raises as add_pair does."""
    def abort(self, cid: int) -> bool: ...
    def export_pair(self, cid: int) -> dict[str, Any]:
        """Stop relaying `cid` and return its state: client_fd, upstream_fd, tag, start_ns,
        last_ns, connect_us, export_ns (CLOCK_MONOTONIC ns) and halves (c2s, s2c), each a dict
        of pipe_r, pipe_w, pipe_len, buf, eof, shut, stream, no_splice, nbytes, spliced,
        copied. The descriptors now belong to the caller. KeyError: unknown id;
        ValueError: still connecting."""
    def import_pair(self, state: dict[str, Any], tag: int | None = None) -> int:
        """Resume a pair from export_pair()'s dict; the loop owns its descriptors from now on."""
    def watch(self, fd: int, tag: int, timeout_ms: int) -> int:
        """One EV_READABLE or EV_WATCH_TIMEOUT for `fd` (not read, not owned); returns an id."""
    def unwatch(self, wid: int) -> bool: ...
    def kill(self, cid: int) -> bool:
        """abort() at an operator's request: the pair ends with reason "killed"."""
    def pair_info(self, cid: int) -> PairInfo | None: ...
    def pairs(self) -> list[PairInfo]: ...
    def run(self, timeout_ms: int = 0) -> list[Event]: ...
    def set_connect_buckets(self, bounds_us: tuple[int, ...] | list[int]) -> None:
        """Bounds (us, increasing, at most 32, +Inf implied) of the connect-time histogram;
        resets its counts (call once, before the first pair)."""
    def connect_histogram(self) -> tuple[list[int], int, int]:
        """(per-bucket counts, not cumulative, +Inf last; sum of connect times in us; count),
        every pair the core saw connect; readable after close()."""
    def stats(self) -> dict[str, int]:
        """Counters; after close() the counters as close() left them (never raises)."""
    # Every other method raises RuntimeError("relay core: the loop is closed") after close().
    def close(self) -> None: ...
    def __enter__(self) -> Loop: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
