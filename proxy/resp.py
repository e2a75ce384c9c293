"""RESP framing: what hiredis cannot do for a proxy.

Requests are parsed by hiredis (`RequestReader`) and encoded by
`hiredis.pack_command`. Replies are different: they must reach the client byte
for byte as the server sent them (hiredis returns `+OK` and `$2\\r\\nOK\\r\\n`
alike, knows no RESP3 attributes or blob errors, and does not say where a reply
ends), so replies are *framed*, not parsed: `frame_end` finds where one reply
ends, and the few replies that carry key names are split into their elements
(`split`), the names rewritten, and the rest of the bytes reused as they are.
"""

from __future__ import annotations

import re

import hiredis

from proxy.speedups import C

CRLF = b"\r\n"

# Redis's own limits (proto-max-bulk-len, client-query-buffer-limit).
DEFAULT_MAX_BULK = 512 * 1024 * 1024
DEFAULT_MAX_QUERY = 1024 * 1024 * 1024
MAX_INLINE = 64 * 1024  # PROTO_INLINE_MAX_SIZE
MAX_DEPTH = 64  # deeper nesting than any real reply: refuse rather than recurse forever


class ProtocolError(Exception):
    """The peer sent bytes that are not RESP. The message reads well after `Protocol error: `."""


# Reply type bytes.
_LINE = frozenset(b"+-:,(#_")      # one line, no payload
_BLOB = frozenset(b"$=!")          # length-prefixed payload
_AGG = frozenset(b"*~>")           # count elements
_PAIRS = frozenset(b"%|")          # count pairs


def _frame_end(buf: bytes | bytearray, pos: int = 0, depth: int = 0) -> int:
    """Index just past the reply that starts at `pos`, or -1 if it is incomplete.

    A RESP3 attribute (`|`) is framed together with the reply it annotates,
    so every frame is one reply (or one push). The reference implementation:
    `frame_end` is this, or the C framer where it gives an answer."""
    nl = buf.find(CRLF, pos)
    if nl < 0:
        if len(buf) - pos > MAX_INLINE:
            raise ProtocolError("too big reply header")
        return -1
    t = buf[pos]
    if t in _LINE:
        return nl + 2
    try:
        n = int(buf[pos + 1:nl])
    except ValueError:
        raise ProtocolError(f"invalid length in reply header {bytes(buf[pos:nl][:40])!r}") from None
    if t in _BLOB:
        if n < 0:
            return nl + 2
        end = nl + 4 + n
        return end if end <= len(buf) else -1
    if t in _AGG or t in _PAIRS:
        if n < 0:
            return nl + 2
        if depth > MAX_DEPTH:
            raise ProtocolError("reply nested too deeply")
        if t in _PAIRS:
            n *= 2
        p = nl + 2
        for _ in range(n):
            p = _frame_end(buf, p, depth + 1)
            if p < 0:
                return -1
        if t == 0x7C:  # '|': the attribute is followed by the reply it describes
            return _frame_end(buf, p, depth + 1)
        return p
    raise ProtocolError(f"unexpected reply type byte {chr(t)!r}")


def _frame_run(buf: bytes, pos: int, limit: int, stop_at_push: bool, pending) -> tuple[int, int]:
    """Frame up to `limit` replies from `pos` while `pending` (a deque) starts with
    None entries (replies passed on as they are), popping them: (end, how many).

    Stops at an incomplete reply and, with `stop_at_push`, at a RESP3 push."""
    m = 0
    while m < limit and pending and pending[0] is None:
        if stop_at_push and pos < len(buf) and buf[pos] == 0x3E:
            break
        end = _frame_end(buf, pos)
        if end < 0:
            break
        pending.popleft()
        pos = end
        m += 1
    return pos, m


if C is not None:
    _c_frame_end = C.frame_end
    frame_run = C.frame_run  # hands anything unusual back: the caller then calls frame_end

    def frame_end(buf: bytes | bytearray, pos: int = 0) -> int:
        """Index just past the reply at `pos`, -1 if incomplete (ProtocolError if not RESP)."""
        if type(buf) is bytes:
            end = _c_frame_end(buf, pos)
            if end != -2:  # -2: an error or unusual syntax, which the Python framer words
                return end
        return _frame_end(buf, pos)
