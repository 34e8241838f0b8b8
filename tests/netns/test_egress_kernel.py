"""Soft-unicast egress against a kernel: slice validation, ports inside the slice, sharing
across destinations, exhaustion, and fail-closed detection when the kernel ignores the slice.

Kernel-facing tests run in a network namespace made by the test (its own port space and its own
net.ipv4.ip_local_port_range / ip_local_reserved_ports), so the host is never touched and no
other process's ports interfere. The code under test runs in a Python child inside that
namespace and reports JSON; every assertion is made here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import REPO_ROOT

from relay.lab.netns import CommandFailed, Topology
from relay.serve import proxyproto

REPO = REPO_ROOT

_PRELUDE = f"""
import errno, json, os, socket, struct, sys, time
sys.path.insert(0, {REPO!r})
from relay import config
from relay.serve import egress
from relay.config import host
from relay.serve.routing import Denied, Router, SliceExhausted
"""


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, sysctls, IP_TRANSPARENT)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


@pytest.fixture
def ns() -> Iterator[tuple[Topology, str]]:
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with Topology() as topo:
        try:
            name = topo.host("e")
        except (CommandFailed, OSError) as exc:
            pytest.skip(f"cannot create a network namespace: {exc}")
        yield topo, name


def run_in_ns(topo: Topology, name: str, body: str, timeout: float = 20.0) -> Any:
    """Run `body` (Python; it sets `result`) inside the namespace; return `result`."""
    code = _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    proc = topo.run(name, [sys.executable, "-c", code], check=False, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"namespace child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- kernel checks in a netns

_VALIDATE = """
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 49999")
with open("/proc/sys/net/ipv4/ip_local_reserved_ports", "w") as f:
    f.write("45000-45010,47000")

def problems(*slices):
    text = '[[listener]]\\nbind = "127.0.0.1:0"\\nmode = "tproxy"\\n'
    for address, ports in slices:
        text += f'[[egress]]\\naddress = "{address}"\\nports = "{ports}"\\n'
    cfg = config.loads(text)
    return config.validate_host(cfg, "relay.toml")

cfg_bad = config.loads(
    '[[listener]]\\nbind = "127.0.0.1:0"\\nmode = "tproxy"\\n'
    '[[egress]]\\naddress = "192.0.2.1"\\nports = "30000-30007"\\n'
)
result = {
    "good": problems(("192.0.2.1", "41000-41007"), ("192.0.2.1", "41008-41015"),
                     ("192.0.2.2", "41000-41007")),
    "good_v6": problems(("2001:db8::1", "41000-41007")),
    "below": problems(("192.0.2.1", "30000-30007")),
    "straddles": problems(("192.0.2.1", "49990-50010")),
    "above_v6": problems(("2001:db8::1", "50000-50007")),
    "reserved_range": problems(("192.0.2.1", "44990-45001")),
    "reserved_single": problems(("192.0.2.1", "46990-47005")),
    "overlap": problems(("192.0.2.1", "42000-42100"), ("192.0.2.1", "42050-42200")),
    "validate_host": config.validate_host(cfg_bad, "relay.toml"),
    "host_range": host.read_port_range(),
    "host_reserved": host.read_reserved_ports(),
}
"""


def test_validate_slices_against_this_namespaces_kernel(ns: tuple[Topology, str]) -> None:
    topo, name = ns
    r = run_in_ns(topo, name, _VALIDATE)
    assert r["host_range"] == [40000, 49999]
    assert r["host_reserved"] == [[45000, 45010], [47000, 47000]]
    assert r["good"] == [] and r["good_v6"] == []
    for key in ("below", "straddles", "above_v6"):
        assert len(r[key]) == 1, r[key]
        assert "outside net.ipv4.ip_local_port_range 40000-49999" in r[key][0]
        assert "silently ignore" in r[key][0]
    assert r["reserved_range"] == [
        'relay.toml: egress[0].ports: "44990-45001": overlaps net.ipv4.ip_local_reserved_ports '
        "45000-45010"
    ]
    assert r["reserved_single"] == [
        'relay.toml: egress[0].ports: "46990-47005": overlaps net.ipv4.ip_local_reserved_ports '
        "47000"
    ]
    assert r["overlap"] == [
        'relay.toml: egress[1].ports: "42050-42200": overlaps egress[0] ports 42000-42100 on '
        "address 192.0.2.1"
    ]
    assert len(r["validate_host"]) == 1
    assert r["validate_host"][0].startswith("relay.toml: egress[0]")


def test_host_sysctls_untouched_by_namespace_tests(ns: tuple[Topology, str]) -> None:
    topo, name = ns
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        before = f.read()
    run_in_ns(topo, name, _VALIDATE)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert f.read() == before


_LOOPBACK_SLICE = """
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 49999")
SLICE = (41000, 41007)

