"""Spread (unpinned) routes over a real Redis / Valkey Cluster (proxy/spread.py,
proxy/spread_io.py): every request goes to the primary owning the slot of its rewritten
keys, multi-key commands are split per slot and merged, keyless ones fan out, and a
client's replies come back in order whatever nodes answered them. Against the `cluster`
fixture (tests/cluster_helpers.py: 3 primaries + 3 replicas). A spread route has no
shared links (each client has its own connection per node), so one upstream mode."""

from __future__ import annotations

import random
import threading

import pytest
import redis

from cluster_helpers import wait_until
from conftest import ProxyProcess
from integration_helpers import Raw, client, uniq
from proxy.cluster import key_slot


@pytest.fixture(scope="module")
def spread(cluster):
    """(proxy, namespace): a spread route with namespace NS on the cluster."""
    from proxy.embedded import free_port
    ns = uniq("sp")
    mport = free_port()
    p = ProxyProcess(["--upstream", f"redis+cluster://{cluster.seeds()}", "--namespace", ns, "--policy", "app",
                      "--metrics-listen", f"127.0.0.1:{mport}"])
    p.mport = mport
    yield p, ns
    p.stop()


def owner_has(cluster, key: bytes) -> bool:
    """Is `key` stored on the primary owning its slot? (the others answer -MOVED for it)"""
    return cluster.primary_for(key_slot(key)).call("EXISTS", key) == 1


def test_keys_land_on_the_owners_of_their_slots(cluster, spread):
    p, ns = spread
    c = client(p)
    keys = [f"k{i}" for i in range(30)]
    for k in keys:
        assert c.set(k, k)
    assert [c.get(k) for k in keys] == [k.encode() for k in keys]
    for k in keys:
        assert owner_has(cluster, f"{ns}:{k}".encode())
    # the namespace spreads: all three primaries hold some of them
    holders = {cluster.primary_for(key_slot(f"{ns}:{k}".encode())).port for k in keys}
    assert len(holders) == 3
    # client hash tags choose the slot: {u}:a and {u}:b stay together
    assert c.set("{u1}:a", "1") and c.set("{u1}:b", "2")
    assert c.eval("return redis.call('get', KEYS[1]) .. redis.call('get', KEYS[2])", 2, "{u1}:a", "{u1}:b") \
        == b"12"


def test_split_commands_answer_as_one_redis(cluster, spread):
    """MGET, MSET, DEL, UNLINK, EXISTS, TOUCH over keys of many slots: the replies one
    Redis holding the same keys gives (a dict stands for it: values in key order, counts
    of keys, duplicates counted as Redis counts them)."""
    p, ns = spread
    c = client(p)
    pre = uniq("s")
    keys = [f"{pre}:{i}" for i in range(40)]
    model = {k: f"v{i}".encode() for i, k in enumerate(keys)}
    assert c.mset(model) is True
    probe = keys[::3] + [f"{pre}:missing", keys[0]]
    assert c.mget(probe) == [model.get(k) for k in probe]
    assert c.exists(*probe) == sum(k in model for k in probe)
    assert c.touch(*probe) == sum(k in model for k in probe)
    assert c.delete(*keys[:10], f"{pre}:missing") == 10
    assert c.unlink(*keys[10:20], keys[10]) == 10
    for k in keys[:20]:
        del model[k]
    assert c.mget(keys) == [model.get(k) for k in keys]
    for k in keys[20:]:
        assert owner_has(cluster, f"{ns}:{k}".encode())
    # one slot: not split, the server's own reply (errors included)
    assert c.mget("{t}a", "{t}b") == [None, None]
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        c.execute_command("MSET", "a")


def test_cross_slot_commands_are_refused_by_the_proxy(spread):
    p, _ = spread
    c = client(p)
    a, b = "x1", "x2"
    assert key_slot(a.encode()) != key_slot(b.encode())
    for cmd in (["MSETNX", a, "1", b, "2"], ["SINTERSTORE", a, b], ["RENAME", a, b], ["BLMPOP", "1", "2", a, b, "LEFT"]):
        with pytest.raises(redis.ResponseError) as e:
            c.execute_command(*cmd)
        # redis-py names the error by its code (CROSSSLOT) and keeps the text after it
        assert type(e.value) is redis.exceptions.ClusterCrossSlotError, cmd
        assert str(e.value) == "Keys in request don't hash to the same slot", cmd
    # fail closed: what is not routed on a spread route is refused naming the command, the route and why
    with pytest.raises(redis.ResponseError, match="WAIT is refused on route .*: on a spread route over a Redis "
                                                  "Cluster it waits for this connection's own writes"):
        c.execute_command("WAIT", "0", "0")
    with pytest.raises(redis.ResponseError, match="CLIENT TRACKING is refused on route .*invalidations come from "
                                                  "every node"):
        c.execute_command("CLIENT", "TRACKING", "on")
    assert c.ping() is True


