"""Privilege drop for workers: root binds, the worker runs as the configured user.

Order matters and each step is checked:
1. Shrink the capability bounding set to what the worker still needs (PR_CAPBSET_DROP needs
   CAP_SETPCAP, which root still has at this point).
2. PR_SET_KEEPCAPS=1 so setuid(2) from 0 to non-zero keeps the *permitted* set (the effective set
   is cleared regardless).
3. setgroups, setgid, setuid (all of real/effective/saved ids: no way back to root).
4. capset(2): permitted = effective = the kept capabilities, inheritable = none; clear ambient.
5. PR_SET_KEEPCAPS=0, PR_SET_NO_NEW_PRIVS=1 (an execve can never gain privileges again:
   setuid binaries and file capabilities are ignored).
6. Read /proc/self/status back and compare: the kernel's view is the only proof.

IP_TRANSPARENT (TPROXY listeners, soft-unicast egress sockets bound to non-local addresses) is the
only privileged operation a worker performs after the drop; the kernel accepts CAP_NET_RAW *or*
CAP_NET_ADMIN for it (net/ipv4/ip_sockglue.c). We keep CAP_NET_RAW, the narrower one: it cannot
touch routes, nftables or interfaces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import grp
import os
import pwd

from relay.config.model import Config

__all__ = [
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "PrivilegeError",
    "Target",
    "drop_privileges",
    "needed_capabilities",
    "proc_status",
    "resolve_target",
    "set_parent_death_signal",
]

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SETPCAP = 8

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/capability.h>: version 3 takes two 32-bit words per set (capabilities 0-63).
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(RuntimeError):
    """The worker could not reach the requested user/capability state."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(err)} (errno {err})")


def _prctl(option: int, arg2: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), what)


@dataclasses.dataclass(frozen=True)
class Target:
    """Who a worker becomes: user name, ids and supplementary groups."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def resolve_target(user: str, group: str = "") -> Target | None:
    """Look up `user` / `group` (names or numbers); None when no user is configured."""
    if not user:
        if group:
            raise PrivilegeError(f"group {group!r} is set but user is empty")
        return None
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"user {user!r} does not exist") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"group {group!r} does not exist") from None
    groups = sorted({gid, *os.getgrouplist(pw.pw_name, gid)})
    return Target(pw.pw_name, pw.pw_uid, gid, tuple(groups))


def needed_capabilities(cfg: Config) -> frozenset[int]:
    """Capabilities a worker keeps: CAP_NET_RAW when it must set IP_TRANSPARENT itself.

    TPROXY listeners hand out already-transparent sockets, but the worker then connects to the
    original destination, and any [[egress]] section binds non-local soft-unicast addresses:
    both need IP_TRANSPARENT on sockets the worker creates.
    """
    tproxy = any(lst.transparent for lst in cfg.listener)
    egress = bool(cfg.egress)
    return frozenset({CAP_NET_RAW}) if (tproxy or egress) else frozenset()


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (PR_SET_PDEATHSIG).

    The setting is cleared by any change of credentials, so call it after drop_privileges.
    """
    _prctl(PR_SET_PDEATHSIG, sig, f"prctl(PR_SET_PDEATHSIG, {sig})")


def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def _mask(caps: frozenset[int]) -> int:
    m = 0
    for c in caps:
        m |= 1 << c
    return m


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, Groups, CapEff, CapPrm, CapBnd, NoNewPrivs...)."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _capset(caps: frozenset[int]) -> None:
    mask = _mask(caps)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for word in (0, 1):
        bits = (mask >> (32 * word)) & 0xFFFFFFFF
        data[word].effective = bits
        data[word].permitted = bits
        data[word].inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), f"capset({sorted(caps)})")


def _verify(target: Target | None, caps: frozenset[int]) -> None:
    status = proc_status()
    problems = []
    if target is not None:
        if status["Uid"].split() != [str(target.uid)] * 4:
            problems.append(f"Uid is {status['Uid']!r}, expected {target.uid} x4")
        if status["Gid"].split() != [str(target.gid)] * 4:
            problems.append(f"Gid is {status['Gid']!r}, expected {target.gid} x4")
        want = _mask(caps)
        for key in ("CapEff", "CapPrm", "CapBnd"):
            if int(status[key], 16) != want:
                problems.append(f"{key} is {status[key]}, expected {want:016x}")
        if int(status.get("CapAmb", "0"), 16) != 0:
            problems.append(f"CapAmb is {status['CapAmb']}, expected 0")
    if status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {status.get('NoNewPrivs')!r}, expected 1")
    if problems:
        raise PrivilegeError("privilege drop not effective: " + "; ".join(problems))


def drop_privileges(target: Target | None, caps: frozenset[int]) -> None:
    """Become `target` keeping only `caps`, then forbid regaining privileges.

    With no target (no user configured) the process keeps its ids and capabilities and only
    sets no-new-privileges. Must run before any thread starts: setuid(2) in glibc changes every
    thread, but the capability calls below act on the calling thread only.
    """
    if target is None:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
        _verify(None, caps)
        return
    if os.geteuid() != 0:
        if os.getuid() == target.uid and os.getgid() == target.gid:
            # Already the target user (started unprivileged): nothing to drop but the option.
            _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
            return
        raise PrivilegeError(
            f"cannot switch to user {target.user!r} (uid {target.uid}): running as uid "
            f"{os.geteuid()}, not root; start relay as root or leave `user` empty"
        )
    for cap in range(_last_cap() + 1):
        if cap not in caps:
            _prctl(PR_CAPBSET_DROP, cap, f"prctl(PR_CAPBSET_DROP, {cap})")
    _prctl(PR_SET_KEEPCAPS, 1, "prctl(PR_SET_KEEPCAPS, 1)")
    try:
        os.setgroups(list(target.groups))
        os.setresgid(target.gid, target.gid, target.gid)
        os.setresuid(target.uid, target.uid, target.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {target.user!r}: {exc}") from None
    _capset(caps)
    _check(
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    )
    _prctl(PR_SET_KEEPCAPS, 0, "prctl(PR_SET_KEEPCAPS, 0)")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    _verify(target, caps)
