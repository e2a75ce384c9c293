"""Integration through the proxy with redis-py against real servers: clients (sync/async,
RESP2/RESP3), pipelines, transactions, scripts, SORT, SCAN/KEYS, emulated commands."""

from __future__ import annotations

import asyncio

import pytest
import redis

from integration_helpers import Raw, aclient, client, direct, uniq


# ---------------------------------------------------------------- clients


def test_sync_client_basic(ns_proxy, d, proto):
    r = client(ns_proxy, protocol=proto)
    assert r.set("foo", "bar") is True
    assert r.get("foo") == b"bar"
    assert r.get("missing") is None
    r.mset({"a": 1, "b": 2})
    assert r.mget("a", "b", "nope") == [b"1", b"2", None]
    r.hset("h", mapping={"f1": "v1", "f2": "v2"})
    assert r.hgetall("h") == {b"f1": b"v1", b"f2": b"v2"}
    r.zadd("z", {"m": 1.5})
    assert r.zscore("z", "m") == 1.5
    assert r.exists("foo", "a", "nope") == 2
    assert r.rename("a", "a2") is True
    assert r.lmove("nolist", "other", "LEFT", "RIGHT") is None
    assert sorted(d.keys("*")) == [b"ns:a2", b"ns:b", b"ns:foo", b"ns:h", b"ns:z"]
    assert sorted(r.keys("*")) == [b"a2", b"b", b"foo", b"h", b"z"]
    r.close()


def test_async_client_basic(ns_proxy, d, proto):
    async def main():
        r = aclient(ns_proxy, protocol=proto)
        try:
            assert await r.set("foo", "bar") is True
            assert await r.get("foo") == b"bar"
            assert await r.incr("n") == 1
            async with r.pipeline(transaction=False) as p:
                for i in range(200):
                    p.set(f"k{i}", i)
                    p.get(f"k{i}")
                res = await p.execute()
            assert res[1::2] == [str(i).encode() for i in range(200)]
            async with r.pipeline(transaction=True) as p:
                p.rpush("q", "x", "y")
                p.blpop(["q"], timeout=1)
                p.keys("q*")
                res = await p.execute()
            assert res[0] == 2
            assert list(res[1]) == [b"q", b"x"]
            assert res[2] == [b"q"]
            assert sorted([k async for k in r.scan_iter(match="k1*", count=50)]) == \
                sorted(f"k{i}".encode() for i in range(200) if str(i).startswith("1"))
        finally:
            await r.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert d.get("ns:foo") == b"bar"
    assert d.exists("foo") == 0


# ---------------------------------------------------------------- pipelines and transactions


