"""UDP through real `relay run` processes on loopback (backend mode; TPROXY and slices are the
netns tests'): DNS-style flows, idle expiry, the flow limit, reload, stats and /metrics."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import UdpOrigin, relay_cli, relay_totals, wait_for
from test_metrics import scrape, value

from relay.lab.process import relay_config


@pytest.fixture
def udp_origin() -> Iterator[Callable[..., UdpOrigin]]:
    made: list[UdpOrigin] = []

    def make(reply: Callable[[bytes], bytes | None] = lambda b: b) -> UdpOrigin:
        def answers(data: bytes) -> list[bytes]:
            out = reply(data)
            return [] if out is None else [out]

        o = UdpOrigin(reply=answers)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


def udp_relay(relays: Any, origin_port: int, *, workers: int = 2, responses: int = 0,
              settings: dict[str, Any] | None = None, extra_relay: str = "",
              listener_extra: str = "") -> Any:
    """A relay with UDP listener "dns" in backend mode towards 127.0.0.1:origin_port."""
    relay_settings = {"log_format": "json", **(settings or {})}
    rp = relays(lambda adm: relay_config(None, admin_socket=adm, workers=workers, drain=5.0,
                                         settings=relay_settings, extra_relay=extra_relay,
                                         extra=f'''
[[listener]]
name = "dns"
protocol = "udp"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{origin_port}"
udp_responses = {responses}
{listener_extra}'''))
    rp.wait_ready()
    return rp


def client(timeout: float = 2.0) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.settimeout(timeout)
    return c


def ask(addr: tuple[str, int], payload: bytes, timeout: float = 2.0) -> bytes | None:
    with client(timeout) as c:
        c.sendto(payload, addr)
        try:
            return c.recvfrom(70000)[0]
        except TimeoutError:
            return None


def udp_flows(rp: Any) -> list[dict[str, Any]]:
    return [r for r in rp.flows() if r.get("protocol") == "udp"]


@pytest.mark.timeout(60)
def test_dns_style_flows_close_at_once_and_both_workers_carry_them(
        udp_origin: Any, relays: Any) -> None:
    origin = udp_origin(lambda b: b"answer:" + b)
    rp = udp_relay(relays, origin.port, responses=1, settings={"udp_idle_timeout": 30.0})
    addr = rp.address("dns")
    n = 60
    for i in range(n):
        assert ask(addr, b"q%d" % i) == b"answer:q%d" % i
    # udp_responses = 1: each flow ended with its first reply, long before the idle timeout.
    records = rp.wait_flows(n)
    flows = [r for r in records if r.get("protocol") == "udp"]
    assert len(flows) == n
    assert {r["reason"] for r in flows} == {"responses"}
    assert all(r["c2s_dgrams"] == 1 and r["s2c_dgrams"] == 1 for r in flows)
    assert all(r["dest"] == f"127.0.0.1:{origin.port}" and r["listener"] == "dns" for r in flows)
    assert all(r["duration"] < 5.0 for r in flows)

    def settled() -> dict[str, Any] | None:
        workers = rp.workers()
        if all(w["stats"].get("udp_flows_total", 0) > 0 for w in workers) and sum(
                w["stats"].get("udp_flows_total", 0) for w in workers) == n:
            return {"workers": workers}
        return None

    wait_for(settled, 5.0, "both workers to have carried UDP flows (SO_REUSEPORT hash)")
    t = relay_totals(rp)
    assert t["udp_flows_open"] == 0
    assert t["udp_closed"]["responses"] == n
    assert t["udp_dgrams_c2s"] == t["udp_dgrams_s2c"] == n


@pytest.mark.timeout(60)
def test_oneway_flows_end_once_forwarded_and_are_logged(udp_origin: Any, relays: Any) -> None:
    # udp_oneway: every flow ends as soon as its datagram is forwarded (nginx proxy_responses 0),
    # long before the idle timeout; the origin's answers are never read; one log line per flow.
    origin = udp_origin(lambda b: b"ignored:" + b)
    rp = udp_relay(relays, origin.port, workers=1, settings={"udp_idle_timeout": 30.0},
                   listener_extra="udp_oneway = true\n")
    addr = rp.address("dns")
    n = 40
    socks = [client(timeout=0.3) for _ in range(n)]
    for i, c in enumerate(socks):
        c.sendto(b"m%d" % i, addr)
    wait_for(lambda: len(origin.received) >= n, 5.0, f"the origin to get {n} datagrams")
    assert sorted(d for d, _peer in origin.received) == sorted(b"m%d" % i for i in range(n))
    # A socket (source port) per flow.  A oneway flow's socket is closed once it has forwarded,
    # and the kernel may hand that port to a later flow: 39 of 40 distinct in one make test
    # (about 3 % of runs, 40 picks from the ephemeral range).  A shared socket would give 1.
    assert len({peer for _d, peer in origin.received}) >= n - 3
    records = [r for r in rp.wait_flows(n) if r.get("protocol") == "udp"]
    assert len(records) == n
    assert {r["reason"] for r in records} == {"responses"}
    assert all(r["c2s_dgrams"] == 1 and r["s2c_dgrams"] == 0 for r in records)
    assert {r["client"] for r in records} == {f"127.0.0.1:{c.getsockname()[1]}" for c in socks}
    assert all(r["dest"] == f"127.0.0.1:{origin.port}" and r["egress"] == "" for r in records)
    wait_for(lambda: relay_totals(rp)["udp_flows_total"] == n, 5.0, f"udp_flows_total == {n}")
    t = relay_totals(rp)
    assert t["udp_flows_open"] == 0
    assert t["udp_closed"]["responses"] == n and t["udp_dgrams_s2c"] == 0
    # The origin answered every datagram; nothing reached a client.
    with pytest.raises(TimeoutError):
        socks[0].recvfrom(100)
    # The same client's next datagram is a new flow.
    socks[0].sendto(b"again", addr)
    wait_for(lambda: relay_totals(rp)["udp_flows_total"] == n + 1, 5.0, "a new flow for 'again'")
    for c in socks:
        c.close()


@pytest.mark.timeout(60)
def test_idle_timeout_frees_flows(udp_origin: Any, relays: Any) -> None:
    origin = udp_origin()
    rp = udp_relay(relays, origin.port, workers=1, settings={"udp_idle_timeout": 1.5})
    addr = rp.address("dns")
    socks = [client() for _ in range(5)]
    for c in socks:
        c.sendto(b"hello", addr)
        assert c.recvfrom(100)[0] == b"hello"
    wait_for(lambda: relay_totals(rp)["udp_flows_total"] == 5, 3.0, "udp_flows_total == 5")
    wait_for(lambda: relay_totals(rp)["udp_flows_open"] == 0, 6.0, "udp_flows_open == 0")
    flows = udp_flows(rp)
    assert len(flows) == 5 and {r["reason"] for r in flows} == {"idle_timeout"}
    assert all(r["duration"] >= 1.4 for r in flows)
    # The same client source port starts a new flow afterwards.
    socks[0].sendto(b"again", addr)
    assert socks[0].recvfrom(100)[0] == b"again"
    for c in socks:
        c.close()


@pytest.mark.timeout(60)
def test_flood_beyond_max_flows_is_dropped_counted_and_does_not_grow(
        udp_origin: Any, relays: Any) -> None:
    origin = udp_origin()
    rp = udp_relay(relays, origin.port, workers=1,
                   settings={"udp_max_flows": 8, "udp_idle_timeout": 30.0})
    addr = rp.address("dns")
    # Many client source ports, as a spoofing client would use: 200 new keys in a burst.
    socks = [client(0.5) for _ in range(200)]
    for c in socks:
        c.sendto(b"x", addr)
    time.sleep(1.0)
    answered = 0
    for c in socks:
        c.setblocking(False)
        try:
            c.recvfrom(100)
            answered += 1
        except BlockingIOError:  # nothing came back
            pass
    assert answered == 8
    # Stats reach the supervisor once a second: wait for the snapshot that saw the burst.
    t = wait_for(lambda: (t := relay_totals(rp))["udp_drops"]["no_flow_slot"] >= 192 and t, 5.0,
                 "no_flow_slot drops >= 192")
    assert t["udp_flows_open"] == 8 and t["udp_flows_total"] == 8
    assert t["udp_drops"]["no_flow_slot"] == 192
    assert len({p for p in origin.peers}) == 8
    # A second wave changes nothing: still 8 flows, every datagram counted as dropped.
    for c in socks[8:]:
        c.sendto(b"y", addr)
    wait_for(lambda: relay_totals(rp)["udp_drops"]["no_flow_slot"] == 384, 3.0,
             "no_flow_slot drops == 384")
    assert relay_totals(rp)["udp_flows_open"] == 8
    for c in socks:
        c.close()


@pytest.mark.timeout(60)
def test_largest_and_empty_datagrams_pass_intact(udp_origin: Any, relays: Any) -> None:
    origin = udp_origin()
    rp = udp_relay(relays, origin.port, workers=1)
    addr = rp.address("dns")
    big = os.urandom(65507)  # the largest IPv4 UDP payload
    with client() as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        c.sendto(big, addr)
        assert c.recvfrom(70000)[0] == big
        c.sendto(b"", addr)
        assert c.recvfrom(100)[0] == b""
    # Read the drops from the same (fresh) report that shows the bytes: the supervisor's
    # snapshot lags about a second, so an earlier read would always see zero.
    t = wait_for(lambda: (lambda t: t if t["udp_bytes_s2c"] == len(big) else None)(
        relay_totals(rp)), 3.0, "the worker's report of the 65,507-byte reply")
    assert t["udp_drops"]["truncated"] == 0


@pytest.mark.timeout(90)
def test_reload_serves_new_flows_without_failure(udp_origin: Any, relays: Any) -> None:
    origin = udp_origin()
    rp = udp_relay(relays, origin.port, workers=2, settings={"udp_idle_timeout": 30.0})
    addr = rp.address("dns")
    old = [client() for _ in range(6)]
    for c in old:
        c.sendto(b"old", addr)
        assert c.recvfrom(100)[0] == b"old"
    failures: list[int] = []
    done = threading.Event()

    def stream() -> None:
        i = 0
        while not done.is_set():
            if ask(addr, b"n%d" % i, timeout=3.0) != b"n%d" % i:
                failures.append(i)
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(0.3)
    rp.send_signal(signal.SIGHUP)
    wait_for(lambda: {w["generation"] for w in rp.workers()} == {2}
             and all(w["stats"].get("udp_started") for w in rp.workers()), 20.0,
             "generation 2 alone, its UDP started")
    time.sleep(0.5)
    done.set()
    t.join(10)
    assert failures == [], f"new flows failed during the reload: {failures}"
    # The old generation's flows ended with reason "reload" (they do not survive a reload).
    reloaded = [r for r in udp_flows(rp) if r["reason"] == "reload"]
    old_ports = {c.getsockname()[1] for c in old}
    assert old_ports <= {int(r["client"].rsplit(":", 1)[1]) for r in reloaded}
    # ... and the same clients start new flows in the new generation.
    for c in old:
        c.sendto(b"again", addr)
        assert c.recvfrom(100)[0] == b"again"
    for c in old:
        c.close()


@pytest.mark.timeout(60)
def test_stats_and_metrics_count_the_same_datagrams(udp_origin: Any, relays: Any) -> None:
    origin = udp_origin(lambda b: b + b)
    rp = udp_relay(relays, origin.port, workers=2, responses=1,
                   extra_relay='metrics_listen = "127.0.0.1:0"')
    address = rp.stats()["admin"]["metrics"]
    addr = rp.address("dns")
    n = 20
    for i in range(n):
        assert ask(addr, b"%04d" % i) == b"%04d" % i * 2

    def counted() -> dict[str, Any] | None:
        m = scrape(address)
        if value(m, "relay_udp_closes_total", reason="responses") == n:
            return m
        return None

    m = wait_for(counted, 5.0, f"{n} UDP closes with reason responses")
    assert value(m, "relay_udp_flows_total") == n
    assert value(m, "relay_udp_flows_open") == 0
    assert value(m, "relay_udp_datagrams_total", direction="c2s") == n
    assert value(m, "relay_udp_datagrams_total", direction="s2c") == n
    assert value(m, "relay_udp_bytes_total", direction="c2s") == 4 * n
    assert value(m, "relay_udp_bytes_total", direction="s2c") == 8 * n
    t = relay_totals(rp)
    assert t["udp_dgrams_c2s"] == n and t["udp_bytes_s2c"] == 8 * n
    text = rp.admin("stats")
    assert f"udp: flows open 0, total {n}" in text
    assert f"udp closes: responses={n}" in text


def test_relay_check_refuses_what_udp_cannot_do(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('''
[[listener]]
name = "a"
protocol = "udp"
bind = "127.0.0.1:5353"
mode = "redirect"

[[listener]]
name = "b"
protocol = "udp"
bind = "127.0.0.1:5354"
backend = "unix:/run/x.sock"
proxy_protocol = "v2"

[[listener]]
name = "c"
bind = "127.0.0.1:5355"
backend = "127.0.0.1:53"
udp_responses = 1
udp_oneway = true

[[listener]]
name = "d"
protocol = "udp"
bind = "127.0.0.1:5356"
backend = "127.0.0.1:53"
udp_responses = 2
udp_oneway = true
''')
    out = relay_cli("check", "-c", str(path))
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert f'{path}: listener[0].mode: "redirect": not available for protocol = "udp"' in text
    assert f'{path}: listener[1].backend: "unix:/run/x.sock": a unix socket backend' in text
    assert f'{path}: listener[1].proxy_protocol: "v2": TCP only' in text
    assert f'{path}: listener[2].udp_responses: 1: only used with protocol = "udp"' in text
    assert f'{path}: listener[2].udp_oneway: true: only used with protocol = "udp"' in text
    assert f'{path}: listener[3].udp_oneway: true: a one-way flow reads no replies' in text


@pytest.mark.timeout(60)
def test_udp_address_served_by_another_process_is_refused(relays: Any, tmp_path: Any) -> None:
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("127.0.0.1", 0))
    port = squatter.getsockname()[1]
    try:
        rp = relays(lambda adm: relay_config(None, admin_socket=adm, extra=f'''
[[listener]]
name = "dns"
protocol = "udp"
bind = "127.0.0.1:{port}"
backend = "127.0.0.1:9"
'''))
        assert rp.wait_exit(30) != 0
        assert "another process already serves this UDP address" in rp.output()
    finally:
        squatter.close()