def test_pipelines_over_several_nodes_come_back_in_order(spread):
    """Reply integrity: ECHO tokens interleaved with writes and reads over many slots,
    from several clients at once: every reply is its own request's."""
    p, _ = spread
    errors = []

    def run(n: int) -> None:
        try:
            c = client(p)
            rnd = random.Random(n)
            for rounds in range(20):
                pipe = c.pipeline(transaction=False)
                expect = []
                for i in range(50):
                    k = f"ri{n}:{rnd.randrange(10000)}"
                    tok = f"t{n}.{rounds}.{i}"
                    pipe.set(k, tok)
                    expect.append(True)
                    pipe.echo(tok)
                    expect.append(tok.encode())
                    pipe.get(k)
                    expect.append(tok.encode())
                    if i % 7 == 0:
                        pipe.mget(k, f"ri{n}:none{i}", k)
                        expect.append([tok.encode(), None, tok.encode()])
                got = pipe.execute()
                if got != expect:
                    errors.append((n, rounds, [(g, e) for g, e in zip(got, expect) if g != e][:3]))
                    return
        except Exception as e:  # reported below
            errors.append((n, repr(e)))
    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_keyless_commands_and_scripts(cluster, spread):
    p, ns = spread
    c = client(p)
    assert c.ping() is True and c.echo("hi") == b"hi"
    assert c.time() and c.info("server")["redis_version"]
    sha = c.script_load("return redis.call('incr', KEYS[1])")
    for n in cluster.primaries:  # script caches are per node: loaded on every primary
        assert n.call("SCRIPT", "EXISTS", sha) == [1]
    assert [c.evalsha(sha, 1, f"e{i}") for i in range(10)] == [1] * 10
    assert c.eval("return 7", 0) == 7


def test_scan_keys_dbsize_flushdb_over_every_primary(cluster, spread):
    p, ns = spread
    c = client(p)
    c.flushdb()
    assert c.dbsize() == 0 and c.keys("*") == [] and c.randomkey() is None
    names = {f"sc:{i}".encode() for i in range(300)} | {f"other:{i}".encode() for i in range(50)}
    pipe = c.pipeline(transaction=False)
    for k in names:
        pipe.set(k, "1")
    pipe.execute()
    assert c.dbsize() == 350
    assert sorted(c.keys("*")) == sorted(names)
    assert sorted(c.keys("sc:*")) == sorted(k for k in names if k.startswith(b"sc:"))
    # SCAN over the three nodes, with MATCH and COUNT: every key, none from outside. (A key
    # twice is what Redis's own SCAN may give while a node's table is being rehashed, as
    # just after these writes; that each node is walked once is tests/test_spread.py's.)
    seen = list(c.scan_iter(count=7))
    assert set(seen) == names
    seen = list(c.scan_iter(match="other:*", count=1000))
    assert set(seen) == {k for k in names if k.startswith(b"other:")}
    cursor, batch = c.scan(0, count=5)
    assert cursor != 0
    assert c.randomkey() in names
    # the keys really are on every primary
    for n in cluster.primaries:
        assert n.call("KEYS", f"{ns}:*")
    c.flushdb()
    assert c.dbsize() == 0
    assert all(n.call("KEYS", f"{ns}:*") == [] for n in cluster.primaries)


def test_multi_exec_in_one_slot_and_crossslot(cluster, spread):
    p, ns = spread
    c = client(p)
    with c.pipeline(transaction=True) as tx:
        tx.set("{acct}:a", "1").incr("{acct}:n").get("{acct}:a")
        assert tx.execute() == [True, 1, b"1"]
    owner = cluster.primary_for(key_slot(f"{ns}:{{acct}}:a".encode()))
    assert owner.call("GET", f"{ns}:{{acct}}:n") == b"1"
    # keys of two slots in one transaction: CROSSSLOT for the command, EXECABORT at EXEC
    with c.pipeline(transaction=True) as tx:
        tx.set("{acct}:a", "2").set("{other}:b", "3")
        with pytest.raises(redis.ResponseError):
            tx.execute()
    assert c.get("{acct}:a") == b"1" and c.get("{other}:b") is None
    # MULTI typed command by command; a keyless transaction
    r = Raw("127.0.0.1", p.port)
    for cmd, reply in ((("MULTI",), b"+OK\r\n"), (("PING",), b"+QUEUED\r\n"), (("INCR", "{acct}:n"), b"+QUEUED\r\n"),
                       (("EXEC",), b"*2\r\n+PONG\r\n:2\r\n"), (("MULTI",), b"+OK\r\n"),
                       (("PING",), b"+QUEUED\r\n"), (("EXEC",), b"*1\r\n+PONG\r\n")):
        r.send(cmd)
        assert r.read() == [reply], cmd
    # a command refused while queueing: EXEC answers EXECABORT and nothing runs
    r.send(("MULTI",), ("TIME", "x"), ("SET", "{acct}:z", "1"), ("EXEC",))
    assert r.read(4) == [b"+OK\r\n", b"-ERR wrong number of arguments for 'time' command\r\n", b"+QUEUED\r\n",
                         b"-EXECABORT Transaction discarded because of previous errors.\r\n"]
    assert c.get("{acct}:z") is None
    # WATCH: aborted by another client's write
    with c.pipeline(transaction=True) as tx:
        tx.watch("{acct}:a")
        client(p).set("{acct}:a", "changed")
        tx.multi()
        tx.set("{acct}:a", "mine")
        with pytest.raises(redis.WatchError):
            tx.execute()
    assert c.get("{acct}:a") == b"changed"


