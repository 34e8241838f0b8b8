"""The plain asyncio streams proxy most Python users write: read(64 KiB), write, drain.

Run: python -m bench.competitors.asyncio_streams --listen 127.0.0.1:0 --backend HOST:PORT
(set READ_SIZE in the environment to try another read size: many examples use 4096)
"""

from __future__ import annotations

import asyncio
import os

from bench.competitors.cli import announce, parse

READ_SIZE = int(os.environ.get("READ_SIZE", "65536"))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*backend)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        up_writer.close()
        writer.close()

    server = await asyncio.start_server(handle, *listen, backlog=4096)
    announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main() -> None:
    args = parse(__doc__ or "")
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
