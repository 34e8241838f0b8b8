"""Counting UDP sink: the origin of the UDP metrics (own process, long-lived, never answers).

Counts every datagram and byte that reaches its data port. A second UDP socket, the control
port, answers any datagram with the totals as JSON ({"datagrams": n, "bytes": n}), so the harness
reads the counters before and after each run without going through the proxy.

Run: python -m bench.drivers.udp_sink --listen 127.0.0.1:0
  -> prints 'READY <data port> control=<control port>'
"""

from __future__ import annotations

import json
import socket
import threading

from bench.competitors.cli import hostport

RCVBUF = 16 << 20  # so that the sink is not where datagrams are lost
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python 3.11's socket lacks the name


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # beyond rmem_max: root
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((host, port))
    return sock


def control_port(ready_line: str) -> int:
    """The control port named in the READY line ('READY 4000 control=4001')."""
    for token in ready_line.split():
        if token.startswith("control="):
            return int(token.split("=", 1)[1])
    raise ValueError(f"no control= in {ready_line!r}")


def query(port: int, timeout: float = 2.0) -> dict[str, int]:
    """Ask a running sink (its control port on 127.0.0.1) for its totals."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"?", ("127.0.0.1", port))
        data, _ = sock.recvfrom(4096)
    counts: dict[str, int] = json.loads(data)
    return counts


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=hostport, default=("127.0.0.1", 0))
    args = parser.parse_args()
    data = _bind(*args.listen)
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.bind((args.listen[0], 0))
    totals = [0, 0]  # datagrams, bytes: written by the receive loop only

    def answer() -> None:
        while True:
            _, peer = control.recvfrom(64)
            control.sendto(json.dumps({"datagrams": totals[0], "bytes": totals[1]}).encode(), peer)

    threading.Thread(target=answer, daemon=True).start()
    print(f"READY {data.getsockname()[1]} control={control.getsockname()[1]}", flush=True)
    buf = bytearray(65536)
    recv_into = data.recv_into
    while True:
        n = recv_into(buf)
        totals[0] += 1
        totals[1] += n


if __name__ == "__main__":
    main()
