"""Host checks of the paths root touches for the workers: the admin socket and the log file.

Root creates, unlinks and hands over these paths; an unprivileged user must not be able to steer
that into someone else's file:
- ``relay.admin_socket``: an existing file that is not a socket is never unlinked (a refused
  probe connect used to be taken as "stale socket" for any file).
- ``relay.log_file``: opened with O_NOFOLLOW and handed to the worker user by fchown() of the
  open descriptor (relay.ops.log); a symbolic link, something that is neither a regular file nor
  a FIFO (a log pipe, relay.serve.flowlog), or a directory the worker user can write to (where
  it could swap the file for a link or a hard link between two of root's checks) is refused.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["check_admin_socket", "check_log_file", "writable_by"]


class _Problem(NamedTuple):
    path: str
    value: str
    reason: str


def check_admin_socket(path: str) -> Iterator[_Problem]:
    """An existing ``admin_socket`` path must be a socket (a stale one is replaced)."""
    if not path:
        return
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        yield _Problem("relay.admin_socket", path, f"cannot inspect: {exc.strerror}")
        return
    if not stat.S_ISSOCK(mode):
        yield _Problem("relay.admin_socket", path,
                       f"exists and is not a socket ({_kind(mode)}); refusing to replace it")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO")):
        if test(mode):
            return name
    return "a special file"


def _user_ids(user: str, group: str) -> tuple[int, set[int]] | None:
    """(uid, gids) the workers run as, or None when they stay root / the user is unknown."""
    if not user:
        return None
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return None  # relay.config.host reports the unknown user
    if pw.pw_uid == 0:
        return None
    gids = {pw.pw_gid}
    if group:
        try:
            gids = {grp.getgrgid(int(group)).gr_gid if group.isdigit()
                    else grp.getgrnam(group).gr_gid}
        except KeyError:
            return None
    gids.update(os.getgrouplist(pw.pw_name, pw.pw_gid) if not group else ())
    return pw.pw_uid, gids


def writable_by(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    """Whether a user with ``uid`` / ``gids`` may create or rename entries in a directory with
    this status (permission bits only; ACLs are not consulted)."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def check_log_file(path: str, user: str, group: str) -> Iterator[_Problem]:
    """``log_file`` is not a symbolic link nor a special file, and when the workers drop to an
    unprivileged user, that user cannot write to the directory holding it."""
    if not path:
        return
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        yield _Problem("relay.log_file", path, f"cannot inspect: {exc.strerror}")
        return
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        yield _Problem("relay.log_file", path, f"is {_kind(mode)}, not a regular file (nor a "
                       "FIFO); refusing to open it as root")
        return
    ids = _user_ids(user, group)
    if ids is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return  # relay.config.host reports the missing directory
    except OSError as exc:
        yield _Problem("relay.log_file", path, f"cannot inspect {directory}: {exc.strerror}")
        return
    if writable_by(st, *ids):
        yield _Problem(
            "relay.log_file", path,
            f"directory {directory} is writable by the worker user {user}: it could replace "
            "the file with a link to one of root's files; use a directory only root can write",
        )
