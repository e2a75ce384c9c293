"""Blocking commands and streams through the proxy: one blocked client never delays
another, and the key names in replies come back in the client's names."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from integration_helpers import Raw, aclient, client, decode, wait_blocked


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by result()
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result(timeout=10):
        t.join(timeout)
        assert not t.is_alive(), "blocked call did not return"
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def test_blpop_blocked_client_does_not_delay_another(server, ns_proxy, d, proto):
    a = client(ns_proxy, protocol=proto)
    b = client(ns_proxy, protocol=proto)
    result = in_thread(lambda: a.blpop(["q0", "q1"], timeout=8))
    wait_blocked(server, 1, "blpop")
    t0 = time.monotonic()
    for i in range(50):
        assert b.set(f"x{i}", i) is True
        assert b.get(f"x{i}") == str(i).encode()
    assert time.monotonic() - t0 < 2.0
    # a foreign list with the same client name does not wake it
    d.rpush("q1", "foreign")
    d.rpush("other:q1", "foreign")
    assert b.rpush("q1", "v") == 1
    assert list(result()) == [b"q1", b"v"]
    assert d.lrange("q1", 0, -1) == [b"foreign"] and d.llen("other:q1") == 1
    assert a.blpop(["nothing"], timeout=0.05) is None
    a.close()
    b.close()


def test_brpop_bzpopmin_blmpop_bzmpop(server, ns_proxy, d, proto):
    r = client(ns_proxy, protocol=proto)
    r.rpush("l", "a", "b", "c")
    r.zadd("z", {"m1": 1, "m2": 2.5, "m3": 3})
    assert list(r.brpop(["none", "l"], timeout=1)) == [b"l", b"c"]
    got = r.bzpopmin(["none", "z"], timeout=1)
    assert list(got) == [b"z", b"m1", 1.0]
    assert list(r.bzpopmax(["z"], timeout=1)) == [b"z", b"m3", 3.0]
    got = r.execute_command("BLMPOP", 1, 2, "none", "l", "LEFT", "COUNT", 5)
    assert got[0] == b"l" and list(got[1]) == [b"a", b"b"]
    got = r.execute_command("BZMPOP", 1, 1, "z", "MIN")
    assert got[0] == b"z" and [[x[0], float(x[1])] for x in got[1]] == [[b"m2", 2.5]]
    assert r.execute_command("BLMPOP", 0.05, 1, "l", "LEFT") is None
    # blocked first, fed by another client afterwards
    other = client(ns_proxy, protocol=proto)
    result = in_thread(lambda: r.bzpopmin(["z2"], timeout=8))
    wait_blocked(server, 1, "bzpopmin")
    other.zadd("z2", {"late": 7})
    assert list(result()) == [b"z2", b"late", 7.0]
    result = in_thread(lambda: r.execute_command("BLMPOP", 8, 2, "la", "lb", "RIGHT"))
    wait_blocked(server, 1, "blmpop")
    other.rpush("lb", "x", "y")
    got = result()
    assert got[0] == b"lb" and list(got[1]) == [b"y"]
    r.close()
    other.close()


def test_blpop_async_clients_concurrently(server, ns_proxy, d):
    async def main():
        a, b, c = (aclient(ns_proxy) for _ in range(3))
        try:
            blocked = asyncio.ensure_future(a.blpop(["aq"], timeout=8))
            blocked2 = asyncio.ensure_future(b.brpop(["bq"], timeout=8))
            await asyncio.get_running_loop().run_in_executor(None, wait_blocked, server, 2)
            for i in range(20):
                assert await c.incr("cnt") == i + 1
            await c.rpush("bq", "b1")
            assert list(await asyncio.wait_for(blocked2, 5)) == [b"bq", b"b1"]
            assert not blocked.done()
            await c.rpush("aq", "a1")
            assert list(await asyncio.wait_for(blocked, 5)) == [b"aq", b"a1"]
        finally:
            for x in (a, b, c):
                await x.aclose()
    asyncio.run(asyncio.wait_for(main(), 30))


def first_entry(entries, proto):
    """redis-py gives [(id, fields)] per stream in RESP2 and [[(id, fields)]] in RESP3."""
    if proto == 3:
        entries = entries[0]
    return tuple(entries[0])


def test_xread_and_xreadgroup(server, ns_proxy, d, proto):
    r = client(ns_proxy, protocol=proto)
    r.xadd("s1", {"f": "1"}, id="1-0")
    r.xadd("s2", {"f": "2"}, id="1-0")
    d.xadd("s1", {"f": "foreign"}, id="1-0")
    got = r.xread({"s1": 0, "s2": 0})
    entries = dict(got) if isinstance(got, list) else got
    assert set(entries) == {b"s1", b"s2"}
    assert first_entry(entries[b"s1"], proto) == (b"1-0", {b"f": b"1"})
    r.xgroup_create("s1", "g", id="0")
    got = r.xreadgroup("g", "c1", {"s1": ">"}, count=10)
    entries = dict(got) if isinstance(got, list) else got
    assert list(entries) == [b"s1"]
    assert r.xinfo_groups("s1")[0]["name"] in (b"g", "g")
    # blocking XREAD woken by another client
    other = client(ns_proxy, protocol=proto)
    result = in_thread(lambda: r.xread({"s2": "$"}, block=8000))
    wait_blocked(server, 1, "xread")
    other.xadd("s2", {"f": "new"}, id="2-0")
    got = result()
    entries = dict(got) if isinstance(got, list) else got
    assert list(entries) == [b"s2"] and first_entry(entries[b"s2"], proto) == (b"2-0", {b"f": b"new"})
    assert r.xread({"s2": "$"}, block=50) in (None, [], {})
    r.close()
    other.close()


@pytest.mark.parametrize("resp", [2, 3])
def test_xread_raw_reply_shapes(ns_proxy, d, resp):
    raw = Raw("127.0.0.1", ns_proxy.port)
    dr = Raw("127.0.0.1", d.connection_pool.connection_kwargs["port"])
    dr.call("SELECT", d.connection_pool.connection_kwargs["db"])
    if resp == 3:
        raw.call("HELLO", "3")
        dr.call("HELLO", "3")
    raw.call("XADD", "sa", "1-0", "f", "v")
    raw.call("XADD", "sbb", "1-0", "f", "w")
    through = raw.call("XREAD", "STREAMS", "sa", "sbb", "0", "0")
    server_side = dr.call("XREAD", "STREAMS", "ns:sa", "ns:sbb", "0", "0")
    # same bytes with the names shortened by the prefix
    expected = server_side.replace(b"$5\r\nns:sa\r\n", b"$2\r\nsa\r\n").replace(b"$6\r\nns:sbb\r\n", b"$3\r\nsbb\r\n")
    assert through == expected
    assert through[:1] == (b"%" if resp == 3 else b"*")
    v = decode(through)
    assert (list(v) if resp == 3 else [x[0] for x in v]) == [b"sa", b"sbb"]
    raw.call("XGROUP", "CREATE", "sa", "g", "0")
    through = raw.call("XREADGROUP", "GROUP", "g", "c", "STREAMS", "sa", ">")
    assert through.startswith(b"%1\r\n$2\r\nsa\r\n" if resp == 3 else b"*1\r\n*2\r\n$2\r\nsa\r\n")
    raw.close()
    dr.close()
