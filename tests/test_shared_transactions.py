"""Transactions and named clients on shared links (issue 16, items 1-2), against real servers.

Many clients send MULTI ... EXEC blocks whole (as redis-py's transactional pipeline,
redis-rb and redis-client do) over one shared upstream connection. Each block must
stay atomic (no other client's command inside it: INCR then GET of one shared
counter in one block must agree) and in order, every reply must reach its own
client, and the clients must not each take a connection of their own.
"""

from __future__ import annotations

import threading

import pytest
import redis

from integration_helpers import client, direct, uniq

CLIENTS = 12
BLOCKS = 60


def _server_clients(server) -> int:
    return int(direct(server).info("clients")["connected_clients"])


def test_transactions_from_many_clients_stay_atomic_and_keep_the_shared_link(server, fresh_db, start_proxy,
                                                                              upstream_mode):
    # in dedicated mode every client has its own connection: nothing shared to check
    shared = upstream_mode.startswith("shared")
    ns = uniq("tx")
    proxy = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", ns])
    ctr = "counter"
    errors: list[str] = []
    conns = [client(proxy) for _ in range(CLIENTS)]
    for c in conns:
        assert c.ping()
    before = _server_clients(server)

    def work(i: int, c: redis.Redis) -> None:
        try:
            for j in range(BLOCKS):
                p = c.pipeline(transaction=True)
                p.incr(ctr)
                p.get(ctr)
                p.sadd("queues", f"q{i}")
                p.lpush(f"queue:q{i}", f"job-{i}-{j}")
                incr, got, _, length = p.execute()
                if int(got) != incr:
                    errors.append(f"client {i} block {j}: INCR gave {incr}, GET in the same block {got!r}")
                if length != j + 1:
                    errors.append(f"client {i} block {j}: LPUSH gave {length}, expected {j + 1}")
                # a plain pipeline between blocks: replies in order
                q = c.pipeline(transaction=False)
                q.llen(f"queue:q{i}")
                q.lindex(f"queue:q{i}", 0)
                n, head = q.execute()
                if n != j + 1 or head != f"job-{i}-{j}".encode():
                    errors.append(f"client {i} block {j}: LLEN/LINDEX gave {n}, {head!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(conns)]
    during = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        during.append(_server_clients(server))
        for t in threads:
            t.join(0.05)
    assert errors == []
    d = direct(server, fresh_db)
    assert int(d.get(f"{ns}:{ctr}")) == CLIENTS * BLOCKS
    assert d.scard(f"{ns}:queues") == CLIENTS
    # the clients kept the shared link: the server saw no connection per client
    # (one for the measuring client itself, the shared link, at most a reconnect)
    if shared:
        assert max(during) - before <= 2, (before, max(during))
    for c in conns:
        c.close()


def test_named_clients_keep_the_shared_link(server, fresh_db, start_proxy, upstream_mode):
    ns = uniq("nm")
    proxy = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", ns])
    conns = [client(proxy, client_name=f"worker-{i}") for i in range(8)]
    for i, c in enumerate(conns):
        c.set(f"k{i}", i)
        assert c.client_getname() == f"worker-{i}"
    before = _server_clients(server)
    for i, c in enumerate(conns):
        assert c.get(f"k{i}") == str(i).encode()
    if upstream_mode.startswith("shared"):
        # redis-py sends CLIENT SETNAME on connect: the name is held by the proxy
        assert _server_clients(server) - before <= 1
    with pytest.raises(redis.ResponseError, match="cannot contain spaces"):
        conns[0].client_setname("has space")
    # a named client that moves to a connection of its own (WATCH; a blocking command
    # borrows a pooled connection and keeps the shared link) takes its name along
    assert conns[1].blpop([f"q{uniq()}"], timeout=0.05) is None
    assert conns[1].execute_command("WATCH", f"w{uniq()}") in (True, b"OK", "OK")
    assert conns[1].client_getname() == "worker-1"
    names = [c["name"] for c in direct(server).client_list()]
    assert "worker-1" in names
    for c in conns:
        c.close()
