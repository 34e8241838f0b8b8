"""The compiled flow-log formatter (relay_ext._flowfmt) writes, byte for byte, the lines
relay.ops.log's formatters write for the same record through ``logging`` (the reference), for
any record: names with quotes, spaces, '=', control bytes and non-ASCII, IPv4 / IPv6 / unix /
odd addresses, None fields, integers beyond 64 bits, every reason, errno names and numbers."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.engines import CLOSE_REASONS
from relay.ops import log as relay_log
from relay.serve import flowlog
from relay.serve.handoff import HANDOFF_REFUSALS
from relay.serve.routing import DENY_REASONS
from relay.serve.server import REJECT_REASONS
from relay.serve.udp import UDP_CLOSE_REASONS

pytest.importorskip("relay_ext._flowfmt", reason="the extensions are not built (make build)")

REFERENCE: dict[str, logging.Formatter] = {
    "text": relay_log.TextFormatter(),
    "json": relay_log._EscapingJsonFormatter(),
}
REASONS = sorted({*CLOSE_REASONS, *UDP_CLOSE_REASONS, *DENY_REASONS,
                  *(f"denied_{r}" for r in DENY_REASONS), *(f"rejected_{r}" for r in REJECT_REASONS),
                  *(f"handoff_refused_{r}" for r in HANDOFF_REFUSALS)})

# Text the reference can write: anything but lone surrogates (a UTF-8 log file refuses them).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
# An address-like text with at most one character the rules treat specially (at the fast
# path's boundary: a plain IP literal is written as is, anything else is quoted/escaped).
plain = st.text(st.sampled_from("0123456789abcdef.:%"), max_size=6)
hosts = st.builds(lambda a, c, b: a + c + b, plain,
                  st.sampled_from(["", "=", " ", '"', "\\", "\x00", "\t", "\x7f", "\x85",
                                   "\u2028", "\xe9", "unix:", "[", "/"]), plain)
names = st.one_of(st.sampled_from(["main", "web-1", "dns", ""]), hosts, texts)
ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.one_of(
    st.none(),
    st.tuples(ipv4, ports),
    st.tuples(ipv6, ports, st.integers(0, 2**20), st.integers(0, 2**32 - 1)),
    st.tuples(ipv6.map(lambda h: h + "%eth0"), ports, st.just(0), st.just(2)),
    st.tuples(texts.map(lambda p: "unix:/run/" + p), st.just(0)),
    st.just(""),  # a unix peer as the server records it
    st.tuples(st.just(""), st.just(0)),  # a unix peer's getpeername()
    st.tuples(st.one_of(hosts, texts), ports),  # anything else goes through the escaping rules
    texts,
)
counts = st.one_of(st.integers(0, 2**40), st.integers(-(2**70), 2**70),
                   st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]))
# microseconds: repr(us / 1e6) == repr(round(us / 1e6, 6)) below 2**52; around the notation
# switch (1e-4 s) and the powers of ten
durations = st.one_of(st.integers(0, 1000), st.integers(0, 2**52 - 1),
                      st.sampled_from([10**k + d for k in range(16) for d in (-1, 0, 1)]))
records = st.tuples(
    st.floats(0, 2**35, allow_nan=False),  # end time: 1970 to the year 3058
    names,
    addresses, addresses, addresses,
    counts, counts, counts, counts,
    durations,
    st.one_of(st.sampled_from(REASONS), texts),
    st.one_of(st.just(0), st.sampled_from(sorted(errno.errorcode)), st.integers(1, 10**6)),
    st.one_of(st.sampled_from(["tcp", "udp"]), texts),
    st.integers(-1, 2**40), st.integers(0, 2**40),
)


def reference_bytes(fmt: str, batch: list[flowlog.Record]) -> bytes:
    formatter = REFERENCE[fmt]
    lines = [formatter.format(flowlog._log_record(rec)) + "\n" for rec in batch]
    return "".join(lines).encode("utf-8")


@pytest.mark.parametrize("fmt", ["text", "json"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(records, max_size=8))
def test_compiled_lines_equal_the_logging_formatters(fmt: str,
                                                    batch: list[flowlog.Record]) -> None:
    formatter = flowlog._line_formatter(fmt)
    expected = reference_bytes(fmt, batch)
    assert formatter.lines(batch) == expected
    assert formatter.lines(batch) == expected  # again, from the caches


PINNED = {
    "text": [
        b"2025-12-01T18:00:00.250Z INFO relay.flow[PID]: flow listener=main "
        b"client=127.0.0.1:50408 dest=10.0.0.1:80 egress=\"\" c2s_bytes=5 s2c_bytes=7 "
        b"spliced_bytes=0 copied_bytes=12 duration=0.001234 reason=eof errno=\"\" protocol=tcp",
        b"2025-12-01T18:00:00.999Z INFO relay.flow[PID]: flow listener=\"v6 \xc3\xa9\\n\" "
        b"client=[2001:db8::1]:443 dest=\"unix:/run/x sock\" egress=192.0.2.9:40000 c2s_bytes=0 "
        b"s2c_bytes=0 spliced_bytes=0 copied_bytes=0 duration=1.2e-05 reason=reset_origin "
        b"errno=ECONNRESET protocol=tcp",
        b"2025-12-01T18:00:01.750Z INFO relay.flow[PID]: flow listener=dns "
        b"client=192.0.2.7:5353 dest=198.51.100.53:53 egress=203.0.113.7:40001 c2s_bytes=40 "
        b"s2c_bytes=120 spliced_bytes=0 copied_bytes=160 duration=0.0035 reason=responses "
        b"errno=\"\" protocol=udp c2s_dgrams=1 s2c_dgrams=1",
        b"2025-12-01T18:00:02.000Z INFO relay.flow[PID]: flow listener=\"q\\\"\\\\\" "
        b"client=[::1]:1 dest=127.0.0.1:2 egress=\"\" c2s_bytes=1099511627776 s2c_bytes=3 "
        b"spliced_bytes=1099511627776 copied_bytes=3 duration=10000.0 reason=denied_policy "
        b"errno=9999 protocol=tcp",
    ],
    "json": [
        b'{"time": "2025-12-01T18:00:00.250Z", "level": "INFO", "logger": "relay.flow", '
        b'"pid": PID, "message": "flow", "listener": "main", "client": "127.0.0.1:50408", '
        b'"dest": "10.0.0.1:80", "egress": "", "c2s_bytes": 5, "s2c_bytes": 7, '
        b'"spliced_bytes": 0, "copied_bytes": 12, "duration": 0.001234, "reason": "eof", '
        b'"errno": "", "protocol": "tcp"}',
        b'{"time": "2025-12-01T18:00:00.999Z", "level": "INFO", "logger": "relay.flow", '
        b'"pid": PID, "message": "flow", "listener": "v6 \\u00e9\\n", '
        b'"client": "[2001:db8::1]:443", "dest": "unix:/run/x sock", '
        b'"egress": "192.0.2.9:40000", "c2s_bytes": 0, "s2c_bytes": 0, "spliced_bytes": 0, '
        b'"copied_bytes": 0, "duration": 1.2e-05, "reason": "reset_origin", '
        b'"errno": "ECONNRESET", "protocol": "tcp"}',
        b'{"time": "2025-12-01T18:00:01.750Z", "level": "INFO", "logger": "relay.flow", '
        b'"pid": PID, "message": "flow", "listener": "dns", "client": "192.0.2.7:5353", '
        b'"dest": "198.51.100.53:53", "egress": "203.0.113.7:40001", "c2s_bytes": 40, '
        b'"s2c_bytes": 120, "spliced_bytes": 0, "copied_bytes": 160, "duration": 0.0035, '
        b'"reason": "responses", "errno": "", "protocol": "udp", "c2s_dgrams": 1, '
        b'"s2c_dgrams": 1}',
        b'{"time": "2025-12-01T18:00:02.000Z", "level": "INFO", "logger": "relay.flow", '
        b'"pid": PID, "message": "flow", "listener": "q\\"\\\\", "client": "[::1]:1", '
        b'"dest": "127.0.0.1:2", "egress": "", "c2s_bytes": 1099511627776, "s2c_bytes": 3, '
        b'"spliced_bytes": 1099511627776, "copied_bytes": 3, "duration": 10000.0, '
        b'"reason": "denied_policy", "errno": "9999", "protocol": "tcp"}',
    ],
}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_pinned_lines(fmt: str) -> None:
    from tests.unit.test_flowlog_writer import RECORDS

    batch = [rec for rec in RECORDS if rec[1] != "main" or rec[2] != ""]
    pid = str(os.getpid()).encode()
    got = flowlog._line_formatter(fmt).lines(batch)
    assert got.split(b"\n")[:-1] == [line.replace(b"PID", pid) for line in PINNED[fmt]]


def test_a_lone_surrogate_is_backslashed() -> None:
    rec: flowlog.Record = (0.0, "a\udc80", None, None, None, 0, 0, 0, 0, 0, "eof", 0, "tcp",
                           -1, -1)
    assert b" listener=a\\udc80 client=\"\" " in flowlog._line_formatter("text").lines([rec])
    assert b'"listener": "a\\udc80", ' in flowlog._line_formatter("json").lines([rec])


def test_a_malformed_record_is_refused() -> None:
    with pytest.raises(TypeError, match="tuple of 15"):
        flowlog._line_formatter("text").lines([("too", "short")])  # type: ignore[list-item]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_repeated_dest_objects_and_times_around_zero(fmt: str) -> None:
    """One dest object repeated (the formatter remembers the last one by identity), others and
    None between its repeats, an equal tuple that is another object, across calls and a cache
    reset; end times on both sides of 0 and of whole seconds (the fraction's two paths)."""
    backend = ("10.0.0.1", 80)
    other = ("2001:db8::2", 443, 0, 0)
    unix = ("unix:/run/a b", 0)
    dests = [backend, backend, other, backend, None, None, unix, unix, backend,
             ("10.0.0.1", 80), backend, other]
    times = [0.0, 0.999, 1.0, 1.0005, -0.25, -1.0, -1.5, 1764612000.0, 1764612000.9995,
             2.0 ** 34 + 0.5, 0.001, 7.25]
    batch: list[flowlog.Record] = [
        (t, "main", ("127.0.0.1", 40000 + i), dest, None, i, 2 * i, i, i, 1000 + i, "eof", 0,
         "tcp", -1, -1)
        for i, (t, dest) in enumerate(zip(times, dests, strict=True))]
    formatter = flowlog._line_formatter(fmt)
    expected = reference_bytes(fmt, batch)
    assert formatter.lines(batch) == expected
    assert formatter.lines(batch[5:]) == reference_bytes(fmt, batch[5:])
    for i in range(flowlog_fmt_cache_limit() + 1):  # fill the dest cache past its limit
        formatter.lines([batch[0][:3] + (("192.0.2.1", i),) + batch[0][4:]])
    assert formatter.lines(batch) == expected


def flowlog_fmt_cache_limit() -> int:
    from relay_ext import _flowfmt

    return int(_flowfmt.CACHE_LIMIT)
