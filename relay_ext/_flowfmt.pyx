# cython: language_level=3
"""The flow log's line formatter: a batch of records -> the bytes of complete lines.

Mechanism only. relay.serve.flowlog decides what a line says: it gives the formatter three
callables whose results the formatter caches, and which hold every escaping rule (relay.ops.log's
``key=value`` text, JSON string escaping):

    head(listener)               the level, logger, pid, message and listener fields
    tail(reason, errno, proto)   the reason, errno and protocol fields
    address(addr)                an address field's value, quoted/escaped, when it is not a plain
                                 (ip, port...) tuple; the (cached) dest always goes through it

The formatter writes the rest, which never needs escaping: the time, an IP literal and its port,
the integer fields, the duration (``repr(us / 1e6)``, the shortest text that reads back as the
same double: CPython's own ``PyOS_double_to_string(..., 'r', ...)``) and the field names. A
record is the tuple relay.serve.flowlog.Record describes (15 members).

It holds the GIL throughout (it reads Python objects); the caller hands it small chunks so
another thread waiting for the GIL gets it between two chunks.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH
from libc.math cimport floor, fmod
from libc.string cimport memcpy

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    bint PyUnicode_IS_ASCII(object o)
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    double PyFloat_AsDouble(object o) except? -1.0

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        pass
    tm *gmtime_r(const time_t *timep, tm *result)
    size_t strftime(char *s, size_t maxsize, const char *fmt, const tm *t)

RECORD_FIELDS = 15
CACHE_LIMIT = 4096  # dests and tails kept before the caches start over

cdef class LineFormatter:
    """``LineFormatter(json, head, tail, address)``; ``lines(records) -> bytes``."""

    cdef bint json
    cdef object head, tail, address
    cdef dict heads, tails, dests
    cdef object last_dest  # the last _dest() argument (kept alive here) and its text
    cdef bytes last_shown
    cdef char *buf
    cdef Py_ssize_t cap, n
    cdef double second  # the second whose text is cached, -1 when none
    cdef char second_text[32]
    cdef Py_ssize_t second_len

    def __cinit__(self):
        self.buf = NULL
        self.cap = 0
        self.n = 0
        self.second = -1.0
        self.second_len = 0

    def __init__(self, bint json, head, tail, address):
        self.json = json
        self.head = head
        self.tail = tail
        self.address = address
        self.heads = {}
        self.tails = {}
        self.dests = {}

    def __dealloc__(self):
        if self.buf != NULL:
            PyMem_Free(self.buf)
            self.buf = NULL

    # -- the output buffer -----------------------------------------------------------------------

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t want = self.n + extra
        cdef Py_ssize_t cap = self.cap if self.cap else 65536
        cdef char *grown
        if want <= self.cap:
            return 0
        while cap < want:
            cap *= 2
        grown = <char *>PyMem_Realloc(self.buf, cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.cap = cap
        return 0

    cdef inline int _put(self, const char *s, Py_ssize_t k) except -1:
        if self.n + k > self.cap:
            self._reserve(k)
        memcpy(self.buf + self.n, s, k)
        self.n += k
        return 0

    cdef inline int _put_bytes(self, bytes b) except -1:
        return self._put(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int _put_text(self, str text) except -1:
        cdef Py_ssize_t k
        cdef const char *s
        if PyUnicode_IS_ASCII(text):
            s = PyUnicode_AsUTF8AndSize(text, &k)
            return self._put(s, k)
        return self._put_bytes(text.encode("utf-8", "backslashreplace"))

    cdef int _put_int(self, object value) except -1:
        """An integer as str() writes it."""
        cdef int overflow = 0
        cdef long long v
        if type(value) is not int:
            return self._put_text(str(value))
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return self._put_text(str(value))
        return self._put_ll(v)

    cdef int _put_ll(self, long long v) except -1:
        cdef char digits[24]
        cdef int i = 24
        cdef unsigned long long u = (<unsigned long long>0 - <unsigned long long>v) if v < 0 \
            else <unsigned long long>v
        while True:
            i -= 1
            digits[i] = <char>(48 + u % 10)
            u //= 10
            if u == 0:
                break
        if v < 0:
            i -= 1
            digits[i] = b'-'
        return self._put(&digits[i], 24 - i)

    cdef int _put_time(self, object created) except -1:
        """``2026-12-01T19:31:02.250Z`` as relay.ops.log writes ``record.created``: gmtime of
        the second (floor) and int(created % 1 * 1000) milliseconds."""
        cdef double t = PyFloat_AsDouble(created)
        cdef double second = floor(t)
        cdef double frac
        cdef time_t whole
        cdef tm parts
        cdef int ms
        cdef char tail[6]
        if second != self.second:
            whole = <time_t>second
            if gmtime_r(&whole, &parts) == NULL:
                raise ValueError(f"flow record time {created!r}: out of range")
            self.second_len = strftime(self.second_text, sizeof(self.second_text),
                                       b"%Y-%m-%dT%H:%M:%S", &parts)
            self.second = second
        self._put(self.second_text, self.second_len)
        if t >= 0:
            frac = t - second  # exact (the low bits of t), so equal to fmod(t, 1.0)
        else:
            frac = fmod(t, 1.0)  # Python's float %: the sign of the divisor
            if frac < 0:
                frac += 1.0
        ms = <int>(frac * 1000.0)
        tail[0] = b'.'
        tail[1] = <char>(48 + ms // 100)
        tail[2] = <char>(48 + ms // 10 % 10)
        tail[3] = <char>(48 + ms % 10)
        tail[4] = b'Z'
        return self._put(tail, 5)

    cdef int _put_duration(self, object us) except -1:
        """``repr(us / 1e6)``. For a whole number of microseconds from 100 (0.0001 s, where
        repr leaves exponent notation) below 10**15, that is the exact decimal ``us * 1e-6``
        without trailing zeros: it has at most 15 significant digits, so it is the one
        shortest decimal that reads back as the quotient (DBL_DIG). Anything else goes
        through CPython's own repr."""
        cdef int overflow = 0
        cdef long long v = 0
        cdef long long frac
        cdef char digits[8]
        cdef int k = 7
        cdef int kind = 0
        cdef char *text
        cdef Py_ssize_t n = 0
        if type(us) is int:
            v = PyLong_AsLongLongAndOverflow(us, &overflow)
        if type(us) is int and not overflow and 100 <= v < 1000000000000000:
            self._put_ll(v // 1000000)
            frac = v % 1000000
            digits[0] = b'.'
            if frac == 0:
                digits[1] = b'0'
                return self._put(digits, 2)
            while frac % 10 == 0:
                frac //= 10
                k -= 1
            for n in range(k - 1, 0, -1):
                digits[n] = <char>(48 + frac % 10)
                frac //= 10
            return self._put(digits, k)
        text = PyOS_double_to_string(PyFloat_AsDouble(us) / 1e6, b'r', 0, Py_DTSF_ADD_DOT_0,
                                     &kind)
        while text[n]:
            n += 1
        try:
            self._put(text, n)
        finally:
            PyMem_Free(text)
        return 0

    cdef bint _plain_ip(self, object addr):
        """An (ip, port...) tuple whose host text needs no quoting or escaping in either
        format: printable ASCII without space, '"', '=' or '\\', not a "unix:" name."""
        cdef object host
        cdef const char *s
        cdef Py_ssize_t k, i
        cdef char c
        if type(addr) is not tuple or PyTuple_GET_SIZE(addr) < 2:
            return False
        host = <object>PyTuple_GET_ITEM(addr, 0)
        if type(host) is not str or not PyUnicode_IS_ASCII(host) or type(<object>PyTuple_GET_ITEM(addr, 1)) is not int:
            return False
        s = PyUnicode_AsUTF8AndSize(host, &k)
        if k == 0 or (k >= 5 and s[0] == b'u' and s[1] == b'n' and s[2] == b'i'
                      and s[3] == b'x' and s[4] == b':'):
            return False
        for i in range(k):
            c = s[i]
            if c <= 32 or c >= 127 or c == b'"' or c == b'=' or c == b'\\':
                return False
        return True

    cdef int _put_addr(self, object addr) except -1:
        """"ip:port" / "[v6]:port" (JSON: quoted); anything else through ``address``."""
        cdef object host
        cdef bint v6
        if not self._plain_ip(addr):
            return self._put_text(self.address(addr))
        host = <object>PyTuple_GET_ITEM(addr, 0)
        v6 = ":" in host
        if self.json:
            self._put(b'"', 1)
        if v6:
            self._put(b'[', 1)
        self._put_text(host)
        if v6:
            self._put(b"]:", 2)
        else:
            self._put(b":", 1)
        self._put_int(<object>PyTuple_GET_ITEM(addr, 1))
        if self.json:
            self._put(b'"', 1)
        return 0

    cdef bytes _dest(self, object dest):
        """A destination's or a backend's field value: they repeat, each is formatted once.
        The same object as the last record's (a backend-mode listener's one backend tuple)
        skips the dict's hash and compare."""
        cdef bytes shown
        cdef Py_ssize_t start
        if dest is self.last_dest and self.last_shown is not None:
            return self.last_shown
        shown = self.dests.get(dest)
        if shown is None:
            start = self.n
            self._put_addr(dest)
            shown = PyBytes_FromStringAndSize(self.buf + start, self.n - start)
            self.n = start
            self.dests[dest] = shown
        self.last_dest = dest
        self.last_shown = shown
        return shown

    # -- lines -----------------------------------------------------------------------------------

    def lines(self, list records):
        """The bytes of one line per record, in order (UTF-8; lone surrogates backslashed)."""
        cdef object rec, key, d_c2s
        cdef bytes head, tail, dest
        cdef bint json = self.json
        self.n = 0
        if len(self.dests) > CACHE_LIMIT:
            self.dests.clear()
            self.last_dest = self.last_shown = None
        if len(self.tails) > CACHE_LIMIT:
            self.tails.clear()
        for rec in records:
            if type(rec) is not tuple or PyTuple_GET_SIZE(rec) != RECORD_FIELDS:
                raise TypeError(f"flow record: expected a tuple of {RECORD_FIELDS}, got {rec!r}")
            lst = <object>PyTuple_GET_ITEM(rec, 1)
            head = self.heads.get(lst)
            if head is None:
                head = self.heads[lst] = self.head(lst).encode("utf-8", "backslashreplace")
            key = (<object>PyTuple_GET_ITEM(rec, 10), <object>PyTuple_GET_ITEM(rec, 11),
                   <object>PyTuple_GET_ITEM(rec, 12))
            tail = self.tails.get(key)
            if tail is None:
                tail = self.tails[key] = self.tail(*key).encode("utf-8", "backslashreplace")
            dest = self._dest(<object>PyTuple_GET_ITEM(rec, 3))
            d_c2s = <object>PyTuple_GET_ITEM(rec, 13)
            if json:
                self._put(b'{"time": "', 10)
                self._put_time(<object>PyTuple_GET_ITEM(rec, 0))
                self._put(b'"', 1)
                self._put_bytes(head)
                self._put(b', "client": ', 12)
                self._put_addr(<object>PyTuple_GET_ITEM(rec, 2))
                self._put(b', "dest": ', 10)
                self._put_bytes(dest)
                self._put(b', "egress": ', 12)
                self._put_egress(<object>PyTuple_GET_ITEM(rec, 4))
                self._put(b', "c2s_bytes": ', 15)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 5))
                self._put(b', "s2c_bytes": ', 15)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 6))
                self._put(b', "spliced_bytes": ', 19)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 7))
                self._put(b', "copied_bytes": ', 18)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 8))
                self._put(b', "duration": ', 14)
                self._put_duration(<object>PyTuple_GET_ITEM(rec, 9))
                self._put_bytes(tail)
                if d_c2s >= 0:
                    self._put(b', "c2s_dgrams": ', 16)
                    self._put_int(d_c2s)
                    self._put(b', "s2c_dgrams": ', 16)
                    self._put_int(<object>PyTuple_GET_ITEM(rec, 14))
                self._put(b'}\n', 2)
            else:
                self._put_time(<object>PyTuple_GET_ITEM(rec, 0))
                self._put_bytes(head)
                self._put(b' client=', 8)
                self._put_addr(<object>PyTuple_GET_ITEM(rec, 2))
                self._put(b' dest=', 6)
                self._put_bytes(dest)
                self._put(b' egress=', 8)
                self._put_egress(<object>PyTuple_GET_ITEM(rec, 4))
                self._put(b' c2s_bytes=', 11)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 5))
                self._put(b' s2c_bytes=', 11)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 6))
                self._put(b' spliced_bytes=', 15)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 7))
                self._put(b' copied_bytes=', 14)
                self._put_int(<object>PyTuple_GET_ITEM(rec, 8))
                self._put(b' duration=', 10)
                self._put_duration(<object>PyTuple_GET_ITEM(rec, 9))
                self._put_bytes(tail)
                if d_c2s >= 0:
                    self._put(b' c2s_dgrams=', 12)
                    self._put_int(d_c2s)
                    self._put(b' s2c_dgrams=', 12)
                    self._put_int(<object>PyTuple_GET_ITEM(rec, 14))
                self._put(b'\n', 1)
        return PyBytes_FromStringAndSize(self.buf, self.n)

    cdef int _put_egress(self, object egress) except -1:
        if egress is None:  # backend mode, or no egress slice
            return self._put(b'""', 2)
        return self._put_addr(egress)
