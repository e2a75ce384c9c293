"""Client requests, read the way Redis reads them (networking.c, Redis 7).

`RequestReader` turns the bytes a client sends into requests (lists of bytes),
following processInputBuffer / processMultibulkBuffer / processInlineBuffer
step for step, so that a client sees through the proxy what it would see from
Redis itself, error words included:

- A request starting with `*` is an array of bulk strings; anything else is an
  inline command, one line, split by `split_inline` (Redis's sdssplitargs).
- Lengths are read as string2ll reads them (no `+`, no spaces, no leading
  zeros); a count over INT_MAX is `invalid multibulk length`, a bulk length that
  is negative or over `max_bulk` (proto-max-bulk-len) `invalid bulk length`.
  An element that does not start with `$` is `expected '$', got 'X'`.
- A line is found the way Redis finds it: the first `\\r` (headers) or `\\n`
  (inline) before any NUL byte (Redis uses strchr); the byte after a header's
  `\\r`, and the two after a bulk's payload, are skipped unchecked.
- No line may grow past 64 KB without its end: `too big inline request`, `too
  big mbulk count string`, `too big bulk count string`.
- `*0`, a negative count and blank inline lines are requests of no arguments:
  skipped.

Memory grows with the bytes received, never with a declared length (arguments
are appended as they arrive). Time is linear in the bytes received: the buffer
is consumed by an offset, a line's end is searched for once however the line
arrives, and a buffer is compacted only when its consumed part is large.
"""

from __future__ import annotations

import re
from collections import deque
from functools import lru_cache
from itertools import chain
from operator import itemgetter

from proxy.speedups import C

# The C fast path (proxy/_speedups.c read_plain): whole canonical requests as lists,
# the same reading as `_batch` below, in C. None on the pure-Python path.
_read_plain = C.read_plain if C is not None else None


DEFAULT_MAX_BULK = 512 * 1024 * 1024       # proto-max-bulk-len
DEFAULT_MAX_QUERY = 1024 * 1024 * 1024     # client-query-buffer-limit
MAX_INLINE = 64 * 1024                     # PROTO_INLINE_MAX_SIZE
INT_MAX = 2 ** 31 - 1
LLONG_MAX = 2 ** 63 - 1
COMPACT = 1 << 16  # a bytearray buffer drops its consumed part once it is this large (and half the buffer)


class ProtocolError(Exception):
    """The peer sent bytes that are not RESP. The message reads well after `Protocol error: `.

    (Defined here, below proxy.resp, which re-exports it, so neither module imports the other's
    half-initialised self.)"""


# ---------------------------------------------------------------- lengths

_LL = re.compile(rb"-?[1-9][0-9]*|0")


def string2ll(text: bytes) -> int | None:
    """A length as Redis's string2ll reads it, or None where Redis says it is not one."""
    if not 0 < len(text) < 21 or _LL.fullmatch(text) is None:
        return None
    v = int(text)
    return v if -LLONG_MAX - 1 <= v <= LLONG_MAX else None


# The fast path reads a window of the buffer split at every CRLF, as if no argument
# held one, then checks that guess (see RequestReader._batch). Its tables map header
# tokens to values for the usual small lengths: a look-up both parses and checks
# the text (no sign, no zeros in front); anything else is left to the exact reader.
WINDOW = 32 * 1024
_STEPS = {b"*%d" % i: 2 * i + 1 for i in range(1, 1025)}  # count header -> tokens of its request


@lru_cache(maxsize=8)
def _bulk_lengths(max_bulk: int) -> dict:
    return {b"$%d" % i: i for i in range(min(max_bulk, 9999) + 1)}


_HEADERS = itemgetter(slice(0, None, 2))
_ARGS = itemgetter(slice(1, None, 2))


# ---------------------------------------------------------------- inline commands

