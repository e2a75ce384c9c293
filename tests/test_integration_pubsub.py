"""Pub/sub, keyspace notifications and client tracking through the proxy, with direct
(non-proxied) publishers and writers on the server."""

from __future__ import annotations

import asyncio

import pytest

from integration_helpers import Raw, aclient, client, decode, direct, uniq


@pytest.fixture
def ns(server, fresh_db, start_proxy):
    """(proxy, namespace): a unique namespace, since channels are server-wide."""
    name = uniq("ns")
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", name])
    return p, name


def next_message(p, timeout=5.0):
    m = p.get_message(timeout=timeout, ignore_subscribe_messages=True)
    assert m is not None, "no message arrived"
    return m


def test_subscribe_and_psubscribe_with_direct_publisher(ns, d, proto):
    proxy, name = ns
    r = client(proxy, protocol=proto)
    p = r.pubsub()
    p.subscribe("chan")
    p.psubscribe("ch*")
    for kind in ("subscribe", "psubscribe"):
        m = p.get_message(timeout=5)
        assert m["type"] == kind and m["channel"] in (b"chan", b"ch*")
    # foreign publishes first: none of them may arrive
    assert d.publish("chan", "unprefixed") == 0
    assert d.publish("other:chan", "foreign") == 0
    assert d.publish(f"{name}x:chan", "lookalike") == 0
    assert d.publish(f"{name}:chan", "hi") == 2  # the channel and the pattern subscription
    got = [next_message(p), next_message(p)]
    by_type = {m["type"]: m for m in got}
    assert by_type["message"]["channel"] == b"chan" and by_type["message"]["data"] == b"hi"
    assert by_type["pmessage"]["channel"] == b"chan"
    assert by_type["pmessage"]["pattern"] == b"ch*"
    assert by_type["pmessage"]["data"] == b"hi"
    # a publish through another proxied client reaches a direct subscriber on the server name
    ds = d.pubsub()
    ds.subscribe(f"{name}:chan2")
    ds.get_message(timeout=5)
    other = client(proxy, protocol=proto)
    assert other.publish("chan2", "via-proxy") == 2  # ds and the ch* pattern
    m = ds.get_message(timeout=5)
    assert m["channel"] == f"{name}:chan2".encode() and m["data"] == b"via-proxy"
    m = next_message(p)
    assert (m["type"], m["channel"], m["pattern"]) == ("pmessage", b"chan2", b"ch*")
    p.unsubscribe("chan")
    p.punsubscribe("ch*")
    for kind in ("unsubscribe", "punsubscribe"):
        m = p.get_message(timeout=5)
        assert m["type"] == kind and m["channel"] in (b"chan", b"ch*")
    p.close()
    ds.close()
    r.close()
    other.close()


def test_shard_channels(ns, d, proto):
    proxy, name = ns
    r = client(proxy, protocol=proto)
    p = r.pubsub()
    p.ssubscribe("schan")
    m = p.get_sharded_message(timeout=5)
    assert m["type"] == "ssubscribe" and m["channel"] == b"schan"
    assert d.spublish("schan", "no") == 0
    assert d.spublish("zz:schan", "no") == 0
    assert d.spublish(f"{name}:schan", "yes") == 1
    m = p.get_sharded_message(timeout=5)
    assert (m["type"], m["channel"], m["data"]) == ("smessage", b"schan", b"yes")
    assert r.spublish("schan", "through") == 1
    m = p.get_sharded_message(timeout=5)
    assert (m["channel"], m["data"]) == (b"schan", b"through")
    assert r.pubsub_shardchannels() == [b"schan"]
    assert r.pubsub_shardnumsub("schan") == [(b"schan", 1)]
    p.close()
    r.close()


def test_pubsub_channels_and_numsub(ns, d):
    proxy, name = ns
    r = client(proxy)
    p = r.pubsub()
    p.subscribe("alpha", "beta")
    p.get_message(timeout=5)
    p.get_message(timeout=5)
    ds = d.pubsub()
    ds.subscribe("alpha", f"zz{name}:alpha", f"{name}x:gamma")
    for _ in range(3):
        ds.get_message(timeout=5)
    assert sorted(r.pubsub_channels()) == [b"alpha", b"beta"]
    assert r.pubsub_channels("a*") == [b"alpha"]
    assert r.pubsub_numsub("alpha", "beta", "nobody") == [(b"alpha", 1), (b"beta", 1), (b"nobody", 0)]
    assert r.pubsub_numpat() >= 0
    p.close()
    ds.close()
    r.close()


