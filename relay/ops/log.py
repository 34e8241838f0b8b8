"""Logging: one line per event, as text or JSON lines, with control bytes escaped.

``setup_logging`` configures the root logger once per process.  Text lines look like::

    2026-11-27T04:42:14.123Z INFO relay.serve.server[4242]: accept paused listener=main errno=24

Every control character of the message, of the exception text and of each ``extra=`` field is
shown as an escape (``\\n``, ``\\r``, ``\\x1b``, ``\\u2028``...) so a client-supplied byte can never
start a forged log line.  JSON lines (python-json-logger) get the same guarantee from JSON string
escaping.  ``reopen()`` reopens the log file (SIGUSR1, after logrotate moved it).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import sys
import threading
import time
from typing import Any

try:  # python-json-logger >= 3
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # pragma: no cover - python-json-logger 2.x
    from pythonjsonlogger.jsonlogger import JsonFormatter  # type: ignore[no-redef, unused-ignore]

__all__ = [
    "JSON_FIELDS",
    "LOG_FORMATS",
    "TextFormatter",
    "escape",
    "flow_destination",
    "flush",
    "give_to",
    "log_every",
    "reopen",
    "reset_logging",
    "setup_from_settings",
    "setup_logging",
]

LOG_FORMATS = ("text", "json")
JSON_FIELDS = ("time", "level", "logger", "pid", "message")

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_BARE_VALUE_RE = re.compile(r'^[^\s="\\]+$')


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """Show every control character of ``text`` as an escape; the result is one line."""
    return _CONTROL_RE.sub(_escape_char, text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _text_value(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)
    if _BARE_VALUE_RE.match(text) and not _CONTROL_RE.search(text):
        return text
    return '"' + escape(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _utc_time(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger[pid]: message key=value ...``, control bytes escaped, one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        parts = [
            f"{_utc_time(record.created)} {record.levelname} "
            f"{escape(record.name)}[{record.process}]: {message}"
        ]
        parts.extend(f"{escape(str(k))}={_text_value(v)}" for k, v in _extras(record).items())
        if record.exc_info:
            parts.append("exc=" + _text_value(self.formatException(record.exc_info)))
        if record.stack_info:
            parts.append("stack=" + _text_value(record.stack_info))
        return " ".join(parts)


class _EscapingJsonFormatter(JsonFormatter):
    """python-json-logger with ``time``/``level``/``logger``/``pid`` names and UTC timestamps."""

    def __init__(self) -> None:
        super().__init__(
            ["asctime", "levelname", "name", "process", "message"],
            rename_fields={
                "asctime": "time",
                "levelname": "level",
                "name": "logger",
                "process": "pid",
            },
            json_ensure_ascii=True,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _utc_time(record.created)


class _ReopenableFileHandler(logging.FileHandler):
    """A FileHandler in append mode whose file can be reopened in place (log rotation).

    Root opens it: O_NOFOLLOW refuses a symbolic link planted in place of the file (ELOOP), and
    anything but a regular file or a FIFO (a log pipe) is refused too; ``give_to`` hands the *open descriptor* to the
    worker user (fchown), never a path that could have been swapped meanwhile.
    """

    def _open(self) -> Any:  # logging.FileHandler returns its stream
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.baseFilename, flags, 0o640)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(exc.errno, f"log file {self.baseFilename}: is a symbolic link; "
                                         "refusing to follow it") from None
            raise OSError(exc.errno, f"log file {self.baseFilename}: {exc.strerror}") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # a FIFO: a log pipe
            os.close(fd)
            raise OSError(errno.EINVAL, f"log file {self.baseFilename}: not a regular file "
                                        "nor a FIFO")
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def give_to(self, uid: int, gid: int) -> None:
        """fchown the open log file (so a worker user can reopen it on SIGUSR1); a file with
        several hard links is left alone (one of them could be a file of root's)."""
        self.acquire()
        try:
            stream = self.stream
            if stream is None:
                return
            fd = stream.fileno()
            st = os.fstat(fd)
            if st.st_nlink != 1:
                raise OSError(errno.EPERM, f"log file {self.baseFilename}: has {st.st_nlink} "
                                           "hard links; not handing it to the worker user")
            os.fchown(fd, uid, gid)
        finally:
            self.release()

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            if old is not None:
                old.close()
        finally:
            self.release()


_state_lock = threading.Lock()
_handler: logging.Handler | None = None
_format = "text"


def setup_logging(
    fmt: str = "text", level: str | int = "info", file: str | None = None
) -> logging.Handler:
    """Send every log record of this process to ``file`` (None or "" = stderr) as ``fmt``.

    Replaces the handler installed by a previous call.  Raises ValueError for an unknown format
    or level and OSError (with the path) when the file cannot be opened.
    """
    global _handler, _format
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    numeric = _level_number(level)
    handler: logging.Handler
    if file:
        handler = _ReopenableFileHandler(file, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingJsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    with _state_lock:
        if _handler is not None:
            root.removeHandler(_handler)
            _handler.close()
        root.addHandler(handler)
        root.setLevel(numeric)
        _handler = handler
        _format = fmt
    return handler


def reset_logging() -> None:
    """Remove the handler ``setup_logging`` installed and close its file (tests, embedding)."""
    global _handler
    with _state_lock:
        if _handler is not None:
            logging.getLogger().removeHandler(_handler)
            _handler.close()
            _handler = None


def setup_from_settings(settings: Any) -> logging.Handler:
    """``setup_logging`` from a ``relay.config.settings.RelaySettings`` (log_format, log_level, log_file)."""
    return setup_logging(settings.log_format, settings.log_level, settings.log_file or None)


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(
            f"log level {level!r}: expected one of debug, info, warning, error, critical"
        )
    return number


def give_to(uid: int, gid: int) -> bool:
    """fchown the open log file to ``uid``/``gid``; False when logging to stderr. Raises OSError
    with the path when the file cannot be handed over."""
    handler = _handler
    if isinstance(handler, _ReopenableFileHandler):
        handler.give_to(uid, gid)
        return True
    return False


def reopen() -> bool:
    """Reopen the log file (call on SIGUSR1 from the main loop). False when logging to stderr."""
    handler = _handler
    if isinstance(handler, _ReopenableFileHandler):
        handler.reopen()
        return True
    return False


class _RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, key: str, seconds: float) -> tuple[bool, int]:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < seconds:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False, 0
            self._last[key] = now
            return True, self._suppressed.pop(key, 0)


_limiter = _RateLimiter()


def log_every(
    logger: logging.Logger,
    key: str,
    seconds: float,
    msg: str,
    *args: Any,
    level: int = logging.WARNING,
    **extra: Any,
) -> bool:
    """Log ``msg % args`` at most once per ``seconds`` for ``key`` ("accept paused" storms).

    The next line that gets through carries ``suppressed=N``, the number of lines dropped since
    the previous one.  Returns True when the line was logged.
    """
    admitted, suppressed = _limiter.admit(key, seconds)
    if not admitted:
        return False
    if suppressed:
        extra["suppressed"] = suppressed
    logger.log(level, msg, *args, extra=extra or None)
    return True


def flow_destination(logger: logging.Logger) -> tuple[int, str] | None:
    """(descriptor, format) of the file or stream ``setup_logging`` writes to, when its handler
    is the only place ``logger``'s records go; None otherwise (then use ``logging``).

    The flow log writer (relay.serve.flowlog) writes its batches there itself: it must
    ``os.dup`` the descriptor and take a new one after ``reopen()``.
    """
    handler = _handler
    root = logging.getLogger()
    if (handler is None or logger.handlers or not logger.propagate or logger.filters
            or handler.filters or root.filters or root.handlers != [handler]):
        return None
    stream = getattr(handler, "stream", None)
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError):
        return None
    if fd < 0:
        return None
    return fd, _format


def flush() -> None:
    """Flush the installed handler (before exit or exec)."""
    handler = _handler
    if handler is not None:
        handler.flush()
