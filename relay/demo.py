"""`relay demo` (`make demo`): the relay doing its job on this machine, in under a minute.

Part 1, loopback, any user: an origin, the relay in front of it (backend mode, default engine)
and a plain asyncio streams proxy beside it; the same transfers through each, interleaved; then
connections that end badly on purpose. Summary: throughput against direct, bytes spliced vs
copied, how each connection ended (from the relay's flow log).

Part 2, root only: three hosts in network namespaces (client, relay, origin). The origin owns
several "internet" addresses; the relay host intercepts the client's connections with TPROXY
(rules from `relay nft`) and relays them from a soft-unicast address that is on none of its
interfaces (relay/data/demo.toml). Summary: the flow table (original destination -> soft-unicast
source) checked against what the origin saw, and the throughput. Then UDP through the same
slice: DNS (`dig` -> `dnsmasq`) and an HTTP/3 request over QUIC (aioquic), each flow's egress
checked against what the server saw, and the origin's counters of UDP from inside and outside
the slice (a missing tool skips its part, with the reason).

Every process and namespace the demo creates is removed before it returns, also on failure.
Internal roles (used by the demo itself, in its namespaces): ``--serve-origin`` and
``--run-client``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from typing import Any

from relay.lab.netlab import syn_counters, three_hosts
from relay.lab.netns import Topology, netns_unavailable_reason
from relay.lab.origins import read_line, serve_origin, split_hostport
from relay.lab.process import (
    PYTHON,
    SOURCE_ROOT,
    ReadyProcess,
    RelayProcess,
    child_env,
    flow_records,
)
from relay.lab.quic import quic_unavailable_reason, self_signed
from relay.lab.udp import UDP_TABLE, dnsmasq_argv, dnsmasq_queries, udp_counters
from relay.serve.flowlog import format_addr
from relay.sock import arm_reset

__all__ = ["main", "run_client", "transfer"]

MIB = 1 << 20
CHUNK = MIB  # one send()/recv_into() call moves up to this much


# -- the client ---------------------------------------------------------------------------------


def transfer(dest: tuple[str, int], nbytes: int, timeout: float = 20.0) -> dict[str, Any]:
    """Send ``nbytes`` to an origin through whatever is at ``dest``; what both ends saw."""
    payload = memoryview(bytes(CHUNK))
    with socket.create_connection(dest, timeout=timeout) as sock:
        seen = read_line(sock)
        started = time.perf_counter()
        left = nbytes
        while left:
            left -= sock.send(payload[: min(left, CHUNK)])
        sock.shutdown(socket.SHUT_WR)
        answer = read_line(sock)
        seconds = time.perf_counter() - started
    return {
        "dest": format_addr(dest),
        "origin_saw_source": seen[1],
        "origin_saw_dest": seen[2],
        "sent": nbytes,
        "origin_got": int(answer[1]),
        "seconds": seconds,
    }


def run_client(dests: Sequence[str], nbytes: int, per_dest: int) -> dict[str, Any]:
    """``per_dest`` concurrent transfers to each destination: each one's result, and the wall
    time of them all."""
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(dest: tuple[str, int]) -> None:
        try:
            res = transfer(dest, nbytes)
        except OSError as exc:
            with lock:
                errors.append(f"{format_addr(dest)}: {exc}")
            return
        with lock:
            results.append(res)

    threads = [threading.Thread(target=one, args=(split_hostport(d),)) for d in dests
               for _ in range(per_dest)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise ConnectionError("; ".join(errors))
    return {"results": results, "wall": time.perf_counter() - started}


# -- processes ----------------------------------------------------------------------------------


def _python(*args: str) -> list[str]:
    return [PYTHON, "-m", *args]


def _flows(log_path: str) -> list[dict[str, Any]]:
    try:
        with open(log_path) as f:
            return flow_records(f)
    except FileNotFoundError:
        return []


def _engine_line(log_path: str) -> str:
    with contextlib.suppress(FileNotFoundError), open(log_path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                msg = str(json.loads(line).get("message", ""))
                if msg.startswith("server: engine "):
                    return msg[len("server: engine "):].split(";")[0]
    return "?"


def _started(procs: list[Any], proc: Any) -> Any:
    """``proc`` once it printed READY; it is in ``procs`` (stopped by the caller) either way."""
    procs.append(proc)
    proc.wait_ready(20)
    return proc


# -- part 1: loopback ---------------------------------------------------------------------------


def _gbit(res: dict[str, Any]) -> float:
    return float(res["origin_got"]) * 8 / res["seconds"] / 1e9


def _streams_proxy(procs: list[Any], backend: tuple[str, int]) -> ReadyProcess | str:
    """The baseline: bench's plain asyncio streams proxy, or why it can't run."""
    # Started in SOURCE_ROOT, so `-m bench...` finds it exactly when the source tree is there.
    if not os.path.exists(os.path.join(SOURCE_ROOT, "bench", "competitors",
                                       "asyncio_streams.py")):
        return "bench/ (the source tree) not found"
    proxy: ReadyProcess = _started(procs, ReadyProcess(
        _python("bench.competitors.asyncio_streams", "--listen", "127.0.0.1:0", "--backend",
                format_addr(backend)), name="asyncio streams proxy"))
    return proxy


def _ending_badly(listeners: dict[str, tuple[str, int]]) -> None:
    """One connection per bad ending the flow log should name."""
    with socket.create_connection(listeners["main"], timeout=5) as sock:  # client aborts
        read_line(sock)
        sock.sendall(b"x" * 1000)
        arm_reset(sock)
    for name in ("flaky", "dead"):  # the origin aborts; nobody listens at the backend
        with contextlib.suppress(OSError), socket.create_connection(listeners[name], 5) as sock:
            sock.sendall(b"x" * 1000)
            while sock.recv(CHUNK):
                pass


def part1(workdir: str, nbytes: int, rounds: int) -> dict[str, Any]:
    from relay.config import dumps, from_dict

    procs: list[Any] = []
    try:
        origin = _started(procs, ReadyProcess(
            _python("relay.demo", "--serve-origin", "127.0.0.1:0", "127.0.0.1:0/reset"),
            name="origin"))
        sink, flaky = (split_hostport(a) for a in origin.ready.split()[1:])
        with socket.socket() as hole:  # bound, never listening: connecting to it is refused
            hole.bind(("127.0.0.1", 0))
            dead = hole.getsockname()
            log_path = os.path.join(workdir, "relay-part1.log")
            cfg = from_dict({
                "relay": {"workers": 1, "log_format": "json", "log_file": log_path},
                "listener": [
                    {"name": "main", "bind": "127.0.0.1:0", "backend": format_addr(sink)},
                    {"name": "flaky", "bind": "127.0.0.1:0", "backend": format_addr(flaky)},
                    {"name": "dead", "bind": "127.0.0.1:0", "backend": format_addr(dead)},
                ],
            })
            path = os.path.join(workdir, "part1.toml")
            with open(path, "w") as f:
                f.write(dumps(cfg, comments=False))
            relay = RelayProcess(path)
            procs.append(relay)
            listeners = relay.wait_ready(20)
            baseline = _streams_proxy(procs, sink)
            paths = {"direct": sink, "relay": listeners["main"]}
            if isinstance(baseline, ReadyProcess):
                paths["asyncio streams proxy"] = ("127.0.0.1", int(baseline.ready.split()[1]))
            best: dict[str, float] = {}
            for _ in range(rounds):  # interleaved: machine noise hits every path alike
                for name, dest in paths.items():
                    res = transfer(dest, nbytes)
                    if res["origin_got"] != nbytes:
                        raise RuntimeError(f"{name}: origin got {res['origin_got']} of {nbytes}")
                    best[name] = max(best.get(name, 0.0), _gbit(res))
            _ending_badly(listeners)
            relay.stop()  # SIGTERM: drains, every flow is logged before it exits
        flows = _flows(log_path)
        return {
            "engine": _engine_line(log_path),
            "bytes_per_transfer": nbytes,
            "rounds": rounds,
            "gbit_s": best,
            "baseline_skipped": baseline if isinstance(baseline, str) else "",
            "spliced_bytes": sum(int(f["spliced_bytes"]) for f in flows),
            "copied_bytes": sum(int(f["copied_bytes"]) for f in flows),
            "endings": dict(Counter(f"{f['listener']}:{f['reason']}" for f in flows)),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def print_part1(s: dict[str, Any]) -> None:
    print(f"part 1: loopback, relay engine {s['engine']}")
    print(f"  throughput, {s['bytes_per_transfer'] // MIB} MiB one way, best of {s['rounds']} "
          "(interleaved, one batch):")
    direct = s["gbit_s"].get("direct") or 1.0
    for name, gbit in s["gbit_s"].items():
        print(f"    {name:<24} {gbit:7.2f} Gbit/s  {gbit / direct:5.2f}x direct")
    if s["baseline_skipped"]:
        print(f"    asyncio streams proxy: not measured ({s['baseline_skipped']})")
    total = s["spliced_bytes"] + s["copied_bytes"]
    share = 100.0 * s["spliced_bytes"] / total if total else 0.0
    print(f"  bytes through the relay: {s['spliced_bytes']} spliced ({share:.1f} %), "
          f"{s['copied_bytes']} copied")
    endings = ", ".join(f"{k} x{v}" for k, v in sorted(s["endings"].items()))
    print(f"  connections, listener:how each ended: {endings}")


# -- part 2: network namespaces -------------------------------------------------------------


DESTINATIONS = ("198.51.100.10:80", "198.51.100.11:443", "198.51.100.12:8080",
                "[2001:db8:100::10]:443")
DNS_SERVERS = ("198.51.100.10", "2001:db8:100::10")  # dnsmasq, port 53
DNS_NAME, DNS_ANSWERS = "www.example.test", ("192.0.2.80", "2001:db8::80")
HTTP3_SERVERS = ("198.51.100.11:443", "[2001:db8:100::11]:443")  # aioquic, UDP


class _UdpPart:
    """Part 2's UDP: dnsmasq and an HTTP/3 server in the origin host, dig and an HTTP/3 client
    in the client host; whatever is missing is skipped with the reason."""

    def __init__(self, topo: Topology, origin: str, client: str, workdir: str,
                 procs: list[Any], env: dict[str, str | None]) -> None:
        self.topo, self.origin, self.client, self.workdir = topo, origin, client, workdir
        self.skipped: dict[str, str] = {}
        self.dig: list[dict[str, str]] = []
        self.http3: list[dict[str, Any]] = []
        self.dnsmasq_log = os.path.join(workdir, "dnsmasq.log")
        self.counters_before = {"in_slice": 0, "outside": 0}
        missing = [t for t in ("dig", "dnsmasq") if shutil.which(t) is None]
        if missing:
            self.skipped["dns"] = (f"{' and '.join(missing)} not installed (Debian: "
                                   "bind9-dnsutils, dnsmasq-base)")
        else:
            with open(self.dnsmasq_log, "wb") as out:
                topo.popen(origin, dnsmasq_argv(DNS_SERVERS, {DNS_NAME: DNS_ANSWERS}),
                           stdout=out, stderr=subprocess.STDOUT)
        self.ca = ""
        reason = quic_unavailable_reason()
        if reason is not None:
            self.skipped["http3"] = reason
        else:
            cert, key = self_signed(workdir)
            self.ca = str(cert)
            _started(procs, ReadyProcess(
                _python("relay.lab.quic", "serve", "--cert", str(cert), "--key", str(key),
                        *HTTP3_SERVERS), name="HTTP/3 origin", netns=origin, env=env))

    def ready(self) -> None:
        """Wait until dnsmasq answers (asked inside the origin host), then take the counters'
        baseline: from here on they count what came through the relay."""
        if "dns" not in self.skipped:
            deadline = time.monotonic() + 10
            while self._dig(self.origin, DNS_SERVERS[0], "A") != DNS_ANSWERS[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not answer in 10 s")
                time.sleep(0.1)
        self.counters_before = self.counters()

    def _dig(self, ns: str, server: str, qtype: str) -> str:
        res = self.topo.run(ns, ["dig", "+short", "+tries=1", "+time=3", f"@{server}",
                                 DNS_NAME, qtype], check=False)
        return res.stdout.strip()

    def run_clients(self) -> None:
        if "dns" not in self.skipped:
            for server, qtype in zip(DNS_SERVERS, ("A", "AAAA"), strict=True):
                self.dig.append({"server": server, "query": f"{DNS_NAME} {qtype}",
                                 "answer": self._dig(self.client, server, qtype)})
        if "http3" not in self.skipped:
            for dest in HTTP3_SERVERS:
                res = self.topo.run(self.client, _python(
                    "relay.lab.quic", "get", "--ca", self.ca, dest, "/"), check=False,
                    timeout=30)
                if res.returncode != 0:
                    raise RuntimeError(f"HTTP/3 GET {dest}: {res.stderr.strip()[-300:]}")
                self.http3.append(json.loads(res.stdout))

    def counters(self) -> dict[str, int]:
        return {name: self.topo.nft_counter(self.origin, "inet", UDP_TABLE, name)[0]
                for name in ("in_slice", "outside")}

    def summary(self, flows: list[dict[str, Any]], after: dict[str, int]) -> dict[str, Any]:
        """The UDP flow table: each flow's egress (flow log) next to the source its server
        saw (dnsmasq's query log, the HTTP/3 server's answer)."""
        seen: dict[str, str] = {}
        if "dns" not in self.skipped and os.path.exists(self.dnsmasq_log):
            with open(self.dnsmasq_log) as log:
                for _qtype, _name, source in dnsmasq_queries(log.read()):
                    seen[format_addr(source)] = "dnsmasq"
        for res in self.http3:
            words = res["body"].split()
            if words[:1] == ["SEEN"]:
                seen[words[1]] = "HTTP/3 server"
        rows = []
        for f in flows:
            port = split_hostport(f["dest"])[1]
            rows.append({
                "app": {53: "dns", 443: "http3"}.get(port, "udp"),
                "destination": f["dest"],
                "relay_egress": f["egress"],
                "server_saw_it": seen.get(f["egress"], ""),
                "c2s_dgrams": f["c2s_dgrams"],
                "s2c_dgrams": f["s2c_dgrams"],
                "reason": f["reason"],
            })
        return {
            "skipped": self.skipped,
            "dig": self.dig,
            "http3": [{"dest": r["dest"], "status": r["status"], "seconds": r["seconds"]}
                      for r in self.http3],
            "flows": sorted(rows, key=lambda r: (r["app"], r["destination"])),
            "dgrams_from_slice": after["in_slice"] - self.counters_before["in_slice"],
            "dgrams_from_elsewhere": after["outside"] - self.counters_before["outside"],
        }


def part2(workdir: str, nbytes: int, per_dest: int) -> dict[str, Any]:
    from relay.config import load

    config = str(resources.files("relay") / "data" / "demo.toml")
    egress = load(config, environ={}).egress
    slices = [(e.address, int(e.ports.split("-")[0]), int(e.ports.split("-")[-1]))
              for e in egress]
    log_path = os.path.join(workdir, "relay-part2.log")
    env: dict[str, str | None] = {"RELAY_LOG_FILE": log_path}
    procs: list[Any] = []
    # The lab of the network tests (relay/lab/netlab.py), under the demo's own prefix.
    with Topology(prefix=f"rlyd-{os.getpid()}-") as topo:
        lab = three_hosts(topo)
        try:
            topo.nft(lab.origin, syn_counters(slices))
            topo.nft(lab.origin, udp_counters(slices))
            _started(procs, ReadyProcess(_python("relay.demo", "--serve-origin", *DESTINATIONS),
                                         name="origin", netns=lab.origin, env=env))
            udp = _UdpPart(topo, lab.origin, lab.client, workdir, procs, env)
            udp.ready()
            rules = topo.run(lab.relay, _python("relay", "nft", "-c", config, "--ingress",
                                                lab.relay_ingress, "--apply"), check=False)
            if rules.returncode != 0:
                raise RuntimeError(f"relay nft --apply: {rules.stderr.strip()}")
            relay = RelayProcess(config, netns=lab.relay, env=env)
            procs.append(relay)
            relay.wait_ready(20)
            client = subprocess.run(
                ["ip", "netns", "exec", lab.client,
                 *_python("relay.demo", "--bytes", str(nbytes), "--per-dest", str(per_dest),
                          "--run-client", *DESTINATIONS)],
                capture_output=True, text=True, timeout=60, env=child_env(env), cwd=SOURCE_ROOT)
            if client.returncode != 0:
                raise RuntimeError(f"client: {client.stderr.strip()[-500:]}")
            report = json.loads(client.stdout)
            results, wall = report["results"], report["wall"]
            udp.run_clients()
            relay.stop()  # SIGTERM: drain and log every flow (open UDP flows end "closed")
            syns = {name: topo.nft_counter(lab.origin, "inet", "origin", name)[0]
                    for name in ("in_slice", "outside")}
            udp_after = udp.counters()
        finally:
            for proc in reversed(procs):
                proc.stop()
    every = _flows(log_path)
    flows = [f for f in every if f.get("protocol", "tcp") == "tcp"]
    udp_summary = udp.summary([f for f in every if f.get("protocol") == "udp"], udp_after)
    # A flow log line and a client result belong together when the relay's upstream socket
    # (egress) is the source the origin saw.
    by_egress = {f["egress"]: f for f in flows}
    table = []
    for res in sorted(results, key=lambda r: (r["dest"], r["origin_saw_source"])):
        flow = by_egress.get(res["origin_saw_source"], {})
        table.append({
            "destination": res["dest"],
            "origin_saw_dest": res["origin_saw_dest"],
            "relay_egress": flow.get("egress", ""),
            "origin_saw_source": res["origin_saw_source"],
            "bytes": res["origin_got"],
            "reason": flow.get("reason", "?"),
        })
    return {
        "egress": [f"{e.address} ports {e.ports}" for e in egress],
        "flows": table,
        "syns_from_slice": syns["in_slice"],
        "syns_from_elsewhere": syns["outside"],
        "gbit_s": sum(r["origin_got"] for r in results) * 8 / wall / 1e9,
        "connections": len(results),
        "spliced_bytes": sum(int(f["spliced_bytes"]) for f in flows),
        "copied_bytes": sum(int(f["copied_bytes"]) for f in flows),
        "udp": udp_summary,
    }


def print_part2(s: dict[str, Any]) -> None:
    print("part 2: client -> relay host (TPROXY) -> origin; egress from soft-unicast "
          f"{' and '.join(s['egress'])} (on no interface of the relay host)")
    print(f"  {'original destination':<24} {'soft-unicast source':<26} {'origin saw':<26} "
          f"{'bytes':>10}  end")
    for row in s["flows"]:
        ok = "" if (row["relay_egress"] == row["origin_saw_source"]
                    and row["origin_saw_dest"] == row["destination"]) else "  MISMATCH"
        print(f"  {row['destination']:<24} {row['relay_egress']:<26} "
              f"{row['origin_saw_source']:<26} {row['bytes']:>10}  {row['reason']}{ok}")
    print(f"  {s['connections']} connections at once, {s['gbit_s']:.2f} Gbit/s together; "
          f"{s['spliced_bytes']} bytes spliced, {s['copied_bytes']} copied")
    print(f"  SYNs at the origin (nft counters): {s['syns_from_slice']} from the slice, "
          f"{s['syns_from_elsewhere']} from anywhere else")
    _print_udp(s["udp"])


def _print_udp(u: dict[str, Any]) -> None:
    print("  UDP through the same slice (TPROXY UDP), one line per flow from the flow log:")
    for part, why in u["skipped"].items():
        print(f"    {part}: skipped: {why}")
    for d in u["dig"]:
        print(f"    dig @{d['server']} {d['query']} -> {d['answer'] or '(no answer)'}")
    for h in u["http3"]:
        print(f"    HTTP/3 GET https://{h['dest']}/ -> {h['status']} in {h['seconds']:.3f} s")
    print(f"    {'app':<6} {'original destination':<24} {'soft-unicast source':<26} "
          f"{'server saw it':<14} {'dgrams c2s/s2c':>14}  end")
    for row in u["flows"]:
        saw = row["server_saw_it"] or "MISMATCH"
        dgrams = f"{row['c2s_dgrams']}/{row['s2c_dgrams']}"
        print(f"    {row['app']:<6} {row['destination']:<24} {row['relay_egress']:<26} "
              f"{saw:<14} {dgrams:>14}  {row['reason']}")
    print(f"  UDP datagrams at the origin (nft counters): {u['dgrams_from_slice']} from the "
          f"slice, {u['dgrams_from_elsewhere']} from anywhere else")


# -- entry point ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from relay.cli_docs import EXAMPLES

    p = argparse.ArgumentParser(prog="relay demo", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + EXAMPLES["demo"],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB per loopback transfer (part 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (part 1)")
    p.add_argument("--part", choices=("1", "2", "all"), default="all")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--serve-origin", nargs="+", metavar="HOST:PORT", help=argparse.SUPPRESS)
    p.add_argument("--run-client", nargs="+", metavar="HOST:PORT", help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, default=16 * MIB,
                   help="bytes per connection (part 2)")
    p.add_argument("--per-dest", type=int, default=4,
                   help="concurrent connections per destination (part 2)")
    return p


def main(args: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(args)
    if opts.serve_origin:
        serve_origin(opts.serve_origin)
        return 0
    if opts.run_client:
        json.dump(run_client(opts.run_client, opts.bytes, opts.per_dest), sys.stdout)
        return 0
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as workdir:
        try:
            if opts.part in ("1", "all"):
                summary["part1"] = part1(workdir, opts.mib * MIB, opts.rounds)
                print_part1(summary["part1"])
            if opts.part in ("2", "all"):
                reason = netns_unavailable_reason()
                if reason is not None:
                    summary["part2_skipped"] = reason
                    print(f"part 2 (network namespaces) skipped: {reason}")
                else:
                    summary["part2"] = part2(workdir, opts.bytes, opts.per_dest)
                    print_part2(summary["part2"])
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"relay demo: failed: {exc}", file=sys.stderr)
            return 1
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