def test_resp3_pubsub_allows_commands_while_subscribed(ns, d):
    proxy, name = ns
    raw = Raw("127.0.0.1", proxy.port)
    assert decode(raw.call("HELLO", "3"))[b"proto"] == 3
    assert raw.call("SUBSCRIBE", "chan") == b">3\r\n$9\r\nsubscribe\r\n$4\r\nchan\r\n:1\r\n"
    assert raw.call("SET", "k", "v") == b"+OK\r\n"
    d.publish("other:chan", "foreign")
    d.publish(f"{name}:chan", "hello")
    # the push and the replies interleave in the server's order; read up to PONG
    raw.send(("GET", "k"), ("PING",))
    frames = raw.read(1)
    while b"PONG" not in frames[-1]:
        frames += raw.read(1)
    assert [f for f in frames if not f.startswith(b">")] == [b"$1\r\nv\r\n", b"+PONG\r\n"]
    pushes = [f for f in frames if f.startswith(b">")]
    assert pushes == [b">3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n"]
    assert raw.call("PSUBSCRIBE", "c?an") == b">3\r\n$10\r\npsubscribe\r\n$4\r\nc?an\r\n:2\r\n"
    d.publish(f"{name}:chan", "two")
    frames = raw.read(2)
    assert sorted(frames) == sorted([b">3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$3\r\ntwo\r\n",
                                     b">4\r\n$8\r\npmessage\r\n$4\r\nc?an\r\n$4\r\nchan\r\n$3\r\ntwo\r\n"])
    assert raw.call("INCR", "n") == b":1\r\n"
    raw.send(("UNSUBSCRIBE",), ("PUNSUBSCRIBE",), ("GET", "n"))
    assert raw.read(3) == [b">3\r\n$11\r\nunsubscribe\r\n$4\r\nchan\r\n:1\r\n",
                           b">3\r\n$12\r\npunsubscribe\r\n$4\r\nc?an\r\n:0\r\n",
                           b"$1\r\n1\r\n"]
    raw.close()


def test_resp3_pubsub_redis_py_client(ns, d):
    proxy, name = ns
    r = client(proxy, protocol=3)
    p = r.pubsub()
    p.subscribe("c1")
    assert p.get_message(timeout=5)["type"] == "subscribe"
    d.publish(f"{name}:c1", "m")
    m = next_message(p)
    assert (m["channel"], m["data"]) == (b"c1", b"m")
    p.close()
    r.close()


def test_async_pubsub(ns, d):
    proxy, name = ns

    async def main():
        r = aclient(proxy)
        p = r.pubsub()
        try:
            await p.subscribe("ac")
            await p.psubscribe("a*")
            assert (await p.get_message(timeout=5))["type"] == "subscribe"
            assert (await p.get_message(timeout=5))["type"] == "psubscribe"
            await r.publish("nope", "x")
            d.publish("ac", "x")
            await r.publish("ac", "y")
            got = [await p.get_message(timeout=5, ignore_subscribe_messages=True) for _ in range(2)]
            assert sorted((m["type"], m["channel"], m["data"]) for m in got) == \
                [("message", b"ac", b"y"), ("pmessage", b"ac", b"y")]
        finally:
            await p.aclose()
            await r.aclose()
    asyncio.run(asyncio.wait_for(main(), 20))


# ---------------------------------------------------------------- keyspace notifications