def test_deep_pipeline_keeps_order(ns_proxy, d, proto):
    d.set("other:k0", "foreign")
    d.rpush("ns:list", "a")
    r = client(ns_proxy, protocol=proto)
    p = r.pipeline(transaction=False)
    expected = []
    for i in range(1000):
        m = i % 5
        if m == 0:
            p.set(f"k{i}", i)
            expected.append(True)
        elif m == 1:
            p.get(f"k{i - 1}")
            expected.append(str(i - 1).encode())
        elif m == 2:
            p.incr("counter")
            expected.append(i // 5 + 1)
        elif m == 3:
            p.execute_command("FLUSHALL")  # refused by the proxy, in its position
            expected.append("refused")
        else:
            p.echo(f"e{i}")
            expected.append(f"e{i}".encode())
    p.rpush("list", "b")
    expected.append(2)
    p.blpop(["list"], timeout=1)
    expected.append("blpop")
    res = p.execute(raise_on_error=False)
    assert len(res) == len(expected)
    for got, exp in zip(res, expected):
        if exp == "refused":
            assert isinstance(got, redis.ResponseError) and "FLUSHALL" in str(got)
        elif exp == "blpop":
            assert list(got) == [b"list", b"a"]
        else:
            assert got == exp
    assert d.get("other:k0") == b"foreign"
    assert d.get("ns:k995") == b"995"
    r.close()


def test_multi_exec_strips_key_replies(ns_proxy, d, proto):
    d.set("other:x", "1")
    d.set("plain", "1")
    r = client(ns_proxy, protocol=proto)
    r.rpush("l1", "a", "b", "c")
    r.zadd("z1", {"m1": 1, "m2": 2})
    p = r.pipeline(transaction=True)
    p.blpop(["nolist", "l1"], timeout=1)
    p.execute_command("LMPOP", 2, "nolist", "l1", "LEFT", "COUNT", 1)
    p.execute_command("ZMPOP", 1, "z1", "MIN")
    p.execute_command("BRPOP", "l1", 1)
    p.execute_command("BZPOPMAX", "z1", 1)
    p.execute_command("SCAN", 0, "COUNT", 1000)
    p.keys("*")
    p.set("after", "1")
    res = p.execute()
    assert list(res[0]) == [b"l1", b"a"]
    assert res[1][0] == b"l1" and list(res[1][1]) == [b"b"]
    assert res[2][0] == b"z1"
    assert [list(x)[0] for x in res[2][1]] == [b"m1"]
    assert list(res[3]) == [b"l1", b"c"]
    assert list(res[4])[:2] == [b"z1", b"m2"]
    cursor, keys = res[5]
    assert int(cursor) == 0 and keys == []  # everything was popped: no key of ns left
    assert res[6] == []
    assert res[7] is True
    r.set("k", "v")
    res = r.pipeline(transaction=True).scan(0, count=1000).keys("*").execute()
    assert sorted(res[0][1]) == [b"after", b"k"]
    assert sorted(res[1]) == [b"after", b"k"]
    r.xadd("st", {"f": "v"}, id="1-0")
    d.xadd("st", {"f": "foreign"}, id="1-0")
    res = r.pipeline(transaction=True).xread({"st": 0}).get("k").execute()
    streams = dict(res[0]) if isinstance(res[0], list) else res[0]
    assert list(streams) == [b"st"] and res[1] == b"v"
    r.close()


def test_watch_conflict(ns_proxy, d, proto):
    r1 = client(ns_proxy, protocol=proto)
    r2 = client(ns_proxy, protocol=proto)
    r1.set("w", "0")
    # another proxied client modifies the watched key
    with r1.pipeline() as p:
        p.watch("w")
        assert p.get("w") == b"0"
        r2.set("w", "1")
        p.multi()
        p.set("w", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert r1.get("w") == b"1"
    # a direct (non-proxied) writer on the server key
    with r1.pipeline() as p:
        p.watch("w")
        d.set("ns:w", "direct")
        p.multi()
        p.set("w", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    # a write to the same client name in another namespace does not conflict
    with r1.pipeline() as p:
        p.watch("w")
        d.set("other:w", "x")
        d.set("w", "x")
        p.multi()
        p.set("w", "mine")
        assert p.execute() == [True]
    assert d.get("ns:w") == b"mine"
    r1.close()
    r2.close()


def test_multi_with_refused_command_aborts(ns_proxy, d):
    raw = Raw("127.0.0.1", ns_proxy.port)
    # (CONFIG GET of a parameter outside the tenant policy's safe list: maxmemory is on it)
    raw.send(("MULTI",), ("SET", "a", "1"), ("CONFIG", "GET", "requirepass"), ("INCR", "n"), ("EXEC",))
    multi, queued, refused, queued2, execr = raw.read(5)
    assert (multi, queued, queued2) == (b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n")
    assert refused.startswith(b"-ERR") and b"CONFIG" in refused
    assert execr.startswith(b"-EXECABORT")
    assert d.exists("ns:a", "ns:n") == 0
    assert raw.call("PING") == b"+PONG\r\n"
    assert raw.call("SET", "a", "2") == b"+OK\r\n"
    # DISCARD after a refusal: back to normal, nothing applied
    raw.send(("MULTI",), ("FLUSHALL",), ("DISCARD",), ("GET", "a"))
    assert raw.read(4)[2:] == [b"+OK\r\n", b"$1\r\n2\r\n"]
    raw.close()


# ---------------------------------------------------------------- scripts
# Scripts pass on `app` routes (a trusted application); `tenant`, the default on a
# namespaced route, refuses them unless the upstream user is fenced (test_policy.py).


@pytest.fixture
def app_proxy(server, fresh_db, start_proxy):
    """A proxy adding namespace `ns`, with policy app."""
    return start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns",
                        "--policy", "app"])


def test_lua_scripts_with_keys(app_proxy, d, proto):
    r = client(app_proxy, protocol=proto)
    assert r.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "lk", "v1") in (b"OK", "OK", True)
    assert d.get("ns:lk") == b"v1"
    assert r.eval("return redis.call('GET', KEYS[1])", 1, "lk") == b"v1"
    sha = r.script_load("return {redis.call('INCRBY', KEYS[1], ARGV[1]), redis.call('GET', KEYS[2])}")
    assert r.evalsha(sha, 2, "cnt", "lk", 5) == [5, b"v1"]
    assert r.evalsha(sha, 2, "cnt", "lk", 5) == [10, b"v1"]
    assert d.get("ns:cnt") == b"10"
    script = r.register_script("return redis.call('LPUSH', KEYS[1], ARGV[1])")
    assert script(keys=["sl"], args=["x"]) == 1
    assert d.lrange("ns:sl", 0, -1) == [b"x"]
    assert r.eval_ro("return redis.call('GET', KEYS[1])", 1, "lk") == b"v1"
    r.close()


def test_fcall(server, app_proxy, d):
    r = client(app_proxy)
    lib = uniq("lib")
    fn = uniq("fn")
    code = (f"#!lua name={lib}\n"
            f"redis.register_function('{fn}', function(keys, args) "
            f"redis.call('SET', keys[1], args[1]); return redis.call('GET', keys[1]) end)\n"
            f"redis.register_function{{function_name='{fn}_ro', callback=function(keys, args) "
            f"return redis.call('GET', keys[1]) end, flags={{'no-writes'}}}}")
    assert r.function_load(code, replace=True) in (lib.encode(), lib)
    try:
        assert r.fcall(fn, 1, "fk", "fv") == b"fv"
        assert d.get("ns:fk") == b"fv"
        assert r.fcall_ro(f"{fn}_ro", 1, "fk") == b"fv"
    finally:
        direct(server).function_delete(lib)
    r.close()


# ---------------------------------------------------------------- SORT


def test_sort_by_get_store(ns_proxy, d):
    r = client(ns_proxy)
    r.rpush("ids", 1, 2, 3)
    r.mset({"weight_1": 30, "weight_2": 10, "weight_3": 20})
    for i, name in ((1, "one"), (2, "two"), (3, "three")):
        r.hset(f"obj_{i}", mapping={"name": name, "w": 4 - i})
    # foreign keys with the same client names must not be used
    d.mset({"weight_1": 1, "weight_2": 2, "weight_3": 3, "other:weight_1": 0})
    assert r.sort("ids", by="weight_*") == [b"2", b"3", b"1"]
    assert r.sort("ids", by="weight_*", get=["#", "obj_*->name"]) == \
        [b"2", b"two", b"3", b"three", b"1", b"one"]
    assert r.sort("ids", by="obj_*->w", get="obj_*->name") == [b"three", b"two", b"one"]
    assert r.sort("ids", by="nosort", get="#") == [b"1", b"2", b"3"]
    assert r.sort("ids", by="weight_*", get="obj_*->name", store="sorted") == 3
    assert d.lrange("ns:sorted", 0, -1) == [b"two", b"three", b"one"]
    assert r.lrange("sorted", 0, -1) == [b"two", b"three", b"one"]
    assert r.sort_ro("ids", by="weight_*", get="#", desc=True) == [b"1", b"3", b"2"]
    assert r.execute_command("SORT", "ids", "LIMIT", 0, 2, "BY", "weight_*", "GET", "obj_*->name",
                             "DESC") == [b"one", b"three"]
    r.close()


# ---------------------------------------------------------------- SCAN / KEYS


def test_scan_to_the_end_returns_exactly_own_keys(ns_proxy, d, proto):
    foreign = d.pipeline(transaction=False)
    for i in range(1500):
        foreign.set(f"other:k{i}", 1)
        foreign.set(f"k{i}", 1)
        foreign.set(f"nsx:k{i}", 1)
    foreign.execute()
    r = client(ns_proxy, protocol=proto)
    p = r.pipeline(transaction=False)
    own = set()
    for i in range(1200):
        p.set(f"k{i}", 1)
        own.add(f"k{i}".encode())
    p.hset("hash", mapping={f"f{i}": i for i in range(50)})
    own.add(b"hash")
    p.execute()
    seen = []
    cursor = 0
    while True:
        cursor, batch = r.scan(cursor, count=100)
        seen += batch
        if int(cursor) == 0:
            break
    assert len(seen) == len(set(seen))  # no rehash in a quiet db: each key once
    assert set(seen) == own
    assert set(r.scan_iter(match="k11*", count=200)) == {k for k in own if k.startswith(b"k11")}
    assert set(r.scan_iter(_type="hash", count=500)) == {b"hash"}
    assert set(r.keys("*")) == own
    assert set(r.keys("k10?")) == {f"k10{i}".encode() for i in range(10)}
    assert len(dict(r.hscan_iter("hash", match="f1*"))) == 11
    r.close()


def test_keys_escapes_namespace_glob(server, fresh_db, start_proxy):
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}",
                     "--namespace", "a?[b]"])
    d = direct(server, fresh_db)
    d.set("a?[b]:k", 1)
    d.set("ax[b]:k2", 1)   # would match an unescaped glob
    d.set("ab:k3", 1)
    r = client(p)
    assert r.keys("*") == [b"k"]
    assert list(r.scan_iter()) == [b"k"]
    assert r.dbsize() == 1
    r.close()
    d.close()


