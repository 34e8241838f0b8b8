"""The arrows of docs/architecture.md ("The rooms, in one screen"), read from the source with ast:
nothing in relay.config, relay.serve or relay.engines imports the rooms above them (relay.process,
relay.ops, relay.host, relay.cli), except the leaves the document declares read from every room."""

from __future__ import annotations

import ast
import os

from helpers import REPO_ROOT

LOWER_ROOMS = ("relay/config", "relay/serve", "relay/engines")
UPPER_ROOMS = ("relay.process", "relay.ops", "relay.host", "relay.cli", "relay.lab",
               "relay.demo", "relay.embed")
# Declared in docs/architecture.md as read from every room: they import nothing above relay.ops
# (relay.ops.sessions' client half asks the admin socket through relay.ops.admin, lazily).
LEAVES = ("relay.ops.log", "relay.ops.sessions")
LEAF_MAY_IMPORT = ("relay.config", "relay.sock", "relay.ops")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _imports(path: str) -> list[tuple[int, str]]:
    """Every module an import statement of `path` names (`from a import b` names a and a.b:
    b may be a submodule), anywhere in the file (lazy imports in functions included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return sorted(out)


def _sources(room: str) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(os.path.join(REPO_ROOT, room)):
        found += [os.path.join(root, f) for f in files if f.endswith(".py")]
    assert found, f"no Python file under {room}"
    return sorted(found)


def _upward(path: str, allowed: tuple[str, ...]) -> list[str]:
    rel = os.path.relpath(path, REPO_ROOT)
    bad = []
    for line, module in _imports(path):
        # `from relay.ops import log` names relay.ops and relay.ops.log: judge the longest.
        if _within(module, UPPER_ROOMS) and not _within(module, allowed):
            if module in UPPER_ROOMS and any(
                    _within(m, allowed) and m.startswith(module + ".")
                    for ln, m in _imports(path) if ln == line):
                continue
            bad.append(f"{rel}:{line}: imports {module}")
    return bad


def test_config_serve_and_engines_import_nothing_above_them() -> None:
    bad = [b for room in LOWER_ROOMS for path in _sources(room) for b in _upward(path, LEAVES)]
    assert not bad, "upward imports (docs/architecture.md):\n" + "\n".join(bad)


def test_the_shared_leaves_import_no_room() -> None:
    for leaf in LEAVES:
        path = os.path.join(REPO_ROOT, *leaf.split(".")) + ".py"
        for line, module in _imports(path):
            if module.startswith("relay.") or module == "relay":
                assert _within(module, LEAF_MAY_IMPORT), f"{leaf}:{line}: imports {module}"


def test_the_checker_sees_an_upward_import(tmp_path: os.PathLike[str]) -> None:
    source = os.path.join(str(tmp_path), "bad.py")
    with open(source, "w") as f:
        f.write("def f():\n    from relay.process import handoff\n"
                "from relay.ops import log\nimport relay.cli\n")
    got = _upward(source, LEAVES)
    assert [g.split(": ", 1)[1] for g in got] == [
        "imports relay.process", "imports relay.process.handoff", "imports relay.cli"]
