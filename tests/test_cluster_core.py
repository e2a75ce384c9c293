"""proxy/cluster.py against a real cluster: key slots checked with CLUSTER KEYSLOT, slot maps
built from CLUSTER SHARDS / CLUSTER SLOTS replies recorded from the cluster the test
started (RESP2 and RESP3, IPs, announced hostnames, `?`, unknown endpoints), MOVED and
ASK errors recorded the same way. No reply here is written by hand."""

from __future__ import annotations

import random

import hiredis
import pytest

from cluster_helpers import start_cluster, wait_until
from integration_helpers import Raw
from proxy.cluster import (SLOTS, CrossSlot, Node, Shard, SlotMap, common_slot, crc16, group_by_slot, hash_tag, key_slot,
                           parse_redirect)


def parse(raw: bytes):
    """A recorded reply as the proxy reads replies (hiredis: RESP3 maps become dicts)."""
    r = hiredis.Reader()
    r.feed(raw)
    return r.gets()


def record(node, *args, proto: int = 2, asking: bool = False) -> bytes:
    s = Raw(node.host, node.port)
    try:
        if proto == 3:
            s.call("HELLO", "3")
        if asking:
            s.call("ASKING")
        return s.call(*args)
    finally:
        s.close()


EDGE_KEYS = [
    b"", b"{}", b"{}x", b"x{}", b"{}{a}", b"{a}", b"{a}{b}", b"{{a}}", b"{{}}", b"{a", b"a}", b"}{a}",
    b"}a{", b"{user1000}.following", b"{user1000}.followers", b"foo{}{bar}", b"foo{{bar}}zap",
    b"foo{bar}{zap}", b"a{b}c{d}", b"{\x00}", b"\x00{\xff}\x00", b"\xff\xfe{", b"{" * 50, b"}" * 50,
    b"{ }", b"ns:{tag}:k", b"{ns}:{tag}:k", b"{ns}:k", b"123456789", b"\r\n{\r\n}",
]


def random_keys(n: int, seed: int = 15) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    alphabet = b"ab{}{}:\x00\xff "
    for _ in range(n):
        if rnd.random() < 0.5:  # braces often, so tags of every shape come up
            out.append(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))))
        else:
            out.append(bytes(rnd.randrange(256) for _ in range(rnd.randint(0, 40))))
    return out


def test_crc16_check_value():
    assert crc16(b"123456789") == 0x31C3   # the CRC-16/XMODEM check value


def test_hash_tag_rule():
    assert hash_tag(b"{user1000}.following") == b"user1000"
    assert hash_tag(b"foo{}{bar}") == b"foo{}{bar}"      # the first tag is empty: the whole key
    assert hash_tag(b"foo{{bar}}zap") == b"{bar"         # from the first { to the first } after it
    assert hash_tag(b"foo{bar}{zap}") == b"bar"          # only the first tag counts


def test_key_slot_matches_the_server(cluster):
    node = cluster.primaries[0]
    keys = EDGE_KEYS + random_keys(2000)
    r = node.client()
    try:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", k)
        expected = pipe.execute()
    finally:
        r.close()
    got = [key_slot(k) for k in keys]
    wrong = [(k, g, e) for k, g, e in zip(keys, got, expected) if g != e]
    assert not wrong, wrong[:10]


def test_common_slot():
    assert common_slot([]) is None
    assert common_slot([b"{q}a", b"{q}b", b"q"]) == key_slot(b"q")
    with pytest.raises(CrossSlot):
        common_slot([b"a", b"b"])


def _expected_owners(cluster) -> dict:
    """slot range -> (primary port, replica ports), from how the test assigned them."""
    out = {}
    for p in cluster.primaries:
        reps = sorted(r.port for r in cluster.replicas if r.primary_of is p)
        for lo, hi in cluster.ranges[p.id]:
            out[(lo, hi)] = (p.id, p.port, reps)
    return out


