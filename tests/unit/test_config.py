"""relay.config (schema, settings, values, host checks): every kind of bad config names its key path and reason, all at
once; overrides (environment < command line); TOML dump round-trips; host checks."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import textwrap
from pathlib import Path

import msgspec
import pytest

from relay import config
from relay.config import ConfigError, PolicyRule, from_dict, load, loads, parse_policy_rule
from relay.config.settings import SETTINGS, RelaySettings

GOOD = """
[relay]
workers = 2
maxconn = 1000

[[listener]]
name = "main"
bind = "127.0.0.1:7000"
backend = "127.0.0.1:8000"

[[listener]]
bind = "[::1]:0"
mode = "tproxy"
trusted_proxies = ["10.0.0.0/8", "2001:db8::/32"]

[[egress]]
address = "203.0.113.7"
ports = "40000-40999"
destinations = ["0.0.0.0/0"]

[[egress]]
address = "2001:db8::7"
ports = "41000-41099"

[policy]
allow = ["10.0.0.0/8:80,443,8000-8999", "[2001:db8::/32]:443"]
deny = ["10.9.0.0/16"]
"""


def problems_of(text: str, source: str = "t.toml", **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(textwrap.dedent(text), source, **kw)  # type: ignore[arg-type]
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_good_config_and_parsed_helpers() -> None:
    cfg = loads(GOOD, "good.toml")
    assert cfg.relay.workers == 2 and cfg.relay.maxconn == 1000
    assert cfg.relay.engine == "auto" and cfg.relay.connect_timeout == 5.0  # defaults
    main, second = cfg.listener
    assert main.name == "main" and second.name == "listener1"  # default name by position
    assert main.bind_address == ("127.0.0.1", 7000)
    assert main.backend_address == ("127.0.0.1", 8000)
    assert main.bind_family == socket.AF_INET
    assert second.bind_address == ("::1", 0) and second.bind_family == socket.AF_INET6
    assert second.backend_address is None and second.mode == "tproxy"
    assert [str(n) for n in second.trusted_networks] == ["10.0.0.0/8", "2001:db8::/32"]
    e4, e6 = cfg.egress
    assert e4.port_range == (40000, 40999) and e4.family == socket.AF_INET
    assert e6.networks == (ipaddress.ip_network("::/0"),)  # empty destinations: whole family
    assert e6.destinations == []  # as written (what `relay config dump` writes back)
    assert e6.ip == ipaddress.ip_address("2001:db8::7")
    allow = cfg.policy.allow_rules
    assert allow[0].ports == ((80, 80), (443, 443), (8000, 8999))
    assert allow[1] == PolicyRule(ipaddress.ip_network("2001:db8::/32"), ((443, 443),))
    assert cfg.listener_named("main") is main


def test_backend_forms() -> None:
    def backend(value: str) -> config.Listener:
        return from_dict({"listener": [{"bind": "127.0.0.1:1", "backend": value}]}).listener[0]

    assert backend("unix:/run/app.sock").backend_address == "/run/app.sock"
    assert backend("unix:/run/app.sock").backend_family == socket.AF_UNIX
    assert backend("[2001:db8::1]:443").backend_address == ("2001:db8::1", 443)
    assert backend("[2001:db8::1]:443").backend_family == socket.AF_INET6
    assert backend("app.internal:8080").backend_address == ("app.internal", 8080)
    assert backend("app.internal:8080").backend_family == socket.AF_UNSPEC


def test_one_range_grammar_spacing_and_port_zero() -> None:
    """One slice/range grammar for config and runtime: blanks around "-" are allowed; port 0
    only where it means "any port" (a listener's bind, metrics_listen)."""
    cfg = loads(
        '[[listener]]\nbind = "127.0.0.1:0"\nmode = "tproxy"\n'
        '[[egress]]\naddress = "192.0.2.1"\nports = "40000 - 40010"\n'
    )
    assert cfg.egress[0].port_range == (40000, 40010) and cfg.egress[0].ports == "40000-40010"
    from relay.serve.egress import EgressTable

    picked = EgressTable.from_config(cfg).lookup("198.51.100.1")
    assert picked is not None and (picked.lo, picked.hi) == (40000, 40010)
    assert loads('[relay]\nmetrics_listen = "127.0.0.1:0"\n' + LISTENER_OK).metrics_address == (
        "127.0.0.1",
        0,
    )
    for key, text in (("backend", "127.0.0.1:0"), ("ports", "0-10")):
        table = (
            f'[[listener]]\nbind = "127.0.0.1:1"\nbackend = "{text}"\n'
            if key == "backend"
            else LISTENER_OK + f'[[egress]]\naddress = "192.0.2.1"\nports = "{text}"\n'
        )
        (problem,) = problems_of(table)
        assert "port 0 is outside 1-65535" in problem, problem


def test_frozen_config() -> None:
    cfg = loads(GOOD)
    with pytest.raises(AttributeError):
        cfg.relay.workers = 5  # type: ignore[misc]


BAD_CASES = [
    # (relay/listener/egress/policy TOML fragment, key path, reason fragment)
    ("[relay]\nworkers = -1", "relay.workers: -1", ">= 0"),
    ('[relay]\nworkers = "two"', 'relay.workers: "two"', "expected int"),
    ('[relay]\nengine = "turbo"', 'relay.engine: "turbo"', 'one of "auto", "uring", "epoll"'),
    ("[relay]\nconnect_timeout = 0", "relay.connect_timeout: 0", ">= 0.001"),
    ("[relay]\nidle_timeout = -5.0", "relay.idle_timeout: -5.0", ">= 0.001"),
    ("[relay]\nidle_timeout = 3e6", "relay.idle_timeout: 3000000.0", "<= 2000000.0"),
    ("[relay]\nmaxconn = 0", "relay.maxconn: 0", ">= 1"),
    ("[relay]\npipe_size = 100", "relay.pipe_size: 100", ">= 4096"),
    ('[relay]\nsplice = "yes"', 'relay.splice: "yes"', "expected bool"),
    ("[relay]\nwrokers = 3", "relay.wrokers: 3", "unknown key (did you mean 'workers'?)"),
    ('[relay]\nlog_format = "xml"', 'relay.log_format: "xml"', 'one of "text", "json"'),
    ('[relay]\nadmin_socket = "rel/a.sock"', "relay.admin_socket", "absolute path"),
    ('[relay]\nmetrics_listen = "localhost"', 'relay.metrics_listen: "localhost"', "HOST:PORT"),
    ('[relay]\ngroup = "wheel"', 'relay.group: "wheel"', "set relay.user too"),
    ("[relays]\nworkers = 1", "relays: {workers = 1}", "unknown table (did you mean 'relay'?)"),
]
LISTENER_CASES = [
    (
        'bind = "127.0.0.1:70000"\nbackend = "127.0.0.1:1"',
        'listener[0].bind: "127.0.0.1:70000"',
        "port 70000 is outside 0-65535",
    ),
    (
        'bind = "::1:7000"\nbackend = "127.0.0.1:1"',
        "listener[0].bind",
        "IPv6 addresses need brackets",
    ),
    ('bind = "[::1]7000"\nbackend = "127.0.0.1:1"', "listener[0].bind", '"[IPv6]:PORT"'),
    ('bind = "[1.2.3.4]:7000"\nbackend = "127.0.0.1:1"', "listener[0].bind", "must be IPv6"),
    ('bind = "example.com:7000"\nbackend = "127.0.0.1:1"', "listener[0].bind", "not an IP address"),
    ('bind = "127.0.0.1:x"\nbackend = "127.0.0.1:1"', "listener[0].bind", "not a number"),
    ('bind = "127.0.0.1:1"', "listener[0].backend: (missing)", 'required in mode "backend"'),
    ('bind = "127.0.0.1:1"\nbackend = "127.0.0.1:0"', "listener[0].backend", "outside 1-65535"),
    ('bind = "127.0.0.1:1"\nbackend = "unix:"', "listener[0].backend", 'empty path after "unix:"'),
    (
        'bind = "127.0.0.1:1"\nbackend = "-bad-:80"',
        "listener[0].backend",
        "not an IP address or host name",
    ),
    (
        'bind = "127.0.0.1:1"\nmode = "tproxy"\nbackend = "127.0.0.1:2"',
        "listener[0].backend",
        'only used in mode "backend", not "tproxy"',
    ),
    ('bind = "127.0.0.1:1"\nmode = "nat"', 'listener[0].mode: "nat"', 'one of "backend", "tproxy"'),
    (
        'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\nproxy_protocol = "v1"',
        'listener[0].proxy_protocol: "v1"',
        'one of "", "v2"',
    ),
    (
        'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\ntrusted_proxies = ["10.0.0.1/8"]',
        'listener[0].trusted_proxies[0]: "10.0.0.1/8"',
        "host bits set",
    ),
    (
        'bind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\ntrusted_proxies = "10.0.0.0/8"',
        "listener[0].trusted_proxies",
        "expected array",
    ),
    ('backend = "127.0.0.1:2"', "listener[0].bind: (missing)", "required key missing"),
    (
        'bind = "127.0.0.1:1"\nmode = "tproxy"\ntrusted_proxies = ["10.0.0.0/8", 5]',
        "listener[0].trusted_proxies[1]: 5",
        "expected str, got int",
    ),
    (
        'name = "a,b=c"\nbind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"',
        'listener[0].name: "a,b=c"',
        "use 1-64 letters, digits",
    ),
]
EGRESS_CASES = [
    ('address = "203.0.113.7"\nports = "50-40"', 'egress[0].ports: "50-40"', "reversed"),
    (
        'address = "203.0.113.7"\nports = "1-70000"',
        "egress[0].ports",
        "port 70000 is outside 1-65535",
    ),
    ('address = "203.0.113.7"\nports = "0-10"', "egress[0].ports", "port 0 is outside 1-65535"),
    ('address = "203.0.113.7"\nports = "a-b"', "egress[0].ports", "not a number"),
    (
        'address = "egress.example"\nports = "40000-40010"',
        'egress[0].address: "egress.example"',
        "not an IP address",
    ),
    ('address = "0.0.0.0"\nports = "40000-40010"', "egress[0].address", "unicast"),
    (
        'address = "203.0.113.7"\nports = "40000-40010"\ndestinations = ["10.0.0.0/33"]',
        "egress[0].destinations[0]",
        "not a CIDR",
    ),
    (
        'address = "203.0.113.7"\nports = "40000-40010"\ndestinations = ["::/0"]',
        "egress[0].destinations[0]",
        "IPv6 destination cannot be reached from IPv4",
    ),
    ('address = "203.0.113.7"', "egress[0].ports: (missing)", "required key missing"),
]
POLICY_CASES = [
    ('allow = ["10.0.0.0/8:"]', 'policy.allow[0]: "10.0.0.0/8:"', "empty port list"),
    ('allow = ["10.0.0.0/8:99999"]', "policy.allow[0]", "port 99999 is outside 1-65535"),
    ('deny = ["10.0.0.0/8:90-80"]', "policy.deny[0]", "reversed"),
    ('deny = ["nowhere"]', 'policy.deny[0]: "nowhere"', "expected"),
    ('allow = ["[2001:db8::/32:443"]', "policy.allow[0]", 'missing "]"'),
]
LISTENER_OK = '\n[[listener]]\nbind = "127.0.0.1:1"\nbackend = "127.0.0.1:2"\n'


def assert_one_problem(text: str, where: str, reason: str) -> None:
    """``text`` has exactly one problem, at key path ``where``, whose reason contains ``reason``."""
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"t.toml: {where}"), problems
    assert reason in problems[0]


