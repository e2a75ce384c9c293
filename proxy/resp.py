"""RESP framing: what hiredis cannot do for a proxy.

Requests are read by `RequestReader` (proxy/request_reader.py, Redis's own
reading rules, re-exported here) and encoded by `hiredis.pack_command`. Replies are different: they must reach the client byte
for byte as the server sent them (hiredis returns `+OK` and `$2\\r\\nOK\\r\\n`
alike, knows no RESP3 attributes or blob errors, and does not say where a reply
ends), so replies are *framed*, not parsed: `frame_end` finds where one reply
ends, and the few replies that carry key names are split into their elements
(`split`), the names rewritten, and the rest of the bytes reused as they are.
"""

from __future__ import annotations

import hiredis

# Requests: Redis's limits (proto-max-bulk-len, client-query-buffer-limit,
# PROTO_INLINE_MAX_SIZE), the reader, and the error every RESP reader here raises.
from proxy.request_reader import (DEFAULT_MAX_BULK, DEFAULT_MAX_QUERY, MAX_INLINE,  # noqa: F401
                                  ProtocolError, RequestReader, split_inline)
from proxy.speedups import C

CRLF = b"\r\n"

MAX_DEPTH = 64  # deeper nesting than any real reply: refuse rather than recurse forever


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

    Stops at an incomplete reply and, with `stop_at_push` (a bool, or flags: 1 a push,
    2 an error), at a RESP3 push / an error reply."""
    m = 0
    flags = int(stop_at_push)  # a bool, or flags: 1 stop at a push, 2 stop at an error
    while m < limit and pending and pending[0] is None:
        if pos < len(buf) and ((flags & 1 and buf[pos] == 0x3E) or (flags & 2 and buf[pos] in (0x2D, 0x21))):
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
