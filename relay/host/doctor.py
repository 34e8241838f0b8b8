"""`relay doctor`: can this host run the relay as configured, and if not, what to change.

Every check probes the feature itself (never a kernel version number) and returns PASS, WARN
(works, but degraded or only needed by features not configured) or FAIL (the configuration cannot
work here), with the fix.  The probes themselves are relay.host.probes (re-exported here, with
``versions()``, which feeds ``relay --version``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Literal

import msgspec

from relay.config import Config, ConfigError, host, load
from relay.engines.ring_failure import explain_ring_failure, io_uring_disabled
from relay.host.probes import (
    CAP_SYS_ADMIN,
    CAP_SYS_RESOURCE,
    PAGE,
    format_versions,
    has_capability,
    port_range_sysctl,
    splice_roundtrip,
    tcp_socket,
    udp_origdst_roundtrip,
    udp_port_sharing,
    udp_reuseport,
    versions,
)
from relay.process import budgets as limits
from relay.procfs import read_int, read_proc
from relay.sock import (
    IP_BIND_ADDRESS_NO_PORT,
    IP_LOCAL_PORT_RANGE,
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
)

__all__ = [
    "CHECK_NAMES",
    "Check",
    "Doctor",
    "format_report",
    "format_versions",
    "has_capability",
    "run_checks",
    "versions",
]

Status = Literal["PASS", "WARN", "FAIL"]

_U32 = struct.Struct("=I")

URING_OPS_NEEDED = (
    "ACCEPT",
    "POLL_ADD",
    "CONNECT",
    "CLOSE",
    "ASYNC_CANCEL",
    "SPLICE",
    "RECV",
    "SEND",
)


# What a UDP socket's queues should hold between two reads of the core: one burst of
# QUIC-sized datagrams. The core reads up to 8 recvmmsg rounds of 32 per wakeup (docs/udp-core.md);
# a 1,200-byte datagram costs 2,304 bytes of the socket's buffer (skb truesize, measured with
# /proc/net/udp rx_queue), so net.core.rmem_default = 212992 holds only 92 of them.
UDP_BURST_DATAGRAMS = 256
UDP_DATAGRAM_TRUESIZE = 2304
UDP_BURST_BYTES = UDP_BURST_DATAGRAMS * UDP_DATAGRAM_TRUESIZE


class Check(msgspec.Struct, kw_only=True):
    """One result line."""

    name: str
    status: Status
    detail: str
    fix: str = ""














class Doctor:
    """Runs the checks against one effective configuration (defaults when none is given)."""

    def __init__(self, cfg: Config | None = None, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg if cfg is not None else Config()
        self._ring_error: str | None = None  # set by check_io_uring

    # ------------------------------------------------------------------ what the config needs

    @property
    def needs_transparent(self) -> bool:
        return bool(self.cfg.egress) or any(lst.mode == "tproxy" for lst in self.cfg.listener)

    @property
    def needs_nft(self) -> bool:
        return any(lst.mode in ("tproxy", "redirect") for lst in self.cfg.listener)

    @property
    def needs_udp(self) -> bool:
        return any(lst.is_udp for lst in self.cfg.listener)

    @property
    def needs_udp_tproxy(self) -> bool:
        return any(lst.is_udp and lst.mode == "tproxy" for lst in self.cfg.listener)

    def _severity(self, needed: bool) -> Status:
        return "FAIL" if needed else "WARN"

    # ------------------------------------------------------------------ io_uring

    def check_io_uring(self) -> Check:
        disabled = io_uring_disabled()
        sysctl = f"kernel.io_uring_disabled={disabled}" if disabled is not None else ""
        want_uring = self.cfg.relay.engine == "uring"
        try:
            from liburing import io_uring, io_uring_queue_exit, io_uring_queue_init
        except ImportError as exc:
            self._ring_error = f"python-liburing not importable: {exc}"
            return Check(
                name="io_uring",
                status=self._severity(want_uring),
                detail=self._ring_error,
                fix="pip install liburing==2024.5.3 (the epoll engine is used meanwhile)",
            )
        ring = io_uring()
        try:
            io_uring_queue_init(8, ring, 0)
        except OSError as exc:
            self._ring_error = explain_ring_failure(exc.errno, disabled)
            return Check(
                name="io_uring",
                status=self._severity(want_uring),
                detail=f"cannot create a ring: {self._ring_error}",
                fix=_ring_fix(exc.errno, disabled),
            )
        io_uring_queue_exit(ring)
        return Check(name="io_uring", status="PASS", detail=f"ring created; {sysctl}".rstrip("; "))

    def check_io_uring_ops(self) -> Check:
        if self._ring_error is not None:
            return Check(
                name="io_uring_ops",
                status="WARN",
                detail=f"not probed: {self._ring_error}",
                fix="see the io_uring check",
            )
        try:
            from liburing import probe

            supported = probe()
        except Exception as exc:  # the probe itself failing is the finding
            return Check(name="io_uring_ops", status="WARN", detail=f"probe failed: {exc}")
        missing = [op for op in URING_OPS_NEEDED if not supported.get(f"IORING_OP_{op}")]
        if missing:
            return Check(
                name="io_uring_ops",
                status=self._severity(self.cfg.relay.engine == "uring"),
                detail="unsupported: " + ", ".join(missing),
                fix='use engine = "epoll" (or "auto", which falls back by itself)',
            )
        return Check(
            name="io_uring_ops", status="PASS", detail="supported: " + ", ".join(URING_OPS_NEEDED)
        )

    # ------------------------------------------------------------------ splice and pipes

    def check_splice(self) -> Check:
        try:
            moved = splice_roundtrip(64 * 1024)
        except OSError as exc:
            return Check(
                name="splice",
                status=self._severity(self.cfg.relay.splice),
                detail=f"socket -> pipe -> socket failed: {exc}",
                fix="set relay.splice = false (bytes are copied instead)",
            )
        return Check(
            name="splice", status="PASS", detail=f"{moved} bytes socket -> pipe -> socket intact"
        )

    def check_pipe_size(self) -> Check:
        requested = self.cfg.relay.pipe_size
        max_size = read_int("/proc/sys/fs/pipe-max-size")
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, requested)
                error = ""
            except OSError as exc:
                error = f"F_SETPIPE_SZ({requested}) failed: {os.strerror(exc.errno or 0)}; "
            granted = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        finally:
            os.close(r)
            os.close(w)
        detail = f"{error}requested {requested}, granted {granted}; fs.pipe-max-size={max_size}"
        if granted >= requested:
            return Check(name="pipe_size", status="PASS", detail=detail)
        return Check(
            name="pipe_size",
            status="WARN",
            detail=detail,
            fix=f"sysctl -w fs.pipe-max-size={requested}, or set relay.pipe_size <= {granted}",
        )

    def check_pipe_budget(self) -> Check:
        """The pipe budget exactly as ``relay run`` computes it (relay.process.budgets)."""
        rs = self.cfg.relay
        workers = rs.resolved_workers
        wanted = rs.pipes_per_worker(workers)
        if not wanted:
            return Check(name="pipe_budget", status="PASS", detail="splice off: no pipes")
        if rs.user:
            # Workers drop to relay.user: only root keeps the exemption.
            user, exempt = rs.user, rs.user == "root"
        else:
            user = pwd.getpwuid(os.geteuid()).pw_name
            exempt = has_capability(CAP_SYS_RESOURCE) or has_capability(CAP_SYS_ADMIN)
        budget = limits.pipe_budget(None if exempt else user, rs.pipe_size, wanted, workers)
        if budget.per_worker >= wanted:
            return Check(name="pipe_budget", status="PASS", detail=budget.message)
        pages = wanted * workers * max(1, budget.pipe_bytes // PAGE)
        return Check(
            name="pipe_budget",
            status="WARN",
            detail=budget.message + "; past the budget new pipes get one page and F_SETPIPE_SZ "
            "fails, so workers get fewer pipes",
            fix=f"sysctl -w fs.pipe-user-pages-soft={pages} (0 = no limit), "
            "or lower relay.max_pipes / relay.pipe_size",
        )

    # ------------------------------------------------------------------ socket options

    def check_ip_transparent(self) -> Check:
        probes = [(socket.AF_INET, socket.SOL_IP, IP_TRANSPARENT, "IP_TRANSPARENT")]
        if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
            probes.append(
                (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_TRANSPARENT, "IPV6_TRANSPARENT")
            )
        done = []
        for family, level, option, label in probes:
            with tcp_socket(family) as s:
                try:
                    s.setsockopt(level, option, 1)
                except OSError as exc:
                    return Check(
                        name="ip_transparent",
                        status=self._severity(self.needs_transparent),
                        detail=f"setsockopt({label}): {os.strerror(exc.errno or 0)} "
                        "(needed by tproxy listeners and non-local egress addresses)",
                        fix="run as root or with CAP_NET_ADMIN (systemd: "
                        "AmbientCapabilities=CAP_NET_ADMIN)",
                    )
            done.append(label)
        return Check(
            name="ip_transparent", status="PASS", detail=" and ".join(done) + " can be set"
        )

    def check_ip_bind_address_no_port(self) -> Check:
        with tcp_socket() as s:
            try:
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                value = s.getsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT)
            except OSError as exc:
                return Check(
                    name="ip_bind_address_no_port",
                    status=self._severity(bool(self.cfg.egress)),
                    detail=f"IP_BIND_ADDRESS_NO_PORT: {os.strerror(exc.errno or 0)}",
                    fix="needs Linux 4.2+; egress slices cannot share ports without it",
                )
        status: Status = "PASS" if value == 1 else "FAIL"
        return Check(name="ip_bind_address_no_port", status=status, detail=f"read back {value}")

    def check_ip_local_port_range_option(self) -> Check:
        """Set IP_LOCAL_PORT_RANGE, read it back, and see a real connect pick a port inside it."""
        sys_range = port_range_sysctl()
        lo, hi = (sys_range[0], sys_range[0] + 63) if sys_range else (40000, 40063)
        needed = bool(self.cfg.egress)
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(tcp_socket())
            server.bind(("127.0.0.1", 0))
            server.listen(4)
            client = stack.enter_context(tcp_socket())
            try:
                client.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, _U32.pack(hi << 16 | lo))
                value = _U32.unpack(client.getsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, 4))[0]
            except OSError as exc:
                return Check(
                    name="ip_local_port_range_option",
                    status=self._severity(needed),
                    detail=f"IP_LOCAL_PORT_RANGE (51): {os.strerror(exc.errno or 0)}",
                    fix="needs Linux 6.3+; without it egress slices cannot be enforced",
                )
            if value != (hi << 16 | lo):
                return Check(
                    name="ip_local_port_range_option",
                    status=self._severity(needed),
                    detail=f"set {lo}-{hi}, read back {value & 0xFFFF}-{value >> 16}",
                )
            client.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            client.bind(("127.0.0.1", 0))
            client.settimeout(2.0)
            client.connect(server.getsockname())
            port = client.getsockname()[1]
        if lo <= port <= hi:
            return Check(
                name="ip_local_port_range_option",
                status="PASS",
                detail=f"set {lo}-{hi}, read back, connect() got port {port}",
            )
        return Check(
            name="ip_local_port_range_option",
            status=self._severity(needed),
            detail=f"set {lo}-{hi} but connect() got port {port}: the kernel ignored the range",
        )

    def check_ip_local_port_range(self) -> Check:
        sys_range = port_range_sysctl()
        reserved = read_proc("/proc/sys/net/ipv4/ip_local_reserved_ports") or ""
        detail = (
            f"net.ipv4.ip_local_port_range={sys_range[0]}-{sys_range[1]}"
            if sys_range
            else "net.ipv4.ip_local_port_range unreadable"
        )
        detail += f"; ip_local_reserved_ports={reserved or '(none)'}"
        if not self.cfg.egress:
            return Check(name="ip_local_port_range", status="PASS", detail=detail)
        slices = ", ".join(e.ports for e in self.cfg.egress)
        problems = [
            f"{path}: {value}: {reason}"
            for path, value, reason in host.check_egress(list(enumerate(self.cfg.egress)))
        ]
        if problems:
            return Check(
                name="ip_local_port_range",
                status="FAIL",
                detail=f"{detail}; " + "; ".join(problems),
                fix="move the slices inside net.ipv4.ip_local_port_range, away from "
                "ip_local_reserved_ports and from each other (sysctl -w "
                'net.ipv4.ip_local_port_range="LO HI")',
            )
        return Check(
            name="ip_local_port_range", status="PASS", detail=f"{detail}; slices {slices} fit"
        )

    # ------------------------------------------------------------------ limits

    def check_nofile(self) -> Check:
        import resource

        rs = self.cfg.relay
        needed = limits.nofile_needed_for(rs, max(1, len(self.cfg.listener)))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        ceiling = limits.nr_open()
        detail = (
            f"soft {soft}, hard {hard}, fs.nr_open={ceiling}; {needed} needed per worker for "
            f"maxconn={rs.maxconn} over {rs.resolved_workers} workers"
        )
        if soft >= needed or soft == resource.RLIM_INFINITY:
            return Check(name="nofile", status="PASS", detail=detail)
        if hard >= needed or hard == resource.RLIM_INFINITY:
            return Check(
                name="nofile",
                status="PASS",
                detail=detail + "; relay run raises the soft limit itself",
            )
        if has_capability(CAP_SYS_RESOURCE) and (ceiling is None or ceiling >= needed):
            return Check(
                name="nofile",
                status="WARN",
                detail=detail + "; relay run raises the hard limit (CAP_SYS_RESOURCE)",
                fix=f"LimitNOFILE={needed} in the systemd unit makes it explicit",
            )
        return Check(
            name="nofile",
            status="FAIL",
            detail=detail,
            fix=f"LimitNOFILE={needed} (systemd) or `ulimit -Hn {needed}`"
            + (
                f"; sysctl -w fs.nr_open={needed}"
                if ceiling is not None and ceiling < needed
                else ""
            )
            + "; or lower relay.maxconn",
        )

    # ------------------------------------------------------------------ nftables / TPROXY

    def check_nftables(self) -> Check:
        nft = shutil.which("nft")
        if nft is None:
            return Check(
                name="nftables",
                status=self._severity(self.needs_nft),
                detail="nft not found in PATH (needed for tproxy/redirect listeners)",
                fix="apt-get install nftables",
            )
        try:
            out = subprocess.run(
                [nft, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Check(name="nftables", status="WARN", detail=f"{nft} --version: {exc}")
        return Check(name="nftables", status="PASS", detail=f"{nft}: {out.stdout.strip()}")

    def _nft_accepts(self, name: str, needed: bool, rules: list[str], what: str,
                     fix: str) -> Check:
        """Does `nft -c` (check only, nothing applied) accept these prerouting rules?"""
        nft = shutil.which("nft")
        if nft is None:
            return Check(name=name, status=self._severity(needed),
                         detail="not checked: nft not found", fix="apt-get install nftables")
        ruleset = (
            "table inet relay_doctor {\n"
            "  chain prerouting {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            + "".join(f"    {rule}\n" for rule in rules)
            + "  }\n"
            "}\n"
        )
        try:
            res = subprocess.run([nft, "-c", "-f", "-"], input=ruleset, capture_output=True,
                                 text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Check(name=name, status=self._severity(needed), detail=f"nft -c: {exc}")
        if res.returncode == 0:
            return Check(name=name, status="PASS", detail=f"nft -c accepts {what}")
        reason = " ".join(res.stderr.split())[:300] or f"exit status {res.returncode}"
        return Check(name=name, status=self._severity(needed),
                     detail=f"nft -c rejects {what}: {reason}", fix=fix)

    def check_tproxy(self) -> Check:
        return self._nft_accepts(
            "tproxy", any(lst.mode == "tproxy" for lst in self.cfg.listener),
            ["meta l4proto tcp tproxy ip to 127.0.0.1:1 meta mark set 1 accept"],
            "a tproxy rule",
            "run as root / CAP_NET_ADMIN; the kernel needs nft_tproxy (modprobe nft_tproxy)")

    # ------------------------------------------------------------------ UDP

    def check_udp_transparent(self) -> Check:
        """A transparent UDP listener in miniature: IP_TRANSPARENT (CAP_NET_ADMIN) and the
        original destination of a real datagram from its IP_ORIGDSTADDR control message."""
        families = [socket.AF_INET]
        if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
            families.append(socket.AF_INET6)
        done = []
        for family in families:
            label = "IPv6" if family == socket.AF_INET6 else "IPv4"
            try:
                host, port = udp_origdst_roundtrip(family)
            except OSError as exc:
                eperm = exc.errno == errno.EPERM
                return Check(
                    name="udp_transparent",
                    status=self._severity(self.needs_udp_tproxy),
                    detail=f"{label}: transparent UDP socket with RECVORIGDSTADDR: "
                    f"{exc.strerror or exc} (needed by UDP tproxy listeners and the reply "
                    "sockets that answer from the original destination)",
                    fix="run as root or with CAP_NET_ADMIN (systemd: "
                    "AmbientCapabilities=CAP_NET_ADMIN)" if eperm else
                    "the kernel must support IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR",
                )
            done.append(f"{label} {host}:{port}" if label == "IPv4" else f"{label} [{host}]:{port}")
        return Check(
            name="udp_transparent",
            status="PASS",
            detail="IP_TRANSPARENT set, ORIGDSTADDR received: " + ", ".join(done),
        )

    def check_udp_port_sharing(self) -> Check:
        needed = self.needs_udp and bool(self.cfg.egress)
        try:
            port = udp_port_sharing()
        except OSError as exc:
            return Check(
                name="udp_port_sharing",
                status=self._severity(needed),
                detail=f"two SO_REUSEADDR sockets on one port, connected to two destinations: "
                f"{exc.strerror or exc} (UDP egress shares each slice port across destinations)",
                fix="needs a Linux kernel whose UDP lookup prefers connected sockets; without "
                "it each slice port serves one UDP flow at a time",
            )
        return Check(
            name="udp_port_sharing",
            status="PASS",
            detail=f"port {port} shared by two connected sockets, each got only its own reply",
        )

    def check_udp_reuseport(self) -> Check:
        try:
            port = udp_reuseport(2)
        except OSError as exc:
            return Check(
                name="udp_reuseport",
                status=self._severity(self.needs_udp),
                detail=f"two UDP sockets with SO_REUSEPORT on one port: {exc.strerror or exc}",
                fix="SO_REUSEPORT needs Linux 3.9+; run relay with workers = 1 meanwhile",
            )
        return Check(name="udp_reuseport", status="PASS",
                     detail=f"two UDP sockets share port {port} with SO_REUSEPORT")

    def check_udp_tproxy(self) -> Check:
        return self._nft_accepts(
            "udp_tproxy", self.needs_udp_tproxy,
            ["meta l4proto udp socket transparent 1 meta mark set 1 accept",
             "meta l4proto udp tproxy ip to 127.0.0.1:1 meta mark set 1 accept",
             "meta l4proto udp tproxy ip6 to [::1]:1 meta mark set 1 accept"],
            "udp tproxy (ip, ip6) and the udp socket match",
            "run as root / CAP_NET_ADMIN; the kernel needs nft_tproxy and nft_socket "
            "(modprobe nft_tproxy nft_socket)")

    def check_udp_buffers(self) -> Check:
        """Socket buffer sysctls against one burst: a datagram that finds the receive queue
        full is dropped by the kernel (UdpRcvbufErrors), never seen by the relay."""
        values = {
            key: read_int(f"/proc/sys/net/core/{key}")
            for key in ("rmem_default", "rmem_max", "wmem_default", "wmem_max")
        }
        detail = ", ".join(f"net.core.{k}={v}" for k, v in values.items())
        detail += (
            f"; one burst = {UDP_BURST_DATAGRAMS} datagrams of 1200 bytes = "
            f"{UDP_BURST_BYTES} bytes of buffer"
        )
        short = [k for k in ("rmem_default", "wmem_default")
                 if (values[k] or 0) < UDP_BURST_BYTES]
        if not short:
            return Check(name="udp_buffers", status="PASS", detail=detail)
        if not self.needs_udp:
            return Check(name="udp_buffers", status="PASS",
                         detail=detail + f"; {', '.join(short)} below it (no UDP listener)")
        fix = " ".join(f"sysctl -w net.core.{k}={UDP_BURST_BYTES}" for k in short)
        return Check(
            name="udp_buffers",
            status="WARN",
            detail=detail + f"; {', '.join(short)} cannot hold it: bursts are dropped by the "
            "kernel (netstat -su: receive buffer errors)",
            fix=fix,
        )

    # ------------------------------------------------------------------ engines, config

    def check_egress_nat(self) -> Check:
        """NAT rules or conntrack entries touching the egress addresses (relay.host.natscan)."""
        from relay.host import natscan

        addresses = sorted({e.address for e in self.cfg.egress})
        if not addresses:
            return Check(name="egress_nat", status="PASS", detail="no egress address configured")
        problems = [f"NAT rule touching {who}: {rule[:160]}"
                    for who, rule in natscan.nat_rules(addresses)]
        problems += [f"{n} conntrack entries with {address}"
                     for address, n in natscan.conntrack_entries(addresses).items()]
        if not problems:
            return Check(name="egress_nat", status="PASS",
                         detail=f"no NAT rule or conntrack entry touches {', '.join(addresses)}")
        return Check(
            name="egress_nat", status="WARN", detail="; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
            fix="exempt the egress addresses from NAT (NAT rewrites the source ports the slices "
                "keep apart), and set relay.egress_notrack = true then relay nft --apply",
        )

    def check_engines(self) -> Check:
        try:
            from relay.engines import available
        except ImportError as exc:
            return Check(name="engines", status="WARN", detail=f"relay.engines: {exc}")
        avail = available()
        detail = "; ".join(f"{name}: {why or 'usable'}" for name, why in avail.items())
        engine = self.cfg.relay.engine
        if engine != "auto" and avail.get(engine) is not None:
            return Check(
                name="engines",
                status="FAIL",
                detail=f'relay.engine = "{engine}" is not usable: {detail}',
                fix='set relay.engine = "auto" or fix the reason above',
            )
        if not any(why is None for name, why in avail.items() if name != "asyncio"):
            return Check(
                name="engines",
                status="WARN",
                detail=detail,
                fix="build the core (make build): only the slow asyncio engine is usable",
            )
        return Check(name="engines", status="PASS", detail=detail)

    def check_config(self) -> Check:
        if self.config_path is None:
            return Check(name="config", status="PASS", detail="no config file given")
        try:
            cfg = load(self.config_path, check_kernel=True)
        except ConfigError as exc:
            return Check(
                name="config",
                status="FAIL",
                detail=f"{len(exc.problems)} problem(s): " + " | ".join(exc.problems),
                fix=f"relay check -c {self.config_path}",
            )
        return Check(
            name="config",
            status="PASS",
            detail=f"{self.config_path}: {len(cfg.listener)} listener(s), {len(cfg.egress)} egress",
        )

    def checks(self) -> list[Callable[[], Check]]:
        out = [
            self.check_io_uring,
            self.check_io_uring_ops,
            self.check_splice,
            self.check_pipe_size,
            self.check_pipe_budget,
            self.check_ip_transparent,
            self.check_ip_bind_address_no_port,
            self.check_ip_local_port_range_option,
            self.check_ip_local_port_range,
            self.check_nofile,
            self.check_nftables,
            self.check_tproxy,
            self.check_udp_transparent,
            self.check_udp_port_sharing,
            self.check_udp_reuseport,
            self.check_udp_tproxy,
            self.check_udp_buffers,
            self.check_egress_nat,
            self.check_engines,
        ]
        if self.config_path is not None:
            out.append(self.check_config)
        return out


CHECK_NAMES: tuple[str, ...] = (
    "io_uring",
    "io_uring_ops",
    "splice",
    "pipe_size",
    "pipe_budget",
    "ip_transparent",
    "ip_bind_address_no_port",
    "ip_local_port_range_option",
    "ip_local_port_range",
    "nofile",
    "nftables",
    "tproxy",
    "udp_transparent",
    "udp_port_sharing",
    "udp_reuseport",
    "udp_tproxy",
    "udp_buffers",
    "egress_nat",
    "engines",
)


def run_checks(doctor: Doctor) -> list[Check]:
    """Run every check; a check that raises is reported as FAIL with the exception."""
    results = []
    for fn in doctor.checks():
        name = fn.__name__.removeprefix("check_")
        try:
            results.append(fn())
        except Exception as exc:
            results.append(
                Check(
                    name=name, status="FAIL", detail=f"check crashed: {type(exc).__name__}: {exc}"
                )
            )
    return results


def format_report(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for r in results:
        lines.append(f"{r.status} {r.name:<{width}}  {r.detail}")
        if r.fix and r.status != "PASS":
            lines.append(f"     {'':<{width}}  fix: {r.fix}")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "WARN", "FAIL")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


def report_json(results: list[Check]) -> bytes:
    return msgspec.json.format(
        msgspec.json.encode(
            {"ok": not any(r.status == "FAIL" for r in results), "checks": results}
        ),
        indent=2,
    )


def main(config_path: str | None = None, as_json: bool = False) -> int:
    """`relay doctor [-c FILE] [--json]`: 0 when nothing FAILs, 1 otherwise."""
    cfg: Config | None = None
    if config_path is not None:
        with contextlib.suppress(ConfigError):
            cfg = load(config_path)  # a broken file is reported by the config check
    doctor = Doctor(cfg, config_path)
    results = run_checks(doctor)
    if as_json:
        sys.stdout.buffer.write(report_json(results) + b"\n")
    else:
        sys.stdout.write(format_report(results))
    sys.stdout.flush()
    return 1 if any(r.status == "FAIL" for r in results) else 0


# ---------------------------------------------------------------------- explanations


def _ring_fix(code: int | None, disabled: int | None) -> str:
    fallback = " (the epoll engine serves meanwhile, with the same guarantees)"
    if code == errno.EPERM and disabled in (1, 2):
        return (
            "sysctl -w kernel.io_uring_disabled=0, or add the relay user to "
            "kernel.io_uring_group" + fallback
        )
    if code == errno.EPERM:
        return (
            "allow io_uring_setup/io_uring_enter/io_uring_register in the seccomp "
            "profile" + fallback
        )
    if code == errno.ENOMEM:
        return "raise RLIMIT_MEMLOCK (LimitMEMLOCK=)" + fallback
    return 'use engine = "epoll"' + fallback