@pytest.mark.parametrize(("fragment", "where", "reason"), BAD_CASES)
def test_bad_relay_settings(fragment: str, where: str, reason: str) -> None:
    assert_one_problem(fragment + "\n" + LISTENER_OK, where, reason)


@pytest.mark.parametrize(("fragment", "where", "reason"), LISTENER_CASES)
def test_bad_listener(fragment: str, where: str, reason: str) -> None:
    assert_one_problem("[[listener]]\n" + fragment, where, reason)


@pytest.mark.parametrize(("fragment", "where", "reason"), EGRESS_CASES)
def test_bad_egress(fragment: str, where: str, reason: str) -> None:
    assert_one_problem(LISTENER_OK + "[[egress]]\n" + fragment, where, reason)


@pytest.mark.parametrize(("fragment", "where", "reason"), POLICY_CASES)
def test_bad_policy(fragment: str, where: str, reason: str) -> None:
    assert_one_problem(LISTENER_OK + "[policy]\n" + fragment, where, reason)


def test_every_problem_reported_at_once() -> None:
    text = (
        "[relay]\nworkers = -1\nengine = 'x'\n"
        "[[listener]]\nname = 'a'\nbind = '127.0.0.1:99999'\nproxy_protocol = 'v9'\n"
        "[[listener]]\nname = 'a'\nbind = '127.0.0.1:5'\nbackend = '127.0.0.1:6'\n"
        "[[egress]]\naddress = 'x'\nports = '9-1'\n"
        "[policy]\nallow = ['1.2.3.4/40']\n"
    )
    problems = problems_of(text)
    keys = [p.split(": ")[1] for p in problems]
    assert keys == [
        "relay.workers",
        "relay.engine",
        "listener[0].proxy_protocol",
        "listener[0].bind",
        "listener[0].backend",
        "listener[1].name",
        "egress[0].address",
        "egress[0].ports",
        "policy.allow[0]",
    ], problems
    assert all(p.startswith("t.toml: ") for p in problems)


