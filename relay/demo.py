"""`relay demo` (`make demo`): the relay doing its job on this machine, in under a minute.

Part 1, loopback, any user: an origin, the relay in front of it (backend mode, default engine)
and a plain asyncio streams proxy beside it; the same transfers through each, interleaved; then
connections that end badly on purpose. Summary: throughput against direct, bytes spliced vs
copied, how each connection ended (from the relay's flow log).

Part 2, root only: three hosts in network namespaces (client, relay, origin). The origin owns
several "internet" addresses; the relay host intercepts the client's connections with TPROXY
(rules from `relay nft`) and relays them from a soft-unicast address that is on none of its
interfaces (relay/data/demo.toml). Summary: the flow table (original destination -> soft-unicast
source) checked against what the origin saw, and the throughput.

Every process and namespace the demo creates is removed before it returns, also on failure.
Internal roles (used by the demo itself, in its namespaces): ``--serve-origin`` and
``--run-client``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from relay.serve.flowlog import format_addr
from relay.sock import arm_reset

__all__ = ["main", "read_line", "serve_connection", "serve_origin", "transfer"]

MIB = 1 << 20
CHUNK = MIB  # one send()/recv_into() call moves up to this much
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- the origin: "SEEN <peer> <local>", read to EOF, "BYTES <n>" -----------------------------


def serve_connection(conn: socket.socket, reset: bool = False) -> None:
    """The origin's side of one connection (the demo's and the network tests' origin)."""
    with conn:
        peer, local = conn.getpeername(), conn.getsockname()
        conn.sendall(f"SEEN {format_addr(peer)} {format_addr(local)}\n".encode())
        buf = bytearray(CHUNK)
        if reset:  # read something, then abort: the relay must pass the RST on
            conn.recv_into(buf)
            arm_reset(conn)
            return
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(f"BYTES {total}\n".encode())


def serve_origin(specs: Sequence[str]) -> None:
    """Listen on each "HOST:PORT" (port 0: any; suffix "/reset": abort every connection),
    print "READY addr..." and serve until killed."""
    bound = []
    for spec in specs:
        text, _, mode = spec.partition("/")
        host, port = _split(text)
        lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(256)
        bound.append(format_addr(lsock.getsockname()))

        def accept_loop(lsock: socket.socket = lsock, reset: bool = mode == "reset") -> None:
            while True:
                conn, _ = lsock.accept()
                threading.Thread(target=serve_connection, args=(conn, reset), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()
    print("READY " + " ".join(bound), flush=True)
    threading.Event().wait()


# -- the client ---------------------------------------------------------------------------------


def read_line(sock: socket.socket) -> list[str]:
    """One line from the origin, split in words."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed before a full line ({data!r})")
        data += chunk
    return data.decode().split()


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

    threads = [threading.Thread(target=one, args=(_split(d),)) for d in dests
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


class Proc:
    """A child process in its own session; ``ready`` is its first stdout line starting with
    READY. ``stop()`` ends it and everything it forked (its session), never anything else."""

    def __init__(self, argv: Sequence[str], name: str, timeout: float = 20.0,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
            env=env, cwd=_REPO,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._pump_err, daemon=True).start()
        threading.Thread(target=self._pump_out, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = " | ".join(self.stderr[-3:]) or "no output"
                    raise RuntimeError(f"{name} did not start: {tail}") from None
                continue
            if line.startswith("READY"):
                self.ready = line
                return

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind in its session
        self.proc.wait(5)


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _flows(log_path: str) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(log_path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("logger") == "relay.flow":
                    out.append(rec)
    return out


def _engine_line(log_path: str) -> str:
    with contextlib.suppress(FileNotFoundError), open(log_path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                msg = str(json.loads(line).get("message", ""))
                if msg.startswith("server: engine "):
                    return msg[len("server: engine "):].split(";")[0]
    return "?"


def _listeners(ready: str) -> dict[str, tuple[str, int]]:
    """'READY pid=1 listeners=main=127.0.0.1:4000,b=...' -> {"main": ("127.0.0.1", 4000)}."""
    text = ready.split("listeners=", 1)[1].split()[0]
    return {name: _split(addr) for name, addr in (p.split("=", 1) for p in text.split(","))}


# -- part 1: loopback ---------------------------------------------------------------------------


def _gbit(res: dict[str, Any]) -> float:
    return float(res["origin_got"]) * 8 / res["seconds"] / 1e9


def _streams_proxy(backend: tuple[str, int]) -> Proc | str:
    """The baseline: bench's plain asyncio streams proxy, or why it can't run."""
    # Started with cwd=_REPO, so `-m bench...` finds it exactly when the source tree is there.
    if not os.path.exists(os.path.join(_REPO, "bench", "competitors", "asyncio_streams.py")):
        return "bench/ (the source tree) not found"
    return Proc(_python("bench.competitors.asyncio_streams", "--listen", "127.0.0.1:0",
                        "--backend", format_addr(backend)), "asyncio streams proxy")


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

    procs: list[Proc] = []
    try:
        origin = Proc(_python("relay.demo", "--serve-origin", "127.0.0.1:0", "127.0.0.1:0/reset"),
                      "origin")
        procs.append(origin)
        sink, flaky = (_split(a) for a in origin.ready.split()[1:])
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
            relay = Proc(_python("relay", "run", "-c", path), "relay")
            procs.append(relay)
            listeners = _listeners(relay.ready)
            baseline = _streams_proxy(sink)
            if isinstance(baseline, Proc):
                procs.append(baseline)
            paths = {"direct": sink, "relay": listeners["main"]}
            if isinstance(baseline, Proc):
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


def netns_unavailable() -> str | None:
    """Why part 2 cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables TPROXY); run `sudo make demo`"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 nftables)"
    return None


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


