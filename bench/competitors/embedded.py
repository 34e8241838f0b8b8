"""The embedded service: an asyncio service on uvloop that relays with relay.splice().

Accepts with `loop.sock_accept`, connects upstream with `loop.sock_connect`, then awaits
`relay.splice(client, upstream)` (relay/embed.py: the core moves the bytes, the event loop only
drives it). This is what an application that embeds relay pays per connection.

Run: python -m bench.competitors.embedded --listen 127.0.0.1:0 --backend HOST:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from bench.competitors.cli import announce, parse


async def handle(client: socket.socket, backend: tuple[str, int]) -> None:
    import relay

    loop = asyncio.get_running_loop()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    upstream.setblocking(False)
    try:
        await loop.sock_connect(upstream, backend)
    except OSError:
        upstream.close()
        client.close()
        return
    # splice() takes both sockets over (detached: it closes them when the pair is done).
    with contextlib.suppress(OSError):
        await relay.splice(client, upstream)


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(4096)
    lsock.setblocking(False)
    announce(lsock.getsockname()[1])
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(lsock)
        client.setblocking(False)
        task = loop.create_task(handle(client, backend))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    args = parse(__doc__ or "")
    from bench.procs import raise_nofile

    raise_nofile()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
