"""Bad input and faults: the offending connection gets a clear error (and is closed
where the stream cannot be trusted), while another connection, opened before,
keeps working with its data intact. Real servers and real proxy processes.
"""

from __future__ import annotations

import os
import signal
import select
import socket
import time

import pytest
import redis

from proxy.embedded import ServerStartError, free_port, start_server
from proxy.resp import frame_end, split

HANG = 10.0  # generous hang guard (seconds): a test waiting longer than this has failed


# ---------------------------------------------------------------- raw RESP client


def encode(*args) -> bytes:
    args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def bulk(v: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(v), v)


class Raw:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=HANG)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> bytes:
        """One reply frame; ConnectionError if the peer closes first."""
        while True:
            if self.buf:
                end = frame_end(self.buf, 0)
                if end >= 0:
                    f, self.buf = self.buf[:end], self.buf[end:]
                    return f
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError(f"closed; unread {self.buf[:200]!r}")
            self.buf += data

    def call(self, *args) -> bytes:
        self.send(encode(*args))
        return self.frame()

    def read_to_eof(self) -> bytes:
        """Everything until the peer closes (a hang past HANG fails the test)."""
        out, self.buf = self.buf, b""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return out
            if not data:
                return out
            out += data

    def is_closed(self, wait: float = HANG) -> bool:
        """True once the peer closed (reading and dropping nothing: data is an error)."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(HANG)
        assert not data, f"unexpected bytes {data[:200]!r}"
        return True

    def close(self) -> None:
        self.sock.close()


class Bystander:
    """A connection opened before the fault; it must keep working, its data intact."""

    def __init__(self, port: int, tag: bytes = b"by"):
        self.conn = Raw(port)
        self.key, self.value = b"bystander:" + tag, b"intact \r\n\xff" + tag
        assert self.conn.call(b"SET", self.key, self.value) == b"+OK\r\n"

    def check(self) -> None:
        assert self.conn.call(b"PING") == b"+PONG\r\n"
        assert self.conn.call(b"GET", self.key) == bulk(self.value)
        assert self.conn.call(b"ECHO", b"still here") == bulk(b"still here")


def expect_protocol_error(conn: Raw, message: bytes | None = None) -> bytes:
    """The connection's remaining output is one protocol error, then it is closed."""
    out = conn.read_to_eof()
    assert out.startswith(b"-ERR Protocol error: ") and out.endswith(b"\r\n") and out.count(b"\r\n") == 1, out
    if message is not None:
        assert out == b"-ERR Protocol error: " + message + b"\r\n"
    return out


def assert_proxy_healthy(proxy) -> None:
    assert proxy.process.poll() is None, proxy.output()
    assert "Traceback" not in proxy.output(), proxy.output()


@pytest.fixture
def upstream(server, fresh_db):
    return f"redis://{server.host}:{server.port}/{fresh_db}"


@pytest.fixture
def direct(server, fresh_db):
    r = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    yield r
    r.close()


@pytest.fixture
def dedicated(server):
    """A server of the test's kind that the test may kill or fill up."""
    started = []

    def start(port=None):
        try:
            s = start_server(server.kind, port=port)
        except ServerStartError as e:
            pytest.fail(f"cannot start {server.kind}: {e}")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ---------------------------------------------------------------- malformed requests

MALFORMED = [
    (b"*1\r\n:5\r\n", b"expected '$', got ':'"),     # not a bulk string
    (b"*1\r\n*1\r\n$1\r\na\r\n", b"expected '$', got '*'"),  # nested array
    (b"*1\r\n%1\r\n$1\r\na\r\n$1\r\nb\r\n", b"expected '$', got '%'"),  # a RESP3 map
    (b"*x\r\n", b"invalid multibulk length"),
    (b"*99999999999\r\n", b"invalid multibulk length"),
    (b"*1\r\n$abc\r\n", b"invalid bulk length"),
    (b"*1\r\n$-5\r\n", b"invalid bulk length"),
    (b"*1\r\n$99999999999\r\n", b"invalid bulk length"),
    (b'SET k "a b\r\n', b"unbalanced quotes in request"),
    (b"SET k 'a'b\r\n", b"unbalanced quotes in request"),
]


