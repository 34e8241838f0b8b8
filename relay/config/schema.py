"""The shape of the config file: one msgspec struct per TOML table, with each key's help text.

These structs describe the text as written (strings, lists of strings) and feed ``relay config
schema`` (JSON schema for editors), the per-key checks of relay.config.validate and the comments
of ``relay config dump``.  The values the relay runs on are relay.config.model's.  Tables::

    [relay]          process-wide settings, declared in relay.config.settings
    [[listener]]     name, protocol (tcp|udp), bind, mode (backend|tproxy|redirect), backend,
                     proxy_protocol, trusted_proxies, udp_responses, udp_oneway, reuseport,
                     ingress
    [[egress]]       address, ports "lo-hi", destinations (CIDRs)
    [policy]         allow, deny: "CIDR" or "CIDR:80,443,8000-8999"
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from relay.config.model import Config as ConfigModel
from relay.config.model import Mode, Protocol, ProxyProtocol
from relay.config.settings import RelaySettings

__all__ = [
    "Config",
    "EgressConfig",
    "ListenerConfig",
    "PolicyConfig",
    "dumps",
    "schema",
]


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
    protocol: Annotated[
        Protocol,
        Meta(description='"tcp" or "udp" (UDP: modes backend and tproxy; see docs/udp.md)'),
    ] = "tcp"
    udp_responses: Annotated[
        int,
        Meta(
            ge=0,
            le=1 << 30,
            description="UDP only: end a flow after this many replies (DNS = 1); 0 = unlimited",
        ),
    ] = 0
    udp_oneway: Annotated[
        bool,
        Meta(
            description="UDP only: the upstream never answers (syslog, statsd, NetFlow): a flow "
            "ends as soon as its datagrams are forwarded, like nginx's proxy_responses 0",
        ),
    ] = False
    reuseport: Annotated[
        bool,
        Meta(
            description="share the port with other processes that set it too (SO_REUSEPORT); "
            "false = a second relay on this address is refused (EADDRINUSE)"
        ),
    ] = False
    ingress: Annotated[
        list[str],
        Meta(description="tproxy/redirect: interfaces whose traffic relay nft sends to this "
             "listener; empty = every interface but lo (relay nft --ingress overrides it)"),
    ] = []


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


class PolicyConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """``[policy]``: which destinations may be reached (deny wins)."""

    allow: Annotated[
        list[str],
        Meta(description='"CIDR" or "CIDR:80,443,8000-8999" entries that may be reached'),
    ] = msgspec.field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    deny: Annotated[list[str], Meta(description="entries never reached (checked first)")] = []
    allow_private: Annotated[
        bool,
        Meta(description="also reach private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, "
             "fc00::/7) through a broad allow rule; without it only an allow rule inside such a "
             "range reaches it"),
    ] = False


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The whole file (its JSON schema's root)."""

    relay: RelaySettings = msgspec.field(default_factory=RelaySettings)
    listener: list[ListenerConfig] = []
    egress: list[EgressConfig] = []
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)


TABLES: Mapping[str, type[msgspec.Struct]] = {
    "relay": RelaySettings,
    "listener": ListenerConfig,
    "egress": EgressConfig,
    "policy": PolicyConfig,
}


def schema() -> dict[str, Any]:
    """JSON schema of the config file (msgspec), for editors and `relay config schema`."""
    return msgspec.json.schema(Config)


# --------------------------------------------------------------------------- dump


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


def _as_written(table: str, value: Any) -> dict[str, Any]:
    """A model value back as its TOML table: each key read from the model's property of that
    name (the text form of the parsed value)."""
    if table == "relay":
        out: dict[str, Any] = msgspec.to_builtins(value)
        return out
    return {f.name: getattr(value, f.name) for f in msgspec.structs.fields(TABLES[table])}


def dumps(cfg: ConfigModel, *, comments: bool = True) -> str:
    """The config as TOML, every setting spelled out (defaults included); ``loads`` reads it back.

    With ``comments``, each key is preceded by its help text.
    """
    helps: dict[str, dict[str, str]] = {}
    if comments:
        for name, cls in TABLES.items():
            helps[name] = {f.name: _field_help(f.type) for f in msgspec.structs.fields(cls)}
    blocks = [_toml_table("[relay]", _as_written("relay", cfg.relay), helps.get("relay", {}))]
    for name, items in (("listener", cfg.listener), ("egress", cfg.egress)):
        blocks.extend(
            _toml_table(f"[[{name}]]", _as_written(name, t), helps.get(name, {})) for t in items
        )
    blocks.append(
        _toml_table("[policy]", _as_written("policy", cfg.policy), helps.get("policy", {}))
    )
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"


def _field_help(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        for extra in typing.get_args(tp)[1:]:
            if isinstance(extra, Meta) and extra.description:
                return extra.description
    return ""
