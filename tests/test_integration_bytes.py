"""Byte-exactness: the same RESP request through the proxy and directly gives the same
reply bytes (for replies that carry no key names), in RESP2 and RESP3.

The proxy (namespace `ns`) runs over db A; the direct connection runs the same commands
with `ns:` written out, in db B, so both sides see identical data."""

from __future__ import annotations

import pytest

from integration_helpers import Raw, direct

P = "{p}"

# Commands whose replies name no key; `{p}` is "" through the proxy and "ns:" directly.
COMMANDS = [
    ("SET", "{p}k", "v"), ("GET", "{p}k"), ("GET", "{p}missing"), ("SET", "{p}k", "v2", "GET"),
    ("SET", "{p}k", "v3", "NX"), ("SET", "{p}k2", "x", "NX", "GET"), ("APPEND", "{p}k", "++"),
    ("INCRBYFLOAT", "{p}f", "1.5"), ("INCR", "{p}n"), ("MGET", "{p}k", "{p}nope", "{p}n"),
    ("HSET", "{p}h", "a", "1", "b", "2"), ("HGETALL", "{p}h"), ("HMGET", "{p}h", "a", "zz"),
    ("HGETALL", "{p}nohash"), ("HSTRLEN", "{p}h", "a"),
    ("ZADD", "{p}z", "1.5", "m", "2", "n", "-3e10", "o"), ("ZSCORE", "{p}z", "m"), ("ZSCORE", "{p}z", "nosuch"),
    ("ZRANGE", "{p}z", "0", "-1", "WITHSCORES"), ("ZADD", "{p}z", "INCR", "1", "n"), ("ZMSCORE", "{p}z", "m", "x"),
    ("ZPOPMIN", "{p}z"), ("ZRANK", "{p}z", "n", "WITHSCORE"),
    ("SADD", "{p}s", "x", "y"), ("SMEMBERS", "{p}s"), ("SISMEMBER", "{p}s", "x"), ("SMISMEMBER", "{p}s", "x", "q"),
    ("LPOP", "{p}nolist"), ("LPOP", "{p}nolist", "2"), ("RPUSH", "{p}l", "a", "b", "c"),
    ("LRANGE", "{p}l", "0", "-1"), ("LPOS", "{p}l", "zz"), ("LPOP", "{p}l", "2"),
    ("EXISTS", "{p}k", "{p}h", "{p}none"), ("TYPE", "{p}h"), ("TYPE", "{p}none"), ("TTL", "{p}k"),
    ("PTTL", "{p}none"), ("OBJECT", "ENCODING", "{p}h"), ("GET", "{p}h"), ("INCR", "{p}k"),
    ("XADD", "{p}x", "1-0", "f", "v"), ("XADD", "{p}x", "2-0", "g", "w"), ("XRANGE", "{p}x", "-", "+"),
    ("XLEN", "{p}x"), ("XINFO", "STREAM", "{p}x"),
    ("PFADD", "{p}hll", "a", "b"), ("PFCOUNT", "{p}hll"),
    ("GEOADD", "{p}geo", "13.361389", "38.115556", "Palermo"), ("GEOPOS", "{p}geo", "Palermo", "Nowhere"),
    ("GEODIST", "{p}geo", "Palermo", "Palermo"),
    ("EVAL", "return {1, 2, {3, 'x'}, redis.call('GET', KEYS[1])}", "1", "{p}k"),
    ("EVAL", "return redis.call('HGETALL', KEYS[1])", "1", "{p}h"),
    ("EVAL", "redis.setresp(3); return redis.call('HGETALL', KEYS[1])", "1", "{p}h"),
    ("EVAL", "redis.setresp(3); return redis.call('ZSCORE', KEYS[1], 'n')", "1", "{p}z"),
    ("EVAL", "redis.setresp(3); return {double=3.5}", "0"),
    ("EVAL", "redis.setresp(3); return {big_number='1234567890123456789012345678901234567890'}", "0"),
    ("EVAL", "redis.setresp(3); return {verbatim_string={format='txt', string='hi'}}", "0"),
    ("EVAL", "redis.setresp(3); return {map={a=1}}", "0"),
    ("EVAL", "redis.setresp(3); return {set={a=true}}", "0"),
    ("EVAL", "return redis.error_reply('MYERR custom')", "0"),
    ("EVAL", "return {err='x'}", "0"),
    ("LOLWUT",), ("LOLWUT", "VERSION", "6", "1", "1"), ("ECHO", ""), ("PING",), ("PING", "hi"),
    ("GETRANGE", "{p}none", "0", "-1"), ("STRLEN", "{p}none"),
    ("SET",), ("GET", "{p}a", "b"),  # arity errors come from the server
]


