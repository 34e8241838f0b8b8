"""The UDP datagram core (relay_ext._udp.UdpLoop) on loopback: real sockets, no root.

The test thread drives the loop (run()) and plays Python's part: on UEV_NEW_FLOW it makes the
upstream socket (connected to a UDP origin on a thread) and calls add_flow or refuse_flow.
Real TPROXY is exercised by the netns tests of the integration; here the transparent key path
uses IP_RECVORIGDSTADDR on a plain listener, whose control message then carries the local
address, which is exactly the original destination.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import UdpOrigin, count_fds

import relay_ext._udp as udp  # built by `make test`: a missing core is a failure, not a skip

UdpLoop = udp.UdpLoop
NEW = udp.UEV_NEW_FLOW
DONE = udp.UEV_FLOW_DONE
REASONS = udp.UDP_REASONS
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74

Event = tuple[Any, ...]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def origin() -> Iterator[UdpOrigin]:
    o = UdpOrigin()
    yield o
    o.close()


def udp_socket(host: str = "127.0.0.1", transparent_key: bool = False,
               reuse: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent_key:
        if family == socket.AF_INET:
            s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, 0))
    s.settimeout(2.0)
    return s


def upstream_to(addr: tuple[Any, ...]) -> int:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect(addr)
    return s.detach()


def pump(u: Any, until: Callable[[list[Event]], bool], timeout: float = 5.0,
         on_new: Callable[[Event], None] | None = None) -> list[Event]:
    """run() until `until(events so far)` holds; on_new handles UEV_NEW_FLOW as it arrives."""
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events}"
        for ev in u.run(20):
            events.append(ev)
            if ev[0] == NEW and on_new is not None:
                on_new(ev)
    return events


def accept_to(u: Any, origin_addr: tuple[Any, ...], responses: int = 0,
              fids: list[int] | None = None) -> Callable[[Event], None]:
    def on_new(ev: Event) -> None:
        fid = u.add_flow(ev[2], upstream_to(origin_addr), -1, responses, len(fids or []))
        if fids is not None:
            fids.append(fid)
    return on_new


def recv_all(sock: socket.socket, n: int, timeout: float = 2.0) -> list[tuple[bytes, Any]]:
    out = []
    sock.settimeout(timeout)
    for _ in range(n):
        try:
            out.append(sock.recvfrom(70000))
        except TimeoutError:
            break
    return out


def of_kind(events: list[Event], kind: int) -> list[Event]:
    return [e for e in events if e[0] == kind]


# ------------------------------------------------------------------ backend-style flows


def test_backend_flows_relay_both_ways_and_count(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    laddr = lsn.getsockname()
    clients = [client() for _ in range(3)]
    with UdpLoop(max_flows=16, idle_timeout_ms=10_000) as u:
        u.add_listener(lsn.fileno(), 5, False)
        # Three datagrams each before the loop runs: held while "Python decides", one event per
        # flow, then delivered upstream in order.
        for i, c in enumerate(clients):
            for j in range(3):
                c.sendto(f"c{i}-{j}".encode(), laddr)
        fids: list[int] = []
        events = pump(u, lambda ev: len(fids) == 3 and u.stats()["dgrams_s2c"] == 9,
                      on_new=accept_to(u, origin.addr, fids=fids))
        news = of_kind(events, NEW)
        assert len(news) == 3
        assert {ev[3] for ev in news} == {c.getsockname() for c in clients}
        assert all(ev[1] == 5 and ev[4] is None for ev in news)
        for i, c in enumerate(clients):
            got = recv_all(c, 3)
            assert [d for d, _ in got] == [f"c{i}-{j}".encode() for j in range(3)]
            assert all(src == laddr for _, src in got), "replies must come from the listener"
        # Later datagrams of a known key go straight through, with no new event.
        clients[0].sendto(b"again", laddr)
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 10)
        assert recv_all(clients[0], 1)[0][0] == b"again"
        st = u.stats()
        assert st["flows_open"] == 3 and st["flows_total"] == 3 and st["pending_flows"] == 0
        assert st["dgrams_c2s"] == 10 and st["dgrams_s2c"] == 10
        assert st["bytes_c2s"] == st["bytes_s2c"] == sum(len(d) for d, _ in origin.received)
        assert st["recv_dgrams"] >= 20 and st["send_dgrams"] == 20
        # The origin saw one source port per flow (one upstream socket per flow).
        assert len({peer for _, peer in origin.received}) == 3
    for c in clients:
        c.close()
    lsn.close()


def test_close_flow_reports_closed_with_counters(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, False)
        c.sendto(b"x" * 100, lsn.getsockname())
        fids: list[int] = []
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1, on_new=accept_to(u, origin.addr, fids=fids))
        assert u.close_flow(fids[0]) is True
        assert u.close_flow(fids[0]) is False
        (done,) = of_kind(pump(u, lambda ev: bool(ev)), DONE)
        assert done[1] == fids[0] and REASONS[done[3]] == "closed"
        assert done[4:8] == (1, 100, 1, 100) and done[8] >= 0 and done[9] == 0
        assert u.stats()["flows_open"] == 0
    c.close()
    lsn.close()


# ------------------------------------------------------------------ transparent key path


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not ipv6_loopback(), reason="no IPv6 loopback (::1) here"))])
def test_transparent_key_and_reply_socket(host: str) -> None:
    o = UdpOrigin(host)
    lsn = udp_socket(host, transparent_key=True, reuse=True)
    laddr = lsn.getsockname()[:2]
    c = client(host)
    family = lsn.family
    try:
        with UdpLoop() as u:
            u.add_listener(lsn.fileno(), 9, True)
            c.sendto(b"first", laddr)
            seen: list[Event] = []

            def on_new(ev: Event) -> None:
                seen.append(ev)
                # The reply socket: bound to the original destination, connected to the client.
                r = socket.socket(family, socket.SOCK_DGRAM)
                r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                r.bind(ev[4])
                r.connect(ev[3])
                u.add_flow(ev[2], upstream_to(o.addr), r.detach(), 0, 0)

            pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1, on_new=on_new)
            assert seen[0][3] == c.getsockname()[:2]
            assert seen[0][4] == laddr, "orig_dst must come from IP(V6)_ORIGDSTADDR"
            data, src = c.recvfrom(100)
            assert data == b"first" and src[:2] == laddr
            # Stop reading the listener: the flow's later datagrams must arrive on the connected
            # reply socket (the kernel prefers the connected socket) and still be relayed.
            u.remove_listener(9)
            for i in range(5):
                c.sendto(f"later{i}".encode(), laddr)
            pump(u, lambda ev: u.stats()["dgrams_s2c"] == 6)
            assert [d for d, _ in recv_all(c, 5)] == [f"later{i}".encode() for i in range(5)]
            assert u.stats()["pending_flows"] == 0 and u.stats()["flows_total"] == 1
    finally:
        o.close()
        c.close()
        lsn.close()


def test_transparent_listener_without_origdst_cmsg_drops() -> None:
    lsn = udp_socket()        # IP_RECVORIGDSTADDR not set: no original destination to key on
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, True)
        c.sendto(b"x", lsn.getsockname())
        pump(u, lambda ev: u.stats()["drop_no_origdst"] == 1)
        assert u.stats()["pending_flows"] == 0
    c.close()
    lsn.close()


# ------------------------------------------------------------------ lifetimes


def test_idle_expiry_frees_the_flow_and_its_fds(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    c = client()
    with UdpLoop(idle_timeout_ms=200) as u:
        u.add_listener(lsn.fileno(), 1, False)
        base = count_fds()
        c.sendto(b"ping", lsn.getsockname())
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1, on_new=accept_to(u, origin.addr))
        assert count_fds() == base + 1
        t0 = time.monotonic()
        events = pump(u, lambda ev: bool(of_kind(ev, DONE)), timeout=5)
        (done,) = of_kind(events, DONE)
        assert REASONS[done[3]] == "idle_timeout"
        assert time.monotonic() - t0 >= 0.15
        assert u.stats()["flows_open"] == 0 and u.stats()["closed_idle_timeout"] == 1
        assert count_fds() == base
        # The key is free again: the next datagram is a new flow.
        c.sendto(b"again", lsn.getsockname())
        assert of_kind(pump(u, lambda ev: bool(ev)), NEW)
    c.close()
    lsn.close()


def test_undecided_pending_flow_expires() -> None:
    lsn = udp_socket()
    c = client()
    with UdpLoop(idle_timeout_ms=100) as u:
        u.add_listener(lsn.fileno(), 1, False)
        c.sendto(b"a", lsn.getsockname())
        c.sendto(b"b", lsn.getsockname())
        (new,) = of_kind(pump(u, lambda ev: bool(ev)), NEW)
        pump(u, lambda ev: u.stats()["pending_flows"] == 0)
        assert u.stats()["drop_pending_expired"] == 2
        with pytest.raises(LookupError):
            u.add_flow(new[2], 12345, -1, 0, 0)
    c.close()
    lsn.close()


def test_responses_one_closes_after_first_reply() -> None:
    o = UdpOrigin(reply=lambda b: [b + b"-1", b + b"-2"])    # two answers per question
    lsn = udp_socket()
    c = client()
    try:
        with UdpLoop() as u:
            u.add_listener(lsn.fileno(), 1, False)
            c.sendto(b"q", lsn.getsockname())
            events = pump(u, lambda ev: bool(of_kind(ev, DONE)),
                          on_new=accept_to(u, o.addr, responses=1))
            (done,) = of_kind(events, DONE)
            assert REASONS[done[3]] == "responses" and done[6] == 1
            assert [d for d, _ in recv_all(c, 2, timeout=0.5)] == [b"q-1"]
            assert u.stats()["flows_open"] == 0
    finally:
        o.close()
        c.close()
        lsn.close()


def test_icmp_port_unreachable_ends_flow_with_error() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()
    closed.close()                       # nothing listens there: ICMP port unreachable
    lsn = udp_socket()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, False)
        c.sendto(b"hello", lsn.getsockname())
        events = pump(u, lambda ev: bool(of_kind(ev, DONE)), on_new=accept_to(u, dead))
        (done,) = of_kind(events, DONE)
        assert REASONS[done[3]] == "error" and done[9] == errno.ECONNREFUSED
        assert done[4] == 1                # the held datagram did go out
    c.close()
    lsn.close()


# ------------------------------------------------------------------ limits and bad input


def test_max_flows_drops_extra_keys_without_growth(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    clients = [client() for _ in range(5)]
    with UdpLoop(max_flows=2) as u:
        u.add_listener(lsn.fileno(), 1, False)
        for c in clients:
            c.sendto(b"hi", lsn.getsockname())
        events = pump(u, lambda ev: len(of_kind(ev, NEW)) == 2
                      and u.stats()["drop_no_flow_slot"] == 3, on_new=accept_to(u, origin.addr))
        for c in clients:                 # again: the admitted two relay, the others drop
            c.sendto(b"hi", lsn.getsockname())
        events = pump(u, lambda ev: u.stats()["drop_no_flow_slot"] == 6
                      and u.stats()["dgrams_c2s"] == 4)
        assert not of_kind(events, NEW)
        st = u.stats()
        assert st["drop_no_flow_slot"] == 6
        assert st["flows_open"] == 2 and st["flows_total"] == 2 and st["pending_flows"] == 0
    for c in clients:
        c.close()
    lsn.close()


def test_max_pending_per_flow_and_pending_flows(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    a, b, c = client(), client(), client()
    with UdpLoop(max_pending=3, max_pending_flows=2) as u:
        u.add_listener(lsn.fileno(), 1, False)
        for i in range(6):
            a.sendto(f"{i}".encode(), lsn.getsockname())
        b.sendto(b"b", lsn.getsockname())
        c.sendto(b"c", lsn.getsockname())
        events = pump(u, lambda ev: u.stats()["recv_dgrams"] == 8)
        news = of_kind(events, NEW)
        assert len(news) == 2, "one event per pending flow, and at most max_pending_flows"
        assert u.stats()["drop_pending_full"] == 3 + 1
        first = next(ev for ev in news if ev[3] == a.getsockname())
        u.add_flow(first[2], upstream_to(origin.addr), -1, 0, 0)
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 3)
        assert [d for d, _ in recv_all(a, 3)] == [b"0", b"1", b"2"]
    for s in (a, b, c):
        s.close()
    lsn.close()


def test_refuse_flow_holds_the_key_then_forgets_it() -> None:
    lsn = udp_socket()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, False)
        c.sendto(b"1", lsn.getsockname())
        c.sendto(b"2", lsn.getsockname())
        (new,) = of_kind(pump(u, lambda ev: u.stats()["recv_dgrams"] == 2 and bool(ev)), NEW)
        u.refuse_flow(new[2], 300)
        assert u.stats()["drop_refused"] == 2 and u.stats()["holds"] == 1
        for _ in range(3):
            c.sendto(b"more", lsn.getsockname())
        events = pump(u, lambda ev: u.stats()["recv_dgrams"] == 5)
        assert not of_kind(events, NEW) and u.stats()["drop_refused"] == 5
        with pytest.raises(LookupError):
            u.refuse_flow(new[2], 300)
        time.sleep(0.35)
        c.sendto(b"after", lsn.getsockname())
        assert of_kind(pump(u, lambda ev: bool(ev)), NEW)
        assert u.stats()["holds"] == 0
    c.close()
    lsn.close()


def test_truncated_datagrams_are_dropped_both_ways() -> None:
    # The origin answers with as many bytes as the question asks for.
    o = UdpOrigin(reply=lambda b: [b"r" * int(b)])
    lsn = udp_socket()
    c = client()
    try:
        with UdpLoop(max_datagram=1024) as u:
            u.add_listener(lsn.fileno(), 1, False)
            c.sendto(b"9" * 2000, lsn.getsockname())           # oversized from the client
            pump(u, lambda ev: u.stats()["drop_truncated"] == 1)
            assert u.stats()["pending_flows"] == 0
            c.sendto(b"2000", lsn.getsockname())              # oversized answer
            c.sendto(b"1024", lsn.getsockname())              # fits exactly
            pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1 and u.stats()["drop_truncated"] == 2,
                 on_new=accept_to(u, o.addr))
            got = recv_all(c, 2, timeout=0.5)
            assert [len(d) for d, _ in got] == [1024], "never forwarded cut"
    finally:
        o.close()
        c.close()
        lsn.close()


def test_burst_of_quic_sized_datagrams_loses_under_one_percent(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    c = client()
    c.setblocking(False)
    payload = os.urandom(1200)
    total, step = 2000, 50
    received = 0
    with UdpLoop(batch=32) as u:
        u.add_listener(lsn.fileno(), 1, False)
        # A handshake first (as QUIC's Initial): datagrams beyond max_pending that arrive
        # while Python decides are dropped by design.
        c.sendto(b"hello", lsn.getsockname())
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1, on_new=accept_to(u, origin.addr))
        time.sleep(0.05)
        assert c.recv(100) == b"hello"
        deadline = time.monotonic() + 60
        sent = 0
        while sent < total and time.monotonic() < deadline:
            for _ in range(step):
                c.sendto(payload, lsn.getsockname())
            sent += step
            # Paced: wait until this batch came back (or nothing moved for 200 ms).
            quiet = time.monotonic() + 0.2
            while received < sent and time.monotonic() < quiet:
                if u.run(5):
                    raise AssertionError("no event expected during the burst")
                while True:
                    try:
                        data = c.recv(2000)
                    except BlockingIOError:
                        break
                    assert data == payload
                    received += 1
                    quiet = time.monotonic() + 0.2
        st = u.stats()
    assert sent == total
    assert received >= total * 0.99, f"{total - received} of {total} lost; {st}"
    # Batching shows: the listener's reads carried several datagrams each on average.
    assert st["recv_dgrams"] / st["recv_calls"] > 1.5, st
    assert st["drop_send"] == 0 and st["drop_pending_full"] == 0
    c.close()
    lsn.close()


# ------------------------------------------------------------------ lifecycle and API


def test_close_closes_flow_fds_and_stats_survive(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    clients = [client() for _ in range(3)]
    base = count_fds()
    u = UdpLoop()
    u.add_listener(lsn.fileno(), 1, False)
    for c in clients:
        c.sendto(b"x", lsn.getsockname())
    pump(u, lambda ev: u.stats()["dgrams_s2c"] == 3, on_new=accept_to(u, origin.addr))
    assert count_fds() == base + 2 + 1 + 3   # epoll + timerfd, the listener's dup, 3 upstreams
    u.close()
    u.close()
    assert count_fds() == base
    st = u.stats()
    assert st["flows_open"] == 0 and st["flows_total"] == 3 and st["dgrams_c2s"] == 3
    with pytest.raises(RuntimeError):
        u.run(0)
    for c in clients:
        c.close()
    lsn.close()


def test_api_errors_are_clear() -> None:
    with UdpLoop() as u:
        tcp = socket.socket()
        with pytest.raises(ValueError, match="not a datagram socket"):
            u.add_listener(tcp.fileno(), 1, False)
        tcp.close()
        lsn = udp_socket()
        u.add_listener(lsn.fileno(), 1, False)
        with pytest.raises(ValueError, match="already added"):
            u.add_listener(lsn.fileno(), 1, False)
        with pytest.raises(LookupError):
            u.add_flow(42, 100, -1, 0, 0)
        with pytest.raises(KeyError):
            u.remove_listener(2)
        assert u.close_flow(7) is False
        lsn.close()
    with pytest.raises(ValueError, match="max_flows"):
        UdpLoop(max_flows=0)


def test_listener_dup_outlives_caller_close_for_replies() -> None:
    # Replies of a backend-style flow leave through the listener: after remove_listener the
    # caller may close its socket and the flow still answers (the loop keeps its own dup).
    srv = udp_socket()
    lsn = udp_socket()
    laddr = lsn.getsockname()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, False)
        c.sendto(b"one", laddr)
        fids: list[int] = []
        pump(u, lambda ev: bool(fids), on_new=accept_to(u, srv.getsockname(), fids=fids))
        srv.setblocking(True)
        data, upstream = srv.recvfrom(100)
        assert data == b"one"
        u.remove_listener(1)
        lsn.close()
        srv.sendto(b"late", upstream)
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 1)
        assert recv_all(c, 1)[0] == (b"late", laddr)
        assert u.close_flow(fids[0])
    c.close()
    srv.close()


def test_flow_table_survives_churn(origin: UdpOrigin) -> None:
    # A small table (index of 64 slots) with keys coming and going in every way it can lose
    # one: added, refused without hold, closed, expired.  Every later datagram of a live key
    # must find its flow (no new event), and every freed key must come back as a new one.
    lsn = udp_socket()
    laddr = lsn.getsockname()
    clients = [client() for _ in range(24)]
    by_addr = {c.getsockname(): c for c in clients}
    with UdpLoop(max_flows=24, max_holds=8, max_pending_flows=24) as u:
        u.add_listener(lsn.fileno(), 1, False)
        live: dict[tuple[str, int], int] = {}
        for rnd in range(4):
            for c in clients:
                c.sendto(b"r%d" % rnd, laddr)
            expected_new = {a for a in by_addr if a not in live}

            def on_new(ev: Event, rnd: int = rnd,
                       expected_new: set[tuple[str, int]] = expected_new) -> None:
                assert ev[3] in expected_new, f"round {rnd}: live key {ev[3]} got a new event"
                expected_new.discard(ev[3])
                if (ev[3][1] + rnd) % 3 == 0:
                    u.refuse_flow(ev[2], 0)
                else:
                    live[ev[3]] = u.add_flow(ev[2], upstream_to(origin.addr), -1, 0, 0)

            pump(u, lambda ev, waiting=expected_new: not waiting and u.stats()["pending_flows"] == 0,
                 on_new=on_new)
            # close a third of the live flows
            for addr in list(live)[::3]:
                assert u.close_flow(live.pop(addr))
            pump(u, lambda ev: u.stats()["flows_open"] == len(live))
        assert u.stats()["drop_no_flow_slot"] == 0
    for c in clients:
        c.close()
    lsn.close()


def test_stub_lists_every_public_name() -> None:
    with open(os.path.join(os.path.dirname(udp.__file__), "_udp.pyi")) as f:
        stub = f.read()
    for name in udp.__all__:
        assert name in stub, f"relay_ext/_udp.pyi does not declare {name}"
    for method in ("fileno", "add_listener", "remove_listener", "add_flow", "refuse_flow",
                   "close_flow", "run", "stats", "close"):
        assert hasattr(UdpLoop, method) and f"def {method}(" in stub
    assert REASONS == ("idle_timeout", "responses", "closed", "error")


# ------------------------------------------------------------------ flows the loop opens itself


def test_backend_listener_opens_flows_without_events_and_reports_the_client(
        origin: UdpOrigin) -> None:
    lsn = udp_socket()
    laddr = lsn.getsockname()
    clients = [client() for _ in range(3)]
    with UdpLoop(max_flows=16, idle_timeout_ms=10_000) as u:
        u.add_listener(lsn.fileno(), 9, False, backend=origin.addr, responses=2)
        for i, c in enumerate(clients):
            c.sendto(b"a%d" % i, laddr)
            c.sendto(b"b%d" % i, laddr)
        events = pump(u, lambda ev: len(of_kind(ev, DONE)) == 3)
        assert not of_kind(events, NEW), "backend flows must need no Python decision"
        for i, c in enumerate(clients):
            got = recv_all(c, 2)
            assert sorted(d for d, _ in got) == [b"a%d" % i, b"b%d" % i]
            assert all(src == laddr for _, src in got), "replies must come from the listener"
        done = of_kind(events, DONE)
        # responses=2: each flow ended with its second reply; the event names the client.
        assert {ev[10] for ev in done} == {c.getsockname() for c in clients}
        assert all(ev[2] == 9 and REASONS[ev[3]] == "responses" for ev in done)
        assert all(ev[4:8] == (2, 4, 2, 4) for ev in done)
        assert len({peer for _, peer in origin.received}) == 3  # one socket per flow
        st = u.stats()
        assert st["flows_total"] == 3 and st["flows_open"] == 0 and st["pending_flows"] == 0


def test_oneway_listener_ends_each_flow_once_forwarded(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    laddr = lsn.getsockname()
    c = client()
    fds_before = count_fds()
    with UdpLoop(max_flows=4, idle_timeout_ms=60_000) as u:
        u.add_listener(lsn.fileno(), 3, False, backend=origin.addr, oneway=True)
        # More flows than max_flows, one after the other: each ends at once, nothing fills up.
        for i in range(12):
            c.sendto(b"m%d" % i, laddr)
            events = pump(u, lambda ev: bool(of_kind(ev, DONE)))
            (done,) = of_kind(events, DONE)
            assert REASONS[done[3]] == "responses" and done[4:8] == (1, 2 + (i >= 10), 0, 0)
            assert done[10] == c.getsockname()
        wait = time.monotonic() + 2
        while len(origin.received) < 12 and time.monotonic() < wait:
            time.sleep(0.01)
        assert [d for d, _ in origin.received] == [b"m%d" % i for i in range(12)]
        # The origin echoed every datagram; a one-way flow never reads it.
        assert recv_all(c, 1, timeout=0.3) == []
        st = u.stats()
        assert st["flows_total"] == 12 and st["flows_open"] == 0 and st["dgrams_s2c"] == 0
        assert st["drop_no_flow_slot"] == 0
        assert count_fds() <= fds_before + 3  # the loop's epoll, timerfd and listener dup
    c.close()
    lsn.close()


def test_oneway_add_flow_ends_after_the_held_datagrams(origin: UdpOrigin) -> None:
    lsn = udp_socket()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 1, False, oneway=True)
        for j in range(3):
            c.sendto(b"h%d" % j, lsn.getsockname())
        events = pump(u, lambda ev: bool(of_kind(ev, DONE)), on_new=accept_to(u, origin.addr))
        (done,) = of_kind(events, DONE)
        assert REASONS[done[3]] == "responses" and done[4] == 3
    assert recv_all(c, 1, timeout=0.3) == []


def test_close_flows_reports_every_flow_also_those_the_loop_opened(origin: UdpOrigin) -> None:
    auto, manual = udp_socket(), udp_socket()
    c = client()
    with UdpLoop(idle_timeout_ms=60_000) as u:
        u.add_listener(auto.fileno(), 1, False, backend=origin.addr)
        u.add_listener(manual.fileno(), 2, False)
        c.sendto(b"x", auto.getsockname())
        c.sendto(b"y", manual.getsockname())
        pump(u, lambda ev: u.stats()["dgrams_s2c"] == 2, on_new=accept_to(u, origin.addr))
        assert u.close_flows() == 2
        done = of_kind(pump(u, lambda ev: bool(ev)), DONE)
        assert sorted(ev[2] for ev in done) == [0, 1]  # add_flow tag 0 (accept_to), listener 1
        assert all(REASONS[ev[3]] == "closed" and ev[10] == c.getsockname() for ev in done)
        assert u.stats()["flows_open"] == 0 and u.close_flows() == 0


def test_backend_flow_the_loop_cannot_open_goes_to_python() -> None:
    # connect() of a UDP socket to the broadcast address without SO_BROADCAST fails (EACCES):
    # the loop hands the key to Python as a usual new flow instead of dropping it.
    target = ("255.255.255.255", 53)
    lsn = udp_socket()
    c = client()
    with UdpLoop() as u:
        u.add_listener(lsn.fileno(), 4, False, backend=target)
        c.sendto(b"z", lsn.getsockname())
        (new,) = of_kind(pump(u, lambda ev: bool(ev)), NEW)
        assert new[1] == 4 and new[3] == c.getsockname()
        assert u.stats()["errors"] == 1 and u.stats()["flows_total"] == 0
        u.refuse_flow(new[2], 0)


def test_add_listener_backend_arguments_are_checked() -> None:
    lsn = udp_socket()
    with UdpLoop() as u:
        with pytest.raises(ValueError, match="not a numeric address"):
            u.add_listener(lsn.fileno(), 1, False, backend=("localhost", 53))
        with pytest.raises(ValueError, match="transparent listener cannot have a backend"):
            u.add_listener(lsn.fileno(), 1, True, backend=("127.0.0.1", 53))
        with pytest.raises(ValueError, match="backend port 0"):
            u.add_listener(lsn.fileno(), 1, False, backend=("127.0.0.1", 0))