else:
    frame_end = _frame_end
    frame_run = _frame_run


class PartialReply:
    """One reply that did not arrive whole, framed across reads in linear time.

    `feed(buf, pos)` consumes what it can of the reply from `buf[pos:]` and returns
    (position after what it consumed, done). Complete elements are skipped with
    frame_end; a blob still arriving is counted down by its length; an aggregate
    still arriving is entered, its remaining element counts kept on a stack. So no
    byte is scanned more than a few times, however the reply is chunked, and a
    512 MB bulk costs its bytes, not a re-scan per read. An unfinished header line
    (at most 64 KB) is the only thing held back: `feed` returns before it and the
    caller hands it in again with the next bytes.

    The caller decides what happens to the consumed bytes: forwarded at once
    (a reply that needs no rewriting) or collected whole (one that does)."""

    __slots__ = ("left", "blob", "depth")

    def __init__(self):
        self.left = [1]   # elements still to come at each open level (top: the reply itself)
        self.blob = 0     # payload bytes (CRLF included) of a blob still arriving
        self.depth = 0

    def feed(self, buf: bytes, pos: int) -> tuple[int, bool]:
        n = len(buf)
        left = self.left
        while True:
            if self.blob:
                take = min(self.blob, n - pos)
                pos += take
                self.blob -= take
                if self.blob:
                    return pos, False
            while left and left[-1] == 0:
                left.pop()
            if not left:
                return pos, True
            if pos >= n:
                return pos, False
            end = frame_end(buf, pos)
            if end >= 0:  # a whole element: skip it
                left[-1] -= 1
                pos = end
                continue
            nl = buf.find(CRLF, pos)
            if nl < 0:
                if n - pos > MAX_INLINE:
                    raise ProtocolError("too big reply header")
                return pos, False
            t = buf[pos]
            # frame_end validated the header; an element that is not whole is a
            # blob or an aggregate with a non-negative length
            count = int(buf[pos + 1:nl])
            left[-1] -= 1
            pos = nl + 2
            if t in _BLOB:
                self.blob = count + 2
            else:
                if len(left) > MAX_DEPTH:
                    raise ProtocolError("reply nested too deeply")
                if t == 0x7C:  # '|': the attribute is followed by the reply it describes
                    left[-1] += 1
                left.append(count * 2 if t in _PAIRS else count)


def split(raw: bytes) -> tuple[bytes, list[bytes]]:
    """Split one aggregate reply into its header line and its element frames.

    A leading attribute stays in the header. Non-aggregates give (raw, [])."""
    head = 0
    if raw[:1] == b"|":  # keep the attribute in front, split the value after it
        nl = raw.index(CRLF)
        head = nl + 2
        for _ in range(2 * int(raw[1:nl])):
            head = frame_end(raw, head)
    t = raw[head]
    if t not in _AGG and t not in _PAIRS:
        return raw, []
    nl = raw.index(CRLF, head)
    n = int(raw[head + 1:nl])
    if n < 0:
        return raw, []
    if t in _PAIRS:
        n *= 2
    items = []
    p = nl + 2
    for _ in range(n):
        e = frame_end(raw, p)
        items.append(raw[p:e])
        p = e
    return raw[:nl + 2], items


def join(header: bytes, items: list[bytes]) -> bytes:
    return header + b"".join(items)


def aggregate(kind: bytes, items: list[bytes]) -> bytes:
    """A new aggregate of `kind` (b'*', b'>', b'~') holding already-encoded items."""
    return kind + str(len(items)).encode() + CRLF + b"".join(items)


def string_value(raw: bytes) -> bytes | None:
    """The text of a bulk/simple/verbatim string frame; None for nil or other types."""
    t = raw[:1]
    if t == b"$":
        if raw[1:3] == b"-1":
            return None
        return raw[raw.index(CRLF) + 2:-2]
    if t == b"+":
        return raw[1:-2]
    if t == b"=":
        return raw[raw.index(CRLF) + 2 + 4:-2]  # skip the "txt:" format tag
    return None


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def replace_string(raw: bytes, value: bytes) -> bytes:
    """Re-encode a string frame with new text, keeping its type where RESP allows."""
    if raw[:1] == b"+" and CRLF not in value:
        return b"+" + value + CRLF
    return bulk(value)


