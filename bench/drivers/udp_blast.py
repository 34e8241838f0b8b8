"""UDP load generator (own process): datagrams of one size at a target, bounded in count and time.

Two modes:
- one flow: a connected socket sends `--size`-byte datagrams, paced at `--rate` per second
  (sent in bursts of 32, sleeping when ahead of schedule; 0 = as fast as this process can);
- `--flows`: every datagram comes from a new source address: a fresh socket bound to the next
  (127.0.0.X, port) pair (X from 2, ports 20000-59999; loopback answers on all of 127/8), so a
  proxy that keys flows by client address sees a new flow for each datagram.

Prints one JSON line: sent, seconds, rate (sent/s), send_errors (ENOBUFS, ECONNREFUSED ...),
bind_skipped (flows mode: source pairs already in use).

Run: python -m bench.drivers.udp_blast --target 127.0.0.1:PORT --size 64 --duration 3 [--rate N] [--flows]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Iterator

from bench.competitors.cli import hostport

BURST = 32
PORTS = range(20000, 60000)


def one_flow(target: tuple[str, int], size: int, duration: float, rate: float, limit: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect(target)
    send = sock.send
    payload = b"x" * size
    sent = errors = 0
    start = time.perf_counter()
    stop = start + duration
    while sent + errors < limit:
        now = time.perf_counter()
        if now >= stop:
            break
        if rate > 0:
            ahead = (sent + errors) / rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
        for _ in range(BURST):
            try:
                send(payload)
                sent += 1
            except OSError:  # ENOBUFS, or ECONNREFUSED after an ICMP port unreachable
                errors += 1
    seconds = time.perf_counter() - start
    sock.close()
    return {"sent": sent, "seconds": seconds, "rate": sent / seconds, "send_errors": errors, "bind_skipped": 0}


def sources() -> Iterator[tuple[str, int]]:
    for host in range(2, 255):
        for port in PORTS:
            yield f"127.0.0.{host}", port


def new_flows(target: tuple[str, int], size: int, duration: float, rate: float, limit: int) -> dict[str, float]:
    payload = b"x" * size
    sent = errors = skipped = 0
    start = time.perf_counter()
    stop = start + duration
    for source in sources():
        if sent + errors >= limit:
            break
        now = time.perf_counter()
        if now >= stop:
            break
        if rate > 0:
            ahead = (sent + errors) / rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(source)
            except OSError:
                skipped += 1
                continue
            try:
                sock.sendto(payload, target)
                sent += 1
            except OSError:
                errors += 1
    seconds = time.perf_counter() - start
    return {"sent": sent, "seconds": seconds, "rate": sent / seconds, "send_errors": errors, "bind_skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=hostport, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=0.0, help="datagrams/s (0: as fast as possible)")
    parser.add_argument("--max", type=int, default=20_000_000, help="stop after this many datagrams")
    parser.add_argument("--flows", action="store_true", help="a new source address per datagram")
    args = parser.parse_args()
    run = new_flows if args.flows else one_flow
    print(json.dumps(run(args.target, args.size, args.duration, args.rate, args.max)), flush=True)


if __name__ == "__main__":
    main()
