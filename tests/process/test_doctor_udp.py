"""`relay doctor`'s UDP checks: real probes of this host (a transparent UDP socket's original
destination, SO_REUSEADDR port sharing across destinations, SO_REUSEPORT, nft udp tproxy, the
socket buffer sysctls), and severity that follows the config."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from relay.config import loads
from relay.host import doctor, probes
from relay.host.doctor import Doctor, run_checks

UDP_TPROXY = (
    '[[listener]]\nname = "q"\nbind = "127.0.0.1:7443"\nmode = "tproxy"\nprotocol = "udp"\n'
    '[[egress]]\naddress = "203.0.113.7"\nports = "40000-40007"\n'
)
TCP_ONLY = '[[listener]]\nbind = "127.0.0.1:0"\nbackend = "127.0.0.1:9"\n'
UDP_NAMES = ("udp_transparent", "udp_port_sharing", "udp_reuseport", "udp_tproxy",
             "udp_buffers")


def by_name(cfg_text: str) -> dict[str, doctor.Check]:
    return {r.name: r for r in run_checks(Doctor(loads(cfg_text)))}


def _root() -> bool:
    return doctor.has_capability(12)  # CAP_NET_ADMIN


def test_udp_checks_are_listed() -> None:
    names = doctor.CHECK_NAMES
    assert all(name in names for name in UDP_NAMES)
    assert names.index("udp_transparent") > names.index("tproxy")


def test_origdst_probe_reports_the_address_it_was_sent_to() -> None:
    if not _root():
        with pytest.raises(PermissionError):
            probes.udp_origdst_roundtrip()
        return
    host, port = probes.udp_origdst_roundtrip()
    assert host == "127.0.0.1" and 0 < port < 65536
    if os.path.exists("/proc/net/if_inet6"):
        assert probes.udp_origdst_roundtrip(socket.AF_INET6)[0] == "::1"


def test_transparent_udp_check_follows_capability_and_config() -> None:
    check = by_name(UDP_TPROXY)["udp_transparent"]
    if _root():
        assert check.status == "PASS", check
        assert "ORIGDSTADDR received" in check.detail and "IPv4 127.0.0.1:" in check.detail
    else:
        assert check.status == "FAIL" and "CAP_NET_ADMIN" in check.fix
        # Without a UDP tproxy listener the same finding is only a warning.
        assert by_name(TCP_ONLY)["udp_transparent"].status == "WARN"


def test_port_sharing_and_reuseport_work_here() -> None:
    results = by_name(UDP_TPROXY)
    sharing = results["udp_port_sharing"]
    assert sharing.status == "PASS", sharing
    assert "each got only its own reply" in sharing.detail
    assert results["udp_reuseport"].status == "PASS", results["udp_reuseport"]


def test_port_sharing_probe_refuses_without_reuseaddr() -> None:
    """The probe's premise: without SO_REUSEADDR the second bind of a UDP port fails, so the
    PASS above really shows the kernel sharing it."""
    with probes.udp_socket() as a, probes.udp_socket() as b:
        a.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            b.bind(a.getsockname())


def test_udp_tproxy_rules_are_checked_by_nft() -> None:
    check = by_name(UDP_TPROXY)["udp_tproxy"]
    import shutil

    if shutil.which("nft") is None:
        assert check.status == "FAIL" and "nftables" in check.fix
    elif _root():
        assert check.status == "PASS", check
    else:
        assert check.status == "FAIL" and "CAP_NET_ADMIN" in check.fix


def test_buffers_compared_with_one_burst() -> None:
    rmem = int(Path("/proc/sys/net/core/rmem_default").read_text())
    wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    check = by_name(UDP_TPROXY)["udp_buffers"]
    assert f"net.core.rmem_default={rmem}" in check.detail
    assert f"{doctor.UDP_BURST_BYTES} bytes" in check.detail
    if min(rmem, wmem) >= doctor.UDP_BURST_BYTES:
        assert check.status == "PASS"
    else:
        assert check.status == "WARN"
        assert f"={doctor.UDP_BURST_BYTES}" in check.fix and "sysctl -w net.core." in check.fix
        # The same host is fine for a config without UDP.
        assert by_name(TCP_ONLY)["udp_buffers"].status == "PASS"