def test_keyspace_notifications(server, fresh_db, ns, d):
    proxy, name = ns
    r = client(proxy)
    p = r.pubsub()
    p.subscribe("__keyspace@0__:foo", "__keyevent@0__:set")
    p.psubscribe("__keyspace@0__:f*")
    for _ in range(3):
        m = p.get_message(timeout=5)
        assert m["channel"] in (b"__keyspace@0__:foo", b"__keyevent@0__:set", b"__keyspace@0__:f*")
    other_db = direct(server, fresh_db % 15 + 1)
    # events that must not be delivered
    d.set("foo", 1)
    d.set("other:foo", 1)
    d.set(f"{name}x:foo", 1)
    other_db.set(f"{name}:foo", 1)
    d.lpush("ns:foo", 1)
    # now the client's own key, in its db
    d.set(f"{name}:foo", 2)
    got = [next_message(p) for _ in range(3)]
    seen = sorted((m["type"], m["channel"], m.get("pattern"), m["data"]) for m in got)
    assert seen == sorted([
        ("message", b"__keyspace@0__:foo", None, b"set"),
        ("pmessage", b"__keyspace@0__:foo", b"__keyspace@0__:f*", b"set"),
        ("message", b"__keyevent@0__:set", None, b"foo"),
    ])
    r.set("fizz", 1)  # through the proxy: key event with the client name
    got = [next_message(p) for _ in range(2)]
    assert sorted((m["channel"], m["data"]) for m in got) == [
        (b"__keyevent@0__:set", b"fizz"), (b"__keyspace@0__:fizz", b"set")]
    assert p.get_message(timeout=0.05, ignore_subscribe_messages=True) is None
    p.close()
    r.close()
    other_db.close()


# ---------------------------------------------------------------- client tracking


def test_client_tracking_resp3_invalidation(ns, d):
    proxy, name = ns
    raw = Raw("127.0.0.1", proxy.port)
    raw.call("HELLO", "3")
    assert raw.call("CLIENT", "TRACKING", "ON") == b"+OK\r\n"
    raw.call("SET", "tk", "1")
    assert raw.call("GET", "tk") == b"$1\r\n1\r\n"
    d.set("tk", "foreign")          # another namespace's key: no invalidation
    d.set(f"{name}:tk", "2")
    frames = raw.read(1)
    assert frames == [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\ntk\r\n"]
    assert raw.call("GET", "tk") == b"$1\r\n2\r\n"
    assert raw.call("CLIENT", "TRACKING", "OFF") == b"+OK\r\n"
    raw.close()


def test_client_tracking_bcast_prefix(ns, d):
    proxy, name = ns
    raw = Raw("127.0.0.1", proxy.port)
    raw.call("HELLO", "3")
    assert raw.call("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "user:") == b"+OK\r\n"
    info = decode(raw.call("CLIENT", "TRACKINGINFO"))
    assert info[b"prefixes"] == [b"user:"]
    d.set("user:1", 1)
    d.set("other:user:1", 1)
    d.set(f"{name}:item:1", 1)
    d.set(f"{name}:user:7", 1)
    frames = raw.read(1)
    assert frames == [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\nuser:7\r\n"]
    raw.call("CLIENT", "TRACKING", "OFF")
    # BCAST without PREFIX: only the namespace's keys
    assert raw.call("CLIENT", "TRACKING", "ON", "BCAST") == b"+OK\r\n"
    d.set("other:z", 1)
    d.set(f"{name}:z", 1)
    assert raw.read(1) == [b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nz\r\n"]
    raw.close()


def test_client_tracking_resp2_redirect(ns, d):
    proxy, name = ns
    sub = Raw("127.0.0.1", proxy.port)
    sub_id = sub.value("CLIENT", "ID")  # the upstream connection's id, which REDIRECT needs
    assert sub.call("SUBSCRIBE", "__redis__:invalidate") == \
        b"*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n"
    r = client(proxy, single_connection_client=True)
    assert r.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", sub_id) in (b"OK", True, "OK")
    r.set("rk", 1)
    r.get("rk")
    d.set("rk", 2)
    d.set(f"{name}:rk", 2)
    assert sub.read(1) == [b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$2\r\nrk\r\n"]
    sub.close()
    r.close()


def test_keyevent_pattern_drops_foreign_keys(server, fresh_db, ns, d, proto):
    proxy, name = ns
    r = client(proxy, protocol=proto)
    p = r.pubsub()
    p.psubscribe("__keyevent@0__:*")
    m = p.get_message(timeout=5)
    assert (m["type"], m["channel"]) == ("psubscribe", b"__keyevent@0__:*")
    d.set("other:a", 1)
    d.incr("plain")
    d.set(f"{name}:mine", 1)
    m = next_message(p)
    assert (m["pattern"], m["channel"], m["data"]) == (b"__keyevent@0__:*", b"__keyevent@0__:set", b"mine")
    d.delete(f"{name}:mine", "other:a")
    m = next_message(p)
    assert (m["channel"], m["data"]) == (b"__keyevent@0__:del", b"mine")
    assert p.get_message(timeout=0.05, ignore_subscribe_messages=True) is None
    p.close()
    r.close()
