"""PROXY protocol version 2 (binary), TCP only: build headers and parse them strictly.

Wire format (haproxy doc/proxy-protocol.txt, section 2.2):
  12-byte signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
  1 byte  version (high nibble, must be 2) | command (low nibble: 0 LOCAL, 1 PROXY)
  1 byte  address family (high nibble: 1 INET, 2 INET6) | transport (low nibble: 1 STREAM)
  2 bytes length of what follows, network order
  addresses: TCP4 src(4) dst(4) sport(2) dport(2) = 12; TCP6 src(16) dst(16) sport dport = 36
  then TLVs: type(1) length(2) value, which must exactly fill the rest.

We emit TCP4 / TCP6 / LOCAL and accept the same: UDP, UNIX and UNSPEC-with-PROXY are rejected.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "SIGNATURE",
    "HEADER_FIXED_LEN",
    "MAX_HEADER_LEN",
    "HeaderReader",
    "ProxyInfo",
    "ProxyProtocolError",
    "ProxyProtocolIncomplete",
    "build",
    "build_local",
    "parse",
]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED_LEN = 16
MAX_HEADER_LEN = HEADER_FIXED_LEN + 0xFFFF

VER_CMD_LOCAL = 0x20
VER_CMD_PROXY = 0x21
FAM_UNSPEC = 0x00
FAM_TCP4 = 0x11
FAM_TCP6 = 0x21

_ADDR_LEN = {FAM_UNSPEC: 0, FAM_TCP4: 12, FAM_TCP6: 36}
_FIXED = struct.Struct("!12sBBH")
_TCP4 = struct.Struct("!4s4sHH")
_TCP6 = struct.Struct("!16s16sHH")
_TLV_HEAD = struct.Struct("!BH")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY v2 header (the message says which part is wrong)."""


