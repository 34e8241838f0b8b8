"""Engine selection: the same ``Loop`` interface from the core (uring, epoll) or pure asyncio.

``create(name, **loop_options) -> (loop, reason)`` and ``available() -> {name: None | reason}``
(docs/architecture.md, layer 2). ``"auto"`` prefers io_uring, then epoll (both from
``relay_ext._core``); when the core is not built at all it falls back to the asyncio engine, and
it always logs why it chose what it chose.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import Any, Protocol

from relay.engines.constants import (
    CLOSE_REASONS,
    EV_ACCEPT,
    EV_ACCEPT_ERROR,
    EV_DONE,
    EV_READABLE,
    EV_WATCH_TIMEOUT,
    LOOP_DEFAULTS,
)
from relay.engines.ring_failure import explain_ring_failure, io_uring_disabled

__all__ = [
    "CLOSE_REASONS",
    "ENGINES",
    "EV_ACCEPT",
    "EV_ACCEPT_ERROR",
    "EV_DONE",
    "EV_READABLE",
    "EV_WATCH_TIMEOUT",
    "LOOP_DEFAULTS",
    "EngineLoop",
    "available",
    "create",
]

log = logging.getLogger("relay.engines")

ENGINES: tuple[str, ...] = ("uring", "epoll", "asyncio")
CORE_ENGINES: tuple[str, ...] = ("uring", "epoll")


class EngineLoop(Protocol):
    """The ``Loop`` interface every engine provides (see docs/architecture.md)."""

    backend: str

    def fileno(self) -> int: ...
    def add_listener(self, fd: int, tag: int, local_address: bool = False) -> None: ...
    def remove_listener(self, tag: int) -> None: ...
    def pause_accept(self, tag: int) -> None: ...
    def resume_accept(self, tag: int) -> None: ...
    def add_pair(self, client_fd: int, upstream_fd: int, tag: int = 0,
                 connecting: bool = False, prefix: bytes = b"", *,
                 client_accepted: bool = False, upstream_nonblocking: bool = False) -> int: ...
    def abort(self, cid: int) -> None: ...
    def watch(self, fd: int, tag: int, timeout_ms: int) -> int: ...
    def unwatch(self, wid: int) -> bool: ...
    def kill(self, cid: int) -> bool: ...
    # (cid, tag, connecting, c2s_bytes, s2c_bytes, age_us, idle_us): the session table
    def pair_info(self, cid: int) -> tuple[int, int, bool, int, int, int, int] | None: ...
    def pairs(self) -> list[tuple[int, int, bool, int, int, int, int]]: ...
    def run(self, timeout_ms: int) -> list[tuple[Any, ...]]: ...
    def stats(self) -> dict[str, int]: ...
    def set_connect_buckets(self, bounds_us: tuple[int, ...] | list[int]) -> None: ...
    # (per-bucket counts, +Inf last; sum of connect times in us; count)
    def connect_histogram(self) -> tuple[list[int], int, int]: ...
    def close(self) -> None: ...


def _core_loop_class() -> Any:
    from relay_ext._core import Loop

    return Loop


def _describe_start_failure(name: str, exc: OSError) -> str:
    what = f"{name} backend cannot start: {exc.strerror or exc} (errno {exc.errno})"
    if name == "uring" and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOMEM):
        return what + ": " + explain_ring_failure(exc.errno, io_uring_disabled())
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return what + ": out of file descriptors or memory"
    return what


@functools.lru_cache(maxsize=1)
def available() -> dict[str, str | None]:
    """Map each engine name to ``None`` when usable here, else the reason it is not.

    The core engines are probed by starting a tiny loop of each backend (probing the feature,
    not the kernel version). The answer is cached for the life of the process.
    """
    result: dict[str, str | None] = {}
    try:
        loop_class = _core_loop_class()
    except ImportError as exc:
        reason = f"relay_ext._core is not importable ({exc}); build it with `make build`"
        for name in CORE_ENGINES:
            result[name] = reason
    else:
        for name in CORE_ENGINES:
            try:
                probe = loop_class(backend=name, max_conns=4, max_pipes=1)
            except OSError as exc:
                result[name] = _describe_start_failure(name, exc)
            else:
                probe.close()
                result[name] = None
    result["asyncio"] = None
    return result


def create(name: str, **loop_options: Any) -> tuple[EngineLoop, str]:
    """Start an engine loop; returns ``(loop, one-line reason for the choice)``.

    ``name``: ``"auto"``, ``"uring"``, ``"epoll"`` or ``"asyncio"``. A named engine that cannot
    start raises ``OSError``/``ImportError`` with the cause; ``"auto"`` tries uring, then epoll,
    then (only when the core is not built) asyncio, and logs why it settled where it did.
    """
    loop_options.pop("backend", None)
    if name == "asyncio":
        return _create_asyncio(loop_options), "engine asyncio requested"
    if name in CORE_ENGINES:
        return _create_core(name, loop_options), f"engine {name} requested"
    if name != "auto":
        raise ValueError(f"engine {name!r}: unknown; choose one of auto, {', '.join(ENGINES)}")

    try:
        loop_class = _core_loop_class()
    except ImportError as exc:
        reason = (f"auto: asyncio engine (relay_ext._core is not importable: {exc}; "
                  "build it with `make build` for uring/epoll)")
        log.warning("%s", reason)
        return _create_asyncio(loop_options), reason
    failures: list[str] = []
    for candidate in CORE_ENGINES:
        try:
            loop = loop_class(backend=candidate, **loop_options)
        except OSError as exc:
            failures.append(_describe_start_failure(candidate, exc))
            continue
        if failures:
            reason = f"auto: {candidate} engine because {'; '.join(failures)}"
            log.warning("%s", reason)
        else:
            reason = f"auto: {candidate} engine (io_uring available)"
            log.info("%s", reason)
        return loop, reason
    raise OSError(errno.ENOTSUP, "auto: no core engine can start: " + "; ".join(failures))


def _create_core(name: str, loop_options: dict[str, Any]) -> EngineLoop:
    loop_class = _core_loop_class()
    try:
        loop: EngineLoop = loop_class(backend=name, **loop_options)
    except OSError as exc:
        raise OSError(exc.errno, _describe_start_failure(name, exc)) from exc
    return loop


def _create_asyncio(loop_options: dict[str, Any]) -> EngineLoop:
    from relay.engines.aio import AioLoop

    return AioLoop(**loop_options)
