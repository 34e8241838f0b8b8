"""The ``[relay]`` settings, declared once.

Each setting is one annotated field of :class:`RelaySettings`: its type and constraints (msgspec
``Meta``), its default and its help text live there and nowhere else.  :data:`SETTINGS` derives
from it the TOML key (``relay.<name>``), the ``relay run`` flag (``--<name-with-dashes>``) and the
environment variable (``RELAY_<NAME>``).  Precedence: default < file < environment < command line.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from relay.engines.constants import LOOP_DEFAULTS

__all__ = [
    "ENGINES",
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "RelaySettings",
    "Setting",
    "parse_setting_text",
]

ENV_PREFIX = "RELAY_"
ENGINES: tuple[str, ...] = ("auto", "uring", "epoll", "asyncio")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")

Engine = Literal["auto", "uring", "epoll", "asyncio"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# The core takes timeouts as a C int of milliseconds: at least 1 ms, at most 2**31 - 1 ms.
MIN_SECONDS = 0.001
MAX_SECONDS = 2_000_000.0  # about 23 days
C_INT_MAX = 2**31 - 1  # the core's Loop() takes its sizes as C ints


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class RelaySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Process-wide settings: the ``[relay]`` table."""

    engine: Annotated[
        Engine,
        Meta(description="I/O engine: auto (uring, else epoll), uring, epoll or asyncio"),
    ] = "auto"
    workers: Annotated[
        int, Meta(ge=0, le=4096, description="worker processes; 0 = one per CPU")
    ] = 0
    maxconn: Annotated[
        int,
        Meta(
            ge=1,
            le=10_000_000,
            description="connections open at once, all workers together (exact: the workers "
            "share their counters)",
        ),
    ] = 10000
    maxconn_per_source: Annotated[
        int,
        Meta(
            ge=0,
            le=10_000_000,
            description="connections open at once per client address; 0 = unlimited",
        ),
    ] = 0
    ipv6_source_prefix: Annotated[
        int,
        Meta(ge=1, le=128, description="maxconn_per_source counts IPv6 clients per prefix of "
             "this length (one client usually owns a whole /64)"),
    ] = 64
    connect_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds to wait for the upstream connection",
        ),
    ] = LOOP_DEFAULTS["connect_timeout_ms"] / 1000
    idle_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds without a byte either way before both sides are reset",
        ),
    ] = LOOP_DEFAULTS["idle_timeout_ms"] / 1000
    half_close_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds a half-closed connection may stay idle before it is closed",
        ),
    ] = LOOP_DEFAULTS["half_close_timeout_ms"] / 1000
    proxy_header_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds a trusted proxy's connection may take to send its PROXY v2 "
            "header (it waits parked, never blocking the worker) before it is reset",
        ),
    ] = 3.0
    proxy_header_max_waiting: Annotated[
        int,
        Meta(
            ge=1,
            description="connections per worker that may wait for their PROXY v2 header at "
            "once; more are reset and counted (denied proxy_header_overflow)",
        ),
    ] = 1024
    drain_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds old workers may keep serving after stop or reload",
        ),
    ] = 30.0
    handoff: Annotated[
        bool,
        Meta(
            description="reload: hand established TCP flows to the new workers instead of "
            "draining them (docs/handoff.md)",
        ),
    ] = True
    heartbeat_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds a worker may go without a heartbeat before it is killed "
            "and replaced",
        ),
    ] = 10.0
    pipe_size: Annotated[
        int,
        Meta(
            ge=4096,
            le=1 << 30,
            description="bytes requested per splice pipe (F_SETPIPE_SZ, capped by "
            "fs.pipe-max-size)",
        ),
    ] = LOOP_DEFAULTS["pipe_size"]
    max_pipes: Annotated[
        int,
        Meta(
            ge=0,
            # two pipes per connection (one each way) at most: more are never used
            le=2 * 10_000_000,
            description="splice pipes per worker (idle + in use); 0 = maxconn / 4",
        ),
    ] = 0
    splice: Annotated[
        bool, Meta(description="move bulk data with splice(2); false = always copy")
    ] = bool(LOOP_DEFAULTS["splice"])
    splice_min: Annotated[
        int,
        Meta(
            ge=0,
            le=C_INT_MAX,  # the core takes it as a C int
            description="bytes pending below which a transfer is copied, not spliced",
        ),
    ] = LOOP_DEFAULTS["splice_min"]
    socket_rcvbuf: Annotated[
        int,
        Meta(
            ge=0,
            le=C_INT_MAX,  # the core takes it as a C int
            description="SO_RCVBUF of relayed sockets in bytes (the kernel doubles it, capped "
            "by net.core.rmem_max); 0 = kernel auto-tuning (docs/single-stream.md)",
        ),
    ] = LOOP_DEFAULTS["socket_rcvbuf"]
    socket_rcvlowat: Annotated[
        int,
        Meta(
            ge=0,
            le=C_INT_MAX,  # the core takes it as a C int
            description="uring engine: SO_RCVLOWAT in bytes raised on a bulk flow's source "
            "(woken only once this much is queued; a tail below it waits 1 ms at most); "
            "0 = off (docs/single-stream.md)",
        ),
    ] = LOOP_DEFAULTS["socket_rcvlowat"]
    user: Annotated[
        str, Meta(description="drop privileges to this user after binding; empty = stay")
    ] = ""
    group: Annotated[
        str, Meta(description="drop privileges to this group after binding; empty = user's")
    ] = ""
    log_format: Annotated[
        LogFormat, Meta(description="log line format: text or json (one JSON object a line)")
    ] = "text"
    log_file: Annotated[
        str, Meta(description="log file path; empty = stderr", extra={"metavar": "PATH"})
    ] = ""
    log_level: Annotated[
        LogLevel, Meta(description="lowest level logged: debug, info, warning, error, critical")
    ] = "info"
    flow_log: Annotated[bool, Meta(description="log one line per finished connection")] = True
    flow_log_buffer: Annotated[
        int,
        Meta(ge=1, le=1 << 20, description="flow log records waiting for the writer at most; "
             "more are dropped and counted (flowlog_dropped)"),
    ] = 16384
    flow_log_flush: Annotated[
        float,
        Meta(gt=0, le=60, description="seconds between flow log writes (sooner once 1024 "
             "records wait)"),
    ] = 0.2
    egress_notrack: Annotated[
        bool,
        Meta(description="relay nft: NOTRACK the soft-unicast egress flows, so conntrack (and "
             "any NAT rule) never touches their 4-tuples"),
    ] = False
    admin_socket: Annotated[
        str,
        Meta(
            description="unix socket for `relay stats` and `relay reload`; empty = none",
            extra={"metavar": "PATH"},
        ),
    ] = ""
    udp_idle_timeout: Annotated[
        float,
        Meta(
            ge=MIN_SECONDS,
            le=MAX_SECONDS,
            description="seconds without a datagram either way before a UDP flow ends",
        ),
    ] = 60.0
    udp_max_flows: Annotated[
        int,
        Meta(
            ge=1,
            le=4_000_000,
            description="UDP flows open at once per worker; datagrams of new flows beyond it "
            "are dropped and counted",
        ),
    ] = 16384
    metrics_listen: Annotated[
        str,
        Meta(
            description='HOST:PORT serving Prometheus /metrics, e.g. "127.0.0.1:9109"; empty = none',
            extra={"metavar": "HOST:PORT"},
        ),
    ] = ""
    # relay nft: how its rules and routes fit the host's own firewall and policy routing.
    tproxy_mark: Annotated[
        int,
        Meta(ge=1, le=0xFFFF_FFFF, description="relay nft: packet mark (fwmark) that selects "
             "tproxy_table for intercepted packets and replies to soft-unicast addresses"),
    ] = 1
    tproxy_table: Annotated[
        int,
        Meta(ge=1, le=0xFFFF_FFFF, description="relay nft: routing table holding the one "
             "route \"local default dev lo\" (not 253-255: default, main, local)"),
    ] = 100
    tproxy_rule_priority: Annotated[
        int,
        Meta(ge=1, le=32765, description="relay nft: `ip rule` preference of \"fwmark "
             "tproxy_mark lookup tproxy_table\" (before main, 32766)"),
    ] = 100
    nft_table: Annotated[
        str,
        Meta(description="relay nft: name of the nft table (family inet) it owns and replaces"),
    ] = "relay"
    nft_priority: Annotated[
        int,
        Meta(ge=-400, le=400, description="relay nft: priority of its tproxy prerouting chain "
             "(mangle = -150)"),
    ] = -150
    nft_nat_priority: Annotated[
        int,
        Meta(ge=-199, le=400, description="relay nft: priority of its redirect (nat) "
             "prerouting chain (dstnat = -100; after conntrack, -200)"),
    ] = -100

    @property
    def resolved_workers(self) -> int:
        """Worker processes to run: ``workers``, or the CPUs this process may use when 0."""
        return self.workers or _cpu_count()

    def maxconn_per_worker(self, workers: int | None = None) -> int:
        """Connection table size of one worker: maxconn / workers, rounded up."""
        n = workers or self.resolved_workers
        return -(-self.maxconn // n)

    def pipes_per_worker(self, workers: int | None = None) -> int:
        """Pipe pool cap of one worker: 0 when splice is off, else ``max_pipes`` or maxconn / 4."""
        if not self.splice:
            return 0
        return self.max_pipes or max(1, self.maxconn_per_worker(workers) // 4)

    def loop_options(self, workers: int | None = None) -> dict[str, int]:
        """Keyword arguments for ``relay.engines.create`` / ``relay_ext._core.Loop``."""
        return {
            "pipe_size": self.pipe_size,
            "max_pipes": self.pipes_per_worker(workers),
            "max_conns": self.maxconn_per_worker(workers),
            "splice_min": self.splice_min,
            "socket_rcvbuf": self.socket_rcvbuf,
            "socket_rcvlowat": self.socket_rcvlowat,
            "connect_timeout_ms": round(self.connect_timeout * 1000),
            "idle_timeout_ms": round(self.idle_timeout * 1000),
            "half_close_timeout_ms": round(self.half_close_timeout * 1000),
        }

    def udp_loop_options(self) -> dict[str, int]:
        """Keyword arguments for ``relay_ext._udp.UdpLoop`` (one per worker)."""
        return {
            "max_flows": self.udp_max_flows,
            "idle_timeout_ms": max(1, round(self.udp_idle_timeout * 1000)),
        }


@dataclasses.dataclass(frozen=True)
class Setting:
    """One ``[relay]`` setting and every name it goes by."""

    name: str
    type: Any  # the annotated field type (msgspec validates with it)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    metavar: str  # placeholder in --help: Meta(extra={"metavar": ...}) or one by type

    @property
    def key(self) -> str:
        return f"relay.{self.name}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def base_type(self) -> type:
        """bool, int, float or str: what the value is once validated."""
        t = self.type
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
        if typing.get_origin(t) is Literal:
            return str
        return t


def _derive_settings() -> tuple[Setting, ...]:
    out = []
    for f in msgspec.structs.fields(RelaySettings):
        t = f.type
        help_text = ""
        metavar = ""
        base = t
        if typing.get_origin(t) is Annotated:
            base, *extras = typing.get_args(t)
            for extra in extras:
                if isinstance(extra, Meta):
                    help_text = extra.description or help_text
                    metavar = (extra.extra or {}).get("metavar", metavar)
        choices = None
        if typing.get_origin(base) is Literal:
            choices = tuple(str(a) for a in typing.get_args(base))
        if not metavar:
            metavar = {int: "N", float: "SECONDS", bool: ""}.get(base, f.name.upper())
        out.append(Setting(f.name, t, f.default, help_text, choices, metavar))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _derive_settings()
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_setting_text(setting: Setting, text: str) -> Any:
    """Turn the text of an environment variable or flag into the setting's base type.

    Raises ValueError with the reason; range checks happen later with the rest of the config.
    """
    base = setting.base_type
    value = text.strip()
    if base is bool:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected a boolean (true/false, yes/no, on/off, 1/0)")
    if base is int:
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError("expected an integer") from None
    if base is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    if setting.choices is not None and value not in setting.choices:
        raise ValueError("expected one of " + ", ".join(setting.choices))
    return text
