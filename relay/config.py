"""The relay configuration: TOML in, one validated immutable :class:`Config` out.

The whole file is validated before anything uses it and every problem is reported at once, each as
``source: key.path: value: reason`` (source is the file, ``RELAY_<NAME>`` or ``--flag`` for
overrides).  Shape (see docs/architecture.md)::

    [relay]          process-wide settings, declared in relay.settings
    [[listener]]     name, bind, mode (backend|tproxy|redirect), backend, proxy_protocol,
                     trusted_proxies
    [[egress]]       address, ports "lo-hi", destinations (CIDRs)
    [policy]         allow, deny: "CIDR" or "CIDR:80,443,8000-8999"

Checks that depend on this host (egress slices against the kernel's port ranges, users and groups
that must exist) run only with ``check_kernel=True`` (``relay check`` and ``relay run``).
The value parsers (HOST:PORT, port ranges, CIDRs, policy rules) live in relay.addr and are
re-exported here.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import json
import os
import pwd
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from relay.addr import (
    IPAddress,
    IPNetwork,
    PolicyRule,
    family_of,
    parse_hostport,
    parse_network,
    parse_policy_rule,
    parse_port_range,
)
from relay.settings import SETTINGS, SETTINGS_BY_NAME, RelaySettings, parse_setting_text

__all__ = [
    "Config",
    "ConfigError",
    "EgressConfig",
    "IPNetwork",
    "ListenerConfig",
    "PolicyConfig",
    "PolicyRule",
    "RelaySettings",
    "dumps",
    "from_dict",
    "load",
    "loads",
    "parse_hostport",
    "parse_network",
    "parse_policy_rule",
    "parse_port_range",
    "schema",
    "validate_host",
]

Mode = Literal["backend", "tproxy", "redirect"]
ProxyProtocol = Literal["", "v2"]


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- the structs


class ListenerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One ``[[listener]]``."""

    name: Annotated[
        str,
        Meta(description='unique name (letters, digits, "_.-"); default "listener<N>"'),
    ] = ""
    bind: Annotated[
        str, Meta(description='address to listen on, "HOST:PORT" or "[IPv6]:PORT"; port 0 = any')
    ]
    mode: Annotated[
        Mode,
        Meta(
            description="backend: relay to a fixed backend; tproxy: to the original destination "
            "(nft TPROXY); redirect: to SO_ORIGINAL_DST (nft redirect/DNAT)"
        ),
    ] = "backend"
    backend: Annotated[
        str, Meta(description='backend mode only: "HOST:PORT", "[IPv6]:PORT" or "unix:/path"')
    ] = ""
    proxy_protocol: Annotated[
        ProxyProtocol, Meta(description='"v2": send a PROXY v2 header upstream; "" = none')
    ] = ""
    trusted_proxies: Annotated[
        list[str],
        Meta(description="CIDRs allowed to send us a PROXY v2 header; empty = never parse one"),
    ] = []

    @property
    def bind_address(self) -> tuple[str, int]:
        return parse_hostport(self.bind, allow_port_zero=True)

    @property
    def bind_family(self) -> socket.AddressFamily:
        return family_of(self.bind_address[0])

    @property
    def backend_address(self) -> tuple[str, int] | str | None:
        """(host, port); a str path for ``unix:/path``; None when there is no backend."""
        if not self.backend:
            return None
        if self.backend.startswith("unix:"):
            return self.backend[len("unix:") :]
        return parse_hostport(self.backend, allow_hostname=True)

    @property
    def backend_family(self) -> socket.AddressFamily:
        """AF_INET, AF_INET6, AF_UNIX, or AF_UNSPEC for a host name (resolve it) or no backend."""
        addr = self.backend_address
        if addr is None:
            return socket.AF_UNSPEC
        if isinstance(addr, str):
            return socket.AF_UNIX
        try:
            return family_of(addr[0])
        except ValueError:
            return socket.AF_UNSPEC

    @property
    def trusted_networks(self) -> list[IPNetwork]:
        return [parse_network(t) for t in self.trusted_proxies]


class EgressConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One ``[[egress]]``: a soft-unicast address and this host's slice of its ports."""

    address: Annotated[str, Meta(description="source IP address for upstream connections")]
    ports: Annotated[
        str, Meta(description='this host\'s source-port slice, "lo-hi" inside 1-65535')
    ]
    destinations: Annotated[
        list[str],
        Meta(description="CIDRs reached through this address; empty = every address of its family"),
    ] = []

    @property
    def ip(self) -> IPAddress:
        return ipaddress.ip_address(self.address)

    @property
    def family(self) -> socket.AddressFamily:
        return family_of(self.address)

    @property
    def port_range(self) -> tuple[int, int]:
        return parse_port_range(self.ports)

    @property
    def networks(self) -> list[IPNetwork]:
        if not self.destinations:
            return [ipaddress.ip_network("0.0.0.0/0" if self.ip.version == 4 else "::/0")]
        return [parse_network(d) for d in self.destinations]


class PolicyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[policy]``: which destinations may be reached (deny wins)."""

    allow: Annotated[
        list[str],
        Meta(description='"CIDR" or "CIDR:80,443,8000-8999" entries that may be reached'),
    ] = msgspec.field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    deny: Annotated[list[str], Meta(description="entries never reached (checked first)")] = []

    @property
    def allow_rules(self) -> list[PolicyRule]:
        return [parse_policy_rule(e) for e in self.allow]

    @property
    def deny_rules(self) -> list[PolicyRule]:
        return [parse_policy_rule(e) for e in self.deny]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The whole validated configuration."""

    relay: RelaySettings = msgspec.field(default_factory=RelaySettings)
    listener: list[ListenerConfig] = []
    egress: list[EgressConfig] = []
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)

    def listener_named(self, name: str) -> ListenerConfig:
        for lst in self.listener:
            if lst.name == name:
                return lst
        raise KeyError(f"no listener named {name!r}")


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


def _show(value: Any) -> str:
    text = _show_full(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _show_full(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
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
            problems.add(f"{path}.{key}", value, f"unknown key{hint}")
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


def _bind_hostport(text: str) -> tuple[str, int]:
    return parse_hostport(text, allow_port_zero=True)


def _backend_hostport(text: str) -> tuple[str, int]:
    return parse_hostport(text, allow_hostname=True)


def _validate_relay(v: dict[str, Any], p: _Problems) -> None:
    if v.get("metrics_listen"):
        _check_call(p, "relay.metrics_listen", v["metrics_listen"], _bind_hostport)
    admin = v.get("admin_socket")
    if admin and not os.path.isabs(admin):
        p.add("relay.admin_socket", admin, "must be an absolute path")
    elif admin and len(os.fsencode(admin)) > 107:
        p.add("relay.admin_socket", admin, "longer than a unix socket path may be (107 bytes)")
    if v.get("group") and not v.get("user"):
        p.add("relay.group", v["group"], "set relay.user too (a group alone is never dropped to)")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _validate_listener(path: str, v: dict[str, Any], p: _Problems) -> None:
    name = v.get("name")
    if name is not None and not _NAME_RE.match(name):
        p.add(
            f"{path}.name", name, "use 1-64 letters, digits, '_', '.', '-' (starting alphanumeric)"
        )
    if "bind" in v:
        _check_call(p, f"{path}.bind", v["bind"], _bind_hostport)
    mode, backend = v.get("mode"), v.get("backend", "")
    if mode == "backend" and "backend" in v:
        if not backend:
            p.add(f"{path}.backend", _MISSING, 'required in mode "backend"')
        elif backend.startswith("unix:"):
            sock_path = backend[len("unix:") :]
            if not sock_path:
                p.add(f"{path}.backend", backend, 'empty path after "unix:"')
            elif len(os.fsencode(sock_path)) > 107:
                p.add(f"{path}.backend", backend, "unix socket path longer than 107 bytes")
        elif backend:
            _check_call(p, f"{path}.backend", backend, _backend_hostport)
    elif mode is not None and backend:
        p.add(f"{path}.backend", backend, f'only used in mode "backend", not "{mode}"')
    for j, cidr in enumerate(v.get("trusted_proxies", ())):
        _check_call(p, f"{path}.trusted_proxies[{j}]", cidr, parse_network)


def _validate_egress(path: str, v: dict[str, Any], p: _Problems) -> None:
    ip = _check_call(p, f"{path}.address", v["address"], _parse_ip) if "address" in v else None
    if ip is not None and (ip.is_unspecified or ip.is_multicast):
        p.add(f"{path}.address", v["address"], "must be a unicast address")
        ip = None
    if "ports" in v:
        _check_call(p, f"{path}.ports", v["ports"], parse_port_range)
    for j, dest in enumerate(v.get("destinations", ())):
        net = _check_call(p, f"{path}.destinations[{j}]", dest, parse_network)
        if net is not None and ip is not None and net.version != ip.version:
            p.add(
                f"{path}.destinations[{j}]",
                dest,
                f"an IPv{net.version} destination cannot be reached from IPv{ip.version} "
                f"address {v['address']}",
            )


def _validate_policy(v: dict[str, Any], p: _Problems) -> None:
    for key in ("allow", "deny"):
        for j, entry in enumerate(v.get(key, ())):
            _check_call(p, f"policy.{key}[{j}]", entry, parse_policy_rule)


def _validate_listener_set(
    listeners: list[dict[str, Any]], p: _Problems, require_listener: bool
) -> None:
    if not listeners and require_listener and not any(k.startswith("listener") for k in p.paths):
        p.add("listener", _MISSING, "at least one [[listener]] is required")
    seen_names: dict[str, int] = {}
    seen_binds: dict[tuple[str, int], int] = {}
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
        if bind[1] and bind in seen_binds:
            p.add(f"listener[{i}].bind", v["bind"], f"same address as listener[{seen_binds[bind]}]")
        seen_binds.setdefault(bind, i)


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
) -> Config:
    """Validate a parsed TOML document. ``environ``: apply ``RELAY_*`` variables from it;
    ``overrides``: setting name -> value (command line, wins over everything);
    ``require_listener=False`` accepts a config without any ``[[listener]]`` (for dumps)."""
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

    known = {f.name for f in msgspec.structs.fields(Config)}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(key, value, f"unknown table{hint}")

    relay = _convert_fields(RelaySettings, data.get("relay", {}), "relay", problems)
    if relay is not None:
        _validate_relay(relay, problems)
    listeners: list[dict[str, Any]] = []
    for i, item in enumerate(_tables(data.get("listener", []), "listener", "listener", problems)):
        v = _convert_fields(ListenerConfig, item, f"listener[{i}]", problems)
        if v is not None:
            v["name"] = v.get("name") or f"listener{i}"
            _validate_listener(f"listener[{i}]", v, problems)
            listeners.append(v)
    _validate_listener_set(listeners, problems, require_listener)
    egress: list[dict[str, Any]] = []
    for i, item in enumerate(_tables(data.get("egress", []), "egress", "egress", problems)):
        v = _convert_fields(EgressConfig, item, f"egress[{i}]", problems)
        if v is not None:
            _validate_egress(f"egress[{i}]", v, problems)
            egress.append(v)
    policy = _convert_fields(PolicyConfig, data.get("policy", {}), "policy", problems)
    if policy is not None:
        _validate_policy(policy, problems)

    if problems.lines or relay is None or policy is None:
        raise ConfigError(problems.lines)
    return Config(
        relay=RelaySettings(**relay),
        listener=[ListenerConfig(**v) for v in listeners],
        egress=[EgressConfig(**v) for v in egress],
        policy=PolicyConfig(**policy),
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\" \\ \n \t \uXXXX ...) are valid TOML basic-string escapes.
        # DEL is the one control character JSON leaves alone and TOML forbids.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _toml_table(header: str, table: Mapping[str, Any], comments: Mapping[str, str]) -> list[str]:
    lines = [header]
    for key, value in table.items():
        if comments.get(key):
            lines.append(f"# {comments[key]}")
        lines.append(f"{key} = {_toml_value(value)}")
    return lines


def dumps(cfg: Config, *, comments: bool = True) -> str:
    """The config as TOML, every setting spelled out (defaults included); ``loads`` reads it back.

    With ``comments``, each key is preceded by its help text.
    """
    data = msgspec.to_builtins(cfg)
    helps: dict[str, dict[str, str]] = {}
    if comments:
        for name, cls in (
            ("relay", RelaySettings),
            ("listener", ListenerConfig),
            ("egress", EgressConfig),
            ("policy", PolicyConfig),
        ):
            helps[name] = {f.name: _field_help(f.type) for f in msgspec.structs.fields(cls)}
    blocks = [_toml_table("[relay]", data["relay"], helps.get("relay", {}))]
    for name in ("listener", "egress"):
        blocks.extend(_toml_table(f"[[{name}]]", t, helps.get(name, {})) for t in data[name])
    blocks.append(_toml_table("[policy]", data["policy"], helps.get("policy", {})))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


def _field_help(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        for extra in typing.get_args(tp)[1:]:
            if isinstance(extra, Meta) and extra.description:
                return extra.description
    return ""


def schema() -> dict[str, Any]:
    """JSON schema of the config file (msgspec), for editors and `relay config schema`."""
    return msgspec.json.schema(Config)


def loads(
    text: str,
    source: str = "<string>",
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    require_listener: bool = True,
) -> Config:
    """Parse and validate TOML text (no host checks)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    return from_dict(
        data, source, environ=environ, overrides=overrides, require_listener=require_listener
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
    ignore the environment).  ``check_kernel``: also run :func:`validate_host`.
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
    cfg = loads(
        text, source, environ=os.environ if environ is None else environ, overrides=overrides
    )
    if check_kernel:
        problems = validate_host(cfg, source)
        if problems:
            raise ConfigError(problems)
    return cfg


def validate_host(cfg: Config, source: str = "<config>") -> list[str]:
    """Checks against this machine: egress slices (``relay.egress.validate_slices``: inside
    net.ipv4.ip_local_port_range, clear of reserved ports, not overlapping) and that
    ``relay.user`` / ``relay.group`` exist."""
    problems = _Problems(source, {})
    if cfg.relay.user:
        try:
            pwd.getpwnam(cfg.relay.user)
        except KeyError:
            problems.add("relay.user", cfg.relay.user, "no such user on this host")
    if cfg.relay.group:
        try:
            grp.getgrnam(cfg.relay.group)
        except KeyError:
            problems.add("relay.group", cfg.relay.group, "no such group on this host")
    lines = problems.lines
    if cfg.egress:
        from relay.egress import validate_slices  # imported here: relay.egress imports us

        lines.extend(
            p if p.startswith(source + ":") else f"{source}: {p}" for p in validate_slices(cfg)
        )
    return lines