@pytest.mark.parametrize("data,message", MALFORMED, ids=[repr(d[:14]) for d, _ in MALFORMED])
def test_malformed_request_is_a_protocol_error(upstream, start_proxy, data, message):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    by = Bystander(proxy.port)
    bad = Raw(proxy.port)
    assert bad.call("SET", "a", "1") == b"+OK\r\n"
    bad.send(data)
    expect_protocol_error(bad, message)
    # In one packet with requests before it: those are answered in order, then the
    # error (worded by the parser that met it), then the close.
    bad = Raw(proxy.port)
    bad.send(encode("SET", "a", "1") + encode("GET", "a") + data)
    assert bad.frame() == b"+OK\r\n"
    assert bad.frame() == b"$1\r\n1\r\n"
    expect_protocol_error(bad, message)
    by.check()
    assert Raw(proxy.port).call("GET", "a") == b"$1\r\n1\r\n"
    assert_proxy_healthy(proxy)


def test_huge_bulk_length_after_other_requests_in_one_packet(upstream, start_proxy):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    bad = Raw(proxy.port)
    bad.send(encode("PING") + b"*1\r\n$99999999999\r\n")
    assert bad.frame() == b"+PONG\r\n"
    bad.sock.settimeout(2)
    try:
        out = bad.read_to_eof()
    except socket.timeout:
        out = b"<no reply>"
    assert out == b"-ERR Protocol error: invalid bulk length\r\n"


# The reader's words against redis-server's own, for the same bytes sent straight to it.
# None: Redis answers nothing yet (it waits for more), and so must the reader.
AGAINST_REDIS = [
    b"*1\r\n%1\r\n", b"*1\r\n:5\r\n", b"*1\r\n*1\r\n$1\r\na\r\n", b"*1\r\n+PING\r\n", b"*1\r\n\r\n",
    b"*1\r\n\n\r\n", b"*2147483648\r\n", b"*4294967295\r\n", b"*9223372036854775808\r\n", b"*x\r\n",
    b"*-0\r\n", b"*+1\r\n", b"*01\r\n", b"* 1\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$-0\r\n", b"*1\r\n$04\r\n",
    b"*1\r\n$abc\r\n", b"*1\r\n$536870913\r\n", b"*1\r\n$2000000000\r\n", b"*1\r\n$99999999999\r\n",
    b'SET k "a b\r\n', b"SET k 'a'b\r\n", b'ECHO a"b\r\n', b'ECHO "a\\"\r\n',
    b"*" + b"1" * 70000, b"*1\r\n$" + b"1" * 70000, b"x" * 70000, b"*1\x00" + b"x" * 70000,
    b"ECHO \x00" + b"x" * 70000 + b"\r\n",
    # Redis waits on these
    b"*2147483647\r\n", b"*1073741823\r\n", b"*1\r\n$536870912\r\n", b"*1\r\n%", b"*1\r\n%1",
    b"ECHO a\x00b\r\nPING\r\n", b"*1\x00\r\n$4\r\nPING\r\n", b"*1\r\n\x00$4\r\nPING\r\n",
]


@pytest.fixture(scope="module")
def redis7():
    import shutil
    if not shutil.which("redis-server") and os.environ.get("CI", "").lower() != "true":
        pytest.skip("no redis-server on PATH")
    s = start_server("redis")
    yield s
    s.stop()


def _redis_answer(port: int, data: bytes) -> bytes | None:
    """Redis's protocol error for `data`, or None if it answers nothing and waits."""
    conn = Raw(port)
    conn.send(data)
    conn.sock.settimeout(0.5)
    try:
        out = conn.read_to_eof()
    except socket.timeout:
        return None
    finally:
        conn.close()
    assert out.startswith(b"-ERR Protocol error: ") and out.count(b"\r\n") == 1, out
    return out


@pytest.mark.parametrize("data", AGAINST_REDIS, ids=[repr(d[:16]) for d in AGAINST_REDIS])
def test_reader_words_errors_as_redis_does(redis7, data):
    from proxy.resp import ProtocolError, RequestReader, error
    want = _redis_answer(redis7.port, data)
    r = RequestReader()
    r.feed(data)
    try:
        assert r.get() is None
        got = None
    except ProtocolError as e:
        got = error(f"ERR Protocol error: {e}")  # what the session sends
    assert got == want