def test_brpop_blocks_on_the_owner(cluster, spread):
    p, ns = spread
    q = "{jobs}:q"
    owner = cluster.primary_for(key_slot(f"{ns}:{q}".encode()))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", client(p).brpop([q, "{jobs}:q2"], timeout=20)))
    t.start()
    wait_until(lambda: owner.blocked("brpop"), "the BRPOP blocked on the owner")
    client(p).lpush(q, "job")
    t.join(20)
    assert box["v"] == (q.encode(), b"job")


def test_pub_sub(cluster, spread):
    """SUBSCRIBE / PSUBSCRIBE on one node (messages are cluster-wide), SSUBSCRIBE on the
    owner of the channel's slot; PUBLISH / SPUBLISH through the proxy."""
    p, ns = spread
    c = client(p)
    # a message published on another node reaches a subscriber through the proxy
    sub = client(p).pubsub()
    sub.subscribe("news")
    sub.psubscribe("new*")
    assert sub.get_message(timeout=10)["type"] == "subscribe"
    assert sub.get_message(timeout=10)["type"] == "psubscribe"
    cluster.primaries[2].call("PUBLISH", f"{ns}:news", "direct")
    assert c.publish("news", "hi") >= 1
    got = [sub.get_message(timeout=10, ignore_subscribe_messages=True) for _ in range(4)]
    assert sorted((m["type"], m["channel"], m["data"]) for m in got) == [
        ("message", b"news", b"direct"), ("message", b"news", b"hi"),
        ("pmessage", b"news", b"direct"), ("pmessage", b"news", b"hi")]
    sub.close()
    # shard channels: on the owner of their slot
    owner = cluster.primary_for(key_slot(f"{ns}:orders".encode()))
    ssub = client(p).pubsub()
    ssub.ssubscribe("orders")
    assert ssub.get_message(timeout=10)["type"] == "ssubscribe"
    assert owner.call("PUBSUB", "SHARDNUMSUB", f"{ns}:orders")[1] == 1
    assert c.spublish("orders", "o1") == 1
    m = ssub.get_message(timeout=10, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"orders", b"o1")
    ssub.close()
    # RESP3: commands between messages on the subscriptions' node; after the last
    # UNSUBSCRIBE the connection reaches every node again
    r = Raw("127.0.0.1", p.port)
    r.send(("HELLO", "3"))
    assert r.read()[0].startswith(b"%")
    r.send(("SUBSCRIBE", "ch3"))
    assert r.read() == [b">3\r\n$9\r\nsubscribe\r\n$3\r\nch3\r\n:1\r\n"]
    r.send(("PING",), ("KEYS", "*"))
    first, second = r.read(2)
    assert first == b"+PONG\r\n" and b"stays on the node of its subscriptions" in second
    r.send(("UNSUBSCRIBE",))
    assert r.read() == [b">3\r\n$11\r\nunsubscribe\r\n$3\r\nch3\r\n:0\r\n"]
    keys = [f"after{i}" for i in range(12)]
    r.send(*[("SET", k, "1") for k in keys], ("DEL", *keys))
    assert r.read(13) == [b"+OK\r\n"] * 12 + [b":12\r\n"]


