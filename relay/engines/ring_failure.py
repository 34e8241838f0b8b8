"""Why io_uring cannot start on this host: the one explanation of an io_uring_setup(2) errno.

Used by engine selection (relay.engines: the reason a uring loop did not start, and why "auto"
fell back to epoll) and by ``relay doctor`` (relay.host.doctor, which adds the fix). The kernel
answers io_uring_setup with:

* EPERM: ``kernel.io_uring_disabled`` is 2 (off for everyone) or 1 (only CAP_SYS_ADMIN and
  members of ``kernel.io_uring_group``); with 0, a seccomp filter (Docker's default profile
  returns EPERM for the io_uring syscalls) or an LSM refused it;
* ENOSYS: a kernel built without io_uring (or a filter that answers ENOSYS);
* ENOMEM: the ring's memory is charged to RLIMIT_MEMLOCK on kernels before 5.12.
"""

from __future__ import annotations

import errno
import os

from relay.procfs import read_int, read_proc

__all__ = ["IO_URING_DISABLED", "explain_ring_failure", "io_uring_disabled"]

IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"
_IO_URING_GROUP = "/proc/sys/kernel/io_uring_group"


def io_uring_disabled() -> int | None:
    """The ``kernel.io_uring_disabled`` sysctl (0, 1, 2), None on kernels without it."""
    return read_int(IO_URING_DISABLED)


def explain_ring_failure(code: int | None, disabled: int | None) -> str:
    """One line naming the cause of io_uring_setup failing with errno ``code``, given the
    ``kernel.io_uring_disabled`` value ``disabled`` (``io_uring_disabled()``)."""
    if code in (errno.EPERM, errno.EACCES):
        name = errno.errorcode[code]
        if disabled == 2:
            return f"{name}: kernel.io_uring_disabled=2 turns io_uring off for every process"
        if disabled == 1:
            group = read_proc(_IO_URING_GROUP)
            return (
                f"{name}: kernel.io_uring_disabled=1 allows only CAP_SYS_ADMIN and members of "
                f"kernel.io_uring_group ({group})"
            )
        where = f" with kernel.io_uring_disabled={disabled}" if disabled is not None else ""
        return (
            f"{name}{where}: a seccomp filter (e.g. Docker's default profile) or an LSM blocks "
            "io_uring_setup"
        )
    if code == errno.ENOSYS:
        return "ENOSYS: kernel built without io_uring, or the syscall is filtered"
    if code == errno.ENOMEM:
        return "ENOMEM: RLIMIT_MEMLOCK too small for the ring (kernels before 5.12)"
    return os.strerror(code or 0)
