"""PROXY protocol v2: byte-exact headers, strict parsing, truncation reported as such."""

from __future__ import annotations

import socket
import struct

import pytest

from relay.serve import proxyproto
from relay.serve.proxyproto import ProxyProtocolError, ProxyProtocolIncomplete, build, parse

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

# Hand-assembled from haproxy doc/proxy-protocol.txt section 2.2.
TCP4_VECTOR = (
    SIG
    + b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 address bytes
    + bytes([192, 0, 2, 1]) + bytes([198, 51, 100, 7])
    + b"\xdc\x04" + b"\x01\xbb"  # 56324, 443
)
TCP6_VECTOR = (
    SIG
    + b"\x21\x21\x00\x24"  # v2 PROXY, TCP over IPv6, 36 address bytes
    + bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + b"\x30\x39" + b"\x00\x50"  # 12345, 80
)
LOCAL_VECTOR = SIG + b"\x20\x00\x00\x00"


def test_build_tcp4_is_byte_exact() -> None:
    assert build(("192.0.2.1", 56324), ("198.51.100.7", 443)) == TCP4_VECTOR


def test_build_tcp6_is_byte_exact_and_accepts_v6_sockaddr_4tuples() -> None:
    got = build(("2001:db8::1", 12345, 0, 0), ("2001:db8::2", 80, 0, 0))
    assert got == TCP6_VECTOR


def test_build_local_and_none_side() -> None:
    assert proxyproto.build_local() == LOCAL_VECTOR
    assert build(None, ("192.0.2.1", 1)) == LOCAL_VECTOR


def test_build_mapped_both_sides_is_tcp4_and_mixed_is_tcp6() -> None:
    assert build(("::ffff:192.0.2.1", 56324), ("::ffff:198.51.100.7", 443)) == TCP4_VECTOR
    mixed = build(("192.0.2.1", 1000), ("2001:db8::2", 80))
    assert mixed[13] == 0x21 and len(mixed) == 16 + 36
    assert mixed[16:32] == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])


@pytest.mark.parametrize(
    ("vector", "src", "dst"),
    [
        (TCP4_VECTOR, ("192.0.2.1", 56324), ("198.51.100.7", 443)),
        (TCP6_VECTOR, ("2001:db8::1", 12345), ("2001:db8::2", 80)),
    ],
)
def test_parse_roundtrip_leaves_payload_alone(vector: bytes, src: tuple, dst: tuple) -> None:
    length, info = parse(vector + b"GET / HTTP/1.0\r\n")
    assert length == len(vector)
    assert info.command == "PROXY" and info.src == src and info.dst == dst
    assert info.family == (socket.AF_INET if len(vector) == 28 else socket.AF_INET6)


def test_parse_local_has_no_addresses() -> None:
    length, info = parse(LOCAL_VECTOR + b"x")
    assert (length, info.command, info.src, info.dst) == (16, "LOCAL", None, None)


def test_parse_local_with_tcp4_family_skips_addresses() -> None:
    hdr = SIG + b"\x20\x11\x00\x0c" + bytes(12)
    length, info = parse(hdr)
    assert length == 28 and info.command == "LOCAL" and info.src is None


def test_parse_tlvs_are_bounds_checked_and_returned() -> None:
    tlvs = struct.pack("!BH", 0x04, 3) + b"abc" + struct.pack("!BH", 0x02, 0)
    body = TCP4_VECTOR[16:] + tlvs
    hdr = SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body
    length, info = parse(hdr + b"payload")
    assert length == len(hdr)
    assert info.tlvs == ((0x04, b"abc"), (0x02, b""))


@pytest.mark.parametrize("vector", [TCP4_VECTOR, TCP6_VECTOR, LOCAL_VECTOR])
def test_every_truncation_is_incomplete_not_accepted(vector: bytes) -> None:
    for cut in range(len(vector)):
        with pytest.raises(ProxyProtocolIncomplete) as info:
            parse(vector[:cut])
        assert info.value.have == cut
        assert info.value.needed == (16 if cut < 16 else len(vector))


def _header(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n", "signature"),  # v1 text
        (b"GET / HTTP/1.1\r\n\r\n", "signature"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8), "signature"),
        (b"\r\n\r\x01", "signature"),  # mismatch seen before 12 bytes arrive
        (_header(0x11, 0x11, bytes(12)), "version"),
        (_header(0x22, 0x11, bytes(12)), "command"),
        (_header(0x21, 0x12, bytes(12)), "family"),  # UDP over IPv4
        (_header(0x21, 0x31, bytes(216)), "family"),  # UNIX stream
        (_header(0x21, 0x00, b""), "UNSPEC"),
        (_header(0x21, 0x11, bytes(8)), "shorter than"),
        (_header(0x21, 0x21, bytes(12)), "shorter than"),
        (_header(0x21, 0x11, bytes(12) + b"\x04\x00"), "TLV header truncated"),
        (_header(0x21, 0x11, bytes(12) + b"\x04\x00\x05abc"), "overruns"),
        (SIG[:12] + b"\x11", "version"),  # bad version seen as soon as byte 13 arrives
    ],
)
def test_malformed_headers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message) as info:
        parse(data)
    assert not isinstance(info.value, ProxyProtocolIncomplete)


def test_overrun_by_declared_length_waits_for_more() -> None:
    # A declared length longer than what arrived is "need more data", with the exact total.
    hdr = _header(0x21, 0x11, bytes(12))[:-4]
    with pytest.raises(ProxyProtocolIncomplete) as info:
        parse(hdr)
    assert info.value.needed == 28