def test_slot_migrated_during_traffic(cluster, spread):
    """Pipelines of RPUSH (in a slot being migrated) + ECHO + SET (other slots) from three
    clients while the slot moves: every -ASK and -MOVED is followed by the proxy (the
    request was not run; it is sent again where the redirect says, its reply in its
    place), so no client sees one; every acknowledged write is stored exactly once,
    every ECHO is its own."""
    from test_cluster_routing import Writer, _check_writes

    class MixedWriter(Writer):
        def run(self) -> None:
            c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=20)
            i = 0
            while not self.stop.is_set():
                i += 1
                v = f"{self.tag}-{i}"
                try:
                    with c.pipeline(transaction=False) as pl:
                        pl.rpush(self.key, v).echo(v).set(f"other:{self.tag}:{i % 50}", v)
                        r = pl.execute(raise_on_error=False)
                except (redis.ConnectionError, redis.TimeoutError):
                    self.unknown.append(v)
                    continue
                if isinstance(r[0], redis.ResponseError):
                    text = str(r[0])
                    if "proxy: hash slot" in text:
                        self.redirected.append(v)
                        self.asks += "-ASK" in text
                    else:
                        self.unknown.append(v)
                elif isinstance(r[0], int) and r[1] == v.encode() and r[2] is True:
                    self.acked.append(v)
                else:
                    self.mismatch.append((v, r))
            c.close()

    p, ns = spread
    tag = uniq("mig")
    slot = key_slot(tag.encode())
    src = cluster.primary_for(slot)
    dst = next(n for n in cluster.primaries if n is not src)
    writers = [MixedWriter(p.port, f"{{{tag}}}:list{i}", f"w{i}") for i in range(3)]
    for w in writers:
        w.start()
    try:
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers), "traffic before the migration")
        asking = lambda: int(dst.info("commandstats").get("cmdstat_asking", {}).get("calls", 0))  # noqa: E731
        before = asking()
        cluster.begin_migration(slot, src, dst)
        cluster.move_keys(slot, src, dst)
        # keys already moved: the old owner answers -ASK, the proxy sends ASKING + the request to dst
        wait_until(lambda: asking() >= before + 3, "ASK followed by the proxy")
        cluster.move_keys(slot, src, dst)
        cluster.finish_migration(slot, dst)
        marks = [len(w.acked) for w in writers]
        wait_until(lambda: all(len(w.acked) >= m + 20 for w, m in zip(writers, marks)), "traffic on the new owner")
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)
    c = client(p)
    for i, w in enumerate(writers):
        _check_writes([w], c.lrange(f"{{{tag}}}:list{i}", 0, -1))
        assert w.redirected == [] and w.unknown == [], (w.redirected[:3], w.unknown[:3])
    assert dst.call("LLEN", f"{ns}:{{{tag}}}:list0") > 0 and src.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    # the redirects the proxy followed are counted (at least the ASKs the importing node saw)
    from test_limits import metric, scrape
    assert metric(scrape(p.mport), "keyspace_proxy_cluster_redirects_total", kind="ask") >= 3


def test_resp3_and_connection_state_reach_every_node(cluster, spread):
    """HELLO 3 and CLIENT SETNAME go to every node the client uses, opened before or after."""
    p, ns = spread
    c = client(p, protocol=3)
    name = uniq("nm")
    c.client_setname(name)
    keys = [f"r3:{i}" for i in range(30)]
    for k in keys:
        c.hset(k, mapping={"f": k})
    assert [c.hgetall(k) for k in keys] == [{b"f": k.encode()} for k in keys]
    assert c.mget([f"nope{i}" for i in range(10)]) == [None] * 10
    assert c.client_getname() == name.encode()
    # every primary has a connection of this client, named and speaking RESP3
    for n in cluster.primaries:
        lines = [ln for ln in n.call("CLIENT", "LIST").decode().splitlines() if f"name={name} " in ln]
        assert lines and all("resp=3" in ln for ln in lines), n


def test_blocked_brpop_follows_its_slot(cluster, spread):
    """A BRPOP blocked on a node whose slot moves is answered -MOVED by the server (it
    was not served): the proxy blocks it again on the new owner, and the client gets the
    job pushed there (with the command's whole timeout again)."""
    p, ns = spread
    tag = uniq("blk")
    slot = key_slot(tag.encode())
    src = cluster.primary_for(slot)
    dst = next(n for n in cluster.primaries if n is not src)
    box = {}

    def block():
        try:
            box["v"] = client(p, socket_timeout=40).brpop([f"{{{tag}}}:qa", f"{{{tag}}}:qb"], timeout=30)
        except redis.RedisError as e:
            box["e"] = e
    t = threading.Thread(target=block)
    t.start()
    wait_until(lambda: src.blocked("brpop"), "the BRPOP blocked on the owner")
    cluster.migrate_slot(slot, dst)
    wait_until(lambda: dst.blocked("brpop"), "the BRPOP blocked again on the new owner")
    client(p).lpush(f"{{{tag}}}:qb", "job")
    t.join(40)
    assert box == {"v": (f"{{{tag}}}:qb".encode(), b"job")}