def test_listener_set_rules() -> None:
    problems = problems_of("[relay]\nworkers = 1\n")
    assert problems == ["t.toml: listener: (missing): at least one [[listener]] is required"]
    problems = problems_of("[listener]\nbind = '127.0.0.1:1'\n")
    assert "expected an array of tables ([[listener]])" in problems[0]
    problems = problems_of(LISTENER_OK + LISTENER_OK)
    assert problems == ['t.toml: listener[1].bind: "127.0.0.1:1": same address as listener[0]']
    # port 0 means "any port": two such listeners do not collide
    zero = '\n[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:2"\n'
    assert [lst.name for lst in loads(zero + zero).listener] == ["listener0", "listener1"]


def test_syntax_error_and_unreadable_file(tmp_path: Path) -> None:
    problems = problems_of("[relay\nworkers = 1")
    assert problems[0].startswith("t.toml: TOML syntax error:") and "line 1" in problems[0]
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.problems == [f"{missing}: cannot read: No such file or directory"]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary)


def test_environment_then_command_line_override(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[relay]\nworkers = 2\nmaxconn = 100\n" + LISTENER_OK)
    env = {"RELAY_WORKERS": "3", "RELAY_SPLICE": "off", "RELAY_ENGINE": "epoll"}
    cfg = load(path, environ=env)
    assert (cfg.relay.workers, cfg.relay.splice, cfg.relay.engine) == (3, False, "epoll")
    assert cfg.relay.maxconn == 100  # untouched by the environment
    cfg = load(path, environ=env, overrides={"workers": 4})
    assert cfg.relay.workers == 4  # the command line wins
    assert load(path, environ={}).relay.workers == 2


def test_bad_environment_names_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(LISTENER_OK)
    with pytest.raises(ConfigError) as info:
        load(path, environ={"RELAY_MAXCONN": "lots", "RELAY_CONNECT_TIMEOUT": "-1"})
    assert info.value.problems == [
        'RELAY_MAXCONN: relay.maxconn: "lots": expected an integer',
        'RELAY_CONNECT_TIMEOUT: relay.connect_timeout: "-1": expected float >= 0.001',
    ]


def test_load_uses_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.toml"
    path.write_text(LISTENER_OK)
    monkeypatch.setenv("RELAY_IDLE_TIMEOUT", "12.5")
    assert load(path).relay.idle_timeout == 12.5
    assert loads(LISTENER_OK).relay.idle_timeout == 300.0  # loads() ignores it unless asked


def test_dump_round_trips() -> None:
    cfg = loads(GOOD)
    text = config.dumps(cfg)
    assert "# worker processes; 0 = one per CPU" in text
    assert loads(text) == cfg
    assert loads(config.dumps(cfg, comments=False)) == cfg
    odd = from_dict(
        {
            "relay": {"user": 'q"\\\n\x7f\U0001f600\u2028'},
            "listener": [{"bind": "[::]:1", "mode": "redirect"}],
        }
    )
    assert loads(config.dumps(odd)) == odd


def test_schema_is_json_and_forbids_unknown_keys() -> None:
    schema = json.loads(json.dumps(config.schema()))
    defs = schema["$defs"]
    assert set(defs) >= {
        "Config",
        "RelaySettings",
        "ListenerConfig",
        "EgressConfig",
        "PolicyConfig",
    }
    relay = defs["RelaySettings"]
    assert relay["additionalProperties"] is False
    assert relay["properties"]["workers"]["minimum"] == 0
    assert sorted(relay["properties"]["engine"]["enum"]) == ["asyncio", "auto", "epoll", "uring"]
    assert defs["ListenerConfig"]["required"] == ["bind"]


def test_settings_declared_once() -> None:
    fields = [f.name for f in msgspec.structs.fields(RelaySettings)]
    assert [s.name for s in SETTINGS] == fields
    for s in SETTINGS:
        assert s.help, s.name
        assert s.flag == "--" + s.name.replace("_", "-")
        assert s.env == "RELAY_" + s.name.upper()
        assert s.default == getattr(RelaySettings(), s.name)


def test_per_worker_derivations() -> None:
    rs = RelaySettings(maxconn=1001, workers=4, connect_timeout=1.5)
    assert rs.maxconn_per_worker() == 251  # rounded up
    assert rs.pipes_per_worker() == 62
    opts = rs.loop_options()
    assert opts["max_conns"] == 251 and opts["connect_timeout_ms"] == 1500
    assert RelaySettings(splice=False).pipes_per_worker(1) == 0
    assert RelaySettings(workers=0).resolved_workers == len(os.sched_getaffinity(0))


def test_policy_rule_matching() -> None:
    rule = parse_policy_rule("10.0.0.0/8:80,8000-8999")
    assert rule.matches("10.1.2.3", 80) and rule.matches("10.1.2.3", 8500)
    assert not rule.matches("10.1.2.3", 81) and not rule.matches("11.0.0.1", 80)
    assert rule.matches("::ffff:10.0.0.1", 80)  # IPv4-mapped form is the same host
    assert parse_policy_rule("192.0.2.1").network == ipaddress.ip_network("192.0.2.1/32")
    assert parse_policy_rule("192.0.2.1:22").ports == ((22, 22),)
    v6 = parse_policy_rule("2001:db8::/32:443")
    assert v6.matches("2001:db8::5", 443) and not v6.matches("2001:db8::5", 80)


def _port_range() -> tuple[int, int]:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = (int(x) for x in f.read().split())
    return lo, hi


def test_host_checks_with_check_kernel(tmp_path: Path) -> None:
    lo, hi = _port_range()
    if lo <= 1024:
        pytest.skip(f"ip_local_port_range {lo}-{hi} leaves no room below it for the test")
    path = tmp_path / "r.toml"
    path.write_text(
        LISTENER_OK
        + f'[[egress]]\naddress = "127.0.0.1"\nports = "{lo - 100}-{lo - 1}"\n'
        + '[relay]\nuser = "no-such-user-relay-test"\n'
    )
    cfg = load(path, environ={})  # fine without host checks
    assert cfg.egress[0].port_range == (lo - 100, lo - 1)
    with pytest.raises(ConfigError) as info:
        load(path, check_kernel=True, environ={})
    text = "\n".join(info.value.problems)
    assert f'{path}: relay.user: "no-such-user-relay-test": no such user on this host' in text
    assert "ip_local_port_range" in text and all(
        p.startswith(f"{path}: ") for p in info.value.problems
    )


# --------------------------------------------------------------------------- what `run` refuses

LISTEN_AT = '[[listener]]\nbind = "{bind}"\nbackend = "{backend}"\n'
RUN_REFUSES = [
    # (config text, key path and value, reason fragment)
    (
        LISTEN_AT.format(bind="127.0.0.1:7000", backend="127.0.0.1:7000"),
        'listener[0].backend: "127.0.0.1:7000"',
        "reaches this listener itself at 127.0.0.1:7000",
    ),
    (  # connect() to 0.0.0.0 reaches 127.0.0.1: one client made 200 connections to itself
        LISTEN_AT.format(bind="127.0.0.1:7000", backend="0.0.0.0:7000"),
        'listener[0].backend: "0.0.0.0:7000"',
        "reaches this listener itself",
    ),
    (
        LISTEN_AT.format(bind="0.0.0.0:7000", backend="127.0.0.1:7000"),
        'listener[0].backend: "127.0.0.1:7000"',
        "reaches this listener itself at 0.0.0.0:7000",
    ),
    (
        LISTEN_AT.format(bind="127.0.0.1:7000", backend="no-such-host.invalid:80"),
        'listener[0].backend: "no-such-host.invalid:80"',
        "host name does not resolve",
    ),
    (
        '[[listener]]\nbind = "127.0.0.1:1"\nmode = "tproxy"\n'
        '[[listener]]\nbind = "127.0.0.1:2"\nmode = "tproxy"\n',
        'listener[1].mode: "tproxy"',
        "listener listener0 (IPv4 TCP tproxy, every interface but lo) catches all of its traffic",
    ),
    ("[relay]\nmax_pipes = 2147483648\n" + LISTENER_OK, "relay.max_pipes: 2147483648",
     "<= 20000000"),
    ("[relay]\nsplice_min = 2147483648\n" + LISTENER_OK, "relay.splice_min: 2147483648",
     "<= 2147483647"),
    ("[relay]\nmaxconn_per_source = 2147483648\n" + LISTENER_OK,
     "relay.maxconn_per_source: 2147483648", "<= 10000000"),
    ('[relay]\nuser = "ro\\u0000ot"\n' + LISTENER_OK, 'relay.user: "ro\\x00ot"',
     "contains a NUL byte"),
    ('[relay]\nlog_file = "/no/such/dir/relay.log"\n' + LISTENER_OK,
     'relay.log_file: "/no/such/dir/relay.log"', "directory /no/such/dir does not exist"),
    ('[relay]\nlog_file = "/proc/version"\n' + LISTENER_OK, 'relay.log_file: "/proc/version"',
     "cannot be opened for appending"),
    ('[relay]\nlog_file = "/tmp"\n' + LISTENER_OK, 'relay.log_file: "/tmp"', "is a directory"),
]


@pytest.mark.parametrize(("text", "where", "reason"), RUN_REFUSES)
def test_check_refuses_what_run_would(text: str, where: str, reason: str) -> None:
    problems = problems_of(text, check_host=True)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"t.toml: {where}: "), problems
    assert reason in problems[0], problems


