"""The test tiers: tests/unit (pure logic, no processes), tests/engines (every engine, the core,
the embedding API), tests/process (real `relay run` processes and signals), tests/netns (network
namespaces, root). Each test is marked with its tier (``pytest -m unit``); a directory runs one
tier too (``pytest tests/unit``). The harness shared with the demo is relay.lab; test-only
helpers are tests/helpers.py; fixtures come from tests/fixtures/ through ``pytest_plugins``."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["fixtures.engines", "fixtures.processes"]

TIERS = ("unit", "engines", "process", "netns")
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        rel = os.path.relpath(str(item.path), _HERE)
        tier = rel.split(os.sep, 1)[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
