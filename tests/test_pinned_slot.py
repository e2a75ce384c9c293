"""`slot = "pinned"`: a namespace written as the keys' hash tag, `{NS}:key`, so the whole
namespace is one cluster hash slot. Proved end to end on a single server (every upstream
mode, C and Python paths), and against a real cluster's CLUSTER KEYSLOT."""

from __future__ import annotations

import threading

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from integration_helpers import client, proxy_toml, uniq, wait_blocked
from proxy.cluster import key_slot
from proxy.config import ConfigError, from_dict, render_toml
from proxy.keyspace import Keyspace


@pytest.fixture
def pinned(server, fresh_db, start_proxy):
    """(proxy, NS): a pinned route on `server` db `fresh_db`; unique NS (channels are server-wide)."""
    ns = uniq("pin")
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}",
                     "--namespace", ns, "--slot", "pinned"])
    return p, ns


def test_keys_are_stored_under_the_hash_tag(pinned, d):
    p, ns = pinned
    c = client(p)
    c.set("a", "1")
    c.mset({"b": "2", "{user1}:c": "3"})
    c.hset("h", "f", "v")
    assert sorted(d.keys("*")) == sorted(f"{{{ns}}}:{k}".encode() for k in ("a", "b", "{user1}:c", "h"))
    # one slot for the whole namespace: the slot of NS; a client's own tag does not choose it
    assert {key_slot(k) for k in d.keys("*")} == {key_slot(ns.encode())}
    assert c.get("a") == b"1" and c.mget("a", "b", "{user1}:c") == [b"1", b"2", b"3"]
    assert sorted(c.keys("*")) == [b"a", b"b", b"h", b"{user1}:c"]
    assert sorted(c.scan_iter(match="{user1}*")) == [b"{user1}:c"]
    assert c.dbsize() == 4
    assert c.randomkey() in (b"a", b"b", b"h", b"{user1}:c")
    assert f"as the hash tag {{{ns}}} (pinned to one slot)" in p.output()   # the start log says so


def test_stripping_is_unambiguous(pinned, d):
    """Only server keys that start with the whole `{NS}:` are the client's."""
    p, ns = pinned
    foreign = [f"{ns}:plain", f"{{{ns}}}x", f"{{{ns}x}}:a", f"{{{ns}}}", f"x{{{ns}}}:a", f"{ns}", "{}:a"]
    for k in foreign:
        d.set(k, "foreign")
    c = client(p)
    c.set("mine", "1")
    assert c.keys("*") == [b"mine"]
    assert list(c.scan_iter(count=1000)) == [b"mine"]
    assert c.dbsize() == 1
    assert c.randomkey() == b"mine"
    c.flushdb()   # the emulation removes ours only
    assert sorted(d.keys("*")) == sorted(k.encode() for k in foreign)


def test_an_unpinned_route_on_the_same_namespace_is_another_keyspace(server, fresh_db, start_proxy, pinned):
    p, ns = pinned
    plain = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", ns])
    client(p).set("k", "pinned")
    client(plain).set("k", "plain")
    assert client(p).get("k") == b"pinned" and client(plain).get("k") == b"plain"
    assert client(p).keys("*") == [b"k"] and client(plain).keys("*") == [b"k"]


def test_multi_lua_rename(pinned, d):
    p, ns = pinned
    c = client(p)
    pipe = c.pipeline(transaction=True)
    pipe.set("x", "1").incr("x").rpush("list", "a", "b").get("x")
    assert pipe.execute() == [True, 2, 2, b"2"]
    script = "redis.call('SET', KEYS[2], redis.call('GET', KEYS[1])); return KEYS"
    assert c.eval(script, 2, "x", "y") == [f"{{{ns}}}:x".encode(), f"{{{ns}}}:y".encode()]  # what Lua sees
    assert c.get("y") == b"2"
    assert c.rename("y", "{t}:z") and c.get("{t}:z") == b"2"
    assert d.get(f"{{{ns}}}:{{t}}:z") == b"2"
    with c.pipeline(transaction=True) as w:   # WATCH, then MULTI/EXEC over several keys
        w.watch("x")
        w.multi()
        w.set("x", "3").set("w", "4")
        assert w.execute() == [True, True]
    assert c.mget("x", "w") == [b"3", b"4"]


def test_brpop_over_several_queues(server, pinned):
    p, ns = pinned
    a, b = client(p), client(p)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", a.brpop(["q1", "q2", "q3"], timeout=8)))
    t.start()
    wait_blocked(server, 1, "brpop")
    b.lpush("q2", "job")
    t.join(10)
    assert box["v"] == (b"q2", b"job")   # the reply's key stripped back