_SPACE = b" \t\n\r\x0b\x0c"                      # C isspace
_SKIP_SPACE = re.compile(rb"[ \t\n\r\x0b\x0c]*")
_PLAIN = re.compile(rb"[^ \t\n\r\"']*")            # an unquoted token ends at ' ' \t \n \r (not \v \f)
_DQ_PLAIN = re.compile(rb'[^"\\]*')
_SQ_PLAIN = re.compile(rb"[^'\\]*")
_UNUSUAL = re.compile(rb"[\"'\x0b\x0c]")           # without these, bytes.split() is sdssplitargs
_BLANK_LINES = re.compile(rb"[ \t\n\r\x0b\x0c]*\n")
_HEX = b"0123456789abcdefABCDEF"
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_UNBALANCED = "unbalanced quotes in request"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command as Redis's sdssplitargs does, in one pass.

    Blanks (C isspace) separate arguments; an unquoted argument ends at a space,
    tab, CR or LF only. "double quotes" know \\n \\r \\t \\b \\a, \\xHH and \\<any>;
    'single quotes' know only \\'. A quote may open inside an argument
    (a"b c" is `ab c`); a closing quote must be followed by a blank or the end.
    ProtocolError("unbalanced quotes in request") otherwise."""
    if _UNUSUAL.search(line) is None:
        return line.split()
    args: list[bytes] = []
    n = len(line)
    i = 0
    while True:
        i = _SKIP_SPACE.match(line, i).end()
        if i >= n:
            return args
        parts = []
        while True:  # one argument
            m = _PLAIN.match(line, i)
            parts.append(m.group())
            i = m.end()
            if i >= n:
                break
            c = line[i]
            if c != 0x22 and c != 0x27:  # a blank that ends the argument
                i += 1
                break
            i += 1
            if c == 0x22:  # "..."
                while True:
                    m = _DQ_PLAIN.match(line, i)
                    parts.append(m.group())
                    i = m.end()
                    if i >= n:
                        raise ProtocolError(_UNBALANCED)
                    if line[i] == 0x22:
                        break
                    # a backslash
                    if i + 1 >= n:
                        raise ProtocolError(_UNBALANCED)
                    e = line[i + 1]
                    if e == 0x78 and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:  # \xHH
                        parts.append(bytes((int(line[i + 2:i + 4], 16),)))
                        i += 4
                    else:
                        parts.append(_ESCAPES.get(e) or line[i + 1:i + 2])
                        i += 2
            else:  # '...'
                while True:
                    m = _SQ_PLAIN.match(line, i)
                    parts.append(m.group())
                    i = m.end()
                    if i >= n:
                        raise ProtocolError(_UNBALANCED)
                    if line[i] == 0x27:
                        break
                    if line[i + 1:i + 2] == b"'":  # \'
                        parts.append(b"'")
                        i += 2
                    else:
                        parts.append(b"\\")
                        i += 1
            i += 1  # past the closing quote
            if i < n and line[i] not in _SPACE:
                raise ProtocolError(_UNBALANCED)
            break
        args.append(b"".join(parts))


# ---------------------------------------------------------------- the reader

_NONE, _INLINE, _MULTIBULK = 0, 1, 2


class RequestReader:
    """Incremental reader of client requests: `feed(data)`, then `get()` until it returns None.

    `get()` returns a request as a list of bytes (never empty), or None when the
    bytes so far end inside one; it raises ProtocolError for bytes Redis would
    refuse, and for any other failure inside the reader. After an error the
    connection must be closed (every later `get()` raises the same error).

    `idle` is True when `get()` last returned None holding no part of a request:
    the next bytes start a new one (the C path may then read them first)."""

    fast = True  # False: the exact reader alone (the tests compare the two)
    # Before AUTH: Redis's limits for a client that has not authenticated (networking.c):
    # at most 10 arguments of at most 16384 bytes. Only the exact reader checks them, so
    # a reader with this set also has `fast` False (proxy/auth.py).
    unauthenticated = False

    def __init__(self, max_bulk: int = DEFAULT_MAX_BULK, max_query: int = DEFAULT_MAX_QUERY):
        self.max_bulk = max_bulk
        self.max_query = max_query
        self.idle = True
        self._lens = _bulk_lengths(max_bulk)
        self._buf: bytes | bytearray = b""
        self._pos = 0            # bytes of _buf already read
        self._error: ProtocolError | None = None
        self._ready: deque = deque()   # requests the fast path read ahead, in order
        self._exact_until = 0    # the fast path failed on the buffer up to here: not again
        # the request being read (Redis's reqtype, multibulklen, bulklen, argv)
        self._type = _NONE
        self._count = 0          # elements still to read; 0: the count line is not read yet
        self._bulk = -1          # length of the bulk being read, -1 while its header is unread
        self._args: list[bytes] = []
        self._taken = 0          # bytes of this request consumed so far (for max_query)
        self._scan = 0           # bytes past _pos searched for the current line's end, in vain
        self._stuck = False      # a NUL before the line's end: Redis never finds that end

    # ------------------------------------------------------------ input

    def feed(self, data: bytes) -> None:
        self.idle = False
        if self._error is not None:
            return
        try:
            if type(data) is not bytes:
                data = memoryview(data).tobytes()
            if not data:
                return
            buf, pos = self._buf, self._pos
            rest = len(buf) - pos
            self._exact_until -= pos  # positions count from the new start below
            if rest == 0:
                self._buf = data
                self._pos = 0
            elif rest <= len(data):
                # a short tail and a longer new chunk: one bytes object again (each byte
                # is copied at most twice this way, so this stays linear)
                self._buf = bytes(buf[pos:]) + data
                self._pos = 0
            else:
                # a long unfinished request growing by small chunks: append in place
                if type(buf) is bytes:
                    buf = bytearray(buf[pos:])
                    self._pos = 0
                elif pos >= COMPACT and pos * 2 >= len(buf):
                    del buf[:pos]
                    self._pos = 0
                else:
                    self._exact_until += pos  # not moved after all
                buf += data
                self._buf = buf
        except Exception as e:  # anything at all: the connection cannot be read on
            self._error = ProtocolError(f"unreadable request ({type(e).__name__})")

    # ------------------------------------------------------------ output

    def get(self) -> list[bytes] | None:
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        try:
            return self._get()
        except ProtocolError as e:
            self._error = e
            raise
        except Exception as e:  # a bug here must still close the connection cleanly
            self._error = ProtocolError(f"unreadable request ({type(e).__name__})")
            raise self._error from e

    def take_rest(self) -> bytes:
        """Between two requests (nothing read ahead, no error): hand back the bytes not read
        yet and forget them, so the caller's C path can read them; b"" otherwise. A read
        that began inside a request is finished here and the rest of it need not be."""
        if self._type != _NONE or self._ready or self._error is not None:
            return b""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return b""
        rest = bytes(buf[pos:])
        self._buf, self._pos, self._exact_until = b"", 0, 0
        self.idle = True
        return rest

    def _get(self) -> list[bytes] | None:
        while True:
            buf = self._buf
            pos = self._pos
            end = len(buf)
            if pos >= end:
                self.idle = self._type == _NONE
                if end:
                    self._buf, self._pos = b"", 0
                return None
            if self._type == _NONE and pos >= self._exact_until and buf[pos] == 0x2A and type(buf) is bytes \
                    and self.fast:
                if _read_plain is not None:
                    reqs, stop = _read_plain(buf, pos, self.max_bulk, 4096)
                    if reqs:
                        self._pos = stop
                        ready = self._ready
                        ready.extend(reqs)
                        return ready.popleft()
                    # not whole or not canonical here: the exact reader takes it, and
                    # the fast path waits until it is past these bytes (no re-walk)
                    self._exact_until = end
                else:
                    ready = self._batch(buf, pos, end)
                    if ready:
                        return ready.popleft()
            args = self._step(buf, end)
            if args is None:
                self.idle = False
                if self._taken + end - self._pos > self.max_query:
                    raise ProtocolError("query buffer limit exceeded")
                return None
            if args:
                return args

    def _batch(self, buf: bytes, pos: int, end: int) -> deque | None:
        """Fast path: the whole, canonically encoded requests at `pos` in the next WINDOW bytes.

        The window is split at every CRLF and walked as tokens `*N`, then N times
        `$L`, payload. That reading is right exactly when every payload token is as
        long as its header says (a payload holding a CRLF would be split and fail
        the check): then Redis's byte-by-byte reading takes the same bytes the same
        way. Checked in a few C-level passes; if the check fails, or nothing whole is
        there, the exact reader takes the window and the fast path waits past it."""
        window = buf[pos:pos + WINDOW] if pos or end > WINDOW else buf
        toks = window.split(b"\r\n")
        last = len(toks) - 1     # the token after the last CRLF: not known to be whole
        steps = _STEPS
        segs = []                # each request's tokens after its count: $L, payload, ...
        add = segs.append
        i = 0
        whole = True             # stopped only where the window's bytes ran out
        while True:
            step = steps.get(toks[i])
            if step is None:
                whole = i == last
                break
            j = i + step
            if j > last:
                break
            add(toks[i + 1:j])
            i = j
        if segs:
            reqs = list(map(_ARGS, segs))
            if list(map(self._lens.get, chain.from_iterable(map(_HEADERS, segs)))) == \
                    list(map(len, chain.from_iterable(reqs))):
                self._pos = pos + len(window) - sum(map(len, toks[i:])) - 2 * (last - i)
                ready = self._ready
                ready.extend(reqs)
                return ready
        if segs or not whole:  # not what the fast path reads: leave the window to the exact reader
            self._exact_until = pos + len(window)
        return None

    def _done(self, pos: int) -> None:
        """The request ends at `pos`: ready for the next."""
        self._pos = pos
        self._type = _NONE
        self._count = 0
        self._bulk = -1
        self._args = []
        self._taken = 0
        self._scan = 0
        self._stuck = False

    def _line_end(self, buf, pos: int, end: int, char: bytes) -> int:
        """Where the line at `pos` ends (its `char`), as Redis's strchr finds it; -1: not yet."""
        if self._stuck:
            return -1
        start = pos + self._scan
        nl = buf.find(char, start)
        if buf.find(b"\0", start, nl if nl >= 0 else end) >= 0:
            self._stuck = True  # strchr stops at the NUL: this line never ends
            return -1
        if nl < 0:
            self._scan = end - pos
        return nl

    def _step(self, buf, end: int) -> list[bytes] | None:
        """Read on in the current request: its arguments ([] for one Redis skips), or None."""
        pos = self._pos
        if self._type == _NONE:
            self._type = _MULTIBULK if buf[pos] == 0x2A else _INLINE
        if self._type == _INLINE:
            if self._scan == 0 and not self._stuck:
                m = _BLANK_LINES.match(buf, pos)
                if m is not None:  # blank lines: requests of no arguments
                    self._done(m.end())
                    return []
            nl = self._line_end(buf, pos, end, b"\n")
            if nl < 0:
                if end - pos > MAX_INLINE:
                    raise ProtocolError("too big inline request")
                return None
            stop = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            line = bytes(buf[pos:stop])
            self._done(nl + 1)
            return split_inline(line)

        taken = 0
        if self._count == 0:  # the count line
            nl = self._line_end(buf, pos, end, b"\r")
            if nl < 0:
                if end - pos > MAX_INLINE:
                    raise ProtocolError("too big mbulk count string")
                return None
            if nl + 2 > end:  # Redis wants a byte after the CR (and skips it unseen)
                self._scan = nl - pos
                return None
            count = string2ll(bytes(buf[pos + 1:nl])) if nl - pos <= 21 else None
            if count is None or count > INT_MAX:
                raise ProtocolError("invalid multibulk length")
            if count > 10 and self.unauthenticated:
                raise ProtocolError("unauthenticated multibulk length")
            taken = nl + 2 - pos
            pos = nl + 2
            self._scan = 0
            if count <= 0:
                self._done(pos)
                return []
            self._count = count
        count, bulk, args = self._count, self._bulk, self._args
        start = pos
        while count:
            if bulk < 0:  # the bulk's header
                nl = self._line_end(buf, pos, end, b"\r")
                if nl < 0:
                    if end - pos > MAX_INLINE:
                        raise ProtocolError("too big bulk count string")
                    break
                if nl + 2 > end:
                    self._scan = nl - pos
                    break
                if buf[pos] != 0x24:
                    raise ProtocolError(f"expected '$', got '{chr(buf[pos])}'")
                bulk = string2ll(bytes(buf[pos + 1:nl])) if nl - pos <= 21 else None
                if bulk is None or bulk < 0 or bulk > self.max_bulk:
                    raise ProtocolError("invalid bulk length")
                if bulk > 16384 and self.unauthenticated:
                    raise ProtocolError("unauthenticated bulk length")
                pos = nl + 2
                self._scan = 0
            if end - pos < bulk + 2:
                break
            args.append(bytes(buf[pos:pos + bulk]))
            pos += bulk + 2
            bulk = -1
            count -= 1
        if count == 0:
            self._done(pos)
            return args
        self._count, self._bulk = count, bulk
        self._taken += taken + pos - start
        self._pos = pos
        return None