class ProxyProtocolIncomplete(ProxyProtocolError):
    """What arrived so far is a valid beginning of a header, but more bytes are needed.

    `needed` is the total header length once known (>= 16), else 16.
    """

    def __init__(self, needed: int, have: int) -> None:
        super().__init__(f"incomplete PROXY v2 header: have {have} of {needed} bytes")
        self.needed = needed
        self.have = have


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """A parsed header. LOCAL (health checks from the proxy itself) carries no addresses:
    the receiver must use the real connection endpoints."""

    command: str  # "PROXY" | "LOCAL"
    family: int | None  # socket.AF_INET | socket.AF_INET6 | None (LOCAL)
    src: tuple[str, int] | None
    dst: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def _v4_bytes(ip: str) -> bytes | None:
    """Packed IPv4 address for an IPv4 or IPv4-mapped IPv6 literal, else None."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return addr.packed
    mapped = addr.ipv4_mapped
    return mapped.packed if mapped is not None else None


def _v6_bytes(ip: str) -> bytes:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + addr.packed).packed
    return addr.packed


def build(src: tuple | None, dst: tuple | None) -> bytes:
    """PROXY v2 header for a TCP connection from `src` to `dst` (socket address tuples, IP
    literals; IPv6 4-tuples are fine). Both IPv4 (or IPv4-mapped) -> TCP4, otherwise TCP6 with
    IPv4 addresses mapped. Either side None -> LOCAL."""
    if src is None or dst is None:
        return build_local()
    src4, dst4 = _v4_bytes(src[0]), _v4_bytes(dst[0])
    if src4 is not None and dst4 is not None:
        body = _TCP4.pack(src4, dst4, src[1], dst[1])
        return _FIXED.pack(SIGNATURE, VER_CMD_PROXY, FAM_TCP4, len(body)) + body
    body = _TCP6.pack(_v6_bytes(src[0]), _v6_bytes(dst[0]), src[1], dst[1])
    return _FIXED.pack(SIGNATURE, VER_CMD_PROXY, FAM_TCP6, len(body)) + body


def build_local() -> bytes:
    """LOCAL header: "this connection is the proxy's own, use the real endpoints"."""
    return _FIXED.pack(SIGNATURE, VER_CMD_LOCAL, FAM_UNSPEC, 0)


def parse(data: bytes | bytearray | memoryview) -> tuple[int, ProxyInfo]:
    """Parse a PROXY v2 header at the start of `data`: returns (header length, info).

    Raises ProxyProtocolIncomplete when `data` is a valid prefix that is too short (more bytes
    may complete it), ProxyProtocolError for anything invalid: a signature mismatch is reported
    as soon as the first differing byte is there. Bytes after the header are not looked at.
    """
    view = bytes(data[:HEADER_FIXED_LEN])
    have = len(data)
    sig_part = view[:12]
    if sig_part != SIGNATURE[: len(sig_part)]:
        raise ProxyProtocolError("not a PROXY v2 header: signature mismatch")
    if have < HEADER_FIXED_LEN:
        if have >= 13:
            _check_ver_cmd(view[12])
        if have >= 14:
            _check_family(view[12], view[13])
        raise ProxyProtocolIncomplete(HEADER_FIXED_LEN, have)
    _sig, ver_cmd, fam, length = _FIXED.unpack(view)
    _check_ver_cmd(ver_cmd)
    _check_family(ver_cmd, fam)
    total = HEADER_FIXED_LEN + length
    addr_len = _ADDR_LEN[fam]
    if length < addr_len:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} shorter than the {addr_len}-byte address block"
        )
    if have < total:
        raise ProxyProtocolIncomplete(total, have)
    body = bytes(data[HEADER_FIXED_LEN:total])
    tlvs = _parse_tlvs(body, addr_len)
    if ver_cmd == VER_CMD_LOCAL:
        return total, ProxyInfo("LOCAL", None, None, None, tlvs)
    if fam == FAM_TCP4:
        s, d, sp, dp = _TCP4.unpack_from(body)
        af = socket.AF_INET
    else:
        s, d, sp, dp = _TCP6.unpack_from(body)
        af = socket.AF_INET6
    src = (socket.inet_ntop(af, s), sp)
    dst = (socket.inet_ntop(af, d), dp)
    return total, ProxyInfo("PROXY", int(af), src, dst, tlvs)


class HeaderReader:
    """Reads one PROXY v2 header from a non-blocking socket, as far as the bytes have arrived,
    without consuming a byte behind it.

    Each recv asks for no more than the header still lacks (16 bytes, then the rest of the
    length they announce), so the payload stays in the socket for the relay. Not MSG_PEEK:
    peeked bytes leave the socket readable, and a level-triggered wait for the rest of a
    dribbled header would wake at once, again and again.
    """

    __slots__ = ("buf", "need")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = HEADER_FIXED_LEN

    def read_from(self, sock: socket.socket) -> ProxyInfo | None:
        """The header once complete, None while bytes are missing (wait for readability and
        call again). Raises ProxyProtocolError when invalid or cut by EOF, OSError when the
        socket failed (a reset)."""
        while True:
            try:
                chunk = sock.recv(self.need - len(self.buf), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            if not chunk:
                raise ProxyProtocolError(f"EOF after {len(self.buf)} header bytes")
            self.buf += chunk
            try:
                _length, info = parse(self.buf)
            except ProxyProtocolIncomplete as exc:
                self.need = exc.needed
                continue
            return info


def _check_ver_cmd(ver_cmd: int) -> None:
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY header version {ver_cmd >> 4} (only v2 is accepted)")
    if ver_cmd not in (VER_CMD_LOCAL, VER_CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {ver_cmd & 0xF:#x} unknown")


def _check_family(ver_cmd: int, fam: int) -> None:
    if fam not in _ADDR_LEN:
        raise ProxyProtocolError(f"PROXY v2 family/transport {fam:#04x} not TCP4/TCP6/UNSPEC")
    if ver_cmd == VER_CMD_PROXY and fam == FAM_UNSPEC:
        raise ProxyProtocolError("PROXY v2 command PROXY with UNSPEC family")


def _parse_tlvs(body: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    end = len(body)
    while offset < end:
        if end - offset < _TLV_HEAD.size:
            raise ProxyProtocolError(f"PROXY v2 TLV header truncated at offset {offset}")
        kind, length = _TLV_HEAD.unpack_from(body, offset)
        offset += _TLV_HEAD.size
        if length > end - offset:
            raise ProxyProtocolError(
                f"PROXY v2 TLV {kind:#04x} length {length} overruns the header by "
                f"{length - (end - offset)} bytes"
            )
        tlvs.append((kind, body[offset : offset + length]))
        offset += length
    return tuple(tlvs)
