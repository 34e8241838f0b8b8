"""Property-based tests (hypothesis): the PROXY v2 parser on arbitrary and mutated bytes, and
`relay check` on mutated configs. Bounded by max_examples to a few seconds each."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (test extras)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from relay import cli  # noqa: E402
from relay.serve import proxyproto  # noqa: E402
from relay.serve.proxyproto import ProxyProtocolError, ProxyProtocolIncomplete  # noqa: E402

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


def _parse_outcome(data: bytes) -> tuple[int, proxyproto.ProxyInfo] | ProxyProtocolError:
    try:
        return proxyproto.parse(data)
    except ProxyProtocolError as exc:  # Incomplete included; anything else is a bug
        return exc


@FAST
@given(st.binary(max_size=80))
def test_arbitrary_bytes_parse_or_raise_protocol_errors(data: bytes) -> None:
    out = _parse_outcome(data)
    if isinstance(out, tuple):
        n, info = out
        assert proxyproto.HEADER_FIXED_LEN <= n <= len(data)
        assert info.command in ("PROXY", "LOCAL")


@FAST
@given(st.binary(max_size=60))
def test_bytes_after_the_signature_parse_or_raise_protocol_errors(tail: bytes) -> None:
    out = _parse_outcome(proxyproto.SIGNATURE + tail)
    if isinstance(out, ProxyProtocolIncomplete):
        assert out.needed > len(proxyproto.SIGNATURE + tail)
    elif isinstance(out, tuple):
        assert out[0] <= len(proxyproto.SIGNATURE) + len(tail)


@st.composite
def headers(draw: Any) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    v6 = draw(st.booleans())
    addr = ipv6 if v6 else ipv4
    src, dst = (draw(addr), draw(ports)), (draw(addr), draw(ports))
    return proxyproto.build(src, dst), src, dst


def _same_address(a: str, b: str) -> bool:
    x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if x.version == 6 and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if y.version == 6 and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


@FAST
@given(headers(), st.binary(max_size=32))
def test_built_headers_round_trip_and_ignore_what_follows(
        h: tuple[bytes, tuple[str, int], tuple[str, int]], payload: bytes) -> None:
    header, src, dst = h
    n, info = proxyproto.parse(header + payload)
    assert n == len(header)
    assert info.command == "PROXY" and info.family in (socket.AF_INET, socket.AF_INET6)
    assert info.src is not None and info.dst is not None
    assert _same_address(info.src[0], src[0]) and info.src[1] == src[1]
    assert _same_address(info.dst[0], dst[0]) and info.dst[1] == dst[1]


@FAST
@given(headers(), st.data())
def test_every_strict_prefix_of_a_header_is_incomplete(h: Any, data: Any) -> None:
    header = h[0]
    cut = data.draw(st.integers(0, len(header) - 1))
    with pytest.raises(ProxyProtocolIncomplete) as info:
        proxyproto.parse(header[:cut])
    assert cut < info.value.needed <= len(header)


@FAST
@given(headers(), st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=4))
def test_tlvs_round_trip(h: Any, tlvs: list[tuple[int, bytes]]) -> None:
    header = h[0]
    extra = b"".join(bytes([k]) + len(v).to_bytes(2, "big") + v for k, v in tlvs)
    length = int.from_bytes(header[14:16], "big") + len(extra)
    n, info = proxyproto.parse(header[:14] + length.to_bytes(2, "big") + header[16:] + extra)
    assert n == len(header) + len(extra)
    assert list(info.tlvs) == tlvs


@FAST
@given(headers(), st.data())
def test_mutated_headers_never_crash_the_parser(h: Any, data: Any) -> None:
    header = bytearray(h[0])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(header) - 1))
        header[i] = data.draw(st.integers(0, 255))
    out = _parse_outcome(bytes(header))
    if isinstance(out, tuple):
        assert out[0] <= len(header)


# ---------------------------------------------------------------------- relay check

BASE: dict[str, Any] = {
    "relay": {"workers": 1, "maxconn": 100, "engine": "auto", "connect_timeout": 5.0,
              "flow_log": True, "log_format": "text"},
    "listener": [{"name": "main", "bind": "127.0.0.1:0", "backend": "127.0.0.1:9"},
                 {"name": "t", "bind": "127.0.0.1:15001", "mode": "tproxy"}],
    "egress": [{"address": "203.0.113.7", "ports": "40000-40999",
                "destinations": ["0.0.0.0/0"]}],
    "policy": {"allow": ["0.0.0.0/0", "::/0"], "deny": []},
}

scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "1e9", "127.0.0.1:0", "[::1]:80", "10.0.0.0/8:22",
                     "unix:", "unix:/x", "65536", "1-0", "40000-39999", "::/0", "tproxy",
                     "v2", "json", "uring", "nobody", "/", "/tmp", "a" * 200]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def _toml_str(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    return re.sub("[\x7f\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v).replace("inf", "inf")
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _toml(doc: dict[str, Any]) -> str:
    lines = []
    for key, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{key}]]")
                lines += [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{key}]")
            lines += [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@st.composite
def mutated_configs(draw: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["relay", "listener", "egress", "policy"]))
        table = doc[section]
        if isinstance(table, list):
            table = table[draw(st.integers(0, len(table) - 1))]
        known = sorted(table)  # empty once earlier mutations deleted every key
        any_key = st.text(min_size=1, max_size=12)
        key = draw(st.one_of(st.sampled_from(known), any_key) if known else any_key)
        if draw(st.booleans()) and key in table:
            del table[key]
        else:
            table[key] = draw(values)
    return doc


_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")(?:\[\d+\])*'
PROBLEM = re.compile(rf"^(?P<file>[^:]+): (?P<path>{_SEGMENT}(?:\.{_SEGMENT})*): .+: .+$")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated_configs())
def test_relay_check_on_mutated_configs_names_every_problem(
        tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(_toml(doc), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["check", "-c", str(path)])
    lines = err.getvalue().splitlines()
    assert "Traceback" not in err.getvalue()
    if rc == 0:
        return
    assert rc == 1, err.getvalue()
    *problems, summary = lines
    assert re.fullmatch(r"relay check: \d+ problems?", summary), summary
    assert problems, err.getvalue()
    for line in problems:
        m = PROBLEM.match(line)
        assert m is not None and m.group("file") == str(path), line
