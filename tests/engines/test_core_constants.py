"""relay/engines/constants.py is Python's copy of the core's vocabulary (the asyncio engine runs
without a built core); these tests pin every name and value of the copy to the core's exports.
Also: a closed Loop is safe to ask for stats() and refuses everything else with a clear error."""

from __future__ import annotations

import ast
import errno
import inspect
import re
import socket
from pathlib import Path

import pytest

from relay.engines import constants as py

core = pytest.importorskip("relay_ext._core", reason="the Cython core is not built")


def test_event_kinds_match_the_core() -> None:
    for name in ("EV_ACCEPT", "EV_ACCEPT_ERROR", "EV_DONE", "EV_READABLE", "EV_WATCH_TIMEOUT",
                 "EV_PAIR"):
        assert getattr(py, name) == getattr(core, name), name


def test_close_reasons_match_the_core() -> None:
    assert py.CLOSE_REASONS == core.REASONS
    for index, name in enumerate(core.REASONS):
        assert getattr(py, "R_" + name.upper()) == index
        assert py.CLOSE_REASON_INDEX[name] == index


def test_udp_close_reasons_start_with_the_udp_cores() -> None:
    udp_core = pytest.importorskip("relay_ext._udp", reason="the UDP core is not built")
    from relay.serve.udp import UDP_CLOSE_REASONS

    n = len(udp_core.UDP_REASONS)
    assert UDP_CLOSE_REASONS[:n] == udp_core.UDP_REASONS  # indexed by UEV_FLOW_DONE's reason
    assert UDP_CLOSE_REASONS[n:] == ("reload",)


def test_each_vocabulary_is_defined_once_under_its_own_name() -> None:
    from relay.serve import handoff, policy, routing, server, udp

    assert routing.DENY_REASONS[:len(policy.POLICY_DENY_REASONS)] == policy.POLICY_DENY_REASONS
    vocabularies = [py.CLOSE_REASONS, routing.DENY_REASONS, server.REJECT_REASONS,
                    udp.UDP_CLOSE_REASONS, handoff.HANDOFF_REFUSALS]
    for vocabulary in vocabularies:
        assert len(set(vocabulary)) == len(vocabulary), vocabulary
    for module in (py, policy, routing, server, udp, handoff):
        assert not hasattr(module, "REASONS"), module.__name__


def test_loop_defaults_match_the_cores_signature() -> None:
    # embedsignature: the docstring's first line is "Loop(str backend='uring', int pipe_size=...)"
    signature = (core.Loop.__doc__ or "").splitlines()[0]
    assert signature.startswith("Loop("), signature
    defaults = {name: ast.literal_eval(value)
                for name, value in re.findall(r"(\w+)=([^,)]+)", signature)}
    assert defaults.pop("backend") == "uring"
    assert defaults == dict(py.LOOP_DEFAULTS)


def test_architecture_doc_shows_the_loop_defaults() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()
    block = doc[doc.index("loop = Loop("):]
    block = block[:block.index("\n)\n")]
    shown = {name: eval(value, {"__builtins__": {}})  # noqa: S307 (our own doc: "1 << 20")
             for name, value in re.findall(r"^    (\w+)=([^,]+),", block, re.M)}
    assert shown.pop("backend") == "uring"
    assert shown and all(py.LOOP_DEFAULTS[name] == value for name, value in shown.items())


def test_asyncio_engine_takes_the_loop_defaults() -> None:
    from relay.engines.aio import AioLoop

    params = inspect.signature(AioLoop).parameters
    taken = {name: p.default for name, p in params.items() if name in py.LOOP_DEFAULTS}
    assert taken == {name: py.LOOP_DEFAULTS[name] for name in taken}
    assert set(py.LOOP_DEFAULTS) - set(taken) == {"splice", "ring_entries"}  # core-only knobs


def test_asyncio_engine_reports_every_stat_the_core_does() -> None:
    """relay stats and /metrics read the same keys whatever the engine."""
    from relay.engines.aio import AioLoop

    loop = core.Loop("epoll", max_conns=4)
    aio = AioLoop(max_conns=4)
    try:
        assert set(loop.stats()) <= set(aio.stats())
    finally:
        loop.close()
        aio.close()


def test_accept_pause_and_backoff_match_the_core() -> None:
    assert py.ACCEPT_PAUSE_ERRNOS == core.ACCEPT_PAUSE_ERRNOS
    assert py.ACCEPT_BACKOFF_FIRST_S == core.ACCEPT_BACKOFF_FIRST_S
    assert py.ACCEPT_BACKOFF_MAX_S == core.ACCEPT_BACKOFF_MAX_S


def test_connect_errno_reasons_match_the_core() -> None:
    assert py.CONNECT_ERRNO_REASONS == core.CONNECT_ERRNO_REASONS
    for err in (*core.CONNECT_ERRNO_REASONS, errno.EACCES, errno.EPERM, 0):
        expected = core.CONNECT_ERRNO_REASONS.get(err, core.REASONS.index("error"))
        assert py.connect_failure_reason(err) == expected, errno.errorcode.get(err, err)
    assert core.REASONS[core.CONNECT_ERRNO_REASONS[errno.ENOENT]] == "refused"


def _backends() -> list[object]:
    params = []
    for name in ("uring", "epoll"):
        try:
            core.Loop(name, max_conns=4).close()
            reason = ""
        except OSError as exc:
            reason = str(exc)
        params.append(pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason)))
    return params


@pytest.mark.parametrize("backend", _backends())
def test_stats_after_close_returns_the_final_counters(backend: str) -> None:
    loop = core.Loop(backend, max_pipes=4)
    before = loop.stats()  # makes one pipe (pipe_size_granted probe): pipes_free == 1
    loop.close()
    after = loop.stats()
    assert after.keys() == before.keys()
    assert after["pipes_max"] == 4 and after["pipe_size_granted"] == before["pipe_size_granted"]
    assert loop.stats() == after
    loop.close()  # idempotent
    assert loop.stats() == after


@pytest.mark.parametrize("backend", _backends())
def test_stats_after_close_counts_the_pairs_close_reset(backend: str) -> None:
    loop = core.Loop(backend, max_pipes=4)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    loop.add_pair(b.detach(), d.detach())
    loop.close()
    final = loop.stats()
    assert final["conns_open"] == 0 and final["conns_total"] == 1
    assert final["closed_aborted"] == 1
    for s in (a, c):
        s.close()


@pytest.mark.parametrize("backend", _backends())
def test_closed_loop_refuses_with_a_clear_error(backend: str) -> None:
    loop = core.Loop(backend, max_pipes=4)
    loop.close()
    lsock = socket.create_server(("127.0.0.1", 0))
    a, b = socket.socketpair()
    try:
        calls = [
            lambda: loop.run(0),
            lambda: loop.fileno(),
            lambda: loop.add_listener(lsock.fileno(), 1),
            lambda: loop.remove_listener(1),
            lambda: loop.pause_accept(1),
            lambda: loop.resume_accept(1),
            lambda: loop.add_pair(a.fileno(), b.fileno()),
            lambda: loop.abort(1),
        ]
        for call in calls:
            with pytest.raises(RuntimeError, match="closed"):
                call()
        assert loop.backend == backend
    finally:
        for s in (lsock, a, b):
            s.close()
