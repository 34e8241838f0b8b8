"""Who runs: the relay engines, the competitors and the direct baseline, and how each starts."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.competitors import haproxy, nginx, socat, splice_floor

ROOT = str(Path(__file__).resolve().parent.parent)
DIRECT = "direct"
HAPROXY = "haproxy"
STREAMS = "asyncio-streams"
NGINX = "nginx-stream"
EMBEDDED = "embedded"
EMBEDDED_SERVE = "embedded-serve"
UVLOOP = "uvloop-protocol"
SPLICE_FLOOR = "splice-floor"
# Which Protocol proxy variant the numbers come from (see bench/competitors/asyncio_protocol.py).
PROTOCOL_VARIANT = "EOF closes the peer (no half-close)"
RELAY_ENGINES = ("uring", "epoll", "asyncio")


Start = Callable[[int, Path], procs.Service | None]


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "relay" | "competitor" | "baseline"
    available: Callable[[], str | None]  # None, or why it is skipped
    # start(backend_port, tmpdir) -> running TCP proxy; returns None for the direct baseline;
    # the field is None for a contender that does not proxy TCP.
    start: Start | None
    idle: bool = False  # also measured by the idle-connections driver
    start_udp: Start | None = None  # the same for UDP (None: not a UDP contender)
    # the UDP proxy for the udpflows metric when it is set up differently (None: start_udp's)
    start_udp_flows: Start | None = None
    variant: str = ""  # how this contender is set up, shown next to its numbers
    workers: int = 1  # relay worker processes (per-worker shares are read when > 1)
    only_metrics: tuple[str, ...] = ()  # measured for these metrics only (empty: all it serves)

    def serves(self, protocol: str) -> bool:
        return (self.start if protocol == "tcp" else self.start_udp) is not None

    def measures(self, metric: str, protocol: str) -> bool:
        return self.serves(protocol) and (not self.only_metrics or metric in self.only_metrics)


def _python_script(name: str, module: str) -> Callable[[int, Path], procs.Service | None]:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        argv = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend_port}"]
        return procs.start_reporting_port(name, argv, cwd=ROOT)

    return start


def _uvloop_available() -> str | None:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "uvloop not installed"
    return None


def _start_socat(backend_port: int, tmp: Path) -> procs.Service:
    return procs.start_retrying(lambda port: procs.Service("socat", socat.argv(port, ("127.0.0.1", backend_port))))


def _start_splice_floor(backend_port: int, tmp: Path) -> procs.Service:
    try:
        exe = splice_floor.build(tmp)
    except RuntimeError as exc:
        raise procs.StartError(str(exc)) from None
    return procs.start_reporting_port(SPLICE_FLOOR, splice_floor.argv(exe, backend_port))


def _start_haproxy(backend_port: int, tmp: Path) -> procs.Service:
    def make(port: int) -> procs.Service:
        nofile = min(procs.nofile_hard(), procs.NOFILE)
        cfg = haproxy.write_config(tmp, port, ("127.0.0.1", backend_port), nofile)
        return procs.Service("haproxy", haproxy.argv(cfg))

    return procs.start_retrying(make)


# How each relay contender was started in this batch: "cli" (python -m relay run) or "server"
# (bench.relay_launch, through relay.serve.server.Server) when the CLI is not usable yet.
RELAY_MODE: dict[str, str] = {}


@dataclass(frozen=True)
class RelaySetup:
    engine: str
    workers: int = 1
    flow_log: bool = True  # the default a user gets; `-nolog` variants turn it off
    extra: tuple[str, ...] = ()  # more `relay run` options (a setting away from its default)
    only_metrics: tuple[str, ...] = ()  # a tuning variant: measured only where it can matter


def _relay_cli(name: str, setup: RelaySetup, backend_port: int, tmp: Path) -> procs.Service:
    """`relay run` on port 0; its READY line ('READY pid=.. listeners=name=127.0.0.1:PORT') names the port.

    The flow log (when on) goes to a file in the batch's temp dir, as it would to a log file or
    journald in production: through a pipe the harness reads, its cost would land on the harness.
    """
    admin = tmp / f"{name}-{len(RELAY_MODE)}-{time.monotonic_ns() % 10**9}.sock"
    argv = [
        sys.executable, "-m", "relay", "run", "--listen", "127.0.0.1:0",
        "--backend", f"127.0.0.1:{backend_port}", "--engine", setup.engine,
        "--workers", str(setup.workers), "--drain-timeout", "1", "--admin-socket", str(admin),
        "--flow-log" if setup.flow_log else "--no-flow-log", "--log-file", str(tmp / f"{name}.log"),
        *setup.extra,
    ]
    svc = procs.start_reporting_port(name, argv, timeout=30.0, cwd=ROOT)
    svc.admin_socket = str(admin)
    return svc


def _relay_server(name: str, setup: RelaySetup, backend_port: int) -> procs.Service:
    argv = [sys.executable, "-m", "bench.relay_launch", "--engine", setup.engine,
            "--backend", f"127.0.0.1:{backend_port}"]
    return procs.start_reporting_port(name, argv, timeout=30.0, cwd=ROOT)


def _relay(name: str, setup: RelaySetup) -> Callable[[int, Path], procs.Service | None]:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        mode = RELAY_MODE.get(name)
        if mode == "server":
            return _relay_server(name, setup, backend_port)
        try:
            svc = _relay_cli(name, setup, backend_port, tmp)
        except procs.StartError as cli_error:
            # The fallback only makes sense for the plain setup it reproduces.
            if mode == "cli" or setup != RelaySetup(setup.engine, 1, False):
                raise
            try:
                svc = _relay_server(name, setup, backend_port)
            except procs.StartError as server_error:
                raise procs.StartError(f"relay run: {cli_error}; Server(): {server_error}") from None
            RELAY_MODE[name] = "server"
            return svc
        RELAY_MODE[name] = "cli"
        return svc

    return start


UDP_CONFIG = """\
[relay]
workers = 1
drain_timeout = 1.0
log_file = "{log}"
{relay_extra}
[[listener]]
name = "udp"
protocol = "udp"
mode = "backend"
bind = "127.0.0.1:0"
backend = "127.0.0.1:{backend_port}"
{listener_extra}"""
# udpflows: one datagram per flow to a sink that never answers, as nginx's config
# (proxy_responses 0: the session ends once the datagram is forwarded; proxy_timeout 10s).
# With the defaults every flow would hold its socket and table slot for udp_idle_timeout (60 s),
# and the 16,384 slots fill within the run: the metric would measure that limit, not the rate.
UDP_FLOWS_RELAY = "udp_idle_timeout = 10.0\n"
UDP_FLOWS_LISTENER = "udp_oneway = true\n"
UDP_VARIANT = ("udp64/udp1200: defaults (flow log on, udp_idle_timeout 60 s, udp_max_flows 16384); "
               "udpflows: listener udp_oneway = true, udp_idle_timeout = 10 s")
NGINX_VARIANT = "UDP: proxy_responses 0; proxy_timeout 10s (every UDP metric)"


def _relay_udp(flows: bool) -> Start:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        """`relay run -c` with one UDP listener in backend mode."""
        name = "relay-udp-flows" if flows else "relay-udp"
        cfg = tmp / f"{name}-{backend_port}.toml"
        cfg.write_text(UDP_CONFIG.format(log=tmp / f"{name}.log", backend_port=backend_port,
                                         relay_extra=UDP_FLOWS_RELAY if flows else "",
                                         listener_extra=UDP_FLOWS_LISTENER if flows else ""))
        argv = [sys.executable, "-m", "relay", "run", "-c", str(cfg)]
        return procs.start_reporting_port("relay-udp", argv, timeout=30.0, cwd=ROOT, protocol="udp")

    return start


def _start_nginx_stream(udp: bool) -> Callable[[int, Path], procs.Service | None]:
    def start(backend_port: int, tmp: Path) -> procs.Service:
        def make(port: int) -> procs.Service:
            nofile = min(procs.nofile_hard(), procs.NOFILE)
            cfg = nginx.stream_config(tmp, port, ("127.0.0.1", backend_port), nofile, udp=udp)
            return procs.Service("nginx-stream", nginx.argv(cfg))

        return procs.start_retrying(make, protocol="udp" if udp else "tcp")

    return start


def _start_socat_udp(backend_port: int, tmp: Path) -> procs.Service:
    return procs.start_retrying(
        lambda port: procs.Service("socat", socat.udp_argv(port, ("127.0.0.1", backend_port))), protocol="udp")


def _always() -> str | None:
    return None


# The single-stream tuning variants (docs/single-stream.md) are measured where they can matter.
BULK_TUNING = ("stream1",)

RELAY_VARIANTS: dict[str, RelaySetup] = {
    **{f"relay-{e}": RelaySetup(e) for e in RELAY_ENGINES},
    "relay-uring-nolog": RelaySetup("uring", flow_log=False),
    "relay-uring-w2": RelaySetup("uring", workers=2),
    # a fixed receive buffer instead of auto-tuning: less CPU end to end, more in the relay
    # (docs/single-stream.md)
    "relay-uring-rcvbuf512k": RelaySetup("uring", flow_log=False, extra=("--socket-rcvbuf", "524288"),
                                         only_metrics=BULK_TUNING),
    # SO_RCVLOWAT on bulk sources: woken once the mark is queued (a 1 ms timeout moves a tail)
    "relay-uring-lowat256k": RelaySetup("uring", flow_log=False,
                                        extra=("--socket-rcvlowat", "262144"), only_metrics=BULK_TUNING),
    "relay-uring-rcvbuf512k-lowat128k": RelaySetup(
        "uring", flow_log=False, extra=("--socket-rcvbuf", "524288", "--socket-rcvlowat", "131072"),
        only_metrics=BULK_TUNING),
}
SCALING = ("relay-uring", "relay-uring-w2")  # the --workers 1 vs --workers 2 ratio row

ALL: tuple[Contender, ...] = (
    Contender(DIRECT, "baseline", _always, lambda port, tmp: None, start_udp=lambda port, tmp: None),
    *(Contender(name, "relay", _always, _relay(name, setup), idle=name in {f"relay-{e}" for e in RELAY_ENGINES},
                variant=("flow log on" if setup.flow_log else "--no-flow-log")
                + (f" --workers {setup.workers}" if setup.workers > 1 else "")
                + "".join(f" {arg}" for arg in setup.extra), workers=setup.workers,
                only_metrics=setup.only_metrics)
      for name, setup in RELAY_VARIANTS.items()),
    Contender("relay-udp", "relay", _always, None, start_udp=_relay_udp(flows=False),
              start_udp_flows=_relay_udp(flows=True), variant=UDP_VARIANT),
    Contender(HAPROXY, "competitor", haproxy.available, _start_haproxy, idle=True),
    Contender(NGINX, "competitor", nginx.stream_available, _start_nginx_stream(udp=False),
              start_udp=_start_nginx_stream(udp=True), variant=NGINX_VARIANT),
    Contender("uvloop-protocol", "competitor", _uvloop_available,
              _python_script("uvloop-protocol", "bench.competitors.uvloop_protocol"), variant=PROTOCOL_VARIANT),
    Contender("asyncio-protocol", "competitor", _always,
              _python_script("asyncio-protocol", "bench.competitors.asyncio_protocol"), variant=PROTOCOL_VARIANT),
    Contender(STREAMS, "competitor", _always, _python_script(STREAMS, "bench.competitors.asyncio_streams")),
    Contender(EMBEDDED, "competitor", _uvloop_available, _python_script(EMBEDDED, "bench.competitors.embedded"),
              variant="relay.splice() on uvloop"),
    Contender(EMBEDDED_SERVE, "competitor", _uvloop_available,
              _python_script(EMBEDDED_SERVE, "bench.competitors.embedded_serve"),
              variant="relay.start_server() on uvloop: Python only routes"),
    Contender("socat", "competitor", socat.available, _start_socat, start_udp=_start_socat_udp),
    # not a competitor anyone runs: the kernel's price of a splice relay, beside the relay
    Contender(SPLICE_FLOOR, "baseline", splice_floor.available, _start_splice_floor,
              variant="blocking splice() only, 2 threads per connection, 1 MiB pipes (floor)",
              only_metrics=BULK_TUNING),
)


def select(only: list[str] | None) -> list[Contender]:
    """Contenders named in `only` (engine names like 'uring' mean 'relay-uring'); all if None."""
    if not only:
        return list(ALL)
    aliases = {"uvloop": "uvloop-protocol", "streams": STREAMS, "nginx": NGINX, "relay-uring-log": "relay-uring",
               **{e: f"relay-{e}" for e in RELAY_ENGINES}}
    wanted = {aliases.get(n, n) for n in only}
    unknown = wanted - {c.name for c in ALL}
    if unknown:
        raise SystemExit(f"unknown contender(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(c.name for c in ALL)}")
    return [c for c in ALL if c.name in wanted]
