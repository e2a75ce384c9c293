"""Helpers for the integration tests: clients for the proxy and the server, a raw RESP
socket with its own (independent) reply framer, TOML proxy configs, waits with timeouts."""

from __future__ import annotations

import itertools
import socket
import time

import redis

TIMEOUT = 10.0
_uniq = itertools.count(1)


def uniq(prefix: str = "t") -> str:
    """A name no other test uses (channels and functions are server-wide, not per db)."""
    return f"{prefix}{next(_uniq)}x{int(time.monotonic() * 1000) % 100000}"


def client(proxy, **kw) -> redis.Redis:
    kw.setdefault("socket_timeout", TIMEOUT)
    kw.setdefault("socket_connect_timeout", TIMEOUT)
    return redis.Redis(host="127.0.0.1", port=proxy.port, **kw)


def aclient(proxy, **kw):
    import redis.asyncio as aredis
    kw.setdefault("socket_timeout", TIMEOUT)
    kw.setdefault("socket_connect_timeout", TIMEOUT)
    return aredis.Redis(host="127.0.0.1", port=proxy.port, **kw)


def direct(server, db: int = 0, **kw) -> redis.Redis:
    kw.setdefault("socket_timeout", TIMEOUT)
    return redis.Redis(host=server.host, port=server.port, db=db, **kw)


def wait_for(pred, timeout: float = TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_blocked(server, n: int = 1, cmd: str | None = None):
    """Wait until `n` clients are blocked on the server (optionally in command `cmd`)."""
    d = direct(server)
    try:
        def blocked():
            clients = d.client_list()
            hits = [c for c in clients if "b" in c.get("flags", "")
                    and (cmd is None or c.get("cmd") == cmd)]
            return len(hits) >= n
        wait_for(blocked, what=f"{n} blocked client(s)")
    finally:
        d.close()


def proxy_toml(listeners: list[dict]) -> str:
    """TOML text for a list of listener dicts (values: str/int/bool; 'databases': {cdb: {..}})."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = []
    for entry in listeners:
        out.append("[[listener]]")
        dbs = entry.get("databases")
        for k, v in entry.items():
            if k != "databases":
                out.append(f"{k} = {val(v)}")
        if dbs:
            out.append("[listener.databases]")
            for cdb, spec in dbs.items():
                inner = ", ".join(f"{k} = {val(v)}" for k, v in spec.items())
                out.append(f'"{cdb}" = {{ {inner} }}')
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- raw RESP


def encode(*args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def frame_end(buf: bytes, pos: int = 0) -> int:
    """End of the RESP2/RESP3 frame at `pos`, or -1 if incomplete. Independent of proxy.resp."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return -1
    t = buf[pos:pos + 1]
    if t in (b"+", b"-", b":", b",", b"(", b"#", b"_"):
        return nl + 2
    n = int(buf[pos + 1:nl])
    if t in (b"$", b"=", b"!"):
        if n < 0:
            return nl + 2
        end = nl + 2 + n + 2
        return end if end <= len(buf) else -1
    if t in (b"*", b"~", b">", b"%", b"|"):
        if n < 0:
            return nl + 2
        count = 2 * n if t in (b"%", b"|") else n
        p = nl + 2
        for _ in range(count):
            p = frame_end(buf, p)
            if p < 0:
                return -1
        if t == b"|":  # an attribute precedes the reply it annotates
            p = frame_end(buf, p)
        return p
    raise AssertionError(f"not RESP: {buf[pos:pos + 40]!r}")


class Err(str):
    pass


def decode(raw: bytes):
    """Decode one raw frame to Python values (maps -> list of pairs kept as dict when hashable)."""
    v, end = _decode(raw, 0)
    assert end == len(raw), raw
    return v


def _decode(buf: bytes, pos: int):
    nl = buf.find(b"\r\n", pos)
    t, head = buf[pos:pos + 1], buf[pos + 1:nl]
    if t == b"+":
        return head, nl + 2
    if t == b"-":
        return Err(head.decode()), nl + 2
    if t in (b":", b"("):
        return int(head), nl + 2
    if t == b",":
        return float(head), nl + 2
    if t == b"#":
        return head == b"t", nl + 2
    if t == b"_":
        return None, nl + 2
    n = int(head)
    if t in (b"$", b"=", b"!"):
        if n < 0:
            return None, nl + 2
        s = buf[nl + 2:nl + 2 + n]
        return (Err(s.decode()) if t == b"!" else s), nl + 4 + n
    if n < 0:
        return None, nl + 2
    p = nl + 2
    items = []
    for _ in range(2 * n if t in (b"%", b"|") else n):
        v, p = _decode(buf, p)
        items.append(v)
    if t == b"%":
        return dict(zip(items[0::2], items[1::2])), p
    if t == b"|":
        return _decode(buf, p)
    return items, p


class Raw:
    """A plain socket speaking RESP; replies are returned as raw frames (bytes)."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, *cmds) -> None:
        self.sock.sendall(b"".join(c if isinstance(c, bytes) else encode(*c) for c in cmds))

    def read(self, n: int = 1) -> list[bytes]:
        out = []
        while len(out) < n:
            frame = self.next_frame()
            if frame is not None:
                out.append(frame)
                continue
            self.buf += self.receive(out, n)
        return out

    def next_frame(self) -> bytes | None:
        """The first whole frame in the buffer, taken out of it; None if none is whole yet."""
        end = frame_end(self.buf) if self.buf else -1
        if end <= 0:
            return None
        frame, self.buf = self.buf[:end], self.buf[end:]
        return frame

    def receive(self, out: list[bytes], n: int) -> bytes:
        """More bytes while `out` holds fewer than n frames (subclasses: deadlines, messages)."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise AssertionError(f"connection closed after {len(out)} of {n} replies")
        return data

    def call(self, *args) -> bytes:
        self.send(args)
        return self.read(1)[0]

    def value(self, *args):
        return decode(self.call(*args))

    def nothing_pending(self, wait: float = 0.0) -> bool:
        self.sock.settimeout(wait or 0.001)
        try:
            data = self.sock.recv(1 << 16)
            self.buf += data
        except (BlockingIOError, socket.timeout):
            pass
        finally:
            self.sock.settimeout(TIMEOUT)
        return not self.buf

    def close(self) -> None:
        self.sock.close()