def test_pubsub_and_keyspace_notifications(pinned, d):
    p, ns = pinned
    c = client(p)
    sub = c.pubsub()
    sub.subscribe("chan", "__keyspace@0__:watched")
    sub.psubscribe("ch*")
    confirmed = sorted((m["type"], m["channel"]) for m in (sub.get_message(timeout=5) for _ in range(3)))
    assert confirmed == [("psubscribe", b"ch*"), ("subscribe", b"__keyspace@0__:watched"), ("subscribe", b"chan")]
    assert d.publish(f"{ns}:chan", "unpinned name") == 0     # the server channel is {NS}:chan
    assert d.publish(f"{{{ns}}}:chan", "hi") == 2
    got = sorted((m["type"], m["channel"], m["pattern"], m["data"]) for m in
                 (sub.get_message(timeout=5, ignore_subscribe_messages=True) for _ in range(2)))
    assert got == [("message", b"chan", None, b"hi"), ("pmessage", b"chan", b"ch*", b"hi")]
    assert c.publish("chan", "via proxy") == 2
    for _ in range(2):
        sub.get_message(timeout=5, ignore_subscribe_messages=True)
    client(p).set("watched", "1")
    m = sub.get_message(timeout=5, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"__keyspace@0__:watched", b"set")
    sub.subscribe("__keyevent@0__:expire")
    sub.get_message(timeout=5)
    d.expire(f"{ns}:watched", 100)       # a lookalike outside the namespace: not delivered
    d.set(f"{ns}:watched", "x")
    d.expire(f"{ns}:watched", 100)
    client(p).expire("watched", 100)
    m = sub.get_message(timeout=5, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"__keyspace@0__:watched", b"expire")
    m = sub.get_message(timeout=5, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"__keyevent@0__:expire", b"watched")   # payload stripped
    sub.close()


def test_glob_characters_in_the_namespace_are_escaped(server, fresh_db, start_proxy, d):
    ns = uniq("g") + "[x]?"
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}",
                     "--namespace", ns, "--slot", "pinned"])
    d.set(f"{{{uniq('g')}x}}:k", "lookalike")   # would match if the [x]? were a glob
    c = client(p)
    c.set("k", "1")
    c.set("k2", "2")
    assert sorted(c.keys("k*")) == [b"k", b"k2"]
    assert sorted(c.scan_iter(match="k?")) == [b"k2"]
    assert d.get(f"{{{ns}}}:k") == b"1"
    assert c.dbsize() == 2


def test_cluster_takes_the_pinned_keys_as_one_slot(cluster):
    """On a real cluster, what a pinned route writes is one slot (CLUSTER KEYSLOT), so
    multi-key commands and scripts over it run on its owner without CROSSSLOT."""
    ns = b"app"
    keys = [b"{" + ns + b"}:" + k for k in (b"a", b"b", b"{user1}:c", b"queue:default", b"")]
    node = cluster.primaries[0]
    slots = {node.call("CLUSTER", "KEYSLOT", k) for k in keys}
    assert slots == {key_slot(ns)}
    owner = cluster.primary_for(key_slot(ns))
    r = owner.client()
    try:
        assert r.mset({k: b"1" for k in keys})
        assert r.eval("return redis.call('DEL', unpack(KEYS))", len(keys), *keys) == len(keys)
        with r.pipeline(transaction=True) as m:
            m.lpush(keys[3], "j").rpoplpush(keys[3], keys[0])
            assert m.execute() == [1, b"j"]
        # SORT BY/GET patterns as a pinned route writes them ({NS}:w_*): Valkey 8 takes
        # them on a cluster (same slot as the key); Redis 7.0 refuses BY/GET in cluster mode
        r.rpush(keys[1], "1", "2")
        r.mset({b"{app}:w_1": "9", b"{app}:w_2": "1", b"{app}:v_1": "a", b"{app}:v_2": "b"})
        try:
            assert r.sort(keys[1], by="{app}:w_*", get=["#", "{app}:v_*"]) == [b"2", b"b", b"1", b"a"]
        except redis.ResponseError as e:
            assert cluster.kind == "redis" and "option of SORT denied in Cluster mode" in str(e)
        r.delete(*keys, b"{app}:w_1", b"{app}:w_2", b"{app}:v_1", b"{app}:v_2")
    finally:
        r.close()


# -- why stripping stays unambiguous (no server involved: the mapping itself)

_ns = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="}*\r\n"), min_size=1,
              max_size=8).map(str.encode)
_sep = st.sampled_from([b":", b"/", b"::", b"", b"}"])


