"""Build the Cython core against python-liburing's own headers and .pxd files.

python-liburing's .pxd files say ``cdef extern from '../include/liburing.h'``: the C compiler
resolves that relative to an include directory, so we put ``liburing/lib`` on the path and it
lands on ``liburing/include/liburing.h`` (liburing 2.6).  Debian's liburing-dev (2.3) lives in
/usr/include and would be picked up silently by a bare ``#include <liburing.h>``;
``relay_ext/includes/uring_version_check.h`` makes that an #error instead.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup


def liburing_dirs() -> list[str]:
    try:
        import liburing
    except ImportError as exc:  # pragma: no cover - build-time guard
        sys.exit(
            "relay: building the core needs python-liburing (pip install liburing==2024.5.3): "
            f"{exc}"
        )
    pkg = os.path.dirname(liburing.__file__)
    inc = os.path.join(pkg, "include")
    if not os.path.exists(os.path.join(inc, "liburing.h")):
        sys.exit(f"relay: python-liburing at {pkg} ships no include/liburing.h; need 2024.5.3")
    return [os.path.join(pkg, "lib"), inc]


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    ext = Extension(
        "relay_ext._core",
        sources=["relay_ext/_core.pyx"],
        include_dirs=[*liburing_dirs(), "relay_ext/includes"],
        extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unused-variable"],
    )
    # The UDP datagram core: epoll + recvmmsg/sendmmsg only, no liburing.
    udp = Extension(
        "relay_ext._udp",
        sources=["relay_ext/_udp.pyx"],
        include_dirs=["relay_ext/includes"],
        extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unused-variable"],
    )
    # Connection counters shared by the workers of a generation (mmap + robust pthread mutex).
    limits = Extension(
        "relay_ext._limits",
        sources=["relay_ext/_limits.pyx"],
        extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-unused-variable"],
    )
    return cythonize(
        [ext, udp, limits],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
        include_path=[os.path.dirname(os.path.dirname(liburing_dirs()[0]))],
    )


setup(ext_modules=extensions())
