"""How evenly do worker loops sharing one listening socket split the connections?

    PYTHONPATH=$PWD python -m bench.worker_balance [--conns 2000] [--workers 2] [--backends uring,epoll]

Forks N processes, each running a relay_ext._core.Loop on one inherited listening socket (as
`relay run --workers N` does), opens short connections (connect, close) from the parent, and
prints each process's accepted count.  A measurement, not a test: the numbers go in
docs/worker-balance.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time

from relay_ext._core import EV_ACCEPT, Loop


def serve(listener: socket.socket, backend: str, out: int) -> None:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    accepted = 0
    with Loop(backend) as loop:
        loop.add_listener(listener.fileno(), 1)
        os.write(out, b"r")
        while not stop:
            for ev in loop.run(100):
                if ev[0] == EV_ACCEPT:
                    accepted += 1
                    os.close(ev[2])
    os.write(out, f"{accepted}\n".encode())


def measure(backend: str, workers: int, conns: int) -> list[int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    addr = listener.getsockname()
    pids, pipes = [], []
    for _ in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                serve(listener, backend, w)
            finally:
                os._exit(0)
        os.close(w)
        pids.append(pid)
        pipes.append(r)
    for r in pipes:
        os.read(r, 1)  # each loop is armed
    for _ in range(conns):
        with socket.create_connection(addr) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    time.sleep(0.5)
    counts = []
    for pid, r in zip(pids, pipes, strict=True):
        os.kill(pid, signal.SIGTERM)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.waitpid(pid, 0)
        os.close(r)
        counts.append(int(data.strip() or 0))
    listener.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backends", default="uring,epoll")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    for backend in args.backends.split(","):
        for _ in range(args.runs):
            counts = measure(backend, args.workers, args.conns)
            shares = " / ".join(f"{c} ({100 * c / max(sum(counts), 1):.0f} %)" for c in counts)
            print(f"{backend}: {sum(counts)} of {args.conns} accepted: {shares}")


if __name__ == "__main__":
    main()