# ---------------------------------------------------------------- emulated FLUSHDB / DBSIZE / RANDOMKEY


def test_flushdb_dbsize_randomkey(ns_proxy, d, proto):
    r = client(ns_proxy, protocol=proto)
    assert r.dbsize() == 0
    assert r.randomkey() is None
    p = d.pipeline(transaction=False)
    for i in range(300):
        p.set(f"other:f{i}", 1)
        p.set(f"f{i}", 1)
    p.execute()
    assert r.randomkey() is None
    r.set("only", 1)
    for _ in range(30):
        assert r.randomkey() == b"only"
    rp = r.pipeline(transaction=False)
    for i in range(2500):
        rp.set(f"mine{i}", 1)
    rp.execute()
    assert r.dbsize() == 2501
    for _ in range(20):
        k = r.randomkey()
        assert k == b"only" or k.startswith(b"mine"), k
    # pipelined around an emulation: order kept
    res = r.pipeline(transaction=False).set("x", 1).dbsize().get("x").flushdb().dbsize().execute()
    assert res == [True, 2502, b"1", True, 0]
    assert d.dbsize() == 600
    assert d.get("other:f0") == b"1" and d.get("f299") == b"1"
    r.set("y", 1)
    assert r.flushdb(asynchronous=True) is True
    assert r.dbsize() == 0 and d.dbsize() == 600
    r.close()


