"""An asyncio.Protocol proxy with flow control (pause_reading while the peer's buffer is full).

EOF from one side closes both (the peer's transport flushes what it holds, then closes): no
half-close. Forwarding the EOF with `write_eof()` instead kills uvloop 0.23 under connection
churn (glibc "double free or corruption", SIGABRT, within a second of `Connection: close`
traffic), which would make every ratio against it meaningless. The bench tables name this
variant.

Run: python -m bench.competitors.asyncio_protocol --listen 127.0.0.1:0 --backend HOST:PORT
"""

from __future__ import annotations

import asyncio
from typing import cast

from bench.competitors.cli import announce, parse


class Half(asyncio.Protocol):
    """One socket of a pair; everything it reads is written to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending: list[bytes] = []
        self.pending_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def link(self, peer: Half) -> None:
        self.peer = peer
        for chunk in self.pending:
            peer.send(chunk)
        self.pending.clear()
        if self.pending_eof:
            peer.send_eof()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes the write buffer first

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.send(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.pending_eof = True
        else:
            self.peer.send_eof()
        return False  # close this side too: no half-close (see the module docstring)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()

    async def connect(client: Half) -> None:
        try:
            _, upstream = await loop.create_connection(Half, *backend)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        upstream.link(client)
        client.link(upstream)

    def accept() -> Half:
        client = Half()
        loop.create_task(connect(client))
        return client

    server = await loop.create_server(accept, *listen, backlog=4096)
    announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main(use_uvloop: bool = False) -> None:
    args = parse(__doc__ or "")
    if use_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
