"""The UDP egress port allocator of one worker: which slice ports serve which destinations.

For UDP the kernel does not keep 4-tuples unique for us (docs/udp.md, "The allocator"):
connect() autobind inside IP_LOCAL_PORT_RANGE gives each port to one socket only (no sharing
across destinations), and SO_REUSEADDR + bind lets two sockets take the same (address, port) and
connect to the same destination without complaint. So the relay allocates:

- this worker uses only its share of the slice: ports ``p`` with ``(p - lo) % nworkers == slot``
  (the workers of one generation hold disjoint sets; generations are disjoint in time);
- per destination (address, port) a set of the ports in use towards it: a port is handed out
  only when that destination's set does not hold it, so (egress address, port, destination) is
  unique; one port serves any number of different destinations at once.

Fail closed: ``take`` returns a port of this worker's share or None (slice exhausted for that
destination), never a port outside it. Not thread-safe: one allocator per UDP loop thread.
"""

from __future__ import annotations

from relay.serve.egress import Egress

__all__ = ["PortAllocator", "SlicePorts"]

Destination = tuple[str, int]


class SlicePorts:
    """One egress slice's share for this worker, and the ports in use per destination."""

    def __init__(self, egress: Egress, slot: int, nworkers: int) -> None:
        if not 0 <= slot < nworkers:
            raise ValueError(f"worker slot {slot} outside 0..{nworkers - 1}")
        self.egress = egress
        first = egress.lo + slot
        self.ports: range = range(first, egress.hi + 1, nworkers)  # empty if first > hi
        self._used: dict[Destination, set[int]] = {}
        self._cursor = 0  # round robin: a port just freed is the last to be reused
        self.in_use = 0  # flows holding a port of this slice (a port counts once per flow)

    def take(self, dest: Destination, skip: frozenset[int] = frozenset()) -> int | None:
        """A port of this share not in use towards ``dest`` (and not in ``skip``), marked used;
        None when there is none."""
        n = len(self.ports)
        used = self._used.get(dest)
        if used is not None and len(used) >= n:
            return None
        for i in range(n):
            port = self.ports[(self._cursor + i) % n]
            if (used is None or port not in used) and port not in skip:
                self._cursor = (self._cursor + i + 1) % n
                if used is None:
                    used = self._used[dest] = set()
                used.add(port)
                self.in_use += 1
                return port
        return None

    def give_back(self, dest: Destination, port: int) -> None:
        used = self._used.get(dest)
        if used is None or port not in used:
            raise KeyError(f"port {port} towards {dest} is not in use")
        used.discard(port)
        self.in_use -= 1
        if not used:
            del self._used[dest]

    def used_towards(self, dest: Destination) -> frozenset[int]:
        return frozenset(self._used.get(dest, ()))


class PortAllocator:
    """Every egress slice's share of this worker (worker ``slot`` of ``nworkers``)."""

    def __init__(self, entries: tuple[Egress, ...], slot: int = 0, nworkers: int = 1) -> None:
        self.slot = slot
        self.nworkers = nworkers
        self._slices = {id(e): SlicePorts(e, slot, nworkers) for e in entries}

    def slice_of(self, egress: Egress) -> SlicePorts:
        return self._slices[id(egress)]

    def describe(self) -> str:
        """"203.0.113.7: 500 of 40000-40999 (slot 0 of 2)", one per slice, for the log."""
        return ", ".join(
            f"{s.egress.address}: {len(s.ports)} of {s.egress.lo}-{s.egress.hi} "
            f"(slot {self.slot} of {self.nworkers})"
            for s in self._slices.values()
        )

    def in_use(self) -> dict[str, int]:
        """Egress address -> ports held by flows (a port held towards k destinations counts k)."""
        out: dict[str, int] = {}
        for s in self._slices.values():
            out[s.egress.address] = out.get(s.egress.address, 0) + s.in_use
        return out