@settings(max_examples=500, deadline=None)
@given(a=_ns, b=_ns, sep_a=_sep, sep_b=_sep, key=st.binary(max_size=12), other=st.binary(max_size=20))
def test_pinned_names_are_exact_and_never_nest(a, b, sep_a, sep_b, key, other):
    """The namespace has no `}`, so `{A}` ends at its own brace: a pinned name maps back
    to exactly the client's key, lies in A's slot, and belongs to no other pinned
    namespace whatever the separators (unpinned `app` and `app:x` do overlap)."""
    ka = Keyspace("add", a, sep_a, "r", pinned=True)
    kb = Keyspace("add", b, sep_b, "r", pinned=True)
    server = ka.key_in(key)
    assert ka.key_out(server) == key
    assert key_slot(server) == key_slot(a)
    if a != b:
        assert kb.key_out(server) is None
    out = ka.key_out(other)
    assert (out is None) == (not other.startswith(b"{" + a + b"}" + sep_a))
    if out is not None:
        assert ka.key_in(out) == other


# -- configuration


def _cfg(listener: dict, **top):
    return from_dict({"listener": [dict({"listen": "127.0.0.1:0"}, **listener)], **top}, environ={})


def test_config_pinned_and_rendered():
    cfg = _cfg({"namespace": "app", "slot": "pinned", "databases": {"1": {"db": 3, "namespace": "other"},
                                                                    "2": {"db": 4, "namespace": ""}}})
    r = cfg.routes[0]
    assert r.slot == "pinned" and r.default.keyspace.prefix == b"{app}:"
    assert r.databases[1].keyspace.prefix == b"{other}:"
    assert r.databases[2].keyspace.mode == "none"
    assert "as the hash tag {app} (pinned to one slot)" in r.describe()
    text = render_toml(cfg)
    assert 'slot = "pinned"' in text
    import tomllib
    again = from_dict(tomllib.loads(text), environ={})
    assert again.routes[0].default == r.default and again.routes[0].databases == r.databases
    assert 'slot = "spread"' in render_toml(_cfg({"namespace": "app"}))
    assert _cfg({"namespace": "app"}).routes[0].default.keyspace.prefix == b"app:"


@pytest.mark.parametrize("listener, message", [
    ({"slot": "pinned"}, "listener[0].slot: pinned needs a namespace"),
    ({"slot": "pinned", "strip_namespace": "app"}, "listener[0].slot: pinned works with namespace (add mode), "
                                                   "not strip_namespace 'app'"),
    ({"slot": "pinned", "namespace": "a}b"}, "listener[0].slot: namespace 'a}b' contains '}'"),
    ({"slot": "pinned", "namespace": "app", "databases": {"1": {"db": 1, "strip_namespace": "s"}}},
     "not strip_namespace 's' (client db 1)"),
    ({"slot": "one", "namespace": "app"}, "listener[0].slot: expected one of spread, pinned, got \"one\""),
])
def test_config_refusals(listener, message):
    with pytest.raises(ConfigError) as e:
        _cfg(listener)
    assert message in str(e.value)


def _check(*args, env=None):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    e.pop("REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "proxy", "check", *args], capture_output=True, text=True,
                          timeout=60, env=e, cwd=ROOT)


def test_check_shows_the_setting(server, fresh_db, tmp_path):
    path = tmp_path / "p.toml"
    up = f"redis://{server.host}:{server.port}/{fresh_db}"
    path.write_text(proxy_toml([{"listen": "127.0.0.1:0", "namespace": "app", "slot": "pinned", "upstream": up}]))
    out = _check("--config", str(path))
    assert out.returncode == 0, out.stderr
    assert 'slot = "pinned"' in out.stdout
    out = _check("--listen", "127.0.0.1:0", "--namespace", "app", "--upstream", up, env={"PROXY_SLOT": "pinned"})
    assert out.returncode == 0, out.stderr
    assert 'slot = "pinned"' in out.stdout
    out = _check("--listen", "127.0.0.1:0", "--slot", "pinned", "--upstream", up)
    assert out.returncode == 2 and "--slot: pinned needs a namespace" in out.stderr, out.stderr


def test_existing_namespace_moved_to_its_pinned_names(server, fresh_db, start_proxy, d):
    """README: `migrate --to-namespace '{NS}'` moves a keyspace to the names a pinned
    route uses (same server and db), and the pinned route then sees it."""
    import subprocess
    import sys
    from conftest import ROOT
    ns = uniq("old")
    url = f"redis://{server.host}:{server.port}/{fresh_db}"
    d.set(f"{ns}:a", "1")
    d.rpush(f"{ns}:queue", "j1", "j2")
    d.set("untouched", "x")
    out = subprocess.run([sys.executable, "-m", "proxy", "migrate", "--from", url, "--from-namespace", ns,
                          "--to", url, "--to-namespace", "{" + ns + "}", "--move", "--verify"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(d.keys("*")) == sorted([f"{{{ns}}}:a".encode(), f"{{{ns}}}:queue".encode(), b"untouched"])
    p = start_proxy(["--upstream", url, "--namespace", ns, "--slot", "pinned"])
    c = client(p)
    assert c.get("a") == b"1" and c.lrange("queue", 0, -1) == [b"j1", b"j2"]