def upstream(family, address, dest):
    e = egress.Egress(address, SLICE[0], SLICE[1], family, ())
    s = socket.socket(family, socket.SOCK_STREAM)
    egress.bind_upstream(s, e)
    bound = s.getsockname()[1]   # NO_PORT: nothing reserved yet
    start = time.monotonic()
    try:
        s.connect(dest)
    except OSError as exc:
        s.close()
        return {"errno": errno.errorcode[exc.errno], "seconds": time.monotonic() - start}
    local = egress.check_local_port(s, e)
    keep.append(s)
    return {"bound_port": bound, "local": list(local)}

keep = []
origins = []
for _ in range(3):
    o = socket.socket()
    o.bind(("127.0.0.1", 0))
    o.listen(64)
    origins.append(o)
dests = [o.getsockname() for o in origins]
per_dest = {str(d[1]): [upstream(socket.AF_INET, "127.0.0.1", d) for _ in range(8)]
            for d in dests}
ninth = upstream(socket.AF_INET, "127.0.0.1", dests[0])
for s in keep:  # reset (not FIN): the 4-tuples are free at once, no FIN_WAIT/TIME_WAIT
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
keep.clear()
again = upstream(socket.AF_INET, "127.0.0.1", dests[0])

o6 = socket.socket(socket.AF_INET6)
o6.bind(("::1", 0))
o6.listen(8)
v6 = upstream(socket.AF_INET6, "::1", o6.getsockname())
result = {"per_dest": per_dest, "ninth": ninth, "v6": v6, "again": again}
"""


def test_slice_ports_shared_across_destinations_and_exhaustion(ns: tuple[Topology, str]) -> None:
    topo, name = ns
    r = run_in_ns(topo, name, _LOOPBACK_SLICE)
    slice_ports = set(range(41000, 41008))
    assert len(r["per_dest"]) == 3
    for dest, conns in r["per_dest"].items():
        assert all("local" in c for c in conns), (dest, conns)
        assert all(c["bound_port"] == 0 for c in conns)  # the port came with connect()
        ports = {c["local"][1] for c in conns}
        assert ports == slice_ports, f"destination {dest}: ports {sorted(ports)}"
        assert {c["local"][0] for c in conns} == {"127.0.0.1"}
    assert r["ninth"]["errno"] == "EADDRNOTAVAIL"
    assert r["ninth"]["seconds"] < 0.5
    assert r["again"]["local"][1] in slice_ports  # ports came back once closed
    assert r["v6"]["local"][0] == "::1" and r["v6"]["local"][1] in slice_ports


_ROUTER_SLICE = """
# 10.77.0.0/24 is local to this namespace: the origins live there and so does the egress
# address; policy allows it (not loopback; private, hence allow_private).
os.system("ip route add local 10.77.0.0/24 dev lo")
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 49999")
import logging
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("relay.routing").addHandler(Keep())
logging.getLogger("relay.routing").setLevel(logging.INFO)

cfg = config.loads('''
[[listener]]
bind = "127.0.0.1:0"
mode = "tproxy"
[[egress]]
address = "10.77.0.1"
ports = "%s"
destinations = ["10.77.0.0/24"]
[policy]
allow_private = true
''' % SLICE)
router = Router(cfg.listener[0], cfg, set())

origins = []
for i in range(3):
    o = socket.socket()
    o.bind(("10.77.0.20", 0))
    o.listen(64)
    origins.append(o)

def as_tproxy_client(origin):
    # A socket whose local address is the origin, exactly what TPROXY hands the listener:
    # the original destination is getsockname() of the accepted socket.
    c = socket.create_connection(origin.getsockname())
    held.append(c)
    while True:  # the backlog also holds earlier upstream connections: find this client's
        a, peer = origin.accept()
        held.append(a)
        if peer == c.getsockname():
            a.setblocking(False)
            return a

def open_one(origin):
    client = as_tproxy_client(origin)
    start = time.monotonic()
    try:
        up = router.open_upstream(client)
    except Denied as exc:
        return {"denied": exc.reason, "exhausted": isinstance(exc, SliceExhausted),
                "seconds": time.monotonic() - start}
    finally:
        held.append(client)
    ups.append(up)
    return {"dest": list(up.dest), "egress": list(up.egress), "egress_address": up.egress_address,
            "connecting": up.connecting}