def error(message: str | bytes) -> bytes:
    """An error reply. `message` starts with its code (ERR, WRONGTYPE, ...)."""
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    return b"-" + message.replace(b"\r", b" ").replace(b"\n", b" ") + CRLF


def is_error(raw: bytes) -> bool:
    return raw[:1] in (b"-", b"!")


OK = b"+OK\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


# ---------------------------------------------------------------- requests

pack_command = hiredis.pack_command


def encode_command(args: list[bytes]) -> bytes:
    """Encode a command as a RESP array of bulk strings."""
    # pack_command is C and handles bytes; it is the fast path for every request.
    return pack_command(tuple(args))


def _after_quote(line: bytes, i: int) -> int:
    """Past a closing quote at `i`: Redis wants a space (or the end) right after it."""
    i += 1
    if i < len(line) and not line[i:i + 1].isspace():
        raise ProtocolError("unbalanced quotes in request")
    return i


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command the way Redis's sdssplitargs does (quotes, escapes)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i:i + 1].isspace():
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        if line[i:i + 1] == b'"':
            i += 1
            while True:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i:i + 1]
                if c == b"\\" and i + 1 < n:
                    nxt = line[i + 1:i + 2]
                    if nxt == b"x" and i + 3 < n and _is_hex(line[i + 2:i + 4]):
                        cur += bytes([int(line[i + 2:i + 4], 16)])
                        i += 4
                        continue
                    cur += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"a": b"\a"}.get(nxt, nxt)
                    i += 2
                    continue
                if c == b'"':
                    i = _after_quote(line, i)
                    break
                cur += c
                i += 1
        elif line[i:i + 1] == b"'":
            i += 1
            while True:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i:i + 1]
                if c == b"\\" and line[i + 1:i + 2] == b"'":
                    cur += b"'"
                    i += 2
                    continue
                if c == b"'":
                    i = _after_quote(line, i)
                    break
                cur += c
                i += 1
        else:
            while i < n and not line[i:i + 1].isspace():
                cur += line[i:i + 1]
                i += 1
        args.append(bytes(cur))


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


def _canonical(data: bytes, req) -> bool:
    """Does `data` start with the plain bulk-string encoding of `req`?"""
    if type(req) is not list:
        return False
    try:
        return data.startswith(pack_command(tuple(req)))
    except (TypeError, ValueError):  # nested arrays and the like
        return False


# hiredis's words for a malformed length -> Redis's, so the error a client sees does
# not depend on where in a read the request fell (the header check, in Redis's words,
# runs only on a request that starts a read; see RequestReader._check_header).
_HIREDIS_WORDS = {
    "Bad bulk string length": "invalid bulk length",
    "Bulk string length out of range": "invalid bulk length",
    "Bad multi-bulk length": "invalid multibulk length",
    "Multi-bulk length out of range": "invalid multibulk length",
}


_REDIS_INT = re.compile(rb"-?(?:0|[1-9][0-9]{0,18})")


def _redis_int(text: bytes) -> int | None:
    """A length as Redis's string2ll reads it: no sign but '-', no leading zeros, no spaces."""
    return int(text) if _REDIS_INT.fullmatch(text) else None


