"""The session table across processes: the supervisor asks every worker, the workers answer.

Supervisor -> worker: `SessionsRequest` (a request id, a `SessionFilter`, kill or not) on the
worker's SOCK_SEQPACKET channel. Worker -> supervisor: `SessionsReply` messages for that id, at
most CHUNK sessions each (a message must fit the socket buffer), the last with ``more=False``.

Neither side ever blocks on the other:
- the worker reads requests from its serving thread between two loop.run() calls (the engine
  loop is single-threaded; `Server.set_control_hook`), and queues what the channel cannot take
  now (MSG_DONTWAIT), sending the rest at its next poll;
- the supervisor answers the admin client once every asked worker replied, or at the deadline
  (ANSWER_TIMEOUT) with the late workers listed as missing; a worker that exits before it
  answers is listed the same way at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from relay.ops.sessions import Session, SessionFilter, parse_request

__all__ = [
    "ANSWER_TIMEOUT",
    "CHUNK",
    "SessionBroker",
    "SessionResponder",
    "SessionsReply",
    "SessionsRequest",
]

ANSWER_TIMEOUT = 1.0  # seconds the supervisor waits for the workers before answering without
CHUNK = 200  # sessions per reply message (~250 bytes each in msgpack)

log = logging.getLogger("relay.sessions")


class SessionsRequest(msgspec.Struct, tag="sessions_request"):
    req: int
    filter: SessionFilter
    kill: bool = False


class SessionsReply(msgspec.Struct, tag="sessions_reply"):
    pid: int
    req: int
    sessions: list[Session]
    more: bool = False
    error: str = ""


_encoder = msgspec.msgpack.Encoder()


# ---------------------------------------------------------------------- worker side


class _Server(Protocol):
    def sessions(self, flt: SessionFilter | None = None) -> list[Session]: ...
    def kill_sessions(self, flt: SessionFilter) -> list[Session]: ...


class SessionResponder:
    """In a worker: `poll()` (the Server's control hook) answers the supervisor's requests."""

    def __init__(self, srv: _Server, channel: socket.socket) -> None:
        self._srv = srv
        self._channel = channel
        self._outbox: deque[bytes] = deque()
        # Filled by the worker's one channel reader (the command thread), emptied here in the
        # serving thread, which alone may touch the loop: deque append/popleft are atomic.
        self._inbox: deque[SessionsRequest] = deque()
        self._pid = os.getpid()

    def submit(self, request: SessionsRequest) -> None:
        """From the channel-reading thread: answered at the serving thread's next poll()."""
        self._inbox.append(request)

    def poll(self) -> None:
        if self._outbox and not self._flush():
            return
        while self._inbox:
            self._answer(self._inbox.popleft())

    def _answer(self, request: SessionsRequest) -> None:
        try:
            if request.kill:
                found = self._srv.kill_sessions(request.filter)
            else:
                found = self._srv.sessions(request.filter)
        except Exception as exc:  # a bad request must not take the worker down
            log.warning("worker %d: session request failed: %s", self._pid, exc)
            self._queue(SessionsReply(self._pid, request.req, [], error=str(exc)))
        else:
            for start in range(0, max(len(found), 1), CHUNK):
                chunk = found[start:start + CHUNK]
                self._queue(SessionsReply(self._pid, request.req, chunk,
                                          more=start + CHUNK < len(found)))
        self._flush()

    def _queue(self, msg: SessionsReply) -> None:
        self._outbox.append(_encoder.encode(msg))

    def _flush(self) -> bool:
        """Send what the channel takes now; True once the outbox is empty."""
        while self._outbox:
            try:
                self._channel.send(self._outbox[0], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                log.warning("worker %d: cannot answer the supervisor: %s", self._pid, exc)
                self._outbox.clear()
                return True
            self._outbox.popleft()
        return True


# ---------------------------------------------------------------------- supervisor side


class _Worker(Protocol):
    pid: int
    channel: socket.socket
    state: str


@dataclass(eq=False)
class _Query:
    kill: bool
    reply: Callable[[str], None]
    deadline: float
    waiting: set[int]
    sessions: list[Session] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)


class SessionBroker:
    """In the supervisor: fans an admin request out to the workers, gathers, answers.

    `workers()` returns the live workers; `handle(line, reply)` is the admin socket's entry
    point; the supervisor passes every `SessionsReply` to `on_reply` and calls `check()` from
    its main loop (deadlines, workers that exited).
    """

    def __init__(self, workers: Callable[[], Iterable[_Worker]],
                 timeout: float = ANSWER_TIMEOUT) -> None:
        self._workers = workers
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._queries: dict[int, _Query] = {}

    @property
    def pending(self) -> bool:
        return bool(self._queries)

    def handle(self, line: str, reply: Callable[[str], None]) -> None:
        try:
            command, flt = parse_request(line)
        except (ValueError, msgspec.DecodeError) as exc:
            reply(f"error {exc}\n")
            return
        kill = command == "kill"
        wanted = flt.worker_pids() if kill else set()
        req = next(self._ids)
        query = _Query(kill, reply, time.monotonic() + self._timeout, set())
        data = _encoder.encode(SessionsRequest(req, flt, kill))
        for w in self._workers():
            if w.state == "booting" or (wanted and w.pid not in wanted):
                continue
            try:
                w.channel.send(data, socket.MSG_DONTWAIT)
            except OSError as exc:
                query.missing.append({"pid": w.pid, "error": f"cannot ask it: {exc}"})
                continue
            query.waiting.add(w.pid)
        self._queries[req] = query
        self._maybe_answer(req, query)

    def on_reply(self, msg: SessionsReply) -> None:
        query = self._queries.get(msg.req)
        if query is None or msg.pid not in query.waiting:
            return  # answered already (deadline passed): the late reply is dropped
        query.sessions.extend(msg.sessions)
        if msg.error:
            query.missing.append({"pid": msg.pid, "error": msg.error})
        if not msg.more:
            query.waiting.discard(msg.pid)
            self._maybe_answer(msg.req, query)

    def check(self) -> None:
        if not self._queries:
            return
        now = time.monotonic()
        alive = {w.pid for w in self._workers()}
        for req, query in list(self._queries.items()):
            for pid in sorted(query.waiting - alive):
                query.missing.append({"pid": pid, "error": "exited before answering"})
                query.waiting.discard(pid)
            if now >= query.deadline:
                for pid in sorted(query.waiting):
                    query.missing.append({"pid": pid, "error": "no answer within "
                                                               f"{self._timeout:.1f}s"})
                query.waiting.clear()
            self._maybe_answer(req, query)

    def _maybe_answer(self, req: int, query: _Query) -> None:
        if query.waiting:
            return
        del self._queries[req]
        key = "killed" if query.kill else "sessions"
        body = {key: query.sessions, "missing": query.missing}
        query.reply(msgspec.json.encode(body).decode() + "\n")
