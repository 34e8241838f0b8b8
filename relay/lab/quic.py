"""HTTP/3 over QUIC in the lab (aioquic): a server that says which address it was reached from
and a client that fetches one page, each a process inside a network namespace.

    python -m relay.lab.quic serve --cert C --key K HOST:PORT...   # prints READY, serves
    python -m relay.lab.quic get --ca C --server-name NAME HOST:PORT [PATH]   # prints JSON

The server answers every GET with ``SEEN <peer> <local> <path>`` (the source its kernel saw:
through a transparent relay, the soft-unicast address and a slice port). ``self_signed``
writes the certificate and key the two share (cryptography comes with aioquic). aioquic is
optional: ``quic_unavailable_reason()`` says when it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay.sock import format_address

__all__ = ["fetch", "main", "quic_unavailable_reason", "self_signed", "serve"]


def quic_unavailable_reason() -> str | None:
    try:
        import aioquic  # noqa: F401
        import cryptography  # noqa: F401
    except ImportError as exc:
        return f"aioquic is not installed ({exc}; pip install aioquic)"
    return None


def self_signed(directory: str | Path, name: str = "origin.test") -> tuple[Path, Path]:
    """A self-signed EC certificate for ``name`` (also its own CA); returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(directory) / f"{name}.pem", Path(directory) / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _fmt(addr: Any) -> str:
    host = str(ipaddress.ip_address(addr[0].split("%")[0]))
    mapped = ipaddress.ip_address(host)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        host = str(mapped.ipv4_mapped)
    return format_address((host, addr[1]))


# -- the server ---------------------------------------------------------------------------------


async def serve(binds: Sequence[tuple[str, int]], cert: str, key: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.asyncio import serve as quic_serve
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent

    def protocol_for(local: str) -> type:
        class SeenServer(QuicConnectionProtocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._h3 = H3Connection(self._quic)

            def quic_event_received(self, event: QuicEvent) -> None:
                for ev in self._h3.handle_event(event):
                    if not isinstance(ev, HeadersReceived):
                        continue
                    headers = dict(ev.headers)
                    peer = self._quic.get_peer_address()
                    path = headers.get(b":path", b"/").decode()
                    body = f"SEEN {_fmt(peer)} {local} {path}\n".encode()
                    self._h3.send_headers(ev.stream_id, [
                        (b":status", b"200"), (b"content-type", b"text/plain"),
                        (b"content-length", str(len(body)).encode())])
                    self._h3.send_data(ev.stream_id, body, end_stream=True)
                self.transmit()

        return SeenServer

    bound = []
    for host, port in binds:
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(cert, key)
        local = format_address((host, port))
        await quic_serve(host, port, configuration=config, create_protocol=protocol_for(local))
        bound.append(local)
    print("READY " + " ".join(bound), flush=True)
    await asyncio.Event().wait()


# -- the client ---------------------------------------------------------------------------------


async def fetch(dest: tuple[str, int], path: str, ca: str, server_name: str,
                timeout: float = 10.0) -> dict[str, Any]:
    """One HTTP/3 GET of ``path`` from ``dest``: status, body, seconds."""
    from aioquic.asyncio import QuicConnectionProtocol
    from aioquic.asyncio.client import connect
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import DataReceived, HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import QuicEvent

    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    answer: dict[str, Any] = {"status": 0, "body": b""}

    class Client(QuicConnectionProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.h3 = H3Connection(self._quic)

        def quic_event_received(self, event: QuicEvent) -> None:
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    answer["status"] = int(dict(ev.headers).get(b":status", b"0"))
                elif isinstance(ev, DataReceived):
                    answer["body"] += ev.data
                if getattr(ev, "stream_ended", False) and not done.done():
                    done.set_result(answer)

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    config.load_verify_locations(ca)
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        async with connect(dest[0], dest[1], configuration=config,
                           create_protocol=Client) as client:
            assert isinstance(client, Client)
            stream = client._quic.get_next_available_stream_id()
            authority = f"{server_name}:{dest[1]}".encode()
            client.h3.send_headers(stream, [
                (b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
                (b":path", path.encode()), (b"user-agent", b"relay-lab")], end_stream=True)
            client.transmit()
            result = await done
    return {"dest": _fmt(dest), "status": result["status"],
            "body": result["body"].decode(errors="replace"),
            "seconds": round(time.monotonic() - started, 4)}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(args: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relay.lab.quic", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("binds", nargs="+", metavar="HOST:PORT")
    g = sub.add_parser("get")
    g.add_argument("--ca", required=True)
    g.add_argument("--server-name", default="origin.test")
    g.add_argument("--timeout", type=float, default=10.0)
    g.add_argument("dest", metavar="HOST:PORT")
    g.add_argument("path", nargs="?", default="/")
    opts = p.parse_args(args)
    if opts.cmd == "serve":
        asyncio.run(serve([_hostport(b) for b in opts.binds], opts.cert, opts.key))
        return 0
    try:
        result = asyncio.run(fetch(_hostport(opts.dest), opts.path, opts.ca,
                                   opts.server_name, opts.timeout))
    except (OSError, TimeoutError, ConnectionError) as exc:
        print(f"quic get {opts.dest}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