class RequestReader:
    """Incremental parser of client requests: RESP arrays via hiredis, inline commands by line.

    `feed(data)` then `get()` until it returns None. Raises ProtocolError for
    bytes that are not a request; the connection must then be closed."""

    def __init__(self, max_bulk: int = DEFAULT_MAX_BULK, max_query: int = DEFAULT_MAX_QUERY):
        self._reader = hiredis.Reader(protocolError=ProtocolError, replyError=ProtocolError)
        self._pending = b""   # bytes not yet given to hiredis (we look at the first byte)
        self._in_hiredis = False
        self._buffered = 0    # bytes hiredis holds for an unfinished request
        self._first = None    # a chunk that starts a request, until its first request is checked
        # True when get() last returned None holding no part of a request: the next
        # bytes start a new one (the C path may then read them first).
        self.idle = True
        self.max_bulk = max_bulk
        self.max_query = max_query

    def feed(self, data: bytes) -> None:
        self.idle = False
        if self._pending:
            self._pending += data
        else:
            self._pending = data

    def get(self) -> list[bytes] | None:
        while True:
            if self._in_hiredis:
                try:
                    req = self._reader.gets()
                except (hiredis.ProtocolError, ProtocolError) as e:  # hiredis has its own class too
                    if self._first is not None:  # Redis's wording for what is wrong, where we can
                        first, self._first = self._first, None
                        self._check_header(first)
                    raise ProtocolError(_HIREDIS_WORDS.get(str(e), str(e))) from None
                if req is not False:
                    first = self._first
                    if first is not None:
                        self._first = None
                        # A canonical encoding (what every client library sends) proves the
                        # request was bulk strings only: no need to walk its headers.
                        if not _canonical(first, req):
                            self._check_header(first)
                    if not self._reader.has_data():
                        self._in_hiredis = False
                        self._buffered = 0
                    else:  # what is left belongs to the next requests (len() may count <1 KB more)
                        self._buffered = self._reader.len()
                    if not isinstance(req, list):
                        raise ProtocolError("expected an array of bulk strings")
                    if not req:
                        continue  # "*0\r\n": Redis ignores empty requests
                    for a in req:
                        if type(a) is not bytes:
                            raise ProtocolError("expected bulk strings in a request")
                        if len(a) > self.max_bulk:  # past the header check (late or later chunk)
                            raise ProtocolError("invalid bulk length")
                    return req
                # No request yet: hiredis holds part of one, even when has_data() is
                # False (it consumes type bytes and headers as it goes), so the next
                # bytes continue it and must not be read as an inline command.
                # The limit is on that unfinished request, not on a pipeline of
                # finished ones that came in the same chunk.
                if self._first is not None:  # an unfinished request: refuse absurd lengths now
                    first, self._first = self._first, None
                    self._check_header(first)
                if self._buffered > self.max_query:
                    raise ProtocolError("query buffer limit exceeded")
                if not self._pending:
                    return None
            pend = self._pending
            if not pend:
                self.idle = not self._in_hiredis
                return None
            if self._in_hiredis or pend[0] == 0x2A:  # '*'
                if self._in_hiredis:
                    self._check_growth()
                else:
                    self._first = pend  # checked once hiredis has had a look (see above)
                self._buffered += len(pend)
                self._pending = b""
                self._reader.feed(pend)
                self._in_hiredis = True
                continue
            nl = pend.find(b"\n")
            if nl < 0:
                if len(pend) > MAX_INLINE:
                    raise ProtocolError("too big inline request")
                return None
            line = pend[:nl]
            self._pending = pend[nl + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            args = split_inline(line)
            if args:
                return args

    def _check_growth(self) -> None:
        if self._buffered > self.max_bulk + MAX_INLINE:
            raise ProtocolError("invalid bulk length")

    def _check_header(self, data: bytes) -> None:
        """Refuse absurd lengths before hiredis waits for them, as Redis does.

        Only the headers of a request that starts this chunk are read (cheap and
        exact for the usual case); a request that grows past the limits over many
        chunks is caught by the buffered-bytes check in `get`."""
        nl = data.find(CRLF)
        if nl < 0:
            return
        n = _redis_int(data[1:nl])
        if n is None or n > 1024 * 1024 * 1024:
            raise ProtocolError("invalid multibulk length")
        p = nl + 2
        for _ in range(min(n, 8)):
            if data[p:p + 1] != b"$":
                if p < len(data):  # hiredis would take `+x` as a string; Redis wants `$`
                    raise ProtocolError(f"expected '$', got '{chr(data[p])}'")
                return  # incomplete
            nl = data.find(CRLF, p)
            if nl < 0:
                return
            size = _redis_int(data[p + 1:nl])
            if size is None or size > self.max_bulk or size < 0:
                raise ProtocolError("invalid bulk length")
            p = nl + 2 + size + 2
