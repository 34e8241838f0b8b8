"""Does an egress slice still fit this host's ephemeral port settings? Asked before connect().

IP_LOCAL_PORT_RANGE is honoured only inside net.ipv4.ip_local_port_range and skips
net.ipv4.ip_local_reserved_ports; a slice outside the range is *silently ignored* and connect()
takes any ephemeral port: the SYN has left from a port of another host's slice before
getsockname() can tell (relay.serve.egress checks after connect() as a last resort). Both
sysctls may change while the relay runs (another daemon, `sysctl --system`, a container
runtime), so the workers re-read them at most once a second, right before a connect() that
needs them, and refuse the connection (reason ``slice_unusable``) while the slice does not fit.
The nft output guard of ``relay nft`` drops what still slips through (relay.ops.nft).
"""

from __future__ import annotations

import time

from relay.config.host import (
    PROC_PORT_RANGE,
    PROC_RESERVED_PORTS,
    read_port_range,
    read_reserved_ports,
)

__all__ = ["REFRESH_S", "SliceWatch", "slice_problem"]

REFRESH_S = 1.0  # the sysctls are re-read at most this often


def slice_problem(lo: int, hi: int, port_range: tuple[int, int],
                  reserved: list[tuple[int, int]]) -> str | None:
    """Why ports ``lo``..``hi`` cannot be an IP_LOCAL_PORT_RANGE slice here, or None."""
    sys_lo, sys_hi = port_range
    if not (sys_lo <= lo and hi <= sys_hi):
        return f"outside net.ipv4.ip_local_port_range {sys_lo}-{sys_hi}"
    for r_lo, r_hi in reserved:
        if r_lo <= hi and lo <= r_hi:
            return f"overlaps net.ipv4.ip_local_reserved_ports {r_lo}-{r_hi}"
    return None


class SliceWatch:
    """The answer of ``slice_problem`` for each slice, from sysctls at most REFRESH_S old.

    One per process is enough (``WATCH``); a read costs two small /proc reads. A sysctl that
    cannot be read makes every slice unusable: fail closed.
    """

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._read_at = -REFRESH_S * 2
        self._range: tuple[int, int] = (0, -1)
        self._reserved: list[tuple[int, int]] = []
        self._error = ""
        self._answers: dict[tuple[int, int], str | None] = {}
        self.reads = 0

    def _refresh(self, now: float) -> None:
        self._read_at = now
        self.reads += 1
        self._answers.clear()
        try:
            self._range = read_port_range()
            self._reserved = read_reserved_ports()
            self._error = ""
        except (OSError, ValueError) as exc:
            self._error = f"cannot read {PROC_PORT_RANGE} / {PROC_RESERVED_PORTS}: {exc}"

    def problem(self, lo: int, hi: int) -> str | None:
        """Why the slice ``lo``..``hi`` is unusable right now, or None when it fits."""
        now = self._clock()  # type: ignore[operator]
        if now - self._read_at >= REFRESH_S:
            self._refresh(now)
        key = (lo, hi)
        try:
            return self._answers[key]
        except KeyError:
            answer = self._error or slice_problem(lo, hi, self._range, self._reserved)
            self._answers[key] = answer
            return answer


WATCH = SliceWatch()
