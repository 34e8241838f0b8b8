"""The live session table: what `relay sessions` shows and `relay kill` resets.

HAProxy's `show sess` / `shutdown session` is the model. One `Session` per open connection of
every worker; its id is ``<worker pid>-<n>`` (n counts that worker's connections from 1, never
reused), so an id names one connection for the life of the relay.

Filters (`SessionFilter`, each optional, all must match):

* ``listener``: a listener name, exactly;
* ``destination``: the original destination (tproxy/redirect) or the backend, written as a
  CIDR, an address, ``ADDR:PORT`` / ``[V6]:PORT``, ``CIDR:PORTS`` (the policy rule grammar of
  relay.config.values, no DNS), or ``unix:/path`` for a unix-socket backend;
* ``source``: the client address, same grammar;
* ``ids``: session ids.

The admin socket carries one request line: ``sessions {filter as JSON}`` answers
``{"sessions": [...], "missing": [...]}``; ``kill {filter with ids}`` resets the sessions the
ids name (and the other filters match) and answers ``{"killed": [...], "missing": [...]}``.
``missing`` lists the workers that did not answer (``{"pid": P, "error": "..."}``): their
sessions are absent from the answer, never waited for.

`relay kill` is safe by default: ids kill those sessions; a filter alone kills only when it
matches exactly one session, and needs ``--all`` to kill several (it lists them otherwise).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from relay.config.values import parse_policy_rule
from relay.sock import UNIX_PREFIX

__all__ = [
    "KILL_BATCH",
    "Session",
    "SessionFilter",
    "address_matcher",
    "format_table",
    "kill_main",
    "parse_request",
    "sessions_main",
]

KILL_BATCH = 40  # ids per `kill` request line (the admin socket reads at most 1024 bytes)

AddrMatch = Callable[[Any], bool]


class Session(msgspec.Struct, kw_only=True):
    """One open connection as a worker sees it."""

    id: str  # "<worker pid>-<n>"
    worker: int  # pid
    listener: str
    client: str  # "ip:port" (after a trusted PROXY header: as the proxy said)
    dest: str  # original destination or backend: "ip:port", "[v6]:port", "unix:/path"
    egress: str  # local "ip:port" of the upstream socket when an egress slice was used, else ""
    state: str  # "connecting" | "relaying"
    c2s_bytes: int  # delivered client -> origin
    s2c_bytes: int  # delivered origin -> client
    age: float  # seconds since the pair started
    idle: float  # seconds since the last byte moved either way
    engine: str


class SessionFilter(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    listener: str = ""
    destination: str = ""
    source: str = ""
    ids: list[str] = []

    def is_empty(self) -> bool:
        return not (self.listener or self.destination or self.source or self.ids)

    def check(self) -> None:
        """Raise ValueError naming the filter and the reason for a malformed one."""
        for name in ("destination", "source"):
            text = getattr(self, name)
            if text:
                try:
                    address_matcher(text)
                except ValueError as exc:
                    raise ValueError(f"--{name} {text!r}: {exc}") from None
        for sid in self.ids:
            pid, sep, n = sid.partition("-")
            if not (sep and pid.isdigit() and n.isdigit()):
                raise ValueError(f"session id {sid!r}: expected PID-N as `relay sessions` "
                                 "shows it")

    def worker_pids(self) -> set[int]:
        """The workers the ids name (empty: no ids)."""
        return {int(sid.partition("-")[0]) for sid in self.ids}


def address_matcher(text: str) -> AddrMatch:
    """A predicate over an address as the server keeps it ((ip, port, ...) or "unix:/p")."""
    text = text.strip()
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]

        def match_unix(addr: Any) -> bool:
            value = addr[0] if isinstance(addr, tuple) and addr else addr
            return isinstance(value, str) and value.removeprefix(UNIX_PREFIX) == path

        return match_unix
    try:
        rule = parse_policy_rule(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (or unix:/path)") from None

    def match_ip(addr: Any) -> bool:
        if not isinstance(addr, tuple) or len(addr) < 2 or not isinstance(addr[1], int):
            return False
        try:
            ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
        except ValueError:
            return False
        return rule.matches(ip, addr[1])

    return match_ip


def parse_request(line: str) -> tuple[str, SessionFilter]:
    """An admin request line ``sessions|kill [{json filter}]`` -> (command, filter)."""
    command, _, rest = line.strip().partition(" ")
    if command not in ("sessions", "kill"):
        raise ValueError(f"unknown session command {command!r}")
    flt = (msgspec.json.decode(rest.strip(), type=SessionFilter) if rest.strip()
           else SessionFilter())
    flt.check()
    if command == "kill" and not flt.ids:
        raise ValueError("kill needs session ids")
    return command, flt


# ---------------------------------------------------------------------- text rendering


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{n}" if not unit else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_COLUMNS = ("ID", "PID", "LISTENER", "CLIENT", "DESTINATION", "EGRESS", "STATE", "C>O", "O>C", "AGE",
            "IDLE", "ENGINE")


def format_table(sessions: list[dict[str, Any]]) -> str:
    """The `relay sessions` text: a header and one aligned row per session, oldest first."""
    rows = [_COLUMNS]
    for s in sorted(sessions, key=lambda s: -s["age"]):
        rows.append((s["id"], str(s["worker"]), s["listener"], s["client"], s["dest"], s["egress"] or "-",
                     s["state"], _human_bytes(s["c2s_bytes"]), _human_bytes(s["s2c_bytes"]),
                     _duration(s["age"]), _duration(s["idle"]), s["engine"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- client side


def _ask(args: Any, command: str, flt: SessionFilter) -> dict[str, Any]:
    from relay.ops.admin import _socket_path, request

    body = msgspec.json.encode(flt).decode()
    answer = request(_socket_path(args), f"{command} {body}")
    if answer.startswith("error "):
        raise ValueError(answer[len("error "):].strip())
    try:
        data: dict[str, Any] = json.loads(answer)
    except ValueError:
        raise ValueError(f"unexpected answer from the relay: {answer[:200]!r}") from None
    return data


def _filter_from_args(args: Any, ids: list[str] | None = None) -> SessionFilter:
    flt = SessionFilter(listener=args.listener or "", destination=args.destination or "",
                        source=args.source or "", ids=list(ids or []))
    flt.check()
    return flt


def _warn_missing(command: str, missing: list[dict[str, Any]]) -> None:
    for m in missing:
        print(f"relay {command}: worker {m['pid']}: {m['error']}; its sessions are not "
              "included", file=sys.stderr)


def sessions_main(args: Any) -> int:
    """`relay sessions [--json] [--listener N] [--destination D] [--source S]`."""
    try:
        data = _ask(args, "sessions", _filter_from_args(args))
    except (OSError, ValueError) as exc:
        print(f"relay sessions: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_table(data["sessions"]))
    _warn_missing("sessions", data.get("missing", []))
    return 0


def kill_main(args: Any) -> int:
    """`relay kill ID... | relay kill [--all] --listener/--destination/--source ...`."""
    try:
        flt = _filter_from_args(args, args.ids)
        if flt.is_empty():
            raise ValueError("name the sessions: session ids, or a filter (--listener, "
                             "--destination, --source)")
        missing: list[dict[str, Any]] = []
        if not flt.ids:
            listed = _ask(args, "sessions", flt)
            missing += listed.get("missing", [])
            matched = listed["sessions"]
            if not matched:
                _warn_missing("kill", missing)
                raise ValueError("no open session matches")
            if len(matched) > 1 and not args.all:
                sys.stderr.write(format_table(matched))
                _warn_missing("kill", missing)
                raise ValueError(f"{len(matched)} sessions match; pass --all to kill them all, "
                                 "or kill one by its id")
            flt.ids = [s["id"] for s in matched]
        killed: list[dict[str, Any]] = []
        ids = flt.ids
        for start in range(0, len(ids), KILL_BATCH):
            flt.ids = ids[start:start + KILL_BATCH]
            answer = _ask(args, "kill", flt)
            killed += answer["killed"]
            missing += answer.get("missing", [])
    except (OSError, ValueError) as exc:
        print(f"relay kill: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps({"killed": killed, "missing": missing}, sort_keys=True)
                         + "\n")
    else:
        for s in killed:
            print(f"killed {s['id']} {s['client']} -> {s['dest']}")
    _warn_missing("kill", missing)
    gone = set(ids) - {s["id"] for s in killed}
    for sid in sorted(gone):
        print(f"relay kill: {sid}: no such open session", file=sys.stderr)
    return 0 if not gone and not missing else 1
