"""Request/response load generator (own process): N connections ping-pong fixed-size messages.

Each connection sends one message, waits for the whole echo, records the round trip, sends the
next. Prints one JSON line: requests, seconds, rps, p50_us, p99_us, p999_us, errors.

Run: python -m bench.drivers.rr_client --target 127.0.0.1:PORT --conns 16 --size 64 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from array import array
from collections.abc import Callable
from typing import cast

from bench.competitors.cli import hostport


class Pinger(asyncio.Protocol):
    def __init__(self, message: bytes, record_from: float, stop_at: float, samples: array[int],
                 done: asyncio.Future[None]) -> None:
        self.message = message
        self.size = len(message)
        self.record_from_ns = int(record_from * 1e9)
        self.stop_at_ns = int(stop_at * 1e9)
        self.samples = samples
        self.done = done
        self.received = 0
        self.completed = 0  # round trips including the warm-up (for CPU per request)
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.message)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received < self.size:
            return
        self.received -= self.size
        now = time.perf_counter_ns()
        self.completed += 1
        if now >= self.record_from_ns:
            self.samples.append(now - self.sent_at)
        if now >= self.stop_at_ns:
            assert self.transport is not None
            self.transport.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None or time.perf_counter_ns() < self.stop_at_ns:
                self.done.set_exception(ConnectionError(f"connection lost early: {exc}"))
            else:
                self.done.set_result(None)


def _factory(pinger: Pinger) -> Callable[[], Pinger]:
    return lambda: pinger


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return float(sorted_values[index])


async def run(target: tuple[str, int], conns: int, size: int, duration: float,
              warmup: float) -> dict[str, float | str]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    record_from = start + warmup
    stop_at = record_from + duration
    samples: array[int] = array("q")
    futures: list[asyncio.Future[None]] = []
    pingers: list[Pinger] = []
    message = b"x" * size
    for _ in range(conns):
        done: asyncio.Future[None] = loop.create_future()
        futures.append(done)
        pingers.append(Pinger(message, record_from, stop_at, samples, done))
        await loop.create_connection(_factory(pingers[-1]), *target)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), duration + warmup + 30)
    client_cpu = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    errors = [r for r in results if isinstance(r, BaseException)]
    ordered = sorted(samples)
    return {
        "requests": len(ordered),
        "requests_total": sum(p.completed for p in pingers),
        "seconds": duration,
        "client_cpu": client_cpu,  # CPUs used by this generator: near 1.0 would make it the bottleneck
        "rps": len(ordered) / duration,
        "p50_us": percentile(ordered, 0.50) / 1000,
        "p99_us": percentile(ordered, 0.99) / 1000,
        "p999_us": percentile(ordered, 0.999) / 1000,
        "errors": len(errors),
        "error": str(errors[0]) if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=hostport, required=True)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.target, args.conns, args.size, args.duration, args.warmup))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
