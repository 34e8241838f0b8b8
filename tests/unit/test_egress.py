"""Soft-unicast egress, the parts without a kernel: slice parsing, the most specific
destination wins, the packed IP_LOCAL_PORT_RANGE value. The kernel-facing half is
tests/netns/test_egress_kernel.py.
"""

from __future__ import annotations

import socket
import sys

import pytest

from relay import config
from relay.config.values import parse_port_range
from relay.serve.egress import Egress, EgressTable

# ---------------------------------------------------------------- pure parsing, no kernel


def test_parse_slice() -> None:
    assert parse_port_range("40000-40999") == (40000, 40999)
    assert parse_port_range("40000") == (40000, 40000)
    assert parse_port_range("40000 - 40010") == (40000, 40010)  # the one grammar allows blanks
    for bad in ("0-10", "10-5", "40000-70000", "a-b", ""):
        with pytest.raises(ValueError):
            parse_port_range(bad)


def test_most_specific_destination_wins() -> None:
    cfg = config.loads(
        '[[listener]]\nbind = "127.0.0.1:0"\nmode = "tproxy"\n'
        '[[egress]]\naddress = "203.0.113.7"\nports = "40000-40007"\n'
        '[[egress]]\naddress = "203.0.113.8"\nports = "40000-40007"\n'
        'destinations = ["198.51.100.0/24"]\n'
        '[[egress]]\naddress = "203.0.113.9"\nports = "40000-40007"\n'
        'destinations = ["198.51.100.128/25"]\n'
        '[[egress]]\naddress = "2001:db8::7"\nports = "40000-40007"\n'
    )
    table = EgressTable.from_config(cfg)
    pick = table.lookup
    assert pick("192.0.2.1").address == "203.0.113.7"  # type: ignore[union-attr]
    assert pick("198.51.100.1").address == "203.0.113.8"  # type: ignore[union-attr]
    assert pick("198.51.100.200").address == "203.0.113.9"  # type: ignore[union-attr]
    assert pick("2001:db8:1::1").address == "2001:db8::7"  # type: ignore[union-attr]
    v4_only = EgressTable.from_config(config.loads(
        '[[listener]]\nbind = "127.0.0.1:0"\nmode = "tproxy"\n'
        '[[egress]]\naddress = "203.0.113.7"\nports = "40000-40007"\n'
        'destinations = ["10.0.0.0/8"]\n'
    ))
    assert v4_only.lookup("11.0.0.1") is None and v4_only.lookup("2001:db8::1") is None


def test_range_value_is_hi_shl_16_or_lo() -> None:
    e = Egress("192.0.2.1", 40000, 40007, socket.AF_INET, ("0.0.0.0/0",))
    assert int.from_bytes(e.range_value, sys.byteorder) == (40007 << 16) | 40000
    assert 40000 in e and 40007 in e and 40008 not in e