def test_backend_loop_rules() -> None:
    from relay.config.host import backend_loops

    ip = ipaddress.ip_address
    never_local = lambda _ip: False  # noqa: E731
    assert backend_loops(("127.0.0.1", 80), ip("127.0.0.1"), 80, never_local)
    assert backend_loops(("::1", 80), ip("::"), 80, never_local)
    assert backend_loops(("0.0.0.0", 80), ip("0.0.0.0"), 80, never_local)
    assert not backend_loops(("127.0.0.1", 80), ip("127.0.0.1"), 81, never_local)
    assert not backend_loops(("::1", 80), ip("0.0.0.0"), 80, never_local)  # other family
    assert not backend_loops(("127.0.0.1", 0), ip("127.0.0.1"), 80, never_local)
    assert not backend_loops(("0.0.0.0", 80), ip("192.0.2.1"), 80, never_local)
    assert backend_loops(("0.0.0.0", 80), ip("192.0.2.1"), 80, lambda _ip: True)
    # a backend elsewhere, a free port and a host name that resolves are fine
    loads(LISTEN_AT.format(bind="127.0.0.1:7000", backend="localhost:7001"), check_host=True)


def test_deeply_nested_toml_is_a_problem_not_a_traceback() -> None:
    problems = problems_of("x = " + "[" * 5000 + "]" * 5000)
    assert problems == ["t.toml: TOML nested too deeply (arrays or inline tables)"]
    problems = problems_of("[relay]\nuser = " + "[" * 200 + "]" * 200 + "\n" + LISTENER_OK)
    assert len(problems) == 1 and problems[0].startswith("t.toml: relay.user: [[[")
    assert problems[0].endswith("expected str, got array")


def test_backend_that_is_another_listener_is_a_loop() -> None:
    text = (LISTEN_AT.format(bind="127.0.0.1:7000", backend="127.0.0.1:7001")
            + LISTEN_AT.format(bind="127.0.0.1:7001", backend="127.0.0.1:7002"))
    problems = problems_of(text, check_host=True)
    assert problems == ['t.toml: listener[0].backend: "127.0.0.1:7001": reaches listener[1] of '
                        "this relay at 127.0.0.1:7001: every connection would loop back into "
                        "the relay"]
