"""The admin endpoints of the supervisor, and the `relay stats` / `relay reload` client.

Unix socket (`relay.admin_socket`, mode 0600): one request line per connection, one answer, then
the supervisor closes. Requests: `stats` (text), `stats json`, `reload` (answers once the new
generation serves or the reload failed; the first word of the answer is `ok` or `error`),
`sessions {filter}` / `kill {filter}` (JSON answers, see relay.ops.sessions).
A client has CLIENT_TIMEOUT seconds to send its line; at most MAX_CLIENTS are served at once.

HTTP (`relay.metrics_listen`, relay.ops.http: non-blocking, a 2 s deadline per request, at most
8 at once): `GET /metrics` in the Prometheus text format (a custom collector over the workers'
aggregated counters, process_* of the supervisor, relay_worker_process_* summed over the
workers, relay_build_info); `/ready` (200 once the first generation serves and until stopping,
else 503) and `/live` (200: the supervisor's loop turns, since it is what answers).

Both are served from the supervisor's single-threaded main loop (its selector): no thread exists
in the supervisor when it forks a worker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from relay.config.model import Config
from relay.ops.http import HTTPServer, Response, text
from relay.sock import format_address

__all__ = ["AdminServer", "client_main", "format_stats", "request"]

MAX_REQUEST = 1024
# The classic text exposition format: what generate_latest() writes for our plain ASCII names,
# and the content type every Prometheus version (2.x included) parses.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_TIMEOUT = 5.0  # seconds an admin client may take to send its request / read the answer
MAX_CLIENTS = 16  # admin clients served at once; more are answered "error busy" and closed
RELOAD_TIMEOUT = 120.0  # `relay reload` waits this long for the new generation to serve

Snapshot = Callable[[], dict[str, Any]]
Sessions = Callable[[str, Callable[[str], None]], None]  # (request line, reply(text))
Reload = Callable[[Callable[[bool, str], None] | None], None]


class AdminServer:
    """Admin unix socket + /metrics HTTP server, driven by the supervisor's selector."""

    def __init__(self, selector: selectors.BaseSelector, snapshot: Snapshot, reload: Reload,
                 aggregator: Any, sessions: Sessions | None = None,
                 upgrade: Reload | None = None) -> None:
        from relay.ops.metrics import RelayCollector
        from relay.ops.process_metrics import BuildInfoCollector, WorkerProcessCollector

        self._selector = selector
        self._snapshot = snapshot
        self._reload = reload
        self._upgrade = upgrade
        self._sessions = sessions
        self._unix: socket.socket | None = None
        self._unix_path = ""
        self._http: HTTPServer | None = None
        self._clients: dict[socket.socket, bytearray] = {}
        self._turned = time.monotonic()  # the supervisor loop's last turn (tick)
        # Clients still sending their request line -> monotonic deadline (expire_idle).
        self._deadlines: dict[socket.socket, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(snapshot, aggregator))
        self.registry.register(ProcessCollector(registry=None))  # process_*: the supervisor
        self.registry.register(WorkerProcessCollector(snapshot))
        self.registry.register(BuildInfoCollector(snapshot))

    # ------------------------------------------------------------------ lifecycle

    def open(self, cfg: Config) -> None:
        """Bind what `cfg` asks for; raises OSError naming the address on failure."""
        path = cfg.relay.admin_socket
        if path:
            self._unix = _bind_unix(path)
            self._unix_path = path
            self._selector.register(self._unix, selectors.EVENT_READ, self._accept_unix)
        if cfg.metrics_address is not None:
            routes = {"/metrics": self._metrics, "/ready": self._ready, "/live": self._live,
                      "/": lambda: text(200, "relay: /metrics /ready /live\n")}
            try:
                host, port = cfg.metrics_address
                self._http = HTTPServer(self._selector, (host, port), routes)
            except OSError as exc:
                raise OSError(exc.errno, f"metrics_listen {cfg.relay.metrics_listen}: "
                                         f"{exc.strerror}") from None

    def tick(self) -> None:
        """Once per supervisor loop turn: cut off HTTP clients past their deadline."""
        self._turned = time.monotonic()
        if self._http is not None:
            self._http.expire(self._turned)

    def _metrics(self) -> Response:
        return Response(200, METRICS_CONTENT_TYPE, generate_latest(self.registry))

    def _ready(self) -> Response:
        snap = self._snapshot()
        if snap.get("stopping"):
            return text(503, f"stopping ({snap['stopping']})\n")
        if not snap.get("ready"):
            return text(503, "starting: the first generation does not serve yet\n")
        return text(200, f"ready: generation {snap['generation']} serving\n")

    def _live(self) -> Response:
        return text(200, f"live: loop turned {time.monotonic() - self._turned:.3f}s ago\n")

    def addresses(self) -> dict[str, str]:
        out = {}
        if self._unix is not None:
            out["admin_socket"] = self._unix_path
        if self._http is not None:
            out["metrics"] = format_address(self._http.address)
        return out

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        if self._unix is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._unix)
            self._unix.close()
            self._unix = None
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self._unix_path).st_mode):
                    os.unlink(self._unix_path)
        if self._http is not None:
            self._http.close()
            self._http = None

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors, leave the socket file to the supervisor."""
        for client in self._clients:
            client.close()
        if self._unix is not None:
            self._unix.close()
        if self._http is not None:
            self._http.close_in_child()

    # ------------------------------------------------------------------ unix socket protocol

    def _accept_unix(self) -> None:
        assert self._unix is not None
        try:
            conn, _ = self._unix.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        if len(self._clients) >= MAX_CLIENTS:
            with contextlib.suppress(OSError):
                conn.send(b"error busy: too many admin clients, try again\n")
            conn.close()
            return
        self._clients[conn] = bytearray()
        self._deadlines[conn] = time.monotonic() + CLIENT_TIMEOUT
        self._selector.register(conn, selectors.EVENT_READ, lambda: self._read_client(conn))

    def _read_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf = self._clients.get(conn)
        if buf is None:
            return
        buf += data
        if b"\n" not in buf and data and len(buf) < MAX_REQUEST:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        self._deadlines.pop(conn, None)  # a reload answer may take longer than CLIENT_TIMEOUT
        line = bytes(buf).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        self._dispatch(conn, line)

    def _dispatch(self, conn: socket.socket, line: str) -> None:
        words = line.split()
        if words == ["stats"]:
            self._reply(conn, format_stats(self._snapshot()))
        elif words == ["stats", "json"]:
            self._reply(conn, json.dumps(self._snapshot(), sort_keys=True) + "\n")
        elif words == ["reload"]:
            self._reload(lambda ok, text: self._reply(conn, ("ok " if ok else "error ") + text
                                                      + "\n"))
        elif words == ["upgrade"] and self._upgrade is not None:
            self._upgrade(lambda ok, text: self._reply(conn, ("ok " if ok else "error ") + text
                                                       + "\n"))
        elif words and words[0] in ("sessions", "kill") and self._sessions is not None:
            # Answered once the workers replied (relay.process.sessions, at most ~1 s).
            self._sessions(line, lambda text: self._reply(conn, text))
        else:
            self._reply(conn, f"error unknown request {line[:80]!r}: "
                              "expected 'stats', 'stats json', 'reload', 'upgrade', 'sessions' or 'kill'\n")

    def _reply(self, conn: socket.socket, text: str) -> None:
        # Answers are small; a client that does not read within the timeout is dropped.
        with contextlib.suppress(OSError):
            conn.settimeout(CLIENT_TIMEOUT)
            conn.sendall(text.encode())
        self._drop(conn)

    def expire_idle(self, now: float | None = None) -> int:
        """Close the clients that did not send their request line in time (call once per
        supervisor tick); returns how many were closed."""
        now = time.monotonic() if now is None else now
        late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
        for conn in late:
            self._drop(conn)
        return len(late)

    def _drop(self, conn: socket.socket) -> None:
        self._clients.pop(conn, None)
        self._deadlines.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()


def _bind_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            # Never unlink what is not a socket (a config pointing at a regular file would
            # otherwise delete it: connect() is refused for any non-socket file too).
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, "exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(f"admin socket {path}: another relay is listening there")
            except ConnectionRefusedError:
                os.unlink(path)  # stale file of a dead supervisor
            finally:
                probe.close()
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.strerror:
            raise OSError(exc.errno, f"admin socket {path}: {exc.strerror}") from None
        raise
    return sock


# ---------------------------------------------------------------------- text rendering


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_stats(snap: dict[str, Any]) -> str:
    """The `relay stats` text: supervisor, listeners, one line per worker, totals."""
    from relay.ops.metrics import totals

    lines = [
        f"relay supervisor pid {snap['pid']}, generation {snap['generation']}, "
        f"engine {', '.join(snap.get('engines') or []) or '-'} (configured {snap['engine']}), "
        f"up {snap['uptime']:.0f}s"
        + (f", stopping ({snap['stopping']})" if snap.get("stopping") else ""),
        "listeners: " + (", ".join(f"{k}={v}" for k, v in snap["listeners"].items()) or "none"),
    ]
    for key, value in snap.get("admin", {}).items():
        lines.append(f"{key}: {value}")
    if snap.get("budget"):
        lines.append(f"budget: {snap['budget']}")
    lines.append(f"workers: {len(snap['workers'])}")
    for w in snap["workers"]:
        loop = totals([w])
        hb = w["heartbeat_age"]
        lines.append(
            f"  pid {w['pid']} gen {w['generation']} slot {w['slot']} {w['state']:<8} "
            f"engine {w['engine'] or '-'} heartbeat {'-' if hb is None else f'{hb:.1f}s'} "
            f"open {loop.get('conns_open', 0)} total {loop.get('conns_total', 0)} "
            f"iou-wrk {w['iowq_threads']}"
        )
    t = totals(snap["workers"], snap.get("retired", {}))
    rejected = t.get("rejected", {})
    lines.append(
        f"connections: open {t.get('conns_open', 0)}, total {t.get('conns_total', 0)}, "
        f"rejected maxconn {rejected.get('maxconn', 0)}, "
        f"per source {rejected.get('maxconn_per_source', 0)}"
    )
    lines.append(
        f"bytes: spliced {_human_bytes(t.get('bytes_spliced', 0))}, "
        f"copied {_human_bytes(t.get('bytes_copied', 0))}"
        + (f", client->origin {_human_bytes(t['bytes_c2s'])}" if "bytes_c2s" in t else "")
        + (f", origin->client {_human_bytes(t['bytes_s2c'])}" if "bytes_s2c" in t else "")
    )
    if "guard_dropped_packets" in snap:
        dropped = snap["guard_dropped_packets"]
        lines.append("slice guard: " + ("not installed (relay nft --apply)" if dropped is None
                                        else f"dropped {dropped} packets"))
    lines.append(
        f"pipes: in use {t.get('pipes_in_use', 0)}, free {t.get('pipes_free', 0)}; "
        f"accept pauses {t.get('accept_paused', 0)}"
    )
    for name, total in sorted(t.get("listener_total", {}).items()):
        lines.append(f"listener {name}: open {t.get('listener_open', {}).get(name, 0)}, "
                     f"total {total}")
    if any(k.startswith("udp_") for k in t):
        lines.append(
            f"udp: flows open {t.get('udp_flows_open', 0)}, total {t.get('udp_flows_total', 0)}; "
            f"datagrams client->origin {t.get('udp_dgrams_c2s', 0)} "
            f"({_human_bytes(t.get('udp_bytes_c2s', 0))}), "
            f"origin->client {t.get('udp_dgrams_s2c', 0)} "
            f"({_human_bytes(t.get('udp_bytes_s2c', 0))})"
        )
    for title, key in (("closes", "closed"), ("denied", "denied"),
                       ("egress ports in use", "egress_ports_in_use"),
                       ("udp drops", "udp_drops"), ("udp closes", "udp_closed"),
                       ("udp denied", "udp_denied"),
                       ("udp egress ports in use", "udp_egress_ports_in_use")):
        values = {k: v for k, v in t.get(key, {}).items() if v}
        if values:
            lines.append(f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    from relay.ops.handoff_report import handoff_summary

    lines += handoff_summary(t)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- client side


def request(path: str, line: str, timeout: float = CLIENT_TIMEOUT) -> str:
    """Send one request line to the admin socket at `path`; return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def _socket_path(args: Any) -> str:
    path = getattr(args, "socket", None)
    if path:
        return str(path)
    config = getattr(args, "config", None)
    if config:
        from relay.config import load

        cfg = load(config)
        if cfg.relay.admin_socket:
            return str(cfg.relay.admin_socket)
        raise ValueError(f"{config}: relay.admin_socket is not set; pass --socket PATH")
    raise ValueError("no admin socket: pass --socket PATH or --config FILE")


def client_main(args: Any) -> int:
    """`relay stats [--json]` and `relay reload`: args.command ("stats" | "reload"),
    args.socket (path or None), args.config (path or None), args.json (bool)."""
    command = getattr(args, "command", None) or "stats"
    try:
        path = _socket_path(args)
        if command in ("reload", "upgrade"):
            answer = request(path, command, timeout=RELOAD_TIMEOUT)
        elif command == "stats":
            answer = request(path, "stats json" if getattr(args, "json", False) else "stats")
        else:
            raise ValueError(f"unknown admin command {command!r}: expected stats, reload or "
                             "upgrade")
    except (OSError, ValueError) as exc:
        print(f"relay {command}: {exc}", file=sys.stderr)
        return 1
    if command in ("reload", "upgrade"):
        ok = answer.startswith("ok ")
        (sys.stdout if ok else sys.stderr).write(answer.split(" ", 1)[-1])
        return 0 if ok else 1
    if answer.startswith("error "):
        sys.stderr.write(answer[len("error "):])
        return 1
    sys.stdout.write(answer)
    return 0
