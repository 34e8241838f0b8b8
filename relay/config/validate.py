"""Validation: the TOML document in, one typed :class:`relay.config.model.Config` out.

The whole document is validated before anything uses it and every problem is reported at once,
each as ``source: key.path: value: reason`` (source is the file, ``RELAY_<NAME>`` or ``--flag``
for overrides).  Each value is parsed once, here, with the grammar of relay.config.values, and the
parsed value is what the model carries.  With ``check_host=True`` (``relay check``, ``relay run``,
reload) the checks against this host (relay.config.host) run in the same pass, on every value
that parsed, so one run lists schema and host problems together.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from relay.config import host, interception
from relay.config.model import Config, EgressSlice, Listener, PolicyRules
from relay.config.schema import Config as ConfigFile
from relay.config.schema import EgressConfig, ListenerConfig, PolicyConfig
from relay.config.settings import SETTINGS, SETTINGS_BY_NAME, RelaySettings, parse_setting_text
from relay.config.values import (
    UNIX_PREFIX,
    HostPort,
    IPAddress,
    family_of,
    parse_hostport,
    parse_network,
    parse_policy_rule,
    parse_port_range,
)

__all__ = ["ConfigError", "from_dict", "load", "loads", "validate_host"]


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- validation


class _Problems:
    """Collects ``source: key.path: value: reason`` lines; overridden keys name their origin."""

    def __init__(
        self, source: str, origins: Mapping[str, str], raw: Mapping[str, str] | None = None
    ) -> None:
        self.source = source
        self.origins = origins
        self.raw = raw or {}  # key path -> the text the user typed (environment variables)
        self.lines: list[str] = []
        self.paths: set[str] = set()  # key paths that have a problem

    def add(self, path: str, value: Any, reason: str) -> None:
        self.paths.add(path)
        if path in self.raw:
            value = self.raw[path]
        shown = "(missing)" if value is _MISSING else _show(value)
        source = self.origins.get(path, self.source)
        self.lines.append(f"{source}: {path}: {shown}: {reason}")


_MISSING = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_text(key: Any) -> str:
    """A key as TOML would write it in a dotted path: bare when it can be, else quoted (a key
    like ":" or "a.b" must not make the key path ambiguous)."""
    key = str(key)
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _show(value: Any) -> str:
    text = _show_full(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _show_full(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key_text(k)} = {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    return repr(value)


def _convert_fields(
    cls: type[msgspec.Struct], data: Any, path: str, problems: _Problems
) -> dict[str, Any] | None:
    """Check each field of ``data`` against ``cls`` on its own, so one bad field hides no other.

    Returns the converted values with defaults filled in (fields that failed are left out), or
    None when ``data`` is not a table at all.
    """
    if not isinstance(data, dict):
        problems.add(path, data, "expected a table")
        return None
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(f"{path}.{_key_text(key)}", value, f"unknown key{hint}")
            continue
        try:
            values[key] = msgspec.convert(value, type=field.type)
        except msgspec.ValidationError as exc:
            # msgspec names the failing element of a list as " - at `$[3]`": keep it in the path.
            where = re.search(r" - at `\$(.*)`$", str(exc))
            inner = where.group(1) if where else ""
            shown = value[int(inner[1:-1])] if re.fullmatch(r"\[\d+\]", inner) else value
            problems.add(f"{path}.{key}{inner}", shown, _reason(exc, field.type))
    for name, field in fields.items():
        if name in data:
            continue
        if field.default is not msgspec.NODEFAULT:
            values[name] = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            values[name] = field.default_factory()
        else:
            problems.add(f"{path}.{name}", _MISSING, "required key missing")
    return values


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def _reason(exc: msgspec.ValidationError, tp: Any) -> str:
    choices = _literal_choices(tp)
    if choices is not None:
        return "expected one of " + ", ".join(_show(c) for c in choices)
    text = str(exc)
    cut = text.find(" - at `$")
    text = (text[:cut] if cut >= 0 else text).replace("`", "")
    return text[:1].lower() + text[1:]


def _check_call(problems: _Problems, path: str, value: Any, parse: Any) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        problems.add(path, value, str(exc))
        return None


def _parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("not an IP address") from None


def _bind_hostport(text: str) -> HostPort:
    return parse_hostport(text, allow_port_zero=True)


def _backend_hostport(text: str) -> HostPort:
    return parse_hostport(text, allow_hostname=True)


def _validate_relay(v: dict[str, Any], p: _Problems) -> HostPort | None:
    """Checks across [relay] keys; returns relay.metrics_listen parsed (None when unset)."""
    metrics = None
    if v.get("metrics_listen"):
        metrics = _check_call(p, "relay.metrics_listen", v["metrics_listen"], _bind_hostport)
    admin = v.get("admin_socket")
    if admin and not os.path.isabs(admin):
        p.add("relay.admin_socket", admin, "must be an absolute path")
    elif admin and len(os.fsencode(admin)) > 107:
        p.add("relay.admin_socket", admin, "longer than a unix socket path may be (107 bytes)")
    if v.get("group") and not v.get("user"):
        p.add("relay.group", v["group"], "set relay.user too (a group alone is never dropped to)")
    if v.get("tproxy_table") in _RESERVED_TABLES:
        p.add("relay.tproxy_table", v["tproxy_table"],
              f"reserved for the kernel's {_RESERVED_TABLES[v['tproxy_table']]} table")
    if "nft_table" in v and not _NFT_NAME_RE.fullmatch(v["nft_table"]):
        p.add("relay.nft_table", v["nft_table"],
              "use 1-64 letters, digits and '_' (starting with a letter)")
    for key in ("user", "group", "log_file", "admin_socket"):
        if "\0" in v.get(key, ""):
            p.add(f"relay.{key}", v[key], "contains a NUL byte")
    return metrics


_RESERVED_TABLES = {253: "default", 254: "main", 255: "local"}
_NFT_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _validate_interception(
    indexed: list[tuple[int, Listener | None]], relay: dict[str, Any] | None, p: _Problems
) -> None:
    """The nft rules of tproxy/redirect listeners (relay.config.interception): a listener whose
    traffic an earlier rule takes entirely is refused; chain priorities that would let the nat
    chain see packets before the tproxy chain marked them are refused."""
    by_name = {lst.name: (i, lst) for i, lst in indexed if lst is not None}
    resolved = [lst for _i, lst in by_name.values()]
    for shadow in interception.shadows(resolved):
        if shadow.never:
            i, lst = by_name[shadow.name]
            key, value = ("ingress", lst.ingress) if lst.ingress else ("mode", lst.mode)
            p.add(f"listener[{i}].{key}", value, shadow.reason)
    modes = {lst.mode for lst in resolved}
    if relay and {"tproxy", "redirect"} <= modes:
        prio, nat = relay.get("nft_priority"), relay.get("nft_nat_priority")
        if isinstance(prio, int) and isinstance(nat, int) and prio >= nat:
            p.add("relay.nft_priority", prio,
                  f"must be below relay.nft_nat_priority ({nat}): the redirect rules skip "
                  "packets the tproxy rules marked, so the tproxy chain has to run first")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _validate_backend(path: str, backend: str, p: _Problems) -> HostPort | str | None:
    if not backend:
        p.add(f"{path}.backend", _MISSING, 'required in mode "backend"')
        return None
    if backend.startswith(UNIX_PREFIX):
        sock_path = backend[len(UNIX_PREFIX) :]
        if not sock_path:
            p.add(f"{path}.backend", backend, 'empty path after "unix:"')
        elif len(os.fsencode(sock_path)) > 107:
            p.add(f"{path}.backend", backend, "unix socket path longer than 107 bytes")
        else:
            return sock_path
        return None
    parsed: HostPort | None = _check_call(p, f"{path}.backend", backend, _backend_hostport)
    return parsed


def _backend_family(addr: HostPort | str | None) -> socket.AddressFamily:
    if addr is None:
        return socket.AF_UNSPEC
    if isinstance(addr, str):
        return socket.AF_UNIX
    try:
        return family_of(addr.host)
    except ValueError:  # a host name: the router resolves it
        return socket.AF_UNSPEC


def _validate_listener(path: str, v: dict[str, Any], p: _Problems) -> Listener | None:
    """Checks one listener table; the resolved Listener, or None when something is wrong."""
    ok = len(p.lines)
    name = v.get("name")
    if name is not None and not _NAME_RE.match(name):
        p.add(
            f"{path}.name", name, "use 1-64 letters, digits, '_', '.', '-' (starting alphanumeric)"
        )
    bind = _check_call(p, f"{path}.bind", v["bind"], _bind_hostport) if "bind" in v else None
    mode, backend = v.get("mode"), v.get("backend", "")
    backend_address = None
    if mode == "backend" and "backend" in v:
        backend_address = _validate_backend(path, backend, p)
    elif mode is not None and backend:
        p.add(f"{path}.backend", backend, f'only used in mode "backend", not "{mode}"')
    trusted = tuple(
        _check_call(p, f"{path}.trusted_proxies[{j}]", cidr, parse_network)
        for j, cidr in enumerate(v.get("trusted_proxies", ()))
    )
    ingress = tuple(
        _check_call(p, f"{path}.ingress[{j}]", name, interception.check_iface)
        for j, name in enumerate(v.get("ingress", ()))
    )
    if ingress and mode == "backend":
        p.add(f"{path}.ingress", v["ingress"], 'only used in modes "tproxy" and "redirect"')
    protocol = v.get("protocol")
    if protocol == "udp":
        _validate_udp_listener(path, v, backend_address, p)
    elif protocol == "tcp":
        for key in ("udp_responses", "udp_oneway"):
            if v.get(key):
                p.add(f"{path}.{key}", v[key], 'only used with protocol = "udp"')
    if (
        len(p.lines) != ok
        or bind is None
        or mode is None
        or protocol is None
        or "proxy_protocol" not in v
        or "udp_responses" not in v
        or "udp_oneway" not in v
    ):
        return None
    return Listener(
        name=str(name),
        bind_address=bind,
        bind_family=family_of(bind.host),
        mode=mode,
        backend_address=backend_address,
        backend_family=_backend_family(backend_address),
        proxy_protocol=v["proxy_protocol"],
        trusted_networks=trusted,
        protocol=protocol,
        udp_responses=v["udp_responses"],
        udp_oneway=v["udp_oneway"],
        reuseport=v["reuseport"],
        ingress_interfaces=ingress,
    )


def _validate_udp_listener(
    path: str, v: dict[str, Any], backend: HostPort | str | None, p: _Problems
) -> None:
    """What cannot work for a UDP listener, with the reason (docs/udp.md)."""
    if v.get("mode") == "redirect":
        p.add(
            f"{path}.mode",
            "redirect",
            'not available for protocol = "udp": SO_ORIGINAL_DST needs a connected TCP socket; '
            'use mode = "tproxy" (nft tproxy keeps the original destination per datagram)',
        )
    if isinstance(backend, str):
        p.add(
            f"{path}.backend",
            v.get("backend", ""),
            'a unix socket backend cannot carry protocol = "udp" datagrams; use "HOST:PORT"',
        )
    if v.get("proxy_protocol"):
        p.add(
            f"{path}.proxy_protocol",
            v["proxy_protocol"],
            'TCP only: a PROXY header is a stream prefix; not available for protocol = "udp"',
        )
    if v.get("trusted_proxies"):
        p.add(
            f"{path}.trusted_proxies",
            v["trusted_proxies"],
            'TCP only (PROXY headers); not available for protocol = "udp"',
        )
    if v.get("udp_oneway") and v.get("udp_responses"):
        p.add(
            f"{path}.udp_oneway",
            v["udp_oneway"],
            f"a one-way flow reads no replies; udp_responses = {v['udp_responses']} contradicts it",
        )


def _validate_egress(path: str, v: dict[str, Any], p: _Problems) -> EgressSlice | None:
    """Checks one egress table; the resolved EgressSlice, or None when something is wrong."""
    ok = len(p.lines)
    ip = _check_call(p, f"{path}.address", v["address"], _parse_ip) if "address" in v else None
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        p.add(f"{path}.address", v["address"], "must be a unicast address")
        ip = None
    ports = _check_call(p, f"{path}.ports", v["ports"], parse_port_range) if "ports" in v else None
    networks = []
    for j, dest in enumerate(v.get("destinations", ())):
        net = _check_call(p, f"{path}.destinations[{j}]", dest, parse_network)
        if net is not None and ip is not None and net.version != ip.version:
            p.add(
                f"{path}.destinations[{j}]",
                dest,
                f"an IPv{net.version} destination cannot be reached from IPv{ip.version} "
                f"address {v['address']}",
            )
        networks.append(net)
    if len(p.lines) != ok or ip is None or ports is None:
        return None
    return EgressSlice(ip=ip, port_range=ports, destination_networks=tuple(networks))


def _validate_policy(v: dict[str, Any], p: _Problems) -> PolicyRules | None:
    ok = len(p.lines)
    rules = {
        key: tuple(
            _check_call(p, f"policy.{key}[{j}]", entry, parse_policy_rule)
            for j, entry in enumerate(v.get(key, ()))
        )
        for key in ("allow", "deny")
    }
    if len(p.lines) != ok:
        return None
    return PolicyRules(allow_rules=rules["allow"], deny_rules=rules["deny"],
                       allow_private=bool(v.get("allow_private", False)))


def _validate_listener_set(
    listeners: list[dict[str, Any]], p: _Problems, require_listener: bool
) -> None:
    if not listeners and require_listener and not any(k.startswith("listener") for k in p.paths):
        p.add("listener", _MISSING, "at least one [[listener]] is required")
    seen_names: dict[str, int] = {}
    seen_binds: dict[tuple[str, tuple[str, int]], int] = {}  # TCP and UDP ports are apart
    for i, v in enumerate(listeners):
        name = v.get("name")
        if name is not None:
            if name in seen_names:
                p.add(f"listener[{i}].name", name, f"already used by listener[{seen_names[name]}]")
            seen_names.setdefault(name, i)
        try:
            bind = _bind_hostport(v["bind"])
        except (KeyError, ValueError):
            continue
        key = (str(v.get("protocol", "tcp")), bind)
        if bind[1] and key in seen_binds:
            p.add(f"listener[{i}].bind", v["bind"], f"same address as listener[{seen_binds[key]}]")
        seen_binds.setdefault(key, i)


def _tables(data: Any, path: str, table: str, p: _Problems) -> list[Any]:
    if not isinstance(data, list):
        p.add(path, data, f"expected an array of tables ([[{table}]])")
        return []
    return data


def _apply_environ(
    data: dict[str, Any],
    environ: Mapping[str, str],
    origins: dict[str, str],
    raw: dict[str, str],
    lines: list[str],
) -> None:
    relay = data.setdefault("relay", {})
    if not isinstance(relay, dict):
        return
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text is None:
            continue
        try:
            relay[setting.name] = parse_setting_text(setting, text)
        except ValueError as exc:
            lines.append(f"{setting.env}: {setting.key}: {_show(text)}: {exc}")
            relay.pop(setting.name, None)
        origins[setting.key] = setting.env
        raw[setting.key] = text


def _apply_overrides(
    data: dict[str, Any],
    overrides: Mapping[str, Any],
    origins: dict[str, str],
    raw: dict[str, str],
) -> None:
    relay = data.setdefault("relay", {})
    if not isinstance(relay, dict):
        return
    for name, value in overrides.items():
        setting = SETTINGS_BY_NAME[name]
        relay[name] = value
        origins[setting.key] = setting.flag
        raw.pop(setting.key, None)


def from_dict(
    d: Mapping[str, Any],
    source: str = "<dict>",
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_listener: bool = True,
    check_host: bool = False,
) -> Config:
    """Validate a parsed TOML document. ``environ``: apply ``RELAY_*`` variables from it;
    ``overrides``: setting name -> value (command line, wins over everything);
    ``require_listener=False`` accepts a config without any ``[[listener]]`` (for dumps);
    ``check_host``: also check it against this host (relay.config.host)."""
    if not isinstance(d, Mapping):
        raise ConfigError([f"{source}: (document): {_show(d)}: expected a table"])
    data = dict(d)
    if isinstance(data.get("relay"), dict):
        data["relay"] = dict(data["relay"])
    origins: dict[str, str] = {}
    raw: dict[str, str] = {}
    env_lines: list[str] = []
    if environ is not None:
        _apply_environ(data, environ, origins, raw, env_lines)
    if overrides:
        _apply_overrides(data, overrides, origins, raw)
    problems = _Problems(source, origins, raw)
    problems.lines.extend(env_lines)

    known = {f.name for f in msgspec.structs.fields(ConfigFile)}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(key, value, f"unknown table{hint}")

    relay = _convert_fields(RelaySettings, data.get("relay", {}), "relay", problems)
    metrics = _validate_relay(relay, problems) if relay is not None else None
    tables: list[dict[str, Any]] = []
    listeners: list[Listener | None] = []
    indexed: list[tuple[int, Listener | None]] = []
    for i, item in enumerate(_tables(data.get("listener", []), "listener", "listener", problems)):
        v = _convert_fields(ListenerConfig, item, f"listener[{i}]", problems)
        if v is not None:
            v["name"] = v.get("name") or f"listener{i}"
            listeners.append(_validate_listener(f"listener[{i}]", v, problems))
            indexed.append((i, listeners[-1]))
            tables.append(v)
    _validate_listener_set(tables, problems, require_listener)
    _validate_interception(indexed, relay, problems)
    egress: list[tuple[int, EgressSlice]] = []
    for i, item in enumerate(_tables(data.get("egress", []), "egress", "egress", problems)):
        v = _convert_fields(EgressConfig, item, f"egress[{i}]", problems)
        entry = _validate_egress(f"egress[{i}]", v, problems) if v is not None else None
        if entry is not None:
            egress.append((i, entry))
    policy_table = _convert_fields(PolicyConfig, data.get("policy", {}), "policy", problems)
    policy = _validate_policy(policy_table, problems) if policy_table is not None else None
    if check_host:
        user = relay.get("user", "") if relay is not None else ""
        group = relay.get("group", "") if relay is not None else ""
        admin = relay.get("admin_socket", "") if relay is not None else ""
        log_file = relay.get("log_file", "") if relay is not None else ""
        for path, value, reason in host.check(user, group, egress, admin, log_file):
            problems.add(path, value, reason)
        resolved = [(i, lst) for i, lst in indexed if lst is not None]
        for path, value, reason in host.check_backends(resolved):
            problems.add(path, value, reason)

    if problems.lines or relay is None or policy is None:
        raise ConfigError(problems.lines)
    return Config(
        relay=RelaySettings(**relay),
        listener=tuple(lst for lst in listeners if lst is not None),
        egress=tuple(e for _i, e in egress),
        policy=policy,
        metrics_address=metrics,
    )


def loads(
    text: str,
    source: str = "<string>",
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_listener: bool = True,
    check_host: bool = False,
) -> Config:
    """Parse and validate TOML text (host checks only with ``check_host``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively
        raise ConfigError([f"{source}: TOML nested too deeply (arrays or inline tables)"]) from None
    return from_dict(
        data,
        source,
        environ=environ,
        overrides=overrides,
        require_listener=require_listener,
        check_host=check_host,
    )


def load(
    path: str | os.PathLike[str],
    *,
    check_kernel: bool = False,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, parse and validate a TOML file.

    ``environ`` defaults to ``os.environ`` (``RELAY_<NAME>`` overrides the file; pass ``{}`` to
    ignore the environment).  ``check_kernel``: also check the config against this host, in the
    same pass (relay.config.host).
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc}"]) from None
    return loads(
        text,
        source,
        environ=os.environ if environ is None else environ,
        overrides=overrides,
        check_host=check_kernel,
    )


def validate_host(cfg: Config, source: str = "<config>") -> list[str]:
    """The host checks (relay.config.host) of an already validated config, as problem lines."""
    problems = _Problems(source, {})
    for path, value, reason in host.check(
        cfg.relay.user, cfg.relay.group, list(enumerate(cfg.egress)), cfg.relay.admin_socket,
        cfg.relay.log_file,
    ):
        problems.add(path, value, reason)
    return problems.lines
