"""Echo origin for the request/response and idle drivers (uvloop when installed), own process.

Run: python -m bench.drivers.echo_origin --listen 127.0.0.1:0   -> prints 'READY <port>'
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from bench.competitors.cli import announce, parse
from bench.procs import raise_nofile


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(listen: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, *listen, backlog=4096)
    announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main() -> None:
    args = parse(__doc__ or "", backend=False)
    raise_nofile()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