def fill(cmd, prefix):
    return tuple(a.replace(P, prefix) for a in cmd)


@pytest.fixture
def pair(server, fresh_db, start_proxy):
    other = fresh_db % 15 + 1
    d = direct(server, other)
    d.flushdb()
    d.close()
    # policy app: the byte-for-byte cases include scripts' replies (tenant refuses scripts)
    proxy = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns",
                         "--policy", "app"])
    through = Raw("127.0.0.1", proxy.port)
    straight = Raw(server.host, server.port)
    assert straight.call("SELECT", str(other)) == b"+OK\r\n"
    yield through, straight
    through.close()
    straight.close()


def run_both(through, straight, commands):
    through.send(*[fill(c, "") for c in commands])
    straight.send(*[fill(c, "ns:") for c in commands])
    return through.read(len(commands)), straight.read(len(commands))


def assert_same(commands, got, want):
    for c, g, w in zip(commands, got, want):
        assert g == w, f"{c[:3]}: through the proxy {g[:200]!r} != direct {w[:200]!r}"


def test_same_bytes_resp2_and_resp3(pair):
    through, straight = pair
    got, want = run_both(through, straight, COMMANDS)
    assert_same(COMMANDS, got, want)
    # the RESP2 side really had RESP2 shapes
    assert want[2] == b"$-1\r\n" and want[0] == b"+OK\r\n"
    h3 = [through.call("HELLO", "3"), straight.call("HELLO", "3")]
    assert h3[0][:1] == h3[1][:1] == b"%"
    assert through.call("FLUSHDB") == straight.call("FLUSHDB") == b"+OK\r\n"
    got, want = run_both(through, straight, COMMANDS)
    assert_same(COMMANDS, got, want)
    by_cmd = dict(zip([fill(c, "ns:") for c in COMMANDS], want))
    assert want[2] == b"_\r\n"
    assert by_cmd[("HGETALL", "ns:h")].startswith(b"%2\r\n")
    assert by_cmd[("ZSCORE", "ns:z", "m")] == b",1.5\r\n"
    assert by_cmd[("SMEMBERS", "ns:s")].startswith(b"~2\r\n")
    assert by_cmd[("LOLWUT",)].startswith(b"=")
    assert any(w.startswith(b"(") for w in want)
    # HELLO 2 goes back to RESP2 shapes on both sides
    through.call("HELLO", "2")
    straight.call("HELLO", "2")
    cmds = [("GET", "{p}missing"), ("HGETALL", "{p}h"), ("ZSCORE", "{p}z", "m"), ("LOLWUT",)]
    got, want = run_both(through, straight, cmds)
    assert_same(cmds, got, want)
    assert want[0] == b"$-1\r\n"


def test_same_bytes_info_and_verbatim_shapes(pair):
    through, straight = pair
    for proto in ("2", "3"):
        through.call("HELLO", proto)
        straight.call("HELLO", proto)
        for cmd in (("INFO", "server"), ("CLIENT", "INFO"), ("MEMORY", "DOCTOR")):
            g, w = through.call(*cmd), straight.call(*cmd)
            assert g[:1] == w[:1], cmd
            if proto == "3" and cmd[0] != "MEMORY":
                assert g.split(b"\r\n", 1)[1][:4] == w.split(b"\r\n", 1)[1][:4] == b"txt:", cmd


def test_debug_protocol_on_transparent_route(server, fresh_db, start_proxy):
    proxy = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}"])
    through = Raw("127.0.0.1", proxy.port)
    straight = Raw(server.host, server.port)
    straight.call("SELECT", str(fresh_db))
    kinds = ["string", "integer", "double", "bignum", "null", "array", "set", "map", "attrib",
             "push", "verbatim", "true", "false"]
    for proto in ("2", "3"):
        through.call("HELLO", proto)
        straight.call("HELLO", proto)
        for kind in kinds:
            cmd = ("DEBUG", "PROTOCOL", kind)
            if kind == "push":
                # a push then the reply; read both
                through.send(cmd)
                straight.send(cmd)
                n = 2 if proto == "3" else 1
                assert through.read(n) == straight.read(n), kind
                continue
            assert through.call(*cmd) == straight.call(*cmd), (proto, kind)
        assert through.call("PING") == b"+PONG\r\n"
    through.close()
    straight.close()
