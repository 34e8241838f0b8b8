"""relay.serve.slicecheck: does a slice still fit the ephemeral port sysctls (read here)."""

from __future__ import annotations

from relay.config.host import read_port_range, read_reserved_ports
from relay.host import natscan
from relay.serve.slicecheck import REFRESH_S, SliceWatch, slice_problem


def test_slice_problem_names_the_sysctl() -> None:
    assert slice_problem(40000, 40007, (32768, 60999), []) is None
    assert "ip_local_port_range 50000-60999" in str(
        slice_problem(40000, 40007, (50000, 60999), []))
    assert "ip_local_port_range" in str(slice_problem(60990, 61010, (32768, 60999), []))
    assert "reserved_ports 40005-40005" in str(
        slice_problem(40000, 40007, (32768, 60999), [(40005, 40005)]))
    assert slice_problem(40000, 40007, (32768, 60999), [(40008, 40010)]) is None


def test_watch_reads_at_most_once_per_interval() -> None:
    now = [100.0]
    watch = SliceWatch(clock=lambda: now[0])
    lo, _hi = read_port_range()
    reserved = any(r_lo <= lo <= r_hi for r_lo, r_hi in read_reserved_ports())
    for _ in range(50):
        answer = watch.problem(lo, lo)
    assert watch.reads == 1
    assert (answer is None) != reserved
    assert "ip_local_port_range" in str(watch.problem(lo - 1, lo))  # starts below the range
    now[0] += REFRESH_S
    watch.problem(lo, lo)
    assert watch.reads == 2


def test_conntrack_entries_count_whole_addresses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "nf_conntrack"
    table.write_text(
        "ipv4 2 tcp 6 117 TIME_WAIT src=203.0.113.7 dst=198.51.100.10 sport=40001 dport=80 "
        "src=198.51.100.10 dst=203.0.113.7 sport=80 dport=40001 [ASSURED] mark=0 use=1\n"
        "ipv4 2 tcp 6 117 TIME_WAIT src=203.0.113.70 dst=198.51.100.10 sport=1 dport=80 "
        "src=198.51.100.10 dst=203.0.113.70 sport=80 dport=1 mark=0 use=1\n"
        "ipv6 10 udp 17 29 src=2001:0db8:0007:0000:0000:0000:0000:0007 "
        "dst=2001:0db8:0100:0000:0000:0000:0000:0010 sport=40000 dport=53 mark=0 use=1\n"
    )
    counts = natscan.conntrack_entries(["203.0.113.7", "2001:db8:7::7", "192.0.2.1"],
                                       str(table))
    assert counts == {"203.0.113.7": 2, "2001:db8:7::7": 1}
    assert natscan.conntrack_entries(["203.0.113.7"], str(tmp_path / "missing")) == {}


def test_nat_rule_mentions_are_whole_addresses() -> None:
    assert natscan._mentions('{"saddr":"203.0.113.7"}', "203.0.113.7")
    assert not natscan._mentions('{"saddr":"203.0.113.70"}', "203.0.113.7")
    assert natscan._blanket("-A POSTROUTING -o eth0 -j MASQUERADE")
    assert not natscan._blanket("-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE")
