"""End-to-end smoke: a namespaced route in front of each real server."""

import redis


def test_set_get_through_namespace(server, fresh_db, ns_proxy):
    r = redis.Redis(port=ns_proxy.port)
    direct = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert r.set("foo", "bar") is True
    assert r.get("foo") == b"bar"
    assert direct.keys("*") == [b"ns:foo"]
    assert r.keys("*") == [b"foo"]
