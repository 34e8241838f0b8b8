"""Type stubs for relay's UDP datagram core (relay_ext/_udp.pyx)."""

from types import TracebackType
from typing import Final

UEV_NEW_FLOW: Final[int]
UEV_FLOW_DONE: Final[int]
UDP_REASONS: Final[tuple[str, ...]]   # index = reason int in UEV_FLOW_DONE

Address = tuple[str, int]

# run() returns tuples of these shapes:
#   (UEV_NEW_FLOW, listener_tag, pending_id, client, orig_dst)      orig_dst None unless transparent
#   (UEV_FLOW_DONE, fid, tag, reason, dgrams_c2s, bytes_c2s, dgrams_s2c, bytes_s2c,
#    duration_us, errno, client)
Event = tuple[int, int, int, Address, Address | None] | tuple[int, ...]

class UdpLoop:
    def __init__(
        self,
        *,
        max_flows: int = 65536,
        idle_timeout_ms: int = 60000,
        batch: int = 32,
        max_pending: int = 8,
        max_pending_flows: int = 1024,
        max_holds: int = 4096,
        max_pending_bytes: int = 4194304,
        max_datagram: int = 65536,
    ) -> None: ...
    def fileno(self) -> int: ...
    def add_listener(
        self,
        fd: int,
        tag: int,
        transparent: bool,
        *,
        backend: tuple[str | int, ...] | None = None,
        responses: int = 0,
        oneway: bool = False,
    ) -> None: ...
    def remove_listener(self, tag: int) -> None: ...
    def add_flow(
        self, pending_id: int, upstream_fd: int, reply_fd: int, responses: int, tag: int
    ) -> int: ...
    def refuse_flow(self, pending_id: int, hold_ms: int) -> None: ...
    def close_flow(self, fid: int) -> bool: ...
    def close_flows(self) -> int: ...
    def run(self, timeout_ms: int = 0) -> list[Event]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> UdpLoop: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