@pytest.mark.parametrize("command", ["SHARDS", "SLOTS"])
@pytest.mark.parametrize("proto", [2, 3])
def test_slot_map_from_recorded_reply(cluster, command, proto):
    raw = record(cluster.replicas[0], "CLUSTER", command, proto=proto)
    assert raw[:1] == b"*"
    value = parse(raw)
    m = (SlotMap.from_shards if command == "SHARDS" else SlotMap.from_slots)(value, cluster.replicas[0].host)
    assert m.uncovered() == []
    for (lo, hi), (pid, pport, reps) in _expected_owners(cluster).items():
        for slot in (lo, (lo + hi) // 2, hi):
            prim = m.primary(slot)
            assert (prim.id, prim.host, prim.port, prim.primary) == (pid, "127.0.0.1", pport, True)
            assert sorted(r.port for r in m.replicas(slot)) == reps
            assert all(not r.primary for r in m.replicas(slot))
    assert sorted(n.port for n in m.primaries()) == sorted(p.port for p in cluster.primaries)
    assert len(m.nodes()) == len(cluster.nodes)


@pytest.mark.parametrize("command", ["SHARDS", "SLOTS"])
def test_not_a_cluster(server, command):
    """A server without cluster support answers with an error: a clear ValueError."""
    raw = record(server, "CLUSTER", command)
    assert raw.startswith(b"-ERR")
    build = SlotMap.from_shards if command == "SHARDS" else SlotMap.from_slots
    with pytest.raises(ValueError) as e:
        build(parse(raw))
    assert f"CLUSTER {command} answered" in str(e.value) and "cluster support disabled" in str(e.value)
    with pytest.raises(ValueError):
        build([[b"slots"]])   # a shape no server sends


def test_node_for_keys_is_where_the_server_takes_them(cluster):
    m = SlotMap.from_shards(parse(record(cluster.primaries[0], "CLUSTER", "SHARDS")))
    keys = random_keys(200, seed=3) + EDGE_KEYS
    for k in keys:
        node = m.node_for_keys([k])
        reply = record(node, "SET", k, b"v")
        assert reply == b"+OK\r\n", (k, reply)
    groups = m.group_by_node(keys)
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(keys)))
    for node, idx in groups.items():
        assert idx == sorted(idx)
        assert all(m.primary(key_slot(keys[i])) == node for i in idx)
    with pytest.raises(CrossSlot):
        m.node_for_keys([b"{a}1", b"{b}1"])
    # split per slot, each part accepted by its node as one command (no CROSSSLOT)
    parts = group_by_slot(keys)
    assert sorted(i for idx in parts.values() for i in idx) == list(range(len(keys)))
    for slot, idx in parts.items():
        node = m.primary(slot)
        reply = record(node, "MGET", *[keys[i] for i in idx])
        assert reply.startswith(b"*%d\r\n" % len(idx)), reply
    # why per slot and not per node: two slots of one node are still CROSSSLOT
    lo = cluster.ranges[cluster.primaries[0].id][0][0]
    a, b = cluster.keys_in_slot(lo, 1)[0], cluster.keys_in_slot(lo + 1, 1)[0]
    assert record(cluster.primaries[0], "MGET", a, b).startswith(b"-CROSSSLOT")


def _slot_of(cluster, owner) -> tuple[int, bytes]:
    lo, _ = cluster.ranges[owner.id][0]
    key = cluster.keys_in_slot(lo, 1)[0]
    return lo, key


def test_moved_recorded_ip(cluster):
    owner, other = cluster.primaries[1], cluster.primaries[0]
    slot, key = _slot_of(cluster, owner)
    raw = record(other, "GET", key)
    assert raw.startswith(b"-MOVED ")
    r = parse_redirect(parse(raw))           # a hiredis.ReplyError, as the proxy would see it
    assert (r.kind, r.slot, r.host, r.port) == ("MOVED", slot, "127.0.0.1", owner.port)
    assert parse_redirect(raw.rstrip(b"\r\n")) == r   # the raw line, leading '-' included
    assert r.address("elsewhere") == ("127.0.0.1", owner.port)
    m = SlotMap.from_shards(parse(record(other, "CLUSTER", "SHARDS")))
    assert m.moved(r).primary(slot).id == owner.id


def test_not_a_redirect(cluster):
    raw = record(cluster.primaries[0], "GET")
    assert raw.startswith(b"-ERR")
    assert parse_redirect(parse(raw)) is None


def test_ask_recorded_during_an_import(cluster):
    src, dst = cluster.primaries[2], cluster.primaries[0]
    slot, _ = _slot_of(cluster, src)
    slot += 7
    present, absent = cluster.keys_in_slot(slot, 2, prefix="ask")
    src.call("SET", present, "here")
    cluster.begin_migration(slot, src, dst)
    try:
        assert record(src, "GET", present) == b"$4\r\nhere\r\n"   # still served where it is
        raw = record(src, "GET", absent)
        r = parse_redirect(parse(raw))
        assert (r.kind, r.slot, r.host, r.port) == ("ASK", slot, "127.0.0.1", dst.port)
        # what a client does with it: ASKING, then the command, on the importing node
        assert record(dst, "SET", absent, "new", asking=True) == b"+OK\r\n"
        assert record(dst, "GET", absent).startswith(b"-MOVED ")   # not without ASKING
    finally:
        cluster.move_keys(slot, src, dst)
        cluster.finish_migration(slot, dst)
        cluster.migrate_slot(slot, src)   # back where the test found it
    assert cluster.primary_for(slot) is src
    assert src.call("GET", absent) == b"new" and src.call("GET", present) == b"here"