def test_primary_killed_and_replica_promoted():
    """Its own cluster: a primary SIGKILLed under traffic over every slot. A client with
    a request on the dead node (a blocked BLPOP) gets `upstream unavailable` (the proxy
    cannot know whether it ran) and is closed; one that owed nothing goes on; new connections reach the promoted replica once the map is
    read again; readiness follows; writes WAITed for on the node before the kill are there."""
    from cluster_helpers import start_cluster
    from proxy.embedded import free_port
    from test_cluster_routing import ready, readiness_text
    c = start_cluster("valkey")
    p = None
    try:
        victim = c.primaries[2]
        mport = free_port()
        ns = uniq("fo")
        p = ProxyProcess(["--upstream", f"redis+cluster://{c.seeds()}", "--namespace", ns, "--policy", "app",
                          "--metrics-listen", f"127.0.0.1:{mport}"])
        assert ready(mport)
        r = client(p)
        keys = [f"safe{i}" for i in range(60)]
        r.mset({k: k for k in keys})
        for n in c.primaries:  # every write on its replica before the kill
            assert n.call("WAIT", 1, 10000) == 1
        on_victim = next(k for k in keys if c.primary_for(key_slot(f"{ns}:{k}".encode())) is victim)
        idle = Raw("127.0.0.1", p.port)
        idle.send(("GET", on_victim))
        assert idle.read() == [b"$%d\r\n%s\r\n" % (len(on_victim), on_victim.encode())]
        # a request owed by the victim when it dies: a blocked BLPOP on a list in its slots
        queue = next(q for q in (f"q{i}" for i in range(1000))
                     if c.primary_for(key_slot(f"{ns}:{q}".encode())) is victim)
        held = Raw("127.0.0.1", p.port)
        held.send(("BLPOP", queue, "0"))
        wait_until(lambda: victim.blocked("blpop"), "the BLPOP blocked on the victim")
        c.kill_primary(victim)
        # the request owed by the dead node: an error (the proxy cannot know whether it ran)
        # and the connection closed, never left hanging
        held.sock.settimeout(30)
        try:
            got = held.sock.recv(65536)
        except OSError:
            got = b""
        assert got == b"" or got.startswith(b"-ERR upstream unavailable"), got
        # a connection that owed nothing when the node died goes on: its next request is
        # answered by the promoted replica, or refused while the map is read again; never
        # a hang, never another request's reply
        idle.sock.settimeout(30)
        idle.send(("GET", on_victim))
        got = idle.sock.recv(65536)
        assert got == b"$%d\r\n%s\r\n" % (len(on_victim), on_victim.encode()) or got.startswith(b"-"), got
        wait_until(lambda: client(p).mget(keys) == [k.encode() for k in keys], "every key read again")
        wait_until(lambda: ready(mport), "ready again")
        # slots served by nobody: not ready, and the reason says so
        slot = key_slot(f"{ns}:{keys[0]}".encode())

        def uncovered() -> bool:
            c.unassign(slot)  # (again on every try: see unassign)
            return "does not cover every slot" in readiness_text(mport)
        wait_until(uncovered, "not ready while uncovered")
    finally:
        if p is not None:
            p.stop()
        c.stop()


def test_reply_timeout_on_a_node_connection(cluster):
    """limits.reply_timeout: a node that owes a reply and sends nothing (here: its writes
    paused by CLIENT PAUSE) is declared dead; the client gets the reason, never a hang.
    A blocked BRPOP owes a reply the server may take as long as asked: never timed."""
    ns = uniq("rt")
    p = ProxyProcess(["--upstream", f"redis+cluster://{cluster.seeds()}", "--namespace", ns, "--policy", "app",
                      "--reply-timeout", "1"])
    try:
        key = "paused"
        node = cluster.primary_for(key_slot(f"{ns}:{key}".encode()))
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("v", client(p).brpop(["{q}x"], timeout=2)))
        t.start()
        node.call("CLIENT", "PAUSE", 5000, "WRITE")  # far longer than the timeout
        with pytest.raises(redis.RedisError, match=r"within 1s \(\[limits\] reply_timeout\)"):
            client(p).set(key, "1")
        t.join(20)
        assert box == {"v": None}   # the BRPOP ran out its own timeout: not declared dead
    finally:
        p.stop()


def test_plain_requests_share_one_link_per_node(cluster, spread):
    """upstream_mode shared (the default): plain requests of many clients go on one link
    per node; a client that needs connection state (CLIENT SETNAME) or a transaction
    moves to connections of its own, its replies still in order."""
    p, ns = spread

    def connected():
        return [int(n.info("clients")["connected_clients"]) for n in cluster.primaries]
    keys = [f"sh{i}" for i in range(30)]
    client(p).mset({k: k for k in keys})
    before = connected()
    clients = [client(p) for _ in range(20)]
    for c in clients:
        assert c.mget(keys) == [k.encode() for k in keys] and c.get(keys[0]) == keys[0].encode()
    after = connected()
    assert all(a - b <= 2 for a, b in zip(after, before)), (before, after)
    # one of them takes connection state: its own connections from here on
    own = clients[0]
    own.client_setname("mine")
    pipe = own.pipeline(transaction=False)
    for k in keys:
        pipe.get(k).echo(k)
    assert pipe.execute() == [x for k in keys for x in (k.encode(), k.encode())]
    assert connected()[0] >= after[0] + 1
    assert [c.get(keys[1]) for c in clients] == [keys[1].encode()] * 20


