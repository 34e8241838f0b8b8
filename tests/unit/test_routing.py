"""Router in backend mode on real loopback sockets: PROXY v2 prefix, trusted-proxy header
stripping, untrusted bytes never parsed, loop refusal; tproxy/redirect denials on loopback.

The upstream fd the router returns is driven by hand here (wait for the connect, send the
prefix) exactly as the core would, so the backend sees what it would see through the relay.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from relay import config
from relay.serve import proxyproto
from relay.serve.routing import Denied, Router, Upstream
from relay.sock import check_address_free, open_listener, original_destination


class BackendServer:
    """Blocking TCP or unix server on a thread: accepts connections, records what each sent."""

    def __init__(self, family: int = socket.AF_INET, path: str | None = None) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(path if path is not None else ("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                chunks = []
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        chunks.append(chunk)
                self.received.append(b"".join(chunks))

    def wait_received(self, n: int = 1, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def backend() -> Iterator[BackendServer]:
    server = BackendServer()
    yield server
    server.close()


def make_cfg(text: str) -> config.Config:
    return config.loads(text)


def accept_one(listener: socket.socket, client: socket.socket) -> socket.socket:
    """The accepted socket for `client`, non-blocking like the core hands it over."""
    ready, _, _ = select.select([listener], [], [], 5)
    assert ready, "listener never became readable"
    conn, _ = listener.accept()
    conn.setblocking(False)
    return conn


def finish_upstream(up: Upstream, payload: bytes = b"") -> None:
    """What the core does with an Upstream: wait for connect, check SO_ERROR, send prefix."""
    sock = socket.socket(fileno=up.fd)
    try:
        if up.connecting:
            _, writable, _ = select.select([], [sock], [], 5)
            assert writable, "upstream connect did not complete"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sock.setblocking(True)
        sock.sendall(up.prefix + payload)
    finally:
        sock.close()


@contextlib.contextmanager
def relay_listener(cfg: config.Config) -> Iterator[tuple[Router, socket.socket]]:
    lc = cfg.listener[0]
    listener = open_listener(lc.bind_address)
    router = Router(lc, cfg, set())
    try:
        yield router, listener
    finally:
        router.close()
        listener.close()


def test_backend_plain_has_no_prefix_and_connects(backend: BackendServer) -> None:
    cfg = make_cfg(f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{backend.address[1]}"\n')
    with relay_listener(cfg) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            conn = accept_one(listener, client)
            up = router.open_upstream(conn)
            assert up.prefix == b"" and up.dest == ("127.0.0.1", backend.address[1])
            assert up.egress is None and up.egress_address is None
            finish_upstream(up, b"hello")
            conn.close()
    assert backend.wait_received() == [b"hello"]


def test_both_relayed_sockets_have_tcp_nodelay(backend: BackendServer) -> None:
    """Nagle on either side holds a short tail behind an unacknowledged segment until the
    peer's delayed ACK (40 ms): the accepted socket inherits TCP_NODELAY from the listener, the
    upstream socket sets it itself."""
    cfg = make_cfg(f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{backend.address[1]}"\n')
    with relay_listener(cfg) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            conn = accept_one(listener, client)
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            up = router.open_upstream(conn)
            upstream = socket.socket(fileno=up.fd)
            try:
                assert upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                upstream.close()
            conn.close()


def test_backend_proxy_v2_names_client_and_listener(backend: BackendServer) -> None:
    cfg = make_cfg(
        f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{backend.address[1]}"\n'
        'proxy_protocol = "v2"\n'
    )
    with relay_listener(cfg) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            conn = accept_one(listener, client)
            up = router.open_upstream(conn)
            client_addr, listen_addr = client.getsockname(), listener.getsockname()
            assert up.prefix == proxyproto.build(client_addr, listen_addr)
            finish_upstream(up, b"payload")
            conn.close()
    got = backend.wait_received()
    assert len(got) == 1
    length, info = proxyproto.parse(got[0])
    assert info.src == client_addr and info.dst == listen_addr
    assert got[0][length:] == b"payload"


def test_backend_ipv6_listener_proxy_v2_is_tcp6(backend: BackendServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python build")
    cfg = make_cfg(
        f'[[listener]]\nbind = "[::1]:0"\nbackend = "127.0.0.1:{backend.address[1]}"\n'
        'proxy_protocol = "v2"\n'
    )
    try:
        ctx = relay_listener(cfg)
        router, listener = ctx.__enter__()
    except OSError as exc:
        pytest.skip(f"cannot bind [::1]: {exc}")
    try:
        with socket.create_connection(listener.getsockname()[:2]) as client:
            conn = accept_one(listener, client)
            up = router.open_upstream(conn)
            client_addr = client.getsockname()[:2]
            conn.close()
            os.close(up.fd)
        _, info = proxyproto.parse(up.prefix)
        assert info.family == socket.AF_INET6
        assert info.src == client_addr and info.dst == ("::1", listener.getsockname()[1])
    finally:
        ctx.__exit__(None, None, None)


def test_unix_backend_and_unix_listener_send_local_header() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend_path = os.path.join(tmp, "backend.sock")
        listen_path = os.path.join(tmp, "relay.sock")
        server = BackendServer(socket.AF_UNIX, backend_path)
        try:
            cfg = make_cfg(
                f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "unix:{backend_path}"\n'
                'proxy_protocol = "v2"\n'
            )
            # The listener itself on a unix socket (bind starting with "unix:").
            listener = open_listener(listen_path)
            router = Router(cfg.listener[0], cfg, set())
            try:
                assert listener.family == socket.AF_UNIX and not listener.getblocking()
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(listen_path)
                    conn = accept_one(listener, client)
                    up = router.open_upstream(conn)
                    assert up.dest == (f"unix:{backend_path}", 0)
                    assert up.prefix == proxyproto.build_local()
                    finish_upstream(up, b"via unix")
                    conn.close()
            finally:
                listener.close()
                router.close()
            got = server.wait_received()
            assert got == [proxyproto.build_local() + b"via unix"]
        finally:
            server.close()


def test_unix_listener_replaces_stale_socket_but_not_a_file() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "l.sock")
        open_listener(path).close()  # leaves a stale socket file behind
        open_listener(path).close()
        regular = os.path.join(tmp, "file")
        open(regular, "w").close()
        with pytest.raises(FileExistsError, match="not a socket"):
            open_listener(regular)


def _trusted_cfg(backend_port: int, trusted: str = "127.0.0.0/8") -> config.Config:
    return make_cfg(
        f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{backend_port}"\n'
        f'proxy_protocol = "v2"\ntrusted_proxies = ["{trusted}"]\n'
    )


def test_trusted_proxy_header_is_stripped_and_forwarded(backend: BackendServer) -> None:
    original = proxyproto.build(("198.51.100.9", 41000), ("192.0.2.80", 443))
    with relay_listener(_trusted_cfg(backend.address[1])) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            client.sendall(original + b"application bytes")
            conn = accept_one(listener, client)
            up = router.open_upstream(conn)
            assert up.prefix == original  # the first hop's view, not the proxy's address
            # Only the header was consumed: the payload is still queued on the client socket.
            select.select([conn], [], [], 5)
            assert conn.recv(100) == b"application bytes"
            conn.close()
            os.close(up.fd)


def test_trusted_proxy_header_split_across_segments(backend: BackendServer) -> None:
    original = proxyproto.build(("2001:db8::9", 41000), ("2001:db8::80", 443))
    with relay_listener(_trusted_cfg(backend.address[1])) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.sendall(original[:5])
            conn = accept_one(listener, client)

            def send_rest() -> None:
                time.sleep(0.05)
                client.sendall(original[5:20])
                time.sleep(0.05)
                client.sendall(original[20:] + b"tail")

            sender = threading.Thread(target=send_rest)
            sender.start()
            up = router.open_upstream(conn)
            sender.join()
            assert up.prefix == original
            select.select([conn], [], [], 5)
            assert conn.recv(100) == b"tail"
            conn.close()
            os.close(up.fd)


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_header_invalid"),  # v1 is not accepted
        (proxyproto.SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "proxy_header_invalid"),
        (proxyproto.SIGNATURE + b"\x21\x11\x00", "proxy_header_timeout"),  # stalls mid-header
        (b"", "proxy_header_timeout"),
    ],
)
def test_trusted_proxy_bad_or_missing_header_is_denied(
    backend: BackendServer, sent: bytes, reason: str
) -> None:
    cfg = _trusted_cfg(backend.address[1])
    lc = cfg.listener[0]
    listener = open_listener(lc.bind_address)
    router = Router(lc, cfg, set(), proxy_header_timeout=0.2)
    try:
        with socket.create_connection(listener.getsockname()) as client:
            if sent:
                client.sendall(sent)
            conn = accept_one(listener, client)
            start = time.monotonic()
            with pytest.raises(Denied) as info:
                router.open_upstream(conn)
            assert info.value.reason == reason
            assert time.monotonic() - start < 2.0
            conn.close()
    finally:
        router.close()
        listener.close()


def test_trusted_proxy_eof_mid_header_is_invalid(backend: BackendServer) -> None:
    with relay_listener(_trusted_cfg(backend.address[1])) as (router, listener):
        client = socket.create_connection(listener.getsockname())
        client.sendall(proxyproto.SIGNATURE[:8])
        client.shutdown(socket.SHUT_WR)
        conn = accept_one(listener, client)
        with pytest.raises(Denied) as info:
            router.open_upstream(conn)
        assert info.value.reason == "proxy_header_invalid" and "EOF" in str(info.value)
        conn.close()
        client.close()


def test_untrusted_source_bytes_are_never_parsed(backend: BackendServer) -> None:
    # Only 192.0.2.0/24 is trusted; the loopback client's forged header must reach the backend
    # untouched, after the relay's own header naming the real client.
    forged = proxyproto.build(("203.0.113.66", 1), ("203.0.113.67", 2))
    cfg = _trusted_cfg(backend.address[1], trusted="192.0.2.0/24")
    with relay_listener(cfg) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            client.sendall(forged + b"rest")
            conn = accept_one(listener, client)
            up = router.open_upstream(conn)
            client_addr = client.getsockname()
            assert up.prefix == proxyproto.build(client_addr, listener.getsockname())
            select.select([conn], [], [], 5)
            assert conn.recv(1000) == forged + b"rest"  # nothing was consumed
            finish_upstream(up, forged + b"rest")
            conn.close()
    got = backend.wait_received()
    length, info = proxyproto.parse(got[0])
    assert info.src == client_addr
    assert got[0][length:] == forged + b"rest"


def test_backend_refused_raises_oserror_and_leaks_nothing() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, not listening: connect is refused
        port = placeholder.getsockname()[1]
        cfg = make_cfg(f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{port}"\n')
        with relay_listener(cfg) as (router, listener):
            with socket.create_connection(listener.getsockname()) as client:
                conn = accept_one(listener, client)
                fds_before = len(os.listdir("/proc/self/fd"))
                try:
                    up = router.open_upstream(conn)
                except OSError:
                    pass  # refused synchronously
                else:
                    # Non-blocking connect on loopback: the refusal shows in SO_ERROR.
                    sock = socket.socket(fileno=up.fd)
                    select.select([], [sock], [], 5)
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
                    sock.close()
                assert len(os.listdir("/proc/self/fd")) == fds_before
                conn.close()


def test_unix_backend_missing_raises_and_closes() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "unix:{tmp}/none.sock"\n')
        with relay_listener(cfg) as (router, listener):
            with socket.create_connection(listener.getsockname()) as client:
                conn = accept_one(listener, client)
                fds_before = len(os.listdir("/proc/self/fd"))
                with pytest.raises(FileNotFoundError):
                    router.open_upstream(conn)
                assert len(os.listdir("/proc/self/fd")) == fds_before
                conn.close()


def test_backend_that_is_the_listener_is_refused() -> None:
    cfg = make_cfg('[[listener]]\nbind = "127.0.0.1:7411"\nbackend = "127.0.0.1:7411"\n')
    with pytest.raises(ValueError, match="loop"):
        Router(cfg.listener[0], cfg, set())
    wild = make_cfg('[[listener]]\nbind = "0.0.0.0:7412"\nbackend = "127.0.0.1:7412"\n')
    with pytest.raises(ValueError, match="loop"):
        Router(wild.listener[0], wild, set())


def test_tproxy_mode_refuses_loopback_destination() -> None:
    # Without TPROXY rules the "original destination" of a direct connection is the listener
    # itself on 127.0.0.1: refused at the first hop (loopback), no upstream opened.
    cfg = make_cfg('[[listener]]\nbind = "127.0.0.1:0"\nmode = "tproxy"\n')
    lc = cfg.listener[0]
    try:
        listener = open_listener(lc.bind_address, transparent=lc.transparent)
    except PermissionError as exc:
        pytest.skip(f"tproxy listener needs CAP_NET_ADMIN: {exc}")
    router = Router(lc, cfg, set())
    try:
        assert listener.getsockopt(socket.SOL_IP, 19) == 1  # IP_TRANSPARENT on the listener
        with socket.create_connection(listener.getsockname()) as client:
            conn = accept_one(listener, client)
            assert original_destination(conn, "tproxy") == listener.getsockname()
            fds_before = len(os.listdir("/proc/self/fd"))
            with pytest.raises(Denied) as info:
                router.open_upstream(conn)
            assert info.value.reason == "loopback"
            assert len(os.listdir("/proc/self/fd")) == fds_before
            conn.close()
    finally:
        router.close()
        listener.close()


def test_redirect_mode_without_nat_is_denied() -> None:
    cfg = make_cfg('[[listener]]\nbind = "127.0.0.1:0"\nmode = "redirect"\n')
    with relay_listener(cfg) as (router, listener):
        with socket.create_connection(listener.getsockname()) as client:
            conn = accept_one(listener, client)
            with pytest.raises(Denied) as info:
                router.open_upstream(conn)
            # No NAT entry (or no conntrack at all): there is no original destination.
            assert info.value.reason == "no_original_destination"
            conn.close()


def test_closed_router_refuses_work(backend: BackendServer) -> None:
    cfg = make_cfg(f'[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:{backend.address[1]}"\n')
    router = Router(cfg.listener[0], cfg, set())
    router.close()
    router.close()
    with socket.socket() as s, pytest.raises(RuntimeError, match="closed"):
        router.open_upstream(s)


def test_open_listener_options_and_hostport_parsing() -> None:
    from relay.config.values import parse_hostport

    assert parse_hostport("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    assert parse_hostport("[::0001]:80") == ("::1", 80)
    assert parse_hostport("backend.example:80", allow_hostname=True) == ("backend.example", 80)
    for bad in ("::1:80", "127.0.0.1", "1.2.3.4:99999", "[::1]80", "127.0.0.1:0"):
        with pytest.raises(ValueError):
            parse_hostport(bad)
    cfg = make_cfg(
        '[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:1"\n'
        '[[listener]]\nbind = "[::1]:0"\nbackend = "127.0.0.1:1"\n'
    )
    v4 = open_listener(cfg.listener[0].bind_address)
    try:
        assert not v4.getblocking()
        assert v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert v4.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert v4.getsockopt(socket.SOL_IP, 19) == 0  # backend mode: not transparent
        # Without reuseport a second socket on the same address is refused, in one line.
        with pytest.raises(OSError) as info:
            open_listener(("127.0.0.1", v4.getsockname()[1]))
        assert info.value.errno == errno.EADDRINUSE
        assert str(info.value).startswith(f"[Errno {errno.EADDRINUSE}] listener 127.0.0.1:")
        assert "address already in use" in str(info.value) and "reuseport = true" in str(info.value)
        with pytest.raises(OSError, match="address already in use"):
            check_address_free(("127.0.0.1", v4.getsockname()[1]))
    finally:
        v4.close()
    # reuseport = true: both sockets set SO_REUSEPORT and share the port on purpose; the probe
    # (for callers that must set it themselves) still sees the port taken.
    shared = open_listener(("127.0.0.1", 0), reuseport=True)
    try:
        assert shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        open_listener(("127.0.0.1", shared.getsockname()[1]), reuseport=True).close()
        with pytest.raises(OSError, match="address already in use"):
            check_address_free(("127.0.0.1", shared.getsockname()[1]), what="x")
    finally:
        shared.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # the probe for UDP binds
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        udp.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match="address already in use"):
            check_address_free(("127.0.0.1", udp.getsockname()[1]), socket.SOCK_DGRAM)
    try:
        v6 = open_listener(cfg.listener[1].bind_address)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with v6:
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
