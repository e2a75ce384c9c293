"""Shared upstream connections (issue 3): RESP2 and RESP3 clients each share one link per
route and db; HELLO 3 moves a client to the RESP3 link, not to a connection of its own."""

import redis

from conftest import ProxyProcess
from proxy.embedded import tcp_local_ports


def proxy_links(d: redis.Redis, db: int, p: ProxyProcess) -> dict[str, int]:
    """The connections proxy `p` holds on the server in `db`, by protocol (only its own: a
    db index is reused by later tests, whose proxies may still be connected)."""
    ports = set(tcp_local_ports([p.process.pid], d.connection_pool.connection_kwargs["port"]))
    out: dict[str, int] = {}
    for c in d.client_list():
        if int(c["db"]) == db and int(c["addr"].rsplit(":", 1)[1]) in ports:
            out[c.get("resp", "2")] = out.get(c.get("resp", "2"), 0) + 1
    return out


def test_resp2_and_resp3_clients_share_one_link_each(server, fresh_db, d):
    p = ProxyProcess(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns",
                      "--upstream-mode", "shared"])
    try:
        clients = [redis.Redis(host="127.0.0.1", port=p.port, protocol=proto, single_connection_client=True)
                   for proto in (2, 3) for _ in range(6)]
        for i, c in enumerate(clients):
            assert c.set(f"k{i}", i)
            assert c.hset(f"h{i}", mapping={"f": i}) == 1
        for i, c in enumerate(clients):
            assert c.get(f"k{i}") == str(i).encode()
            assert c.hgetall(f"h{i}") == {b"f": str(i).encode()}  # a RESP3 map for protocol 3
        assert sorted(d.keys("ns:k*")) == sorted(f"ns:k{i}".encode() for i in range(12))
        links = proxy_links(d, fresh_db, p)
        if "resp" in d.client_list()[0]:  # servers that show the protocol in CLIENT LIST
            assert links == {"2": 1, "3": 1}, links
        else:
            assert sum(links.values()) == 2, links
        # a RESP3 client that blocks gets its own connection, still speaking RESP3
        r3 = clients[-1]
        d.rpush("ns:q", "job")
        assert r3.blpop(["q"], 1) == [b"q", b"job"]
        assert r3.hgetall("h11") == {b"f": b"11"}
        for c in clients:
            c.close()
    finally:
        assert p.stop() == 0