def test_dedicated_mode(cluster):
    """upstream_mode dedicated: every client on connections of its own from the start."""
    p = ProxyProcess(["--upstream", f"redis+cluster://{cluster.seeds()}", "--namespace", uniq("dm"),
                      "--policy", "app", "--upstream-mode", "dedicated"])
    try:
        c = client(p)
        keys = [f"d{i}" for i in range(30)]
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.set(k, k).echo(k)
        assert pipe.execute() == [x for k in keys for x in (True, k.encode())]
        assert c.mget(keys) == [k.encode() for k in keys] and c.delete(*keys) == 30
        with c.pipeline(transaction=True) as tx:
            assert tx.set("{d}a", "1").incr("{d}n").execute() == [True, 1]
    finally:
        p.stop()


def test_many_clients_on_the_shared_links_get_their_own_replies(cluster, spread):
    """Reply integrity on the shared node links: eight clients with short pipelines (so
    they stay on the links) of SET + ECHO + GET + MGET over many slots at once."""
    p, _ = spread
    errors = []

    clients = [client(p) for _ in range(8)]  # kept open until the connections are counted

    def run(n: int) -> None:
        try:
            c = clients[n]
            rnd = random.Random(100 + n)
            for rounds in range(60):
                pipe = c.pipeline(transaction=False)
                expect = []
                for i in range(5):
                    k, tok = f"ln{n}:{rnd.randrange(5000)}", f"l{n}.{rounds}.{i}"
                    pipe.set(k, tok).echo(tok).get(k).mget(k, f"ln{n}:none", k)
                    expect += [True, tok.encode(), tok.encode(), [tok.encode(), None, tok.encode()]]
                got = pipe.execute()
                if got != expect:
                    errors.append((n, rounds, [(g, e) for g, e in zip(got, expect) if g != e][:3]))
                    return
        except Exception as e:  # reported below
            errors.append((n, repr(e)))
    before = [int(x.info("clients")["connected_clients"]) for x in cluster.primaries]
    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    after = [int(x.info("clients")["connected_clients"]) for x in cluster.primaries]
    assert all(a - b <= 2 for a, b in zip(after, before)), (before, after)  # they were on the links


def test_a_node_link_owing_replies_at_the_end_of_grace_closes_once_they_are_in(cluster):
    """A reload replaces the spread route (another route name: its node links are keyed by
    route, upstream, node and protocol, so a namespace change alone keeps them for the new
    route's clients) while a client waits on a node link for a reply (the node's writes
    paused): the grace period closes the client, and the old node link, which no route uses
    any more, closes once the reply owed on it is in (it is not kept open to the node)."""
    import signal
    from proxy.embedded import free_port
    from test_reload import closed_by_peer, wait_log, write
    port = free_port()

    def text(name):
        return (f'upstream = "redis+cluster://{cluster.seeds()}"\n[limits]\nreload_grace = 0.5\n'
                f'[[listener]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nnamespace = "{ns}"\npolicy = "app"\n')
    ns = uniq("rl")
    p = ProxyProcess([], text("sp"), port=port)
    try:
        key = uniq("held")
        node = cluster.primary_for(key_slot(f"{ns}:{key}".encode()))

        def links_after_set():  # the proxy's connection that ran the SET (the node link)
            r = node.client()
            try:
                return [c for c in r.client_list() if c.get("cmd") == "set" and int(c["id"]) != r.client_id()]
            finally:
                r.close()
        c = Raw("127.0.0.1", port)
        assert c.call("PING") == b"+PONG\r\n"
        node.call("CLIENT", "PAUSE", 4000, "WRITE")  # the SET below stays owed on the node link
        c.send(("SET", key, "v"))
        write(p, text("sp2"))
        p.process.send_signal(signal.SIGHUP)
        wait_log(p, "reload: generation 2")
        assert closed_by_peer(c.sock, timeout=10)  # closed at the end of the grace period
        c.close()
        wait_log(p, "grace period over")
        # the pause ends, the SET runs and its reply comes in: the retired link closes
        wait_until(lambda: node.call("EXISTS", f"{ns}:{key}") == 1, "the held SET to run")
        wait_until(lambda: not links_after_set(), "the retired node link to close")
    finally:
        p.stop()


def _push(proto: int, *items) -> bytes:
    """A pub/sub frame as one Redis sends it: RESP2 array or RESP3 push."""
    out = b"%s%d\r\n" % (b">" if proto == 3 else b"*", len(items))
    for x in items:
        out += b":%d\r\n" % x if isinstance(x, int) else b"$%d\r\n%s\r\n" % (len(x), x)
    return out


