"""Build the Cython core against python-liburing's own headers and .pxd files.

python-liburing's .pxd files say ``cdef extern from '../include/liburing.h'``: the C compiler
resolves that relative to an include directory, so we put ``liburing/lib`` on the path and it
lands on ``liburing/include/liburing.h`` (liburing 2.6).  Debian's liburing-dev (2.3) lives in
/usr/include and would be picked up silently by a bare ``#include <liburing.h>``;
``relay_ext/includes/uring_version_check.h`` makes that an #error instead.

Cython, setuptools and python-liburing's headers are build-time only: the core must not import
them when it runs.  What a running relay reports about its build (`relay --version`, metrics)
comes from ``relay_ext/_build_info.py``, which `build_ext` writes next to the extensions it
builds (in the wheel, or in the source tree with --inplace / an editable install).
python-liburing itself stays a run-time dependency: the core calls its cpdef functions through
their C API, which imports `liburing.*` when the core is imported.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTRA_COMPILE_ARGS = ["-O2", "-Wno-unused-function", "-Wno-unused-variable"]
BUILD_INFO = "_build_info.py"


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


def liburing_versions() -> tuple[str, str]:
    """(python-liburing's version, the liburing headers' MAJOR.MINOR) used for this build."""
    import liburing

    path = os.path.join(os.path.dirname(liburing.__file__), "include", "liburing",
                        "io_uring_version.h")
    with open(path) as f:
        text = f.read()
    major = re.search(r"IO_URING_VERSION_MAJOR\s+(\d+)", text)
    minor = re.search(r"IO_URING_VERSION_MINOR\s+(\d+)", text)
    headers = f"{major.group(1)}.{minor.group(1)}" if major and minor else "unknown"
    return str(getattr(liburing, "__version__", "unknown")), headers


def build_date() -> str:
    """UTC build time; SOURCE_DATE_EPOCH (reproducible builds) wins when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_info_source(compiler: list[str]) -> str:
    import Cython

    liburing_version, headers = liburing_versions()
    info: dict[str, Any] = {
        "CYTHON_VERSION": Cython.__version__,
        "LIBURING_PYTHON": liburing_version,
        "LIBURING_HEADERS": headers,
        "COMPILER": " ".join(compiler),
        "EXTRA_COMPILE_ARGS": " ".join(EXTRA_COMPILE_ARGS),
        "BUILD_PYTHON": platform.python_version(),
        "BUILD_DATE": build_date(),
    }
    lines = ['"""How relay_ext was built: written by setup.py\'s build_ext, never edited by hand.',
             "",
             "The core imports CYTHON_VERSION from here: Cython is not installed at run time.",
             '"""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    return "\n".join(lines) + "\n"


class BuildExtWithInfo(build_ext):
    """build_ext that also writes relay_ext/_build_info.py beside the extensions: into build_lib
    (what a wheel ships) and, for --inplace or an editable install, into the source tree."""

    def run(self) -> None:
        super().run()
        compiler = getattr(self.compiler, "compiler_so", None) or ["unknown"]
        text = build_info_source(list(compiler))
        targets = {os.path.join(self.build_lib, "relay_ext", BUILD_INFO)}
        if self.inplace or getattr(self, "editable_mode", False):
            package_dir = self.get_finalized_command("build_py").get_package_dir("relay_ext")
            targets.add(os.path.join(package_dir or "relay_ext", BUILD_INFO))
        for path in sorted(targets):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # write-then-rename: a running relay may import the old file at any moment
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(),
                os.path.join(self.build_lib, "relay_ext", BUILD_INFO)]


def extensions() -> list[Extension]:
    from Cython.Build import cythonize

    ext = Extension(
        "relay_ext._core",
        sources=["relay_ext/_core.pyx"],
        include_dirs=[*liburing_dirs(), "relay_ext/includes"],
        extra_compile_args=EXTRA_COMPILE_ARGS,
    )
    # The UDP datagram core: epoll + recvmmsg/sendmmsg only, no liburing.
    udp = Extension(
        "relay_ext._udp",
        sources=["relay_ext/_udp.pyx"],
        include_dirs=["relay_ext/includes"],
        extra_compile_args=EXTRA_COMPILE_ARGS,
    )
    # Connection counters shared by the workers of a generation (mmap + robust pthread mutex).
    limits = Extension(
        "relay_ext._limits",
        sources=["relay_ext/_limits.pyx"],
        extra_compile_args=EXTRA_COMPILE_ARGS,
    )
    # The flow log's line formatter (relay.serve.flowlog): plain CPython API, no system headers.
    flowfmt = Extension(
        "relay_ext._flowfmt",
        sources=["relay_ext/_flowfmt.pyx"],
        extra_compile_args=EXTRA_COMPILE_ARGS,
    )
    return cythonize(
        [ext, udp, limits, flowfmt],
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


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithInfo})
