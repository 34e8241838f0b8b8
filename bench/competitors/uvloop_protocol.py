"""The asyncio.Protocol proxy of asyncio_protocol.py running on uvloop.

Run: python -m bench.competitors.uvloop_protocol --listen 127.0.0.1:0 --backend HOST:PORT
"""

from __future__ import annotations

from bench.competitors.asyncio_protocol import main

if __name__ == "__main__":
    main(use_uvloop=True)