def _keys_per_primary(cluster, ns: str, prefix: str) -> list[str]:
    """One client key per primary (in the namespace's slots), ordered by primary."""
    owner = {}
    for i in range(200):
        k = f"{prefix}{i}"
        port = cluster.primary_for(key_slot(f"{ns}:{k}".encode())).port
        owner.setdefault(port, k)
        if len(owner) == len(cluster.primaries):
            break
    return [owner[n.port] for n in cluster.primaries]


def _read_until(r: Raw, done) -> list[bytes]:
    got = []
    while not done(got):
        got += r.read()
    return got


@pytest.mark.parametrize("proto", [2, 3])
def test_keyspace_notifications_from_every_node(cluster, spread, proto):
    """Keyspace / keyevent channels and patterns are subscribed on every primary (their
    events are node-local), the client sees what one Redis sends: one confirmation per
    channel with a single server's count, each node's events once; a classic channel in
    the same SUBSCRIBE stays on one node (its messages are cluster-wide: once)."""
    p, ns = spread
    for n in cluster.primaries:
        n.call("CONFIG", "SET", "notify-keyspace-events", "KEA")
    try:
        c = client(p)
        pre = uniq("kn")
        keys = _keys_per_primary(cluster, ns, f"{pre}:")
        marks = _keys_per_primary(cluster, ns, f"{pre}:m")
        r = Raw("127.0.0.1", p.port)
        if proto == 3:
            r.send(("HELLO", "3"))
            assert r.read()[0].startswith(b"%")
        chans = [f"__keyspace@0__:{k}".encode() for k in keys]
        r.send(("SUBSCRIBE", f"{pre}:ch", *chans))
        assert r.read(4) == [_push(proto, b"subscribe", f"{pre}:ch".encode(), 1)] + [
            _push(proto, b"subscribe", ch, i + 2) for i, ch in enumerate(chans)]
        r.send(("PSUBSCRIBE", "__keyevent@0__:*"))
        assert r.read() == [_push(proto, b"psubscribe", b"__keyevent@0__:*", 5)]
        # subscribed on every primary, under the namespace; the classic channel on one
        for k in keys:
            for n in cluster.primaries:
                assert n.call("PUBSUB", "NUMSUB", f"__keyspace@0__:{ns}:{k}")[1] == 1
        assert sum(n.call("PUBSUB", "NUMSUB", f"{ns}:{pre}:ch")[1] for n in cluster.primaries) == 1
        assert sum(n.call("PUBSUB", "NUMPAT") for n in cluster.primaries) == 3
        for k in keys:
            assert c.set(k, "v")
        assert c.publish(f"{pre}:ch", "hello") == 1
        # a marker key on each node: its event comes after anything that node sent before
        for k in marks:
            assert c.set(k, "m")
        want_marks = {_push(proto, b"pmessage", b"__keyevent@0__:*", b"__keyevent@0__:set", k.encode())
                      for k in marks}
        got = _read_until(r, lambda got: want_marks <= set(got))
        expected = [_push(proto, b"message", ch, b"set") for ch in chans] + [
            _push(proto, b"pmessage", b"__keyevent@0__:*", b"__keyevent@0__:set", k.encode()) for k in keys] + [
            _push(proto, b"message", f"{pre}:ch".encode(), b"hello")] + sorted(want_marks)
        assert sorted(got) == sorted(expected)
        if proto == 3:  # commands between messages, on the subscriptions' node
            r.send(("PING",))
            assert r.read() == [b"+PONG\r\n"]
        # UNSUBSCRIBE without arguments: a single server's confirmations (counts down to
        # the pattern left), then off every node
        r.send(("UNSUBSCRIBE",))
        got = r.read(4)
        assert [int(f.rsplit(b":", 1)[1][:-2]) for f in got] == [4, 3, 2, 1]
        assert {f.split(b"\r\n")[4] for f in got} == {f"{pre}:ch".encode(), *chans}
        r.send(("PUNSUBSCRIBE", "__keyevent@0__:*"))
        assert r.read() == [_push(proto, b"punsubscribe", b"__keyevent@0__:*", 0)]
        wait_until(lambda: all(n.call("PUBSUB", "NUMPAT") == 0 and
                               n.call("PUBSUB", "NUMSUB", f"__keyspace@0__:{ns}:{keys[0]}")[1] == 0
                               for n in cluster.primaries), "the subscriptions gone from every primary")
        # the connection reaches every node again; no stray frame is left on it
        r.send(*[("SET", k, "2") for k in keys + marks], ("MGET", *keys), ("PING",))
        got = r.read(len(keys + marks) + 2)
        assert got[:len(keys + marks)] == [b"+OK\r\n"] * len(keys + marks)
        assert got[-1] == b"+PONG\r\n"
    finally:
        for n in cluster.primaries:
            n.call("CONFIG", "SET", "notify-keyspace-events", "")


