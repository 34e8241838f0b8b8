"""Linters and type checks run as tests (uvloop's tests/test_sourcecode.py in spirit)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

REPO = REPO_ROOT
BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    path = os.path.join(BIN, name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return found


@pytest.mark.timeout(120)
def test_ruff_is_clean() -> None:
    proc = subprocess.run([tool("ruff"), "check", "relay", "bench", "tests"], cwd=REPO,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(300)
def test_mypy_is_clean() -> None:
    proc = subprocess.run([tool("mypy")], cwd=REPO, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_core_stub_lists_every_public_name() -> None:
    core = pytest.importorskip("relay_ext._core", reason="the Cython core is not built")
    with open(os.path.join(REPO, "relay_ext", "_core.pyi")) as f:
        stub = f.read()
    for name in core.__all__:
        assert f"{name}" in stub, f"relay_ext/_core.pyi does not declare {name}"
    for method in ("add_listener", "remove_listener", "pause_accept", "resume_accept",
                   "add_pair", "abort", "run", "stats", "close", "fileno"):
        assert hasattr(core.Loop, method) and f"def {method}(" in stub
