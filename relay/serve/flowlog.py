"""The flow log: one record per finished (or refused) connection, written off the serving thread.

The serving thread only appends a tuple to a bounded buffer (``FlowLog.add``, well under a
microsecond). A writer thread formats the records and writes them in batches, like nginx's
``access_log ... buffer=``: it wakes when FLUSH_RECORDS records wait or FLUSH_INTERVAL seconds
have passed, whichever comes first. A slow disk or a pipe nobody reads blocks only the writer;
once BUFFER_RECORDS records wait, new ones are dropped and counted (``flowlog_dropped`` in
stats and ``relay_flowlog_dropped`` in the metrics), and the writer says so in a log line when
it can write again. The buffer is flushed on stop (``close``), before a log reopen (SIGUSR1:
``request_reopen``) and therefore on reload (the old workers stop).

Each record is one line on the ``relay.flow`` logger with the message ``"flow"`` and these
fields (text: ``key=value`` after the message; json: members), in this order:

=================  ==========================================================================
``listener``       listener name
``client``         "ip:port" of the client ("[v6]:port"; after a trusted PROXY header: as the
                   proxy said)
``dest``           original destination / backend, "ip:port" or "unix:/path"; "" when unknown
``egress``         "ip:port" the upstream socket used when an egress slice was used, else ""
``c2s_bytes``      bytes delivered client -> origin
``s2c_bytes``      bytes delivered origin -> client
``spliced_bytes``  of those, bytes delivered with splice(2) (zero-copy)
``copied_bytes``   of those, bytes delivered through a user-space buffer (so
                   spliced_bytes + copied_bytes = c2s_bytes + s2c_bytes)
``duration``       seconds from accept to the end, float
``reason``         how it ended, from one of the vocabularies below
``errno``          errno name behind the reason ("ECONNRESET"), "" when none
``protocol``       "tcp" or "udp"
``c2s_dgrams``     UDP only: datagrams client -> origin (and ``s2c_dgrams`` back)
=================  ==========================================================================

``reason`` takes its value from one vocabulary per outcome, each a tuple defined once:

=====================================  ==============================================================
``CLOSE_REASONS``                      TCP, relayed or failed to connect upstream (``eof``,
(``relay.engines``, the core's)        ``reset_client``, ``refused``, ``idle_timeout``, ``killed``...)
``"denied_" + DENY_REASONS``           TCP client the routing refused (``denied_not_allowed``,
(``relay.serve.routing``)              ``denied_loop``, ``denied_slice_exhausted``...); the first
                                       ones are ``relay.serve.policy.POLICY_DENY_REASONS``
``"rejected_" + REJECT_REASONS``       TCP client over a connection limit (``rejected_maxconn``,
(``relay.serve.server``)               ``rejected_maxconn_per_source``)
``"handoff_refused_" +``               TCP flow handed over on reload that the new worker refused
``HANDOFF_REFUSALS``                   (``handoff_refused_listener_removed``...)
(``relay.serve.handoff``)
``UDP_CLOSE_REASONS``                  UDP flow (docs/udp.md): ``idle_timeout``, ``responses``,
(``relay.serve.udp``)                  ``closed``, ``error``, ``reload``; a UDP flow refused before it
                                       started: ``"denied_" + DENY_REASONS``, except
                                       ``slice_exhausted`` (unprefixed) and ``error``
=====================================  ==============================================================

UDP bytes are all copied (``spliced_bytes`` 0).

When ``relay.ops.log.setup_logging`` installed the only handler, the writer formats the lines
itself with the compiled ``relay_ext._flowfmt.LineFormatter`` (the same bytes as
``relay.ops.log.TextFormatter``, the same JSON members as its JSON formatter, the same escaping:
the escaping stays in the Python callables it caches, ``_line_formatter``), CHUNK_RECORDS
records per GIL hold, and writes each chunk with one ``write(2)`` on its own descriptor of the
log destination. Otherwise (embedding, pytest's caplog, or the extensions not built) it hands
each record to ``logging`` from the writer thread, with the same ``extra`` fields: that path is
the reference the compiled lines are tested against (tests/unit/test_flowlog_format.py).
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from relay.ops import log as relay_log
from relay.sock import format_address

try:
    from relay_ext import _flowfmt
except ImportError as exc:  # the extensions are not built: the writer hands lines to logging
    _flowfmt = None  # type: ignore[assignment]
    _FLOWFMT_MISSING = f"relay_ext._flowfmt is not importable ({exc})"

__all__ = [
    "BUFFER_RECORDS",
    "FIELDS",
    "FLOW_LOGGER",
    "FLUSH_INTERVAL",
    "FLUSH_RECORDS",
    "FlowLog",
    "TCP_FIELDS",
    "format_addr",
]

FLOW_LOGGER = logging.getLogger("relay.flow")
log = logging.getLogger("relay.flowlog")

FIELDS = ("listener", "client", "dest", "egress", "c2s_bytes", "s2c_bytes", "spliced_bytes",
          "copied_bytes", "duration", "reason", "errno", "protocol", "c2s_dgrams", "s2c_dgrams")
TCP_FIELDS = FIELDS[:-2]  # a TCP line has no datagram counts
BUFFER_RECORDS = 16384  # records waiting for the writer; beyond this they are dropped
FLUSH_RECORDS = 1024  # wake the writer once this many wait...
FLUSH_INTERVAL = 0.2  # ...or after this many seconds
CHUNK_RECORDS = 256  # records formatted per GIL hold (one write(2) each)
CLOSE_TIMEOUT = 2.0  # close(): how long to wait for a writer blocked on its destination
_CHECK_INTERVAL = 0.1  # the writer looks for a reopen request this often
_DROP_LOG_INTERVAL = 10.0
# Writes to a pipe of at most PIPE_BUF bytes are atomic: lines from several workers sharing a
# pipe (stderr under systemd, a FIFO) never interleave inside a line. Regular files opened with
# O_APPEND take each write(2) whole.
_PIPE_BUF = 4096

# (end time.time(), listener name, client, dest, egress, c2s, s2c, spliced, copied,
#  duration in microseconds, reason, errno, protocol, c2s datagrams, s2c datagrams);
# the datagram counts are -1 for TCP and not shown.
Record = tuple[float, str, Any, Any, Any, int, int, int, int, int, str, int, str, int, int]


def format_addr(addr: tuple | str | None) -> str:
    """A flow log address: (ip, port) -> relay.sock.format_address ("ip:port", "[v6]:port");
    ("unix:/p", 0) -> "unix:/p"; a unix peer -> "unix"; None -> ""."""
    if addr is None:
        return ""
    if isinstance(addr, str):
        return addr
    host = str(addr[0])
    if len(addr) < 2 or host.startswith("unix:"):
        return host
    if not host:  # unix-socket peer: getpeername() is ""
        return "unix"
    return format_address(addr)


def _errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, str(err)) if err else ""


def _line_formatter(fmt: str) -> _flowfmt.LineFormatter:
    """The compiled formatter of ``fmt`` lines (see the module docstring). It caches what these
    callables return, which hold the escaping rules (relay.ops.log's, JSON's): the head per
    listener, the tail per (reason, errno, protocol), an address that is not a plain IP tuple."""
    pid = os.getpid()
    value: Callable[[str], str]
    if fmt == "json":
        value = encode_basestring_ascii

        def head(lst: str) -> str:
            return (f', "level": "INFO", "logger": "relay.flow", "pid": {pid}, '
                    f'"message": "flow", "listener": {value(lst)}')

        def tail(reason: str, err: int, proto: str) -> str:
            return (f', "reason": {value(reason)}, "errno": {value(_errno_name(err))}, '
                    f'"protocol": {value(proto)}')
    else:
        value = relay_log._text_value

        def head(lst: str) -> str:
            return f" INFO relay.flow[{pid}]: flow listener={value(lst)}"

        def tail(reason: str, err: int, proto: str) -> str:
            return (f" reason={value(reason)} errno={value(_errno_name(err))} "
                    f"protocol={value(proto)}")

    def address(addr: Any) -> str:
        return value(format_addr(addr))

    return _flowfmt.LineFormatter(fmt == "json", head, tail, address)


def _as_extra(rec: Record) -> dict[str, Any]:
    (_t, lst, client, dest, egress, c2s, s2c, spliced, copied, dur, reason, err, proto,
     d_c2s, d_s2c) = rec
    extra = {"listener": lst, "client": format_addr(client), "dest": format_addr(dest),
             "egress": format_addr(egress), "c2s_bytes": c2s, "s2c_bytes": s2c,
             "spliced_bytes": spliced, "copied_bytes": copied, "duration": round(dur / 1e6, 6),
             "reason": reason, "errno": _errno_name(err), "protocol": proto}
    if d_c2s >= 0:
        extra["c2s_dgrams"] = d_c2s
        extra["s2c_dgrams"] = d_s2c
    return extra


class _Sink:
    """Where the writer puts lines: its own descriptor of the log destination, or ``logging``."""

    def __init__(self) -> None:
        self.fd = -1
        self.pipe = False
        self.formatter: _flowfmt.LineFormatter | None = None
        dest = relay_log.flow_destination(FLOW_LOGGER)
        if dest is None:
            return
        if _flowfmt is None:
            relay_log.log_every(log, "flowlog no formatter", 3600.0,
                                "flow log: %s; flow lines go through logging (slower)",
                                _FLOWFMT_MISSING)
            return
        fd, fmt = dest
        self.fd = os.dup(fd)
        self.pipe = not stat.S_ISREG(os.fstat(self.fd).st_mode)
        self.formatter = _line_formatter(fmt)

    def write(self, records: list[Record]) -> None:
        if self.formatter is None:
            for rec in records:
                _emit(rec)
            return
        # Formatting holds the GIL: in chunks, each followed by its write(2) (which releases
        # it), the serving thread never waits for the GIL behind a whole batch.
        for start in range(0, len(records), CHUNK_RECORDS):
            data = self.formatter.lines(records[start:start + CHUNK_RECORDS])
            if self.pipe:
                _write_lines_atomically(self.fd, data)
            else:
                _write_all(self.fd, data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _log_record(rec: Record) -> logging.LogRecord:
    """The record as a ``logging`` record: what the writer hands to ``logging`` when it does
    not format the lines itself (and the reference its compiled formatter is tested against)."""
    record = FLOW_LOGGER.makeRecord(FLOW_LOGGER.name, logging.INFO, __file__, 0, "flow", (),
                                    None, extra=_as_extra(rec))
    record.created = rec[0]
    record.msecs = int(rec[0] % 1 * 1000)
    return record


def _emit(rec: Record) -> None:
    FLOW_LOGGER.handle(_log_record(rec))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_lines_atomically(fd: int, data: bytes) -> None:
    start = 0
    end = len(data)
    while start < end:
        stop = min(start + _PIPE_BUF, end)
        if stop < end:
            cut = data.rfind(b"\n", start, stop)
            stop = cut + 1 if cut >= start else stop  # a line longer than PIPE_BUF: cut it
        _write_all(fd, data[start:stop])
        start = stop


class FlowLog:
    """The bounded record buffer of one serving thread and its writer thread.

    ``add`` is called by the serving thread and the worker's UDP thread (a deque append is
    atomic; ``dropped`` may miss a count when both overflow at the same instant); ``dropped``
    may be read from anywhere.
    ``request_reopen`` only sets a flag (safe in a signal handler); ``close`` flushes and stops
    the writer, waiting at most CLOSE_TIMEOUT for a writer blocked on its destination.
    """

    def __init__(self, *, capacity: int = BUFFER_RECORDS, batch: int = FLUSH_RECORDS,
                 interval: float = FLUSH_INTERVAL) -> None:
        self._queue: deque[Record] = deque()
        self._capacity = capacity
        self._batch = batch
        self._interval = interval
        self._kick = threading.Event()
        self._reopen = False
        self._closing = False
        self.dropped = 0  # written by the serving thread only
        self.written = 0  # written by the writer only
        self._dropped_reported = 0
        self._sink: _Sink | None = None
        self._thread: threading.Thread | None = None
        self.add: Callable[[Record], None] = self._add

    def start(self) -> None:
        """Start the writer (in the process that serves: after any fork)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relay-flowlog", daemon=True)
            self._thread.start()

    def _add(self, record: Record) -> None:
        queue = self._queue
        if len(queue) >= self._capacity:
            self.dropped += 1
            return
        queue.append(record)
        if len(queue) >= self._batch and not self._kick.is_set():
            self._kick.set()

    def request_reopen(self) -> None:
        """Write what waits to the current destination, then reopen it (after log rotation)."""
        self._reopen = True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Flush every waiting record and stop the writer."""
        self._closing = True
        self._kick.set()
        thread = self._thread
        if thread is None:
            self._flush()  # never started: write from here
            self._close_sink()
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("flow log: the destination accepts no data; %d records not written",
                        len(self._queue))

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        # request_reopen() runs in a signal handler, which must not take the Event's lock (the
        # interrupted thread may hold it): the writer looks at the flag every _CHECK_INTERVAL.
        check = min(self._interval, _CHECK_INTERVAL)
        next_flush = time.monotonic() + self._interval
        try:
            # Take the destination now: records buffered when the log is rotated belong in
            # the file that was current when they were made.
            self._sink = _Sink()
            while True:
                kicked = self._kick.wait(check)
                self._kick.clear()
                closing = self._closing
                reopen = self._reopen
                now = time.monotonic()
                if kicked or closing or reopen or now >= next_flush:
                    self._flush()
                    next_flush = now + self._interval
                if reopen:
                    self._reopen = False
                    self._close_sink()
                    self._sink = _Sink()
                if closing:
                    break
        except Exception:
            log.exception("flow log writer failed; flow records are no longer written")
            self.add = self._drop
        finally:
            self._close_sink()

    def _drop(self, _record: Record) -> None:
        self.dropped += 1

    def _flush(self) -> None:
        queue = self._queue
        while queue:
            n = min(len(queue), self._batch * 4)
            records = [queue.popleft() for _ in range(n)]
            if not FLOW_LOGGER.isEnabledFor(logging.INFO):
                continue
            if self._sink is None:
                self._sink = _Sink()
            try:
                self._sink.write(records)
            except OSError as exc:
                relay_log.log_every(log, f"flowlog write {id(self)}", _DROP_LOG_INTERVAL,
                                    "flow log: cannot write %d records: %s", n, exc)
                continue
            self.written += n
        dropped = self.dropped
        if dropped > self._dropped_reported:
            if relay_log.log_every(
                    log, f"flowlog dropped {id(self)}", _DROP_LOG_INTERVAL,
                    "flow log: %d records dropped so far: the log destination did not keep up "
                    "(%d records buffered at most)", dropped, self._capacity,
                    flowlog_dropped=dropped):
                self._dropped_reported = dropped

    def _close_sink(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