@contextlib.contextmanager
def _namespaces(prefix: str) -> Iterator[dict[str, str]]:
    """client <-> relay <-> origin, the same addressing as the tests (documentation ranges)."""
    names = {role: f"{prefix}{role}" for role in ("client", "relay", "origin")}
    made: list[str] = []
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0", "net.ipv4.tcp_tw_reuse=1")
        c, r, o = names["client"], names["relay"], names["origin"]
        _ip("-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "in0", "netns", r)
        _ip("-n", r, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", o)
        for ns, dev, addrs in ((c, "eth0", ("192.0.2.2/28", "2001:db8:1::2/64")),
                               (r, "in0", ("192.0.2.1/28", "2001:db8:1::1/64")),
                               (r, "out0", ("192.0.2.17/28", "2001:db8:2::1/64")),
                               (o, "eth0", ("192.0.2.18/28", "2001:db8:2::2/64"))):
            for addr in addrs:
                _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        for ns, via in ((c, "192.0.2.1"), (c, "2001:db8:1::1"), (r, "192.0.2.18"),
                        (r, "2001:db8:2::2")):
            _ip("-n", ns, "route", "add", "default", "via", via)
        # Replies to the soft-unicast addresses go back to the relay host.
        _ip("-n", o, "route", "add", "203.0.113.0/24", "via", "192.0.2.17")
        _ip("-n", o, "route", "add", "2001:db8:7::/48", "via", "2001:db8:2::1")
        for dest in DESTINATIONS:
            host = _split(dest)[0]
            _ip("-n", o, "addr", "add", host + ("/128" if ":" in host else "/32"), "dev", "lo")
        yield names
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _syn_counters(egress: Sequence[Any]) -> str:
    """nft for the origin host: count SYNs from a configured (address, slice) vs all others."""
    rules = "".join(
        f"        tcp flags & (syn | ack) == syn {'ip6' if ':' in e.address else 'ip'} saddr "
        f'{e.address} tcp sport {e.ports} counter name "from_slice" accept\n'
        for e in egress
    )
    return ("table inet origin {\n    counter from_slice { }\n    counter elsewhere { }\n"
            "    chain input {\n        type filter hook input priority filter; policy accept;\n"
            f'{rules}        tcp flags & (syn | ack) == syn counter name "elsewhere"\n    }}\n}}\n')


def _counter(ns: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "counter", "inet", "origin",
                          name], capture_output=True, text=True, timeout=10, check=True).stdout
    words = out.split()
    return int(words[words.index("packets") + 1])


def part2(workdir: str, nbytes: int, per_dest: int) -> dict[str, Any]:
    from relay.config import load

    config = str(resources.files("relay") / "data" / "demo.toml")
    egress = load(config, environ={}).egress
    log_path = os.path.join(workdir, "relay-part2.log")
    env = dict(os.environ, RELAY_LOG_FILE=log_path, PYTHONPATH=_REPO)
    procs: list[Proc] = []
    with _namespaces(f"rlyd-{os.getpid()}-") as ns:
        def inside(role: str, *argv: str) -> list[str]:
            return ["ip", "netns", "exec", ns[role], *argv]

        try:
            counters = subprocess.run(inside("origin", "nft", "-f", "-"), input=_syn_counters(egress),
                                      capture_output=True, text=True, timeout=10)
            if counters.returncode != 0:
                raise RuntimeError(f"origin nft counters: {counters.stderr.strip()}")
            procs.append(Proc(inside("origin", *_python("relay.demo", "--serve-origin",
                                                        *DESTINATIONS)), "origin", env=env))
            rules = subprocess.run(
                inside("relay", *_python("relay", "nft", "-c", config, "--ingress", "in0",
                                         "--apply")),
                capture_output=True, text=True, timeout=30, env=env, cwd=_REPO)
            if rules.returncode != 0:
                raise RuntimeError(f"relay nft --apply: {rules.stderr.strip()}")
            procs.append(Proc(inside("relay", *_python("relay", "run", "-c", config)), "relay",
                              env=env))
            client = subprocess.run(
                inside("client", *_python("relay.demo", "--bytes", str(nbytes), "--per-dest",
                                          str(per_dest), "--run-client", *DESTINATIONS)),
                capture_output=True, text=True, timeout=60, env=env, cwd=_REPO)
            if client.returncode != 0:
                raise RuntimeError(f"client: {client.stderr.strip()[-500:]}")
            report = json.loads(client.stdout)
            results, wall = report["results"], report["wall"]
            procs[-1].stop()  # the relay: drain and log every flow
            syns = {name: _counter(ns["origin"], name) for name in ("from_slice", "elsewhere")}
        finally:
            for proc in reversed(procs):
                proc.stop()
    flows = _flows(log_path)
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
        "syns_from_slice": syns["from_slice"],
        "syns_from_elsewhere": syns["elsewhere"],
        "gbit_s": sum(r["origin_got"] for r in results) * 8 / wall / 1e9,
        "connections": len(results),
        "spliced_bytes": sum(int(f["spliced_bytes"]) for f in flows),
        "copied_bytes": sum(int(f["copied_bytes"]) for f in flows),
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


# -- entry point ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay demo", description=__doc__.split("\n\n")[0])
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
                reason = netns_unavailable()
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
