"""Many pairs ready at once: every byte still moves, and one loop round stays bounded.

With 1,000 busy connections the uring loop used to drain its completion queue until it was
empty, which on a saturated loop took up to 0.4 s (15-27k completions: the kernel posts new
ones while we relay), and run() could not hand accepted connections to Python meanwhile
(docs/performance.md). A round now handles at most one batch of completions, like epoll_wait's
batch. And a ring whose completion queue is smaller than the polls that fire at once (the
kernel parks the rest in its overflow list) must lose nothing.

Real loopback sockets; one core Loop driven from the test's thread. Every byte is queued on the
sockets before the pairs are added, so whatever is ready is ready at once.
"""

from __future__ import annotations

import select
import socket

import pytest
from test_core import BACKENDS, backend_unavailable, core

from tests.helpers import pattern, sha

REQUEST = 4096      # client -> origin, per pair
RESPONSE = 16384    # origin -> client, per pair: both fit the receive buffers, nobody reads early


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback pair (outer end, relay end)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        outer = socket.create_connection(srv.getsockname())
        inner, _ = srv.accept()
    return outer, inner


class Pairs:
    """n relayed pairs; client i queued request(i), origin i queued response(i) beforehand."""

    def __init__(self, loop: core.Loop, n: int, request: bool) -> None:
        self.clients: list[socket.socket] = []
        self.origins: list[socket.socket] = []
        self.cids: list[int] = []
        self.request = request
        inners = []
        for i in range(n):
            client, relay_c = tcp_pair()
            relay_u, origin = tcp_pair()
            if request:
                client.sendall(pattern(REQUEST, seed=i))
            origin.sendall(pattern(RESPONSE, seed=10_000 + i))
            self.clients.append(client)
            self.origins.append(origin)
            inners.append((relay_c, relay_u))
        for relay_c, relay_u in inners:
            self.cids.append(loop.add_pair(relay_c.detach(), relay_u.detach()))

    def close(self) -> None:
        for s in self.clients + self.origins:
            s.close()


def drive(loop: core.Loop, want_c2s: int, want_s2c: int, rounds: int = 2000) -> None:
    for _ in range(rounds):
        stats = loop.stats()
        if stats["bytes_c2s"] >= want_c2s and stats["bytes_s2c"] >= want_s2c:
            return
        loop.run(5)
    stats = loop.stats()
    raise AssertionError(f"relayed {stats['bytes_c2s']}/{want_c2s} bytes c2s and "
                         f"{stats['bytes_s2c']}/{want_s2c} s2c in {rounds} rounds")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


@pytest.mark.skipif(bool(backend_unavailable("uring")), reason=f"uring: {backend_unavailable('uring')}")
def test_a_ring_smaller_than_the_ready_polls_relays_every_byte() -> None:
    # ring_entries=8: a completion queue of 64 entries, and 200 pairs whose upstream poll
    # fires as soon as it is submitted (the response is queued), then 200 client polls.
    n = 200
    with core.Loop("uring", ring_entries=8, max_conns=4 * n) as loop:
        pairs = Pairs(loop, n, request=True)
        try:
            drive(loop, n * REQUEST, n * RESPONSE)
            for i in range(n):
                assert sha(recv_exactly(pairs.origins[i], REQUEST)) == sha(pattern(REQUEST, seed=i))
                got = recv_exactly(pairs.clients[i], RESPONSE)
                assert sha(got) == sha(pattern(RESPONSE, seed=10_000 + i)), f"pair {i}"
            stats = loop.stats()
            # The kernel had to park completions: this test did exercise the overflow path.
            assert stats["cq_overflows"] >= 1
            assert stats["submit_errors"] == 0 and stats["sqe_starved"] == 0
            assert stats["conns_open"] == n
        finally:
            pairs.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_round_handles_a_bounded_batch_of_ready_pairs(backend: str) -> None:
    # 600 pairs whose responses are queued: 600 readiness events at once.  One run(0) must
    # come back to Python after a batch, not after serving every ready pair (the uring loop
    # drained its whole completion queue, which never empties on a saturated loop); the
    # rest are served in the next rounds, in order.
    n = 600
    with core.Loop(backend, max_conns=2 * n) as loop:
        pairs = Pairs(loop, n, request=False)
        try:
            loop.run(0)
            served = sum(1 for cid in pairs.cids if loop.pair_info(cid)[4] > 0)
            assert 0 < served < n, f"one round served {served} of {n} ready pairs"
            if backend == "uring":
                assert loop.stats()["reaps_cut"] >= 1
            drive(loop, 0, n * RESPONSE)
            for i in range(n):
                got = recv_exactly(pairs.clients[i], RESPONSE)
                assert sha(got) == sha(pattern(RESPONSE, seed=10_000 + i)), f"pair {i}"
        finally:
            pairs.close()


@pytest.mark.skipif(bool(backend_unavailable("uring")), reason=f"uring: {backend_unavailable('uring')}")
def test_fileno_stays_readable_while_completions_are_left_for_the_next_round() -> None:
    # An embedder runs the loop only when fileno() turns readable (relay/embed.py).  A round
    # that leaves completions in the queue must leave fileno() readable, or they wait for the
    # embedder's next tick: drive 600 ready pairs by select() on fileno() alone.
    n = 600
    with core.Loop("uring", max_conns=2 * n) as loop:
        fd = loop.fileno()
        pairs = Pairs(loop, n, request=False)
        try:
            rounds = 0
            while loop.stats()["bytes_s2c"] < n * RESPONSE:
                readable, _, _ = select.select([fd], [], [], 2.0)
                assert readable, (f"fileno() not readable with {loop.stats()['bytes_s2c']} of "
                                  f"{n * RESPONSE} bytes relayed after {rounds} rounds")
                loop.run(0)
                rounds += 1
            assert loop.stats()["reaps_cut"] >= 1      # some round did leave work behind
            for i in range(n):
                got = recv_exactly(pairs.clients[i], RESPONSE)
                assert sha(got) == sha(pattern(RESPONSE, seed=10_000 + i)), f"pair {i}"
        finally:
            pairs.close()