held, ups = [], []
result = {"validate": config.validate_host(cfg, "t.toml")}
result["per_origin"] = [[open_one(o) for _ in range(N)] for o in origins]
result["extra"] = open_one(origins[0])
result["extra2"] = open_one(origins[0])
result["log"] = records
for up in ups:
    os.close(up.fd)
"""


def test_router_uses_the_slice_and_fails_fast_when_exhausted(ns: tuple[Topology, str]) -> None:
    topo, name = ns
    r = run_in_ns(topo, name, 'SLICE = "41000-41007"\nN = 8\n' + _ROUTER_SLICE)
    assert r["validate"] == []
    for conns in r["per_origin"]:
        assert all("egress" in c for c in conns), conns
        assert {c["egress"][1] for c in conns} == set(range(41000, 41008))
        assert {c["egress"][0] for c in conns} == {"10.77.0.1"}
        assert {c["egress_address"] for c in conns} == {"10.77.0.1"}
        assert len({tuple(c["dest"]) for c in conns}) == 1
    for extra in (r["extra"], r["extra2"]):
        assert extra["denied"] == "slice_exhausted" and extra["exhausted"] is True
        assert extra["seconds"] < 0.2
    # One rate-limited warning for two exhaustions in a row, naming address and slice.
    exhausted_lines = [line for line in r["log"] if "exhausted" in line]
    assert len(exhausted_lines) == 1, r["log"]
    assert "10.77.0.1 ports 41000-41007" in exhausted_lines[0]


def test_slice_the_kernel_ignores_is_refused_before_connect(ns: tuple[Topology, str]) -> None:
    # 50000-50007 lies outside this namespace's ip_local_port_range (40000-49999): the kernel
    # would silently pick a port from the system range instead. The router refuses before
    # connect() (no SYN leaves), having read the sysctls itself.
    topo, name = ns
    r = run_in_ns(topo, name, 'SLICE = "50000-50007"\nN = 1\n' + _ROUTER_SLICE)
    assert len(r["validate"]) == 1 and "outside" in r["validate"][0]  # refused at start...
    for conns in r["per_origin"]:
        assert conns == [{"denied": "slice_unusable", "exhausted": False,
                          "seconds": conns[0]["seconds"]}]
    unusable = [line for line in r["log"] if "unusable" in line]
    assert len(unusable) == 1 and "ip_local_port_range 40000-49999" in unusable[0], r["log"]


def test_slice_the_kernel_ignores_is_caught_after_connect(ns: tuple[Topology, str]) -> None:
    # The last resort behind the pre-connect check (switched off here): getsockname() after
    # connect() shows a port outside the slice, and the router refuses the connection.
    topo, name = ns
    off = ("from relay.serve import slicecheck\n"
           "slicecheck.WATCH.problem = lambda lo, hi: None\n")
    r = run_in_ns(topo, name, 'SLICE = "50000-50007"\nN = 1\n' + off + _ROUTER_SLICE)
    for conns in r["per_origin"]:
        assert conns == [{"denied": "slice_violation", "exhausted": False,
                          "seconds": conns[0]["seconds"]}]
    assert any("slice violation" in line for line in r["log"]), r["log"]


_LOOP = """
os.system("ip route add local 10.77.0.0/24 dev lo")
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 49999")
cfg = config.loads('''
[[listener]]
bind = "0.0.0.0:0"
mode = "tproxy"
[[egress]]
address = "10.77.0.1"
ports = "41000-41007"
destinations = ["10.99.0.0/16"]
[policy]
allow_private = true
''')
router = Router(cfg.listener[0], cfg, {"10.77.0.5"})
origin = socket.socket()
origin.bind(("10.77.0.20", 0))
origin.listen(8)

def deny_reason(src, dst_sock):
    c = socket.socket()
    if src is not None:
        c.bind(src)
    c.connect(dst_sock.getsockname())
    a, _ = dst_sock.accept()
    fds = len(os.listdir("/proc/self/fd"))
    try:
        up = router.open_upstream(a)
    except Denied as exc:
        reason = exc.reason
    else:
        os.close(up.fd)
        reason = None
    leaked = len(os.listdir("/proc/self/fd")) - fds
    a.close()
    c.close()
    return [reason, leaked]

