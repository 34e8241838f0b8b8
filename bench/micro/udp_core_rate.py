"""Datagrams per second through relay_ext._udp.UdpLoop on loopback (a measurement, not a test).

One flow, client -> listener -> loop -> upstream -> sink.  The client and the sink are separate
processes (plain Python sendto/recv, so on a small machine they can be the limit: the loop's
own CPU per million datagrams is printed next to the rate).  Prints, per datagram size: datagrams
per second forwarded, loss at the sink, the average recvmmsg batch and the loop's CPU time.

    python bench/micro/udp_core_rate.py [--count 200000] [--batch 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
from multiprocessing.connection import Connection

from relay_ext._udp import UEV_NEW_FLOW, UdpLoop


def sink(conn: Connection) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("127.0.0.1", 0))
    conn.send(s.getsockname())
    s.settimeout(1.0)
    n = 0
    t_first = t_last = 0.0
    buf = bytearray(65536)
    while True:
        try:
            s.recv_into(buf)
        except TimeoutError:
            if n > 1:
                break
            continue
        n += 1
        t_last = time.monotonic()
        if n == 2:                         # the first datagram after the hello
            t_first = t_last
    conn.send((n, t_last - t_first))


def direct(size: int, count: int) -> dict[str, float]:
    """The same blaster straight into the sink: what the client and sink alone reach."""
    ctx = mp.get_context("fork")
    sink_here, sink_there = ctx.Pipe()
    blast_here, blast_there = ctx.Pipe()
    sink_proc = ctx.Process(target=sink, args=(sink_there,))
    sink_proc.start()
    blast_proc = ctx.Process(target=blast, args=(sink_here.recv(), size, count, blast_there))
    blast_proc.start()
    blast_here.send(True)
    sent = blast_here.recv()
    received, elapsed = sink_here.recv()
    blast_proc.join()
    sink_proc.join()
    return {"size": size, "rate": (received - 2) / max(elapsed, 1e-6),
            "loss_pct": 100.0 * (sent - (received - 1)) / sent}


def blast(target: tuple[str, int], size: int, count: int, conn: Connection) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.connect(target)
    s.send(b"hello")                       # the flow's first datagram
    conn.recv()                            # the flow exists: go
    payload = b"x" * size
    send = s.send
    for _ in range(count):
        send(payload)
    conn.send(count)


def measure(size: int, count: int, batch: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    lsn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    lsn.bind(("127.0.0.1", 0))
    lsn.setblocking(False)
    sink_here, sink_there = ctx.Pipe()
    blast_here, blast_there = ctx.Pipe()
    sink_proc = ctx.Process(target=sink, args=(sink_there,))
    sink_proc.start()
    sink_addr = sink_here.recv()
    blast_proc = ctx.Process(target=blast, args=(lsn.getsockname(), size, count, blast_there))
    blast_proc.start()
    with UdpLoop(batch=batch, idle_timeout_ms=10_000) as u:
        u.add_listener(lsn.fileno(), 1, False)
        flowing = False
        while not flowing:
            for ev in u.run(100):
                if ev[0] == UEV_NEW_FLOW:
                    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
                    up.connect(sink_addr)
                    u.add_flow(ev[2], up.detach(), -1, 0, 0)
                    flowing = True
        base = u.stats()
        blast_here.send(True)
        cpu0 = time.thread_time()
        t_first = t_last = 0.0
        last_count = base["dgrams_c2s"]
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            u.run(50)
            n = u.stats()["dgrams_c2s"]
            now = time.monotonic()
            if n != last_count:
                if not t_first:
                    t_first = now
                t_last = now
                last_count = n
                quiet_since = now
        cpu = time.thread_time() - cpu0
        st = u.stats()
    sent = blast_here.recv()
    received = sink_here.recv()[0] - 1     # minus the hello
    blast_proc.join()
    sink_proc.join()
    lsn.close()
    forwarded = st["dgrams_c2s"] - base["dgrams_c2s"]
    calls = st["recv_calls"] - base["recv_calls"]
    dgrams = st["recv_dgrams"] - base["recv_dgrams"]
    elapsed = max(t_last - t_first, 1e-6)
    return {
        "size": size,
        "sent": sent,
        "forwarded": forwarded,
        "rate": forwarded / elapsed,
        "loss_pct": 100.0 * (sent - received) / sent,
        "avg_batch": dgrams / calls if calls else 0.0,
        "cpu_s_per_million": cpu / forwarded * 1e6 if forwarded else 0.0,
        "drop_send": st["drop_send"] - base["drop_send"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    print(f"relay_ext._udp on loopback, batch={args.batch}, {os.cpu_count()} CPUs, "
          f"{args.count} datagrams per size")
    print("The client sends as fast as Python can (unpaced): loss is at that offered load.")
    print(f"{'path':>7} {'size':>5} {'dgrams/s':>10} {'loss %':>7} {'avg recvmmsg batch':>19} "
          f"{'loop CPU s / 1M':>16}")
    for size in (64, 1200):
        d = direct(size, args.count)
        print(f"{'direct':>7} {d['size']:>5} {d['rate']:>10.0f} {d['loss_pct']:>7.2f}")
        r = measure(size, args.count, args.batch)
        print(f"{'relay':>7} {r['size']:>5} {r['rate']:>10.0f} {r['loss_pct']:>7.2f} "
              f"{r['avg_batch']:>19.1f} {r['cpu_s_per_million']:>16.2f}")


if __name__ == "__main__":
    main()