@pytest.fixture
def hostnames(cluster):
    """Every node announces `node-PORT.example` and prefers it as its endpoint, as
    ElastiCache does; restored afterwards."""
    names = {n.port: f"node-{n.port}.example" for n in cluster.nodes}
    for n in cluster.nodes:
        n.call("CONFIG", "SET", "cluster-announce-hostname", names[n.port])
        n.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "hostname")
    yield names
    for n in cluster.nodes:
        n.call("CONFIG", "SET", "cluster-announce-hostname", "")
        n.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "ip")


def _gossiped(node, names: dict, hidden: int | None = None) -> bytes:
    """CLUSTER SHARDS once `node` knows every other node's hostname (gossip takes a moment)."""
    def ready():
        m = SlotMap.from_shards(parse(record(node, "CLUSTER", "SHARDS")))
        return all(n.hostname == ("" if n.port == hidden else names[n.port]) for n in m.nodes())
    wait_until(ready, "hostnames to be gossiped")
    return record(node, "CLUSTER", "SHARDS")


@pytest.mark.parametrize("proto", [2, 3])
def test_hostnames_kept_as_announced(cluster, hostnames, proto):
    asker = cluster.primaries[0]
    _gossiped(asker, hostnames)
    for command, build in (("SHARDS", SlotMap.from_shards), ("SLOTS", SlotMap.from_slots)):
        m = build(parse(record(asker, "CLUSTER", command, proto=proto)), asker.host)
        for n in m.nodes():
            assert n.host == hostnames[n.port], (command, n)
            assert n.hostname == hostnames[n.port] if command == "SHARDS" else True
            assert n.ip == "127.0.0.1"
    owner = cluster.primaries[1]
    slot, key = _slot_of(cluster, owner)
    r = parse_redirect(parse(record(asker, "GET", key)))
    assert (r.host, r.port, r.slot) == (hostnames[owner.port], owner.port, slot)
    assert r.address(asker.host) == (hostnames[owner.port], owner.port)


def test_question_mark_endpoint(cluster, hostnames):
    """Hostnames preferred but one node announces none: the servers write `?`."""
    asker, bare = cluster.primaries[0], cluster.primaries[1]
    bare.call("CONFIG", "SET", "cluster-announce-hostname", "")
    _gossiped(asker, hostnames, hidden=bare.port)
    for command, build in (("SHARDS", SlotMap.from_shards), ("SLOTS", SlotMap.from_slots)):
        raw = record(asker, "CLUSTER", command, proto=3)
        m = build(parse(raw), asker.host)
        slot, key = _slot_of(cluster, bare)
        if command == "SLOTS":
            assert b"$1\r\n?\r\n" in raw
        assert m.primary(slot).host == "127.0.0.1"    # its IP, the one address there is
    raw = record(asker, "GET", key)
    r = parse_redirect(parse(raw))
    assert (r.host, r.port) == ("?", bare.port), raw
    m = SlotMap.from_shards(parse(record(asker, "CLUSTER", "SHARDS")), asker.host)
    assert r.address(asker.host, m) == ("127.0.0.1", bare.port)
    assert r.address(asker.host) is None   # without a map it cannot be known
    # nodes that share the port (6379 everywhere is common): no way to tell which
    twin = SlotMap([Shard(Node("x", "10.0.0.9", bare.port, True), (), ((0, 0),))])
    both = SlotMap(m.shards + twin.shards, [])
    assert r.address(asker.host, both) is None


@pytest.mark.parametrize("proto", [2, 3])
def test_unknown_endpoint(cluster, proto):
    """`cluster-preferred-endpoint-type unknown-endpoint` (nodes behind a load balancer):
    a NULL or empty endpoint means the host the client asked."""
    asker = cluster.primaries[0]
    for n in cluster.nodes:
        n.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "unknown-endpoint")
    try:
        for command, build in (("SHARDS", SlotMap.from_shards), ("SLOTS", SlotMap.from_slots)):
            m = build(parse(record(asker, "CLUSTER", command, proto=proto)), "lb.example")
            assert {n.host for n in m.nodes()} == {"lb.example"}
            assert sorted(n.port for n in m.nodes()) == sorted(n.port for n in cluster.nodes)
        owner = cluster.primaries[2]
        slot, key = _slot_of(cluster, owner)
        raw = record(asker, "GET", key)
        r = parse_redirect(parse(raw))
        assert (r.host, r.port) == ("", owner.port), raw
        assert r.address("lb.example") == ("lb.example", owner.port)
    finally:
        for n in cluster.nodes:
            n.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "ip")