own = socket.socket()
own.bind(("10.77.0.5", 0))
own.listen(8)
egress_addr = socket.socket()
egress_addr.bind(("10.77.0.1", 0))
egress_addr.listen(8)
result = {
    # A client coming from our own egress address and slice: our upstream came back.
    "from_own_slice": deny_reason(("10.77.0.1", 41003), origin),
    # Same address, port outside the slice: not our upstream, so no "loop"; but no egress
    # covers 10.77/16 and the destination is this host itself: "own_address".
    "from_other_port": deny_reason(("10.77.0.1", 39000), origin),
    "to_own_address": deny_reason(None, own),
    "to_egress_address": deny_reason(None, egress_addr),
}
"""


def test_loops_are_refused_at_the_first_hop(ns: tuple[Topology, str]) -> None:
    topo, name = ns
    r = run_in_ns(topo, name, _LOOP)
    assert r["from_own_slice"] == ["loop", 0]
    # 10.77.0.20 is an address of this very host (a local route) and no egress covers it:
    # the kernel sources the upstream from 10.77.0.20 itself, which the router spots.
    assert r["from_other_port"] == ["own_address", 0]
    assert r["to_own_address"] == ["own_address", 0]
    assert r["to_egress_address"] == ["own_address", 0]


_REDIRECT = """
import subprocess
os.system("ip route add local 10.77.0.0/24 dev lo")
# IPv6 binds need an assigned address (a local route is not enough, unlike IPv4).
for host in ("1", "20", "30"):
    os.system(f"ip -6 addr add 2001:db8:77::{host}/128 dev lo nodad")
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 49999")
cfg = config.loads('''
[[listener]]
bind = "0.0.0.0:0"
mode = "redirect"
proxy_protocol = "v2"
[[egress]]
address = "10.77.0.1"
ports = "41000-41007"
[[egress]]
address = "2001:db8:77::1"
ports = "41000-41007"
[policy]
allow_private = true
''')
from relay.sock import open_listener
relay4 = open_listener(cfg.listener[0].bind_address)
relay6 = open_listener(("::", relay4.getsockname()[1]))
port = relay4.getsockname()[1]
# Clients' connections to port 9999 are NATed to the relay; the relay's own upstreams leave
# from the egress addresses and are not.
rules = '''
table inet rlytest {
  chain out {
    type nat hook output priority -100;
    ip saddr != 10.77.0.1 tcp dport 9999 redirect to :%d
    ip6 saddr != 2001:db8:77::1 tcp dport 9999 redirect to :%d
  }
}
''' % (port, port)
subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
router = Router(cfg.listener[0], cfg, set())

def through_relay(family, origin_ip, listener):
    origin = socket.socket(family)
    origin.bind((origin_ip, 9999))
    origin.listen(4)
    client = socket.socket(family)
    client.bind((origin_ip.replace("::20", "::30").replace(".20", ".30"), 0))
    client.connect((origin_ip, 9999))
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    up = router.open_upstream(accepted)
    upstream = socket.socket(fileno=up.fd)
    upstream.setblocking(True)
    upstream.sendall(up.prefix)
    seen, peer = origin.accept()
    got = seen.recv(200)
    out = {"dest": list(up.dest), "egress": list(up.egress), "origin_saw_peer": list(peer[:2]),
           "prefix_ok": got == up.prefix, "prefix": up.prefix.hex(),
           "client": list(client.getsockname()[:2])}
    for s in (origin, client, accepted, upstream, seen):
        s.close()
    return out

result = {"v4": through_relay(socket.AF_INET, "10.77.0.20", relay4),
          "v6": through_relay(socket.AF_INET6, "2001:db8:77::20", relay6)}
"""


def test_redirect_mode_relays_to_the_original_destination(ns: tuple[Topology, str]) -> None:
    if shutil.which("nft") is None:
        pytest.skip("`nft` is not installed (Debian: apt-get install nftables)")
    topo, name = ns
    r = run_in_ns(topo, name, _REDIRECT)
    for fam, origin_ip, egress_ip in (
        ("v4", "10.77.0.20", "10.77.0.1"),
        ("v6", "2001:db8:77::20", "2001:db8:77::1"),
    ):
        got = r[fam]
        assert got["dest"] == [origin_ip, 9999], got  # SO_ORIGINAL_DST, not the relay port
        assert got["egress"][0] == egress_ip and 41000 <= got["egress"][1] <= 41007
        assert got["origin_saw_peer"] == got["egress"]  # nothing rewrote the source
        assert got["prefix_ok"]
        _, info = proxyproto.parse(bytes.fromhex(got["prefix"]))
        assert info.src == tuple(got["client"]) and info.dst == (origin_ip, 9999)