def test_dollar_line_is_an_inline_command_as_in_redis(upstream, start_proxy):
    # Redis reads a request that does not start with '*' as an inline command:
    # `$abc` is the (unknown) command "$abc", an error reply, not a protocol error.
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    conn = Raw(proxy.port)
    conn.send(b"$abc\r\n")
    reply = conn.frame()
    assert reply.startswith(b"-ERR ") and b"$abc" in reply.lower(), reply
    assert conn.call("PING") == b"+PONG\r\n"


def test_truncated_request_then_close(upstream, start_proxy, direct):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    by = Bystander(proxy.port)
    for tail in (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc", b"*3\r\n$3\r\nSET\r\n$1", b"*3", b"SET k v"):
        bad = Raw(proxy.port)
        bad.send(tail)
        time.sleep(0.05)
        bad.sock.shutdown(socket.SHUT_WR)
        assert bad.read_to_eof() == b""  # nothing half-read is ever executed
        bad.close()
    by.check()
    assert direct.exists(b"ns:k") == 0 and direct.exists(b"k") == 0
    assert_proxy_healthy(proxy)


# ---------------------------------------------------------------- limits


def test_bulk_longer_than_max_bulk_len(upstream, start_proxy, direct):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns", "--max-bulk-len", "1000"])
    by = Bystander(proxy.port)
    big = b"x" * 2000

    # In the first arguments, in a later one, and with its header in a later packet.
    cases = [
        encode("SET", "k", big),
        encode("MSET", "k1", "v", "k2", "v", "k3", "v", "k4", "v", "k5", big),
    ]
    for data in cases:
        bad = Raw(proxy.port)
        bad.send(data)
        expect_protocol_error(bad, b"invalid bulk length")
    bad = Raw(proxy.port)
    bad.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n")
    time.sleep(0.1)
    bad.send(b"$2000\r\n" + big + b"\r\n")
    expect_protocol_error(bad, b"invalid bulk length")
    assert direct.keys("*") == [b"ns:bystander:by"]

    # At the limit is fine, and so is a long pipeline of small requests.
    ok = Raw(proxy.port)
    assert ok.call("SET", "k", b"y" * 1000) == b"+OK\r\n"
    assert ok.call("STRLEN", "k") == b":1000\r\n"
    n = 20000
    ok.send(b"".join(encode("SET", f"p{i % 100}", "v" * 100) for i in range(n)))
    for _ in range(n):
        assert ok.frame() == b"+OK\r\n"
    by.check()
    assert_proxy_healthy(proxy)


def test_query_buffer_limit(upstream, start_proxy, direct):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns", "--max-query-len", "10000"])
    by = Bystander(proxy.port)
    bad = Raw(proxy.port)
    bad.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$50000\r\n" + b"x" * 20000)  # never finished
    expect_protocol_error(bad, b"query buffer limit exceeded")
    bad = Raw(proxy.port)
    for _ in range(30):  # the same, trickled in, until the proxy answers (sending on would race its close)
        bad.send(b"*2\r\n$4\r\nECHO\r\n$50000\r\n" if _ == 0 else b"y" * 1000)
        if select.select([bad.sock], [], [], 0.02)[0]:
            break
    expect_protocol_error(bad, b"query buffer limit exceeded")
    assert direct.exists(b"ns:k") == 0

    # The limit is on one unfinished request, not on a pipeline of finished ones.
    ok = Raw(proxy.port)
    ok.send(encode("PING") * 5000)
    for _ in range(5000):
        assert ok.frame() == b"+PONG\r\n"
    assert ok.call("SET", "k", b"z" * 9000) == b"+OK\r\n"
    by.check()
    assert_proxy_healthy(proxy)


# ---------------------------------------------------------------- valid but unusual input

BINARY_KEYS = [b"k\r\nx", b"\r\n", b"\xff\xfe\x00bin", b"caf\xc3\xa9", b"\xc3(", b"sp ace", b"*?[", b"$5\r\n", b""]


def _scan_all(conn: Raw, *extra) -> list[bytes]:
    found, cursor = [], b"0"
    while True:
        head, (cur, batch) = split(conn.call(b"SCAN", cursor, b"COUNT", b"2", *extra))
        cursor = cur.split(b"\r\n")[1]
        found += [i.split(b"\r\n", 1)[1][:-2] for i in split(batch)[1]]
        if cursor == b"0":
            return found


@pytest.mark.parametrize("proto", [2, 3])
def test_binary_keys_round_trip(upstream, start_proxy, direct, proto):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    by = Bystander(proxy.port)
    conn = Raw(proxy.port)
    if proto == 3:
        assert conn.call("HELLO", "3").startswith(b"%")
    for i, k in enumerate(BINARY_KEYS):
        assert conn.call(b"SET", k, k + b"\x00value\r\n%d" % i) == b"+OK\r\n"
    for i, k in enumerate(BINARY_KEYS):
        assert conn.call(b"GET", k) == bulk(k + b"\x00value\r\n%d" % i)
    head, items = split(conn.call(b"KEYS", b"*"))
    names = sorted(i.split(b"\r\n", 1)[1][:-2] for i in items)
    assert names == sorted(BINARY_KEYS + [by.key])
    head, items = split(conn.call(b"KEYS", b"k\r\n*"))
    assert items == [bulk(b"k\r\nx")]
    assert sorted(set(_scan_all(conn))) == sorted(BINARY_KEYS + [by.key])
    assert sorted(set(_scan_all(conn, b"MATCH", b"\\*\\?\\[*"))) == [b"*?["]
    assert sorted(direct.keys("*")) == sorted(b"ns:" + k for k in BINARY_KEYS + [by.key])
    assert conn.call(b"DEL", *BINARY_KEYS) == b":%d\r\n" % len(BINARY_KEYS)
    by.check()


INLINE = [b"PING\r\n", b'SET k "a b"\r\n', b"GET k\r\n", b"GET k\n", b"\r\n", b"  EXISTS   k  k \r\n",
          b"SET k2 'it\\'s'\r\n", b'GET "k\\x32"\r\n', b"STRLEN k2\r\n", b"ECHO \"tab\\there\"\r\n",
          b"INCR k\r\n", b"DEL k k2\r\n", b"GET k\r\n"]


def test_inline_commands_typed_by_hand(server, fresh_db, upstream, start_proxy):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    by = Bystander(proxy.port)
    p, d = Raw(proxy.port), Raw(server.port)
    assert d.call("SELECT", fresh_db) == b"+OK\r\n"
    d.call("DEL", "k", "k2")
    for line in INLINE:  # one line per packet, as typed
        p.send(line)
        d.send(line)
        if line.strip():
            got, want = p.frame(), d.frame()
            assert got == want, (line, got, want)
    # All at once: the same bytes again.
    p.send(b"".join(INLINE))
    d.send(b"".join(INLINE))
    for line in INLINE:
        if line.strip():
            got, want = p.frame(), d.frame()
            assert got == want, (line, got, want)
    by.check()


# ---------------------------------------------------------------- upstream faults


def test_upstream_killed_mid_pipeline(dedicated, start_proxy):
    s = dedicated()
    port = s.port
    proxy = start_proxy(["--upstream", f"redis://127.0.0.1:{port}/3", "--namespace", "ns"])
    idle = Raw(proxy.port)
    assert idle.call("PING") == b"+PONG\r\n"
    conn = Raw(proxy.port)
    conn.send(b"".join(encode("SET", f"k{i}", f"value-{i}") for i in range(50)))
    for _ in range(50):
        assert conn.frame() == b"+OK\r\n"

    # 500 GETs answered, then a BLPOP that blocks, then 500 GETs stuck behind it.
    gets = [encode("GET", f"k{i % 50}") for i in range(1000)]
    conn.send(b"".join(gets[:500]) + encode("BLPOP", "q", "30") + b"".join(gets[500:]))
    for i in range(500):
        assert conn.frame() == bulk(b"value-%d" % (i % 50))
    # A second connection streams many replies while the server dies; a BLPOP in
    # the middle keeps the later ones unanswered at the server.
    stream = Raw(proxy.port)
    n, blocked_at = 20000, 10000
    stream.send(b"".join(encode("GET", f"k{i % 50}") if i != blocked_at else encode("BLPOP", "q2", "30")
                         for i in range(n)))
    for i in range(100):
        assert stream.frame() == bulk(b"value-%d" % (i % 50))
    time.sleep(0.2)  # the BLPOP has reached the server

    s.process.kill()  # SIGKILL
    s.process.wait(HANG)
    t0 = time.monotonic()
    errors = 0
    for _ in range(501):  # BLPOP and the 500 GETs behind it
        reply = conn.frame()
        assert reply.startswith(b"-ERR upstream unavailable"), reply
        errors += 1
    assert conn.is_closed()
    # Each reply is its own request's or the error; after the first error, only errors.
    failed = False
    for i in range(100, n):
        reply = stream.frame()
        if reply.startswith(b"-ERR upstream unavailable"):
            failed = True
        else:
            assert not failed, f"reply {reply!r} at {i} after an error"
            assert reply == bulk(b"value-%d" % (i % 50)), (i, reply)
    assert failed  # the BLPOP and what follows it, at least
    assert stream.is_closed()
    assert time.monotonic() - t0 < HANG  # hang guard, not a performance claim
    # The idle connection lost its upstream too: an error or a close, never a hang.
    try:
        reply = idle.call("PING")
        assert reply.startswith(b"-ERR upstream unavailable"), reply
    except (ConnectionError, OSError):
        pass

    # The server comes back on the same port: a new connection works, once the proxy's
    # reconnect loop has had an answer (issue 13: an upstream that could not be reached
    # is marked down and retried with backoff; meanwhile requests fail at once, saying so).
    s2 = dedicated(port=port)
    assert s2.port == port
    deadline = time.monotonic() + HANG
    while True:
        fresh = Raw(proxy.port)
        reply = fresh.call("SET", "after", "restart")
        if reply == b"+OK\r\n" or time.monotonic() > deadline:
            break
        assert reply.startswith(b"-ERR upstream unavailable") and reply.endswith(b"; reconnecting)\r\n"), reply
        time.sleep(0.05)
    assert reply == b"+OK\r\n"
    assert fresh.call("GET", "after") == b"$7\r\nrestart\r\n"
    assert redis.Redis(port=port, db=3).get("ns:after") == b"restart"
    assert_proxy_healthy(proxy)


def test_upstream_unreachable_at_connect(start_proxy):
    closed_port = free_port()
    proxy = start_proxy(["--upstream", f"redis://127.0.0.1:{closed_port}/0", "--namespace", "ns"])
    # A request sent at once gets the error.
    conn = Raw(proxy.port)
    conn.send(encode("PING"))
    out = conn.read_to_eof()
    assert out.startswith(b"-ERR upstream unavailable (cannot connect to 127.0.0.1:%d" % closed_port), out
    # So does one sent after the proxy found out (the error is waiting, then the close).
    conn = Raw(proxy.port)
    time.sleep(0.3)
    try:
        conn.send(encode("PING"))
    except OSError:
        pass
    out = conn.read_to_eof()
    assert out.startswith(b"-ERR upstream unavailable (cannot connect"), out
    # A pipeline: every request gets it, in order.
    conn = Raw(proxy.port)
    conn.send(encode("SET", "a", "1") + encode("GET", "a") + encode("FLUSHALL") + encode("PING"))
    out = conn.read_to_eof()
    frames = []
    while out:
        e = frame_end(out, 0)
        frames.append(out[:e])
        out = out[e:]
    assert len(frames) == 4, frames
    assert frames[2].startswith(b"-ERR command 'FLUSHALL' is refused"), frames
    for f in frames[:2] + frames[3:]:
        assert f.startswith(b"-ERR upstream unavailable"), f
    with pytest.raises(redis.exceptions.RedisError, match="upstream unavailable"):
        redis.Redis(port=proxy.port, socket_timeout=HANG).ping()
    assert_proxy_healthy(proxy)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_does_not_read(dedicated, start_proxy):
    s = dedicated()
    proxy = start_proxy(["--upstream", f"redis://127.0.0.1:{s.port}/0", "--namespace", "ns"])
    by = Bystander(proxy.port)
    assert Raw(proxy.port).call("SET", "bigkey", b"v" * (1 << 20)) == b"+OK\r\n"
    base = _rss_kb(proxy.process.pid)

    hog = socket.create_connection(("127.0.0.1", proxy.port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    n = 800  # 800 MB of replies owed
    hog.sendall(encode("GET", "bigkey") * n)
    peak = base
    for _ in range(30):
        time.sleep(0.1)
        peak = max(peak, _rss_kb(proxy.process.pid))
        by.check()
    assert (peak - base) < 300 * 1024, f"proxy RSS grew by {(peak - base) // 1024} MB"
    # The hog did get (some of) its replies, in order, once it reads.
    hog.settimeout(HANG)
    first = b""
    while len(first) < 20:
        first += hog.recv(20 - len(first))
    assert first.startswith(b"$1048576\r\nvvvv")
    hog.close()
    by.check()
    assert_proxy_healthy(proxy)


def test_refused_command_keeps_its_position_in_a_pipeline(upstream, start_proxy, direct):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns"])
    direct.set(b"foreign", b"keep me")
    by = Bystander(proxy.port)
    conn = Raw(proxy.port)
    cmds = [("SET", "a", "1"), ("FLUSHALL",), ("GET", "a"), ("BLPOP", "q", "0.05"), ("FLUSHALL", "ASYNC"),
            ("DBSIZE",), ("SWAPDB", "0", "1"), ("KEYS", "a*"), ("FLUSHALL",), ("PING",)]
    conn.send(b"".join(encode(*c) for c in cmds))
    replies = [conn.frame() for _ in cmds]
    assert replies[0] == b"+OK\r\n"
    assert replies[1].startswith(b"-ERR command 'FLUSHALL' is refused"), replies
    assert replies[2] == b"$1\r\n1\r\n"
    assert replies[3] == b"*-1\r\n"
    assert replies[4].startswith(b"-ERR command 'FLUSHALL' is refused"), replies
    assert replies[5] == b":2\r\n"  # a and the bystander's key
    assert replies[6].startswith(b"-ERR command 'SWAPDB' is refused"), replies
    assert replies[7] == b"*1\r\n$1\r\na\r\n"
    assert replies[8].startswith(b"-ERR command 'FLUSHALL' is refused"), replies
    assert replies[9] == b"+PONG\r\n"
    assert conn.call("PING") == b"+PONG\r\n"  # a refusal does not close the connection
    assert direct.get(b"foreign") == b"keep me"
    by.check()


def test_sigterm_stops_cleanly(upstream, start_proxy, direct):
    proxy = start_proxy(["--upstream", upstream, "--namespace", "ns", "--drain-timeout", "5"])
    idle = Raw(proxy.port)
    assert idle.call("PING") == b"+PONG\r\n"
    waiting = Raw(proxy.port)
    waiting.send(encode("BLPOP", "q", "1"))
    pushed = Raw(proxy.port)
    pushed.send(encode("BLPOP", "q2", "3"))
    time.sleep(0.2)  # both BLPOPs are at the server
    t0 = time.monotonic()
    os.kill(proxy.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    direct.rpush(b"ns:q2", b"x")  # answered while the proxy drains
    # Each reply in flight is delivered whole, or the connection is closed; nothing else.
    out = waiting.read_to_eof()
    assert out in (b"", b"*-1\r\n"), out
    out = pushed.read_to_eof()
    assert out in (b"", b"*2\r\n$2\r\nq2\r\n$1\r\nx\r\n"), out
    assert idle.read_to_eof() == b""
    assert proxy.process.wait(HANG + 5) == 0, proxy.output()
    assert time.monotonic() - t0 < 5 + HANG  # drain timeout, plus a generous hang guard
    assert "stopped" in proxy.output()
    assert "Traceback" not in proxy.output(), proxy.output()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
