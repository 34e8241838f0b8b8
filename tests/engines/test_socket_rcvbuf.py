"""``socket_rcvbuf``: a fixed SO_RCVBUF on both relayed sockets, on every engine.

The relay's own sockets are observed from outside with ``ss -tm`` (iproute2): ``rb`` in
``skmem`` is the socket's receive buffer, which the kernel sets to twice the SO_RCVBUF value.
Auto-tuning starts every socket at net.ipv4.tcp_rmem[1] (131,072 here), so the value used below
(2 x 150,000) cannot be mistaken for it. Bytes must still arrive intact both ways.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest
from helpers import echo, pattern, read_all, send_in_thread, sha

RCVBUF = 150_000

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed"),
]


def _rcvbufs(port_filter: str) -> list[int]:
    out = subprocess.run(["ss", "-tmnH", "state", "established", port_filter],
                         capture_output=True, text=True, check=True).stdout
    return [int(m) for m in re.findall(r"\brb(\d+)", out)]


@pytest.mark.parametrize("rcvbuf", [0, RCVBUF])
def test_socket_rcvbuf_applies_to_both_relayed_sockets(relay_server, origin, client,
                                                       rcvbuf: int) -> None:
    up = origin(echo)
    relay = relay_server(up.address, socket_rcvbuf=rcvbuf)
    c = client(relay.address)
    data = pattern(4 << 20, seed=7)
    sender = send_in_thread(c, data, shut=False)
    echoed = bytearray()
    while len(echoed) < len(data):
        chunk = c.recv(1 << 20)
        assert chunk, f"stream ended after {len(echoed)} of {len(data)} bytes"
        echoed += chunk
    sender.join()
    assert sha(bytes(echoed)) == sha(data)
    # the pair is still open: look at the relay's accepted socket (local port = the relay's) and its upstream socket (remote
    # port = the origin's): the test's client and the origin's socket have the other ports
    lport, oport = relay.address[1], up.address[1]
    relay_side = _rcvbufs(f"( sport = :{lport} )") + _rcvbufs(f"( dport = :{oport} )")
    assert len(relay_side) == 2, relay_side
    if rcvbuf:
        assert relay_side == [2 * rcvbuf, 2 * rcvbuf]
    else:
        assert 2 * RCVBUF not in relay_side
    c.shutdown(socket.SHUT_WR)
    assert read_all(c).end == "eof"
