"""Shared command line of the standalone proxy scripts: --listen HOST:PORT --backend HOST:PORT."""

from __future__ import annotations

import argparse


def hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def parse(description: str, backend: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", type=hostport, default=("127.0.0.1", 0))
    if backend:
        parser.add_argument("--backend", type=hostport, required=True)
    return parser.parse_args()


def announce(port: int) -> None:
    """Tell the harness we are listening: 'READY <port>'."""
    print(f"READY {port}", flush=True)
