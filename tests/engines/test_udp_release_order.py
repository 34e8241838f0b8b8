"""A supervised server's UDP flows end with the reason the supervisor gave them.

The supervisor sends UdpRelease ("reload" at a reload or upgrade, "closed" at a stop) before it
signals a worker to stop, but the worker's command reader thread passes it on: a stop signal
that wakes the serving loop at once (the core's signal wake-up) can end serve_forever first.
The server then waits a moment for the order instead of ending every flow "closed" itself.
"""

from __future__ import annotations

import socket
import threading

import pytest
from helpers import UdpOrigin

from relay.config import loads
from relay.lab.process import relay_config
from relay.serve.server import Server


def _udp_server(origin: UdpOrigin) -> Server:
    udp = ('\n[[listener]]\nname = "dns"\nprotocol = "udp"\nbind = "127.0.0.1:0"\n'
           f'backend = "127.0.0.1:{origin.port}"\n')
    return Server(loads(relay_config(None, extra=udp), "<test>"), udp_supervised=True)


def _one_flow(srv: Server) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(3.0)
        c.sendto(b"ping", srv.bound_addresses()["dns"])
        assert c.recvfrom(100)[0] == b"ping"


@pytest.mark.parametrize("late_order", ["reload", None])
def test_the_supervisors_order_names_the_flows_end_even_after_the_stop(
        late_order: str | None) -> None:
    """late_order: the UdpRelease reason that reaches the UDP service 0.2 s after the stop
    (the command reader thread is behind; serve_forever has ended its loop by then), or None:
    no order comes, and the flows end "closed" after the wait."""
    origin = UdpOrigin()
    srv = _udp_server(origin)
    try:
        thread = srv.start_thread()
        srv.start_udp()
        _one_flow(srv)
        srv.request_stop(drain=False)
        late = threading.Timer(0.2, srv.release_udp, args=(late_order,)) if late_order else None
        if late is not None:
            late.start()
        thread.join(10)
        if late is not None:
            late.join(5)
        assert not thread.is_alive()
        closed = srv.stats()["udp_closed"]
        want = late_order or "closed"
        assert closed.get(want) == 1 and sum(closed.values()) == 1, closed
    finally:
        srv.stop(drain_timeout=1.0)
        origin.close()
