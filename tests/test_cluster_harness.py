"""The test cluster itself (tests/cluster_helpers.py): it starts as assigned, a slot moves
between primaries during traffic (ASK while importing, MOVED after), a killed primary's
replica takes over, and everything it started is gone after stop()."""

from __future__ import annotations

import os
import threading

import hiredis
import pytest

from cluster_helpers import start_cluster, wait_until
from integration_helpers import Raw
from proxy.cluster import SlotMap, key_slot, parse_redirect


class Follower:
    """A minimal cluster client for the tests: one raw socket per node, MOVED and ASK
    followed with proxy.cluster's parser; counts the redirections it saw."""

    def __init__(self, cluster):
        self.conns: dict[tuple, Raw] = {}
        self.map = SlotMap.from_shards(self.value(cluster.primaries[0].host, cluster.primaries[0].port,
                                                  "CLUSTER", "SHARDS"))
        self.seen = {"MOVED": 0, "ASK": 0}

    def value(self, host, port, *args, asking=False):
        c = self.conns.get((host, port))
        if c is None:
            c = self.conns[(host, port)] = Raw(host, port)
        if asking:
            c.send(("ASKING",), args)
            ok, raw = c.read(2)
            assert ok == b"+OK\r\n"
        else:
            raw = c.call(*args)
        r = hiredis.Reader()
        r.feed(raw)
        return r.gets()

    def call(self, key: bytes, *args):
        node = self.map.primary(key_slot(key))
        host, port, asking = node.host, node.port, False
        for _ in range(5):
            v = self.value(host, port, *args, asking=asking)
            r = parse_redirect(v) if isinstance(v, hiredis.ReplyError) else None
            if r is None:
                return v
            self.seen[r.kind] += 1
            if r.kind == "MOVED":
                self.map = self.map.moved(r, host)
            (host, port), asking = r.address(host, self.map), r.kind == "ASK"
        raise AssertionError(f"redirected too often: {v}")

    def close(self):
        for c in self.conns.values():
            c.close()


def test_started_as_assigned(cluster):
    assert len(cluster.primaries) == 3 and len(cluster.replicas) == 3
    m = SlotMap.from_shards(cluster.replicas[1].call("CLUSTER", "SHARDS"))
    assert m.uncovered() == []
    for p in cluster.primaries:
        lo, hi = cluster.ranges[p.id][0]
        assert m.primary(lo).id == p.id and m.primary(hi).id == p.id
        assert [r.id for r in m.replicas(lo)] == [r.id for r in cluster.replicas if r.primary_of is p]
    for r in cluster.replicas:
        assert r.info("replication")["role"] == "slave"


def test_slot_moves_during_traffic(cluster):
    """INCRs on the keys of one slot run while it moves to another primary; each was
    answered once, so the counters equal the acknowledged INCRs. The traffic met ASK
    during the import (keys already moved) and MOVED after."""
    slot = cluster.ranges[cluster.primaries[0].id][0][0] + 100
    src, dst = cluster.primary_for(slot), cluster.primaries[1]
    keys = cluster.keys_in_slot(slot, 20, prefix="traffic")
    acked = {k: 0 for k in keys}
    stop = threading.Event()
    errors: list = []
    f = Follower(cluster)

    def traffic():
        try:
            i = 0
            while not stop.is_set() or i < 200:
                k = keys[i % len(keys)]
                assert f.call(k, "INCR", k) == acked[k] + 1
                acked[k] += 1
                i += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        cluster.begin_migration(slot, src, dst)
        wait_until(lambda: sum(acked.values()) >= 100 or errors, "traffic")
        cluster.move_keys(slot, src, dst, batch=3, limit=6)   # part of the slot: ASK for those
        wait_until(lambda: f.seen["ASK"] or errors, "an ASK")
        cluster.move_keys(slot, src, dst, batch=5)
        cluster.finish_migration(slot, dst)
        n = sum(acked.values())
        wait_until(lambda: sum(acked.values()) >= n + 100 or errors, "traffic after the move")
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert f.seen["ASK"] > 0 and f.seen["MOVED"] > 0, f.seen
    assert cluster.primary_for(slot) is dst
    stored = dst.client().mget(keys)
    assert [int(v) for v in stored] == [acked[k] for k in keys]
    f.close()
    cluster.migrate_slot(slot, src)   # back as the module's other tests expect it