def test_subscriptions_move_when_their_node_is_lost():
    """Its own cluster: a primary SIGKILLed while clients are subscribed. A connection
    subscribed on it (a shard channel of its slots, a classic channel, a keyspace pattern)
    is resubscribed on the promoted replica, one subscribed elsewhere gets its keyspace
    subscriptions on the promoted replica: neither is closed, neither gets a confirmation
    it did not ask for, and both receive what is published after the failover."""
    from cluster_helpers import start_cluster
    c = start_cluster("valkey")
    p = None
    try:
        for n in c.nodes:
            n.call("CONFIG", "SET", "notify-keyspace-events", "KA")
        victim = c.primaries[2]
        ns = uniq("mv")
        p = ProxyProcess(["--upstream", f"redis+cluster://{c.seeds()}", "--namespace", ns, "--policy", "app"])
        on_victim = next(f"k{i}" for i in range(500) if c.primary_for(key_slot(f"{ns}:k{i}".encode())) is victim)
        shard = next(f"s{i}" for i in range(500) if c.primary_for(key_slot(f"{ns}:s{i}".encode())) is victim)
        # a: RESP2, subscribed on the victim (its shard channel chooses the node)
        a = Raw("127.0.0.1", p.port)
        a.send(("SSUBSCRIBE", shard), ("SUBSCRIBE", "news"), ("PSUBSCRIBE", "__keyspace@0__:k*"))
        assert a.read(3) == [_push(2, b"ssubscribe", shard.encode(), 1), _push(2, b"subscribe", b"news", 1),
                             _push(2, b"psubscribe", b"__keyspace@0__:k*", 2)]
        assert victim.call("PUBSUB", "SHARDNUMSUB", f"{ns}:{shard}")[1] == 1
        # b: RESP3, subscribed on the home node; the victim has its keyspace channel
        b = Raw("127.0.0.1", p.port)
        b.send(("HELLO", "3"))
        assert b.read()[0].startswith(b"%")
        ch = f"__keyspace@0__:{on_victim}".encode()
        b.send(("SUBSCRIBE", ch))
        assert b.read() == [_push(3, b"subscribe", ch, 1)]
        assert victim.call("PUBSUB", "NUMSUB", f"__keyspace@0__:{ns}:{on_victim}")[1] == 1
        # d: classic channels only, left on the victim by a shard channel unsubscribed
        d = Raw("127.0.0.1", p.port)
        d.send(("SSUBSCRIBE", shard), ("SUBSCRIBE", "alerts"), ("SUNSUBSCRIBE", shard))
        assert d.read(3) == [_push(2, b"ssubscribe", shard.encode(), 1), _push(2, b"subscribe", b"alerts", 1),
                             _push(2, b"sunsubscribe", shard.encode(), 0)]  # (shard channels counted apart)
        assert victim.call("PUBSUB", "NUMSUB", f"{ns}:alerts")[1] == 1
        promoted = c.kill_primary(victim)
        # subscribed again on the promoted replica (messages published before may be lost)
        wait_until(lambda: promoted.call("PUBSUB", "SHARDNUMSUB", f"{ns}:{shard}")[1] == 1 and
                   promoted.call("PUBSUB", "NUMSUB", f"__keyspace@0__:{ns}:{on_victim}")[1] == 1 and
                   promoted.call("PUBSUB", "NUMPAT") == 1, "the subscriptions on the promoted replica")
        w = client(p)
        wait_until(lambda: w.set(on_victim, "after") is True, "a write on the promoted replica")
        assert w.spublish(shard, "s-after") == 1
        w.publish("news", "n-after")  # (the count is the receiving node's subscribers: 0 or 1)
        assert sorted(a.read(3)) == sorted([
            _push(2, b"pmessage", b"__keyspace@0__:k*", f"__keyspace@0__:{on_victim}".encode(), b"set"),
            _push(2, b"smessage", shard.encode(), b"s-after"), _push(2, b"message", b"news", b"n-after")])
        assert b.read() == [_push(3, b"message", ch, b"set")]
        # d's classic channel on a live primary
        wait_until(lambda: sum(n.call("PUBSUB", "NUMSUB", f"{ns}:alerts")[1] for n in c.primaries) == 1,
                   "the classic subscription on a live primary")
        w.publish("alerts", "a-after")
        assert d.read() == [_push(2, b"message", b"alerts", b"a-after")]
        # still a subscriber with its own counts: UNSUBSCRIBE as on one server
        b.send(("UNSUBSCRIBE",), ("PING",))
        assert b.read(2) == [_push(3, b"unsubscribe", ch, 0), b"+PONG\r\n"]
        a.send(("PING",))
        assert a.read() == [_push(2, b"pong", b"")]
    finally:
        if p is not None:
            p.stop()
        c.stop()
