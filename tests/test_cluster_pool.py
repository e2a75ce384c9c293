"""The blocking pool (limits.blocking_pool, proxy/bpool.py) on a pinned route over a real
cluster: pooled connections open to the owner of the route's slot (Proxy.data_node), are
dropped when the slot moves (Proxy.cluster_changed), and a BRPOP blocked through the pool
when its slot is migrated gets the error a dedicated connection gets (`-TRYAGAIN` from the
server's -MOVED, or `upstream unavailable (hash slot N of this route moved ...)` when the
proxy's map saw the move first); no job is lost or given twice."""

from __future__ import annotations

import threading

import pytest
import redis

from cluster_helpers import wait_until
from integration_helpers import client
from proxy.cluster import key_slot
from proxy.embedded import free_port
from test_cluster_routing import ns_on, pinned_proxy
from test_limits import metric, scrape


@pytest.fixture
def upstream_mode():
    """The pool exists in shared mode only (dedicated mode: every client has its own)."""
    return "shared"


def proxy_blocked(node, ns: str) -> int:
    """Connections of `node` blocked in BRPOP (the proxy's pooled ones)."""
    r = node.client()
    try:
        return sum(1 for c in r.client_list() if c.get("cmd") == "brpop" and "b" in c.get("flags", ""))
    finally:
        r.close()


class Worker(threading.Thread):
    """BRPOP jobs until stopped; every element taken and every error kept."""

    def __init__(self, port: int, n: int):
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.got: list[bytes] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        while not self.stop.is_set():
            try:
                v = c.brpop(["jobs", f"own{self.n}"], timeout=1)
            except (redis.ResponseError, redis.ConnectionError) as e:
                self.errors.append(str(e))
                continue
            if v is not None:
                self.got.append(v[1])
        c.close()


def push(c: redis.Redis, job: str) -> None:
    """LPUSH until stored: -TRYAGAIN (a redirect: not run) is retried."""
    while True:
        try:
            c.lpush("jobs", job)
            return
        except redis.ResponseError as e:
            assert "TRYAGAIN" in str(e), e


def test_pooled_brpops_follow_a_slot_migration(cluster, start_proxy):
    src, dst = cluster.primaries[0], cluster.primaries[1]
    ns = ns_on(cluster, src, "pool")
    slot = key_slot(ns.encode())
    mport = free_port()
    # 5 workers, 3 pooled connections: two of them wait for the pool
    p = pinned_proxy(start_proxy, cluster, ns, "--blocking-pool", "3", "--metrics-listen", f"127.0.0.1:{mport}")
    producer = client(p)
    workers = [Worker(p.port, i) for i in range(5)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: proxy_blocked(src, ns) == 3, "three pooled BRPOPs blocked on the owner")
        assert metric(scrape(mport), "keyspace_proxy_blocking_pool_borrows_total") >= 3
        for i in range(20):
            push(producer, f"a{i}")
        wait_until(lambda: sum(len(w.got) for w in workers) == 20, "the first jobs taken")
        wait_until(lambda: proxy_blocked(src, ns) == 3, "blocked again before the migration")
        errors_before = sum(len(w.errors) for w in workers)
        cluster.migrate_slot(slot, dst)
        # the blocked ones get an error; then every worker blocks on the new owner through the pool
        wait_until(lambda: sum(len(w.errors) for w in workers) >= errors_before + 3, "the blocked calls answered")
        wait_until(lambda: proxy_blocked(dst, ns) == 3, "pooled BRPOPs blocked on the new owner")
        assert proxy_blocked(src, ns) == 0
        for i in range(20):
            push(producer, f"b{i}")
        wait_until(lambda: sum(len(w.got) for w in workers) == 40, "the jobs after the migration taken")
    finally:
        for w in workers:
            w.stop.set()
        for w in workers:
            w.join(30)
    got = [j for w in workers for j in w.got]
    assert sorted(got) == sorted([f"a{i}".encode() for i in range(20)] + [f"b{i}".encode() for i in range(20)])
    errors = [e for w in workers for e in w.errors]
    assert errors and all("hash slot" in e for e in errors), errors
    assert producer.llen("jobs") == 0 and dst.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_blocking_pool_connections") <= 3 + 1  # (+1: a CLIENT UNBLOCK's)
    # no client got a connection of its own: the pool's and the shared link only, on the new owner
    assert metric(text, "keyspace_proxy_errors_total", kind="orphan_reply") == 0
