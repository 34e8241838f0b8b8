"""Loop.export_pair / Loop.import_pair (relay_ext/handoff.pxi): a pair moved mid-transfer from
one loop to another, in this process and across processes with SCM_RIGHTS
(relay.serve.handoff_wire), goes on byte-exact both ways; half-closed directions and timers keep
their state."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import test_core
from helpers import REPO_ROOT
from test_core import BACKENDS, REASONS, core, recv_all, relay_pair

from relay.serve import handoff_wire as handoff

make_loop = test_core.make_loop  # the fixture: loops driven by a thread, fds checked after


def _small_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP pair (outer end, relay end) with small fixed buffers (no autotuning), so
    a few MiB that nobody reads stall in the relay instead of in the kernel's queues."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        outer = socket.socket()
        outer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        outer.connect(srv.getsockname())
        inner, _ = srv.accept()
    inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    return outer, inner


def _stalled_bulk(drv, up: bytes, down: bytes):
    """A pair whose peers both send and neither reads yet: the relay ends up holding bytes."""
    client, relay_c = _small_pair()
    origin, relay_u = _small_pair()
    cid = drv.call(drv.loop.add_pair, relay_c.detach(), relay_u.detach(), 5)
    senders = [
        threading.Thread(target=lambda: (client.sendall(up), client.shutdown(socket.SHUT_WR))),
        threading.Thread(target=lambda: (origin.sendall(down), origin.shutdown(socket.SHUT_WR))),
    ]
    for t in senders:
        t.start()
    time.sleep(0.4)
    return client, origin, cid, senders


def _drain_both(client: socket.socket, origin: socket.socket) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda: got.__setitem__("origin", recv_all(origin))),
               threading.Thread(target=lambda: got.__setitem__("client", recv_all(client)))]
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    return got


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splice", [True, False])
def test_export_import_mid_transfer_byte_exact(make_loop, backend: str, splice: bool) -> None:
    old = make_loop(backend, splice=splice)
    new = make_loop(backend, splice=splice)
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    client, origin, cid, senders = _stalled_bulk(old, up, down)
    state = old.call(old.loop.export_pair, cid)
    pending = [h["pipe_len"] + len(h["buf"]) for h in state["halves"]]
    assert all(pending), f"the relay held no bytes at export: {state['halves']}"
    if splice:
        assert any(h["pipe_len"] for h in state["halves"]), "no pipe held bytes"
    else:
        assert not any(h["pipe_len"] for h in state["halves"])
    assert old.call(old.loop.stats)["conns_open"] == 0
    new_cid = new.call(new.loop.import_pair, state, 9)
    got = _drain_both(client, origin)
    for t in senders:
        t.join(10)
    assert _sha(got["origin"]) == _sha(up) and len(got["origin"]) == len(up)
    assert _sha(got["client"]) == _sha(down) and len(got["client"]) == len(down)
    (ev,) = new.wait_done()
    assert ev[1] == new_cid and ev[2] == 9 and REASONS[ev[3]] == "eof"
    assert (ev[4], ev[5]) == (len(up), len(down))          # counters carried across loops
    assert not [e for e in old.events if e[0] == core.EV_DONE]
    assert old.call(old.loop.stats)["pipes_in_use"] == 0
    assert new.call(new.loop.stats)["pipes_in_use"] == 0
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_closed_pair_keeps_its_state(make_loop, backend: str) -> None:
    old = make_loop(backend)
    new = make_loop(backend)
    client, origin, cid = relay_pair(old)
    request = os.urandom(200_000)
    client.sendall(request)
    client.shutdown(socket.SHUT_WR)
    assert recv_all(origin) == request              # the FIN was forwarded before the move
    state = old.call(old.loop.export_pair, cid)
    assert state["halves"][0]["shut"] and not state["halves"][1]["eof"]
    new.call(new.loop.import_pair, state)
    response = os.urandom(300_000)
    origin.sendall(response)
    origin.shutdown(socket.SHUT_WR)
    assert recv_all(client) == response
    (ev,) = new.wait_done()
    assert REASONS[ev[3]] == "eof" and (ev[4], ev[5]) == (len(request), len(response))
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_deadline_survives_the_move(make_loop, backend: str) -> None:
    old = make_loop(backend, idle_timeout_ms=1500)
    new = make_loop(backend, idle_timeout_ms=1500)
    client, origin, cid = relay_pair(old)
    client.sendall(b"x")
    assert origin.recv(1) == b"x"
    time.sleep(1.0)                                  # 1 s of the 1.5 s idle budget used here
    state = old.call(old.loop.export_pair, cid)
    moved = time.monotonic()
    new.call(new.loop.import_pair, state)
    (ev,) = new.wait_done(timeout=5)
    assert REASONS[ev[3]] == "idle_timeout"
    assert time.monotonic() - moved < 1.2, "the idle timer restarted at import"
    client.close()
    origin.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_refuses_unknown_and_closed_pairs(make_loop, backend: str) -> None:
    drv = make_loop(backend)
    with pytest.raises(KeyError):
        _call(drv, drv.loop.export_pair, 12345)
    client, origin, cid = relay_pair(drv)
    drv.call(drv.loop.abort, cid)
    with pytest.raises(KeyError):
        _call(drv, drv.loop.export_pair, cid)
    client.close()
    origin.close()


def _call(drv, fn, *args):
    """drv.call that re-raises, on the test thread, what fn raised on the loop thread."""
    def catching():
        try:
            return fn(*args)
        except Exception as exc:
            return exc

    result = drv.call(catching)
    if isinstance(result, Exception):
        raise result
    return result


_CHILD = textwrap.dedent("""
    import json, socket, sys
    import relay_ext._core as core
    from relay.serve import handoff_wire as handoff
    sock = socket.socket(fileno=int(sys.argv[1]))
    msg = handoff.recv_message(sock)
    loop = core.Loop(sys.argv[2])
    cids = [loop.import_pair(handoff.core_state(f)) for f in msg.flows]
    handoff.send_ack(sock, msg.seq, len(cids), 0)
    done = []
    while len(done) < len(cids):
        done += [list(e) for e in loop.run(100) if e[0] == core.EV_DONE]
    loop.close()
    print(json.dumps(done))
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_handoff_to_another_process_with_scm_rights(make_loop, backend: str) -> None:
    old = make_loop(backend)
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    pairs = [_stalled_bulk(old, up, down) for _ in range(3)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(theirs.fileno()), backend],
        pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT})
    theirs.close()
    flows = []
    for _client, _origin, cid, _senders in pairs:
        state = old.call(old.loop.export_pair, cid)
        flows.append(handoff.flow_state(state, listener="l", client=None, dest=None,
                                        egress=None, egress_address=None, source=None))
    assert any(h.pipe_len for f in flows for h in f.halves)
    handoff.send_batch(ours, 1, flows)
    for f in flows:
        handoff.close_flow_fds(f)                    # the child has its own copies now
    ack = handoff.recv_message(ours)
    assert isinstance(ack, handoff.Ack) and (ack.seq, ack.adopted) == (1, 3)
    for client, origin, _cid, senders in pairs:
        got = _drain_both(client, origin)
        for t in senders:
            t.join(10)
        assert _sha(got["origin"]) == _sha(up) and _sha(got["client"]) == _sha(down)
        client.close()
        origin.close()
    out, _ = child.communicate(timeout=30)
    done = json.loads(out)
    assert sorted((REASONS[e[3]], e[4], e[5]) for e in done) == [
        ("eof", len(up), len(down))] * 3
    ours.close()
