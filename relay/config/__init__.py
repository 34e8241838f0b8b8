"""The relay configuration: TOML in, one validated, typed, immutable :class:`Config` out.

- relay.config.schema    the file's tables as msgspec structs (help texts, JSON schema, dump)
- relay.config.settings  the ``[relay]`` settings, declared once (key, flag, env var, default)
- relay.config.values    the one grammar of HOST:PORT, port ranges, CIDRs and policy rules
- relay.config.model     the typed values validation returns (Listener, EgressSlice, ...)
- relay.config.host      checks against this host (users, egress slices vs the kernel)
- relay.config.validate  validation and loading: every problem at once, ``file: key: value: why``
"""

from __future__ import annotations

from relay.config.model import Config, EgressSlice, Listener, PolicyRules
from relay.config.schema import EgressConfig, ListenerConfig, PolicyConfig, dumps, schema
from relay.config.settings import RelaySettings
from relay.config.validate import ConfigError, from_dict, load, loads, validate_host
from relay.config.values import (
    HostPort,
    IPNetwork,
    PolicyRule,
    parse_hostport,
    parse_network,
    parse_policy_rule,
    parse_port_range,
)

__all__ = [
    "Config",
    "ConfigError",
    "EgressConfig",
    "EgressSlice",
    "HostPort",
    "IPNetwork",
    "Listener",
    "ListenerConfig",
    "PolicyConfig",
    "PolicyRule",
    "PolicyRules",
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