def test_ask_during_an_import(cluster):
    slot = cluster.ranges[cluster.primaries[2].id][0][0] + 5
    src, dst = cluster.primary_for(slot), cluster.primaries[0]
    moved_key, staying_key = cluster.keys_in_slot(slot, 2, prefix="import")
    src.call("SET", moved_key, "1")
    src.call("SET", staying_key, "2")
    cluster.begin_migration(slot, src, dst)
    try:
        src.call("MIGRATE", dst.host, dst.port, "", 0, 10000, "KEYS", moved_key)
        f = Follower(cluster)
        assert f.call(staying_key, "GET", staying_key) == b"2"   # still served by the source
        assert f.seen == {"MOVED": 0, "ASK": 0}
        assert f.call(moved_key, "GET", moved_key) == b"1"       # ASK, then ASKING on the target
        assert f.seen == {"MOVED": 0, "ASK": 1}
        f.close()
    finally:
        cluster.move_keys(slot, src, dst)
        cluster.finish_migration(slot, dst)
    f = Follower(cluster)     # its map is from before: the source now answers MOVED
    f.map = SlotMap.from_shards(src.call("CLUSTER", "SHARDS"))
    assert f.map.primary(slot).id == dst.id
    raw = Raw(src.host, src.port).call("GET", staying_key)
    assert raw.startswith(b"-MOVED %d " % slot)
    assert f.call(staying_key, "GET", staying_key) == b"2"
    f.close()
    cluster.migrate_slot(slot, src)


def test_blocked_client_answered_moved_when_its_slot_moves(cluster):
    """What the blocking-command design (docs/cluster.md) stands on: the server ends a
    BLPOP on a slot that moves away with -MOVED, so the proxy can block again on the new
    owner."""
    slot = cluster.ranges[cluster.primaries[0].id][0][0] + 200
    src, dst = cluster.primary_for(slot), cluster.primaries[2]
    key = cluster.keys_in_slot(slot, 1, prefix="blocked")[0]
    s = Raw(src.host, src.port)
    s.send(("BLPOP", key, "30"))
    wait_until(lambda: src.blocked("blpop"), "BLPOP to block")
    cluster.migrate_slot(slot, dst)
    try:
        r = parse_redirect(s.read(1)[0])
        assert (r.kind, r.slot, r.port) == ("MOVED", slot, dst.port)
    finally:
        s.close()
        cluster.migrate_slot(slot, src)


@pytest.mark.parametrize("kind", ["valkey", "redis"])
def test_primary_killed_replica_promoted(kind):
    from conftest import server_kinds
    if kind not in server_kinds():
        pytest.skip(f"no {kind}-server")
    c = start_cluster(kind)
    workdirs = [n.server.workdir for n in c.nodes]
    try:
        victim = c.primaries[1]
        keys = c.keys_in_slot(c.ranges[victim.id][0][0], 50, prefix="durable")
        r = victim.client()
        for k in keys:
            r.set(k, k)
        assert r.wait(1, 10000) == 1   # the replica has them before the kill
        r.close()
        heir = next(x for x in c.replicas if x.primary_of is victim)
        promoted = c.kill_primary(victim)
        assert promoted is heir and not victim.alive
        assert promoted.info("replication")["role"] == "master"
        m = SlotMap.from_shards(c.primaries[0].call("CLUSTER", "SHARDS"))
        assert m.primary(key_slot(keys[0])).id == heir.id
        assert m.uncovered() == []
        assert promoted.client().mget(keys) == keys
    finally:
        c.stop()
    assert not any(n.alive for n in c.nodes + c.dead)
    assert not any(os.path.exists(w) for w in workdirs)