# ---------------------------------------------------------------- refusals and transparent routes


def test_refusals_name_command_and_route(ns_proxy, d):
    r = client(ns_proxy, single_connection_client=True)
    route = f"127.0.0.1:{ns_proxy.port}"
    for cmd, name in ((("FLUSHALL",), "FLUSHALL"), (("CONFIG", "GET", "requirepass"), "CONFIG GET"),
                      (("NOSUCHCOMMAND", "x"), "NOSUCHCOMMAND"), (("SWAPDB", 0, 1), "SWAPDB"),
                      (("OBJECT", "NOSUCHSUB", "k"), "OBJECT NOSUCHSUB")):
        with pytest.raises(redis.ResponseError) as e:
            r.execute_command(*cmd)
        msg = str(e.value)
        assert name in msg and route in msg and "ns" in msg, msg
        assert r.ping() is True
    d.set("keep", 1)
    assert d.get("keep") == b"1"
    assert r.set("a", 1) and r.get("a") == b"1"
    r.close()


def test_transparent_route_passes_unknown_commands(server, fresh_db, start_proxy):
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}"])
    d = direct(server, fresh_db)
    r = client(p, single_connection_client=True)
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("NOSUCHCOMMAND", "x")
    assert "unknown command" in str(e.value).lower() and "route" not in str(e.value)
    assert r.config_get("maxmemory") == {"maxmemory": "0"} or "maxmemory" in r.config_get("maxmemory")
    r.set("plain", "v")
    assert d.get("plain") == b"v"
    assert r.keys("*") == [b"plain"]
    assert r.dbsize() == 1
    assert r.randomkey() == b"plain"
    assert r.ping() is True
    r.close()
    d.close()
