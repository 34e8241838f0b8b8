"""The embedded service, serving form: an asyncio service on uvloop that relays with
relay.start_server().

The core accepts, connects (non-blocking, finished by the core) and relays; Python runs only
the route callback, once per connection (relay/embed_serve.py). This is what an application
pays per connection when it embeds relay and only decides where each client goes.

Run: python -m bench.competitors.embedded_serve --listen 127.0.0.1:0 --backend HOST:PORT
"""

from __future__ import annotations

import asyncio

from bench.competitors.cli import announce, parse


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    import relay

    def route(client: tuple, original_dst: tuple) -> tuple[str, int]:
        return backend

    server = await relay.start_server(listen, route)
    announce(server.address[1])
    await asyncio.Event().wait()


def main() -> None:
    args = parse(__doc__ or "")
    from bench.procs import raise_nofile

    raise_nofile()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