def test_ipv6(cluster):
    """A small cluster on ::1: MOVED and the map carry IPv6 addresses, unbracketed."""
    c6 = start_cluster(cluster.kind, primaries=2, replicas_per_primary=0, host="::1",
                       slots=[[(0, 99), (200, 16383)], [(100, 199)]])   # uneven, as a test may assign
    try:
        a, b = c6.primaries
        slot, key = _slot_of(c6, b)
        raw = record(a, "GET", key)
        r = parse_redirect(parse(raw))
        assert (r.kind, r.slot, r.host, r.port) == ("MOVED", slot, "::1", b.port), raw
        m = SlotMap.from_shards(parse(record(a, "CLUSTER", "SHARDS")), "::1")
        assert m.primary(slot).addr == ("::1", b.port)
        assert [m.primary(s).port for s in (0, 99, 100, 199, 200, 16383)] == [a.port, a.port, b.port, b.port,
                                                                             a.port, a.port]
        assert m.uncovered() == []
        assert SlotMap.from_slots(parse(record(a, "CLUSTER", "SLOTS")), "::1").primary(slot).addr == ("::1", b.port)
    finally:
        c6.stop()


def test_slots_constant():
    assert SLOTS == 16384 and key_slot(b"\xff" * 100) < SLOTS


# -- redis+cluster:// URLs: parsed into seed nodes; what is not built refused at start


@pytest.mark.parametrize("url, seeds, user, password, tls", [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", (("10.0.0.1", 7000), ("10.0.0.2", 7001)), None, None, False),
    ("redis+cluster://cfg.example.cache.amazonaws.com", (("cfg.example.cache.amazonaws.com", 6379),),
     None, None, False),
    ("rediss+cluster://app:p%40ss%2Fw@[::1]:7000,[fe80::2],h:7002/0",
     (("::1", 7000), ("fe80::2", 6379), ("h", 7002)), "app", "p@ss/w", True),
    ("rediss+cluster://:secret@h:6380/", (("h", 6380),), None, "secret", True),
])
def test_cluster_url_parsed(url, seeds, user, password, tls):
    from proxy.config import parse_cluster_url
    c = parse_cluster_url(url)
    assert (c.seeds, c.username, c.password, c.tls is not None) == (seeds, user, password, tls)
    assert "secret" not in c.masked() and "p@ss" not in c.masked()


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://h:7000/2", "a cluster has db 0 only, got /2"),
    ("redis+cluster://h:7000?db=0", "unexpected query"),
    ("redis+cluster://::1:7000", "expected HOST:PORT (IPv6 as [::1]:7000)"),
    ("redis+cluster://h:7000,,i:7001", "bad seed ''"),
    ("redis+cluster://h:99999", "port must be a number from 1 to 65535 in seed 'h:99999'"),
    ("redis+cluster://:secret@h:x", "in seed 'h:x' of 'redis+cluster://:***@h:x'"),
])
def test_cluster_url_mistakes(url, message):
    from proxy.config import parse_cluster_url
    from proxy.schema import Invalid
    with pytest.raises(Invalid) as e:
        parse_cluster_url(url)
    assert message in str(e.value) and "secret" not in str(e.value)


def _start_refused(args: list[str]) -> str:
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("REDIS_URL", None)
    out = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60,
                         env=env, cwd=ROOT)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    return out.stderr


def test_cluster_upstream_refused_at_start(cluster, tmp_path):
    """Even with a real cluster at the seeds: what is not built is refused at start with
    a clear message (a client db mapped to another backend db: a cluster has db 0 only),
    not a proxy that half works. Spread (unpinned) routes are routed since the spread
    work (tests/test_cluster_spread.py)."""
    seeds = cluster.seeds()
    path = tmp_path / "p.toml"
    path.write_text(f'[[listener]]\nlisten = "127.0.0.1:0"\nupstream = "rediss+cluster://:secret@{seeds}"\n'
                    '[listener.databases.1]\ndb = 1\nnamespace = "b"\n')
    err = _start_refused(["--config", str(path)])
    assert "listener[0].databases.1.db: a Redis Cluster has db 0 only" in err and "secret" not in err
    err = _start_refused(["check", "--listen", "127.0.0.1:0", "--upstream", f"redis+cluster://{seeds}/3"])
    assert "a cluster has db 0 only" in err
