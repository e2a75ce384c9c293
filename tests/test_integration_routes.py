"""Routes through the proxy: TOML db maps (SELECT, RESET, COPY ... DB, MOVE), strip mode."""

from __future__ import annotations

import pytest
import redis

from integration_helpers import Raw, client, direct, proxy_toml
from proxy.embedded import free_port


@pytest.fixture
def three_dbs(server, fresh_db):
    """fresh_db and two more distinct dbs, all flushed."""
    dbs = [fresh_db, fresh_db % 15 + 1, (fresh_db + 1) % 15 + 1]
    for db in dbs[1:]:
        r = direct(server, db)
        r.flushdb()
        r.close()
    return dbs


@pytest.fixture
def mapped_proxy(server, three_dbs, start_proxy):
    a, b, c = three_dbs
    port = free_port()
    text = proxy_toml([{
        "name": "app", "listen": f"127.0.0.1:{port}",
        "upstream": f"redis://{server.host}:{server.port}/{a}", "namespace": "ns",
        "databases": {"1": {"db": b, "namespace": "other"}, "2": {"db": c}},
    }])
    return start_proxy(config_text=text, port=port)


def test_select_with_db_map_and_reset(server, three_dbs, mapped_proxy):
    a, b, c = three_dbs
    da, db_, dc = (direct(server, x) for x in three_dbs)
    raw = Raw("127.0.0.1", mapped_proxy.port)
    assert raw.call("SET", "foo", "zero") == b"+OK\r\n"
    assert raw.call("SELECT", "1") == b"+OK\r\n"
    assert raw.call("SET", "foo", "one") == b"+OK\r\n"
    assert raw.call("GET", "foo") == b"$3\r\none\r\n"
    assert raw.value("KEYS", "*") == [b"foo"]
    err = raw.call("SELECT", "5")
    assert err.startswith(b"-ERR") and b"5" in err and b"app" in err, err
    assert raw.call("GET", "foo") == b"$3\r\none\r\n"  # still on client db 1
    assert raw.call("SELECT", "2") == b"+OK\r\n"
    assert raw.call("SET", "foo", "two") == b"+OK\r\n"
    assert raw.call("SELECT", "0") == b"+OK\r\n"
    assert raw.call("GET", "foo") == b"$4\r\nzero\r\n"
    assert da.keys("*") == [b"ns:foo"]
    assert db_.keys("*") == [b"other:foo"]
    assert dc.keys("*") == [b"ns:foo"] and dc.get("ns:foo") == b"two"
    # RESET puts the connection back on the route's db and keyspace
    raw.call("SELECT", "1")
    assert raw.call("RESET") == b"+RESET\r\n"
    assert raw.call("GET", "foo") == b"$4\r\nzero\r\n"
    assert raw.call("DBSIZE") == b":1\r\n"
    # a SELECT inside MULTI that is discarded does not move the connection
    raw.send(("MULTI",), ("SELECT", "1"), ("DISCARD",), ("GET", "foo"))
    assert raw.read(4)[3] == b"$4\r\nzero\r\n"
    # redis-py's db= selects through the map
    r1 = client(mapped_proxy, db=1)
    assert r1.get("foo") == b"one"
    with pytest.raises(redis.ResponseError, match="app"):
        client(mapped_proxy, db=9).get("foo")
    for x in (da, db_, dc, r1):
        x.close()
    raw.close()


def test_copy_db_and_move_are_mapped(server, three_dbs, mapped_proxy):
    a, b, c = three_dbs
    da, db_, dc = (direct(server, x) for x in three_dbs)
    r = client(mapped_proxy, single_connection_client=True)
    r.set("src", "v")
    assert r.copy("src", "dst", destination_db=1) is True
    assert db_.get("other:dst") == b"v"
    assert r.copy("src", "dst2", destination_db=2) is True
    assert dc.get("ns:dst2") == b"v"
    with pytest.raises(redis.ResponseError, match="app"):
        r.copy("src", "dst", destination_db=7)
    # MOVE into a db of another namespace would rename the key: refused
    with pytest.raises(redis.ResponseError) as e:
        r.move("src", 1)
    assert "app" in str(e.value)
    assert r.move("src", 2) is True
    assert da.exists("ns:src") == 0 and dc.get("ns:src") == b"v"
    r.execute_command("SELECT", 2)
    assert r.get("src") == b"v"
    assert r.move("src", 0) is True
    r.execute_command("SELECT", 0)
    assert r.get("src") == b"v"
    assert r.ping()
    for x in (da, db_, dc, r):
        x.close()


def test_keyspace_notifications_follow_db_map(server, three_dbs, mapped_proxy):
    a, b, c = three_dbs
    db_ = direct(server, b)
    p = client(mapped_proxy).pubsub()
    p.subscribe("__keyspace@1__:foo")
    assert p.get_message(timeout=5)["channel"] == b"__keyspace@1__:foo"
    db_.set("foo", 1)          # not in namespace other
    db_.set("ns:foo", 1)       # not in namespace other either
    direct(server, a).set("other:foo", 1)  # right name, wrong db
    db_.set("other:foo", 1)
    m = p.get_message(timeout=5)
    assert (m["channel"], m["data"]) == (b"__keyspace@1__:foo", b"set")
    p.close()
    db_.close()


def test_strip_mode(server, fresh_db, start_proxy):
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}",
                     "--strip-namespace", "ns"])
    d = direct(server, fresh_db)
    r = client(p, single_connection_client=True)
    assert r.set("ns:foo", "v") is True
    assert d.get("foo") == b"v"
    assert r.get("ns:foo") == b"v"
    with pytest.raises(redis.ResponseError) as e:
        r.get("foo")
    assert "'foo'" in str(e.value) and "ns:" in str(e.value)
    with pytest.raises(redis.ResponseError, match="bar"):
        r.mset({"ns:a": 1, "bar": 2})
    assert d.exists("a") == 0
    assert r.ping()
    d.set("plain", 1)
    assert sorted(r.keys("ns:*")) == [b"ns:foo", b"ns:plain"]
    assert sorted(r.scan_iter(match="ns:*")) == [b"ns:foo", b"ns:plain"]
    assert sorted(r.scan_iter()) == [b"ns:foo", b"ns:plain"]
    assert r.randomkey() in (b"ns:foo", b"ns:plain")
    r.rpush("ns:q", "x")
    assert list(r.blpop(["ns:none", "ns:q"], timeout=1)) == [b"ns:q", b"x"]
    assert d.exists("q") == 0
    assert r.dbsize() == 2
    with pytest.raises(redis.ResponseError, match="prefix"):
        r.keys("*")
    assert r.flushdb() is True  # the backend db is exactly this keyspace
    assert d.dbsize() == 0
    r.close()
    d.close()
