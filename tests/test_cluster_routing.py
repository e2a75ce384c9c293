"""Pinned routes over a real Redis / Valkey Cluster (`redis+cluster://`, proxy/cluster_route.py):
every request of a pinned route goes to the primary owning its namespace's slot; a slot
moved (MOVED, ASK) or a primary failed over is followed, and a redirect never reaches
the client (the proxy sends the request again, or the client gets -TRYAGAIN for a request
that was not run). Against the `cluster`
fixture (tests/cluster_helpers.py: 3 primaries + 3 replicas), every upstream mode."""

from __future__ import annotations

import threading

import pytest
import redis

from cluster_helpers import start_cluster, wait_until
from conftest import ProxyProcess
from integration_helpers import Raw, client, proxy_toml, uniq
from proxy.cluster import key_slot
from proxy.embedded import free_port
from test_limits import metric, scrape


def ns_on(cluster, node, base: str = "app") -> str:
    """A fresh namespace whose slot `node` serves now."""
    for i in range(100000):
        ns = f"{uniq(base)}{i}"
        if cluster.primary_for(key_slot(ns.encode())) is node:
            return ns
    raise AssertionError("no namespace found")


def pinned_proxy(start_proxy, cluster, ns: str, *extra):
    return start_proxy(["--upstream", f"redis+cluster://{cluster.seeds()}", "--namespace", ns,
                        "--slot", "pinned", "--policy", "app", *extra])


def test_a_pinned_route_runs_on_the_slot_owner(cluster, start_proxy):
    owner = cluster.primaries[1]
    ns = ns_on(cluster, owner)
    p = pinned_proxy(start_proxy, cluster, ns)
    c = client(p)
    assert c.set("a", "1") and c.get("a") == b"1"
    assert c.mset({"b": "2", "{user1}:c": "3"}) and c.mget("a", "b", "{user1}:c") == [b"1", b"2", b"3"]
    # stored as {NS}:key on the owner of NS's slot, and nowhere else
    assert sorted(owner.call("KEYS", f"{{{ns}}}:*")) == [f"{{{ns}}}:{k}".encode() for k in ("a", "b", "{user1}:c")]
    with c.pipeline(transaction=True) as tx:
        tx.incr("n").rpush("q", "x").lrange("q", 0, -1)
        assert tx.execute() == [1, 1, [b"x"]]
    assert c.eval("return redis.call('rpush', KEYS[1], ARGV[1]) + redis.call('incr', KEYS[2])",
                  2, "q", "n", "y") == 4
    assert c.rename("q", "q2") and c.lrange("q2", 0, -1) == [b"x", b"y"]
    assert sorted(c.keys("*")) == [b"a", b"b", b"n", b"q2", b"{user1}:c"]
    assert sorted(c.scan_iter(match="*")) == [b"a", b"b", b"n", b"q2", b"{user1}:c"]
    assert c.dbsize() == 5 and c.randomkey() in (b"a", b"b", b"n", b"q2", b"{user1}:c")
    # BRPOP over several queues: one slot, one blocked connection on the owner
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", client(p).brpop(["q1", "q2x", "q3"], timeout=20)))
    t.start()
    wait_until(lambda: owner.blocked("brpop"), "the BRPOP blocked on the owner")
    client(p).lpush("q3", "job")
    t.join(20)
    assert box["v"] == (b"q3", b"job")
    # pub/sub is cluster-wide: a message published through the proxy reaches its subscriber
    sub = client(p).pubsub()
    sub.subscribe("chan")
    assert sub.get_message(timeout=10)["type"] == "subscribe"
    assert c.publish("chan", "hi") >= 1
    m = sub.get_message(timeout=10, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"chan", b"hi")
    sub.close()
    # shard channels are in the namespace's slot ({NS}:chan): on the owner too
    ssub = client(p).pubsub()
    ssub.ssubscribe("orders")
    assert ssub.get_message(timeout=10)["type"] == "ssubscribe"
    assert c.spublish("orders", "o1") == 1
    m = ssub.get_message(timeout=10, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"orders", b"o1")
    ssub.close()
    # keyspace notifications are node-local: the owner's are the route's
    owner.call("CONFIG", "SET", "notify-keyspace-events", "KA")
    ksub = client(p).pubsub()
    ksub.subscribe("__keyspace@0__:watched")
    assert ksub.get_message(timeout=10)["type"] == "subscribe"
    c.set("watched", "1")
    m = ksub.get_message(timeout=10, ignore_subscribe_messages=True)
    assert (m["channel"], m["data"]) == (b"__keyspace@0__:watched", b"set")
    ksub.close()
    # WATCH: a transaction aborted by a write from another client
    w = client(p)
    with w.pipeline(transaction=True) as tx:
        tx.watch("a")
        client(p).set("a", "changed")
        tx.multi()
        tx.set("a", "mine")
        with pytest.raises(redis.WatchError):
            tx.execute()
    assert c.get("a") == b"changed"
    c.delete("watched")
    # SELECT: client db 0 only by default (a cluster has db 0)
    with pytest.raises(redis.ResponseError):
        c.execute_command("SELECT", "1")
    c.flushdb()
    assert c.dbsize() == 0 and owner.call("KEYS", f"{{{ns}}}:*") == []


def test_two_pinned_routes_on_different_primaries(cluster, start_proxy):
    a_node, b_node = cluster.primaries[0], cluster.primaries[2]
    na, nb = ns_on(cluster, a_node, "a"), ns_on(cluster, b_node, "b")
    seeds = f"redis+cluster://{cluster.seeds()}"
    pa, pb = free_port(), free_port()
    p = start_proxy(config_text=proxy_toml([
        {"listen": f"127.0.0.1:{pa}", "upstream": seeds, "namespace": na, "slot": "pinned", "policy": "app"},
        {"listen": f"127.0.0.1:{pb}", "upstream": seeds, "namespace": nb, "slot": "pinned", "policy": "app"},
    ]), port=pa)
    ca = redis.Redis(host="127.0.0.1", port=pa, socket_timeout=10)
    cb = redis.Redis(host="127.0.0.1", port=pb, socket_timeout=10)
    for i in range(20):
        ca.rpush("jobs", f"a{i}")
        cb.rpush("jobs", f"b{i}")
    assert ca.llen("jobs") == cb.llen("jobs") == 20
    assert a_node.call("LLEN", f"{{{na}}}:jobs") == 20 and b_node.call("LLEN", f"{{{nb}}}:jobs") == 20
    assert ca.keys("*") == [b"jobs"] and cb.keys("*") == [b"jobs"]
    assert p is not None


class Writer(threading.Thread):
    """RPUSH of unique ids (each with an ECHO in the same pipeline, so a reply handed to
    the wrong request shows; with `readback`, LINDEX key -1 instead, a request on the same
    key) until stopped. Outcomes per id: acked, redirected (-TRYAGAIN: not run), lost
    (connection error: unknown)."""

    def __init__(self, port: int, key: str, tag: str, readback: bool = False):
        super().__init__(daemon=True)
        self.port, self.key, self.tag, self.readback = port, key, tag, readback
        self.acked: list[str] = []
        self.redirected: list[str] = []
        self.unknown: list[str] = []
        self.asks = self.moves = 0
        self.stop = threading.Event()
        self.mismatch: list = []

    def run(self) -> None:
        c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=20)
        i = 0
        while not self.stop.is_set():
            i += 1
            v = f"{self.tag}-{i}"
            try:
                with c.pipeline(transaction=False) as pl:
                    pl.rpush(self.key, v)
                    if self.readback:
                        pl.lindex(self.key, -1)
                    else:
                        pl.echo(v)
                    r = pl.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                # (a ResponseError here: the connection's own handshake was refused,
                # upstream unavailable while a failover is followed; the RPUSH was not sent)
                self.unknown.append(v)
                continue
            if isinstance(r[0], redis.ResponseError):
                text = str(r[0])
                if "proxy: hash slot" in text:
                    self.redirected.append(v)
                    self.asks += "-ASK" in text
                    self.moves += "moved to" in text
                else:
                    self.unknown.append(v)  # upstream unavailable: sent, maybe run
            elif isinstance(r[0], int) and r[1] == v.encode():
                self.acked.append(v)
            else:
                self.mismatch.append((v, r))
        c.close()


def _check_writes(writers, items: list[bytes]) -> None:
    seen = [x.decode() for x in items]
    assert len(seen) == len(set(seen)), "a write was stored twice"
    seen = set(seen)
    for w in writers:
        assert not w.mismatch, w.mismatch[:3]
        assert set(w.acked) <= seen, "an acknowledged write is missing"
        assert not set(w.redirected) & seen, "a request answered -TRYAGAIN was run"


def test_slot_migrated_during_traffic(cluster, start_proxy):
    """No client sees a redirect: a request answered -ASK / -MOVED is sent again by the proxy
    (ASKING counted on the importing node), each pipeline's two requests on one key, so
    the ordering rule (docs/cluster.md) always allows it."""
    src = cluster.primaries[0]
    ns = ns_on(cluster, src, "mig")
    slot = key_slot(ns.encode())
    p = pinned_proxy(start_proxy, cluster, ns)
    writers = [Writer(p.port, f"list{i}", f"w{i}", readback=True) for i in range(3)]
    dst = cluster.primaries[1]
    asking = lambda: int(dst.client().info("commandstats").get("cmdstat_asking", {}).get("calls", 0))  # noqa: E731
    before = asking()
    for w in writers:
        w.start()
    try:
        wait_until(lambda: all(len(w.acked) >= 20 for w in writers), "traffic before the migration")
        cluster.begin_migration(slot, src, dst)
        cluster.move_keys(slot, src, dst)
        # keys already moved: the old owner answers -ASK, and the proxy follows it ...
        wait_until(lambda: asking() >= before + 3, "ASK followed by the proxy")
        cluster.move_keys(slot, src, dst)
        cluster.finish_migration(slot, dst)
        # ... and once handed over, the proxy follows the new owner
        marks = [len(w.acked) for w in writers]
        wait_until(lambda: all(len(w.acked) >= m + 20 for w, m in zip(writers, marks)), "traffic on the new owner")
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)
    c = client(p)
    for i, w in enumerate(writers):
        items = c.lrange(f"list{i}", 0, -1)
        _check_writes([w], items)
        assert not w.redirected, w.redirected[:3]
        # in the client's order: ids increase along the list
        ids = [int(x.decode().rsplit("-", 1)[1]) for x in items]
        assert ids == sorted(ids), "writes of one client stored out of order"
    assert dst.call("LLEN", f"{{{ns}}}:list0") > 0 and src.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


def test_ask_sent_again_only_where_the_clients_order_allows(cluster, start_proxy):
    """In the ASK window (one key moved to the importing node, one still on the old owner):
    a redirected request is sent again (ASKING, then it, on the importing node) when no
    later request of the client ran before it; otherwise it gets -TRYAGAIN and is not run.
    Inside MULTI a redirect is never followed: -TRYAGAIN, then EXECABORT."""
    src, dst = cluster.primaries[2], cluster.primaries[0]
    ns = ns_on(cluster, src, "ask")
    slot = key_slot(ns.encode())
    mport = free_port()
    p = pinned_proxy(start_proxy, cluster, ns, "--metrics-listen", f"127.0.0.1:{mport}")
    c = client(p)
    c.rpush("moved", "a")
    c.rpush("stays", "s")
    cluster.begin_migration(slot, src, dst)
    try:
        src.call("MIGRATE", dst.host, dst.tls_port or dst.port, "", 0, 10000, "KEYS", f"{{{ns}}}:moved")
        r = Raw("127.0.0.1", p.port)
        assert r.call("RPUSH", "moved", "b") == b":2\r\n"          # alone: sent again
        r.send(("RPUSH", "moved", "c"), ("ECHO", "x"))             # ECHO ran after it: not sent again
        first, second = r.read(2)
        assert first.startswith(b"-TRYAGAIN proxy: hash slot %d " % slot) and b"(-ASK)" in first, first
        assert second == b"$1\r\nx\r\n"
        r.send(("RPUSH", "stays", "t"), ("RPUSH", "moved", "d"))   # the last one redirected: sent again
        assert r.read(2) == [b":2\r\n", b":3\r\n"]
        r.send(("RPUSH", "moved", "e"), ("RPUSH", "moved", "f"))   # both redirected: both, in order
        assert r.read(2) == [b":4\r\n", b":5\r\n"]
        r.send(("MULTI",), ("RPUSH", "moved", "g"), ("EXEC",))
        multi, queued, ex = r.read(3)
        assert multi == b"+OK\r\n" and queued.startswith(b"-TRYAGAIN proxy: hash slot"), queued
        assert ex.startswith(b"-EXECABORT"), ex
        r.close()
        # every -ASK a node gave is counted (b, c, d, e, f, g); the two the client got as
        # -TRYAGAIN (c, g) are errors too
        text = scrape(mport)
        assert metric(text, "keyspace_proxy_cluster_redirects_total", kind="ask") == 6
        assert metric(text, "keyspace_proxy_cluster_redirects_total", kind="moved") == 0
        assert metric(text, "keyspace_proxy_errors_total", kind="cluster_redirect") == 2
    finally:
        cluster.move_keys(slot, src, dst)
        cluster.finish_migration(slot, dst)
    # each write once, in the client's order; none answered -TRYAGAIN stored
    assert dst.call("LRANGE", f"{{{ns}}}:moved", 0, -1) == [b"a", b"b", b"d", b"e", b"f"]
    assert dst.call("LRANGE", f"{{{ns}}}:stays", 0, -1) == [b"s", b"t"]


def test_blocked_brpop_when_its_slot_moves(cluster, start_proxy):
    """A client blocked on the old owner gets an error (never a hang, never another's
    reply), and blocks again on the new owner."""
    src = cluster.primaries[2]
    ns = ns_on(cluster, src, "blk")
    p = pinned_proxy(start_proxy, cluster, ns)
    box = {}

    def block():
        try:
            box["v"] = client(p).brpop(["qa", "qb"], timeout=25)
        except redis.RedisError as e:
            box["e"] = e
    t = threading.Thread(target=block)
    t.start()
    wait_until(lambda: src.blocked("brpop"), "the BRPOP blocked on the owner")
    dst = cluster.primaries[0]
    cluster.migrate_slot(key_slot(ns.encode()), dst)
    t.join(30)
    assert "v" not in box and ("hash slot" in str(box["e"])), box
    t = threading.Thread(target=block)
    box.clear()
    t.start()
    wait_until(lambda: dst.blocked("brpop"), "the BRPOP blocked on the new owner")
    client(p).lpush("qb", "job")
    t.join(30)
    assert box == {"v": (b"qb", b"job")}


@pytest.mark.parametrize("kind", ["valkey"])
def test_primary_killed_and_replica_promoted(kind, start_proxy):
    """Its own cluster: a primary SIGKILLed under traffic; the proxy follows the promoted
    replica (writes WAITed for before the kill are all there)."""
    c = start_cluster(kind)
    try:
        victim = c.primaries[2]
        ns = ns_on(c, victim, "fo")
        mport = free_port()
        p = pinned_proxy(start_proxy, c, ns, "--metrics-listen", f"127.0.0.1:{mport}")
        assert ready(mport)
        r = client(p)
        for i in range(50):
            r.rpush("safe", i)
        assert r.execute_command("WAIT", 1, 10000) == 1
        w = Writer(p.port, "live", "w")
        w.start()
        wait_until(lambda: len(w.acked) >= 20, "traffic before the kill")
        promoted = c.kill_primary(victim)
        mark = len(w.acked)
        wait_until(lambda: len(w.acked) >= mark + 20, "traffic on the promoted replica")
        w.stop.set()
        w.join(30)
        assert not w.mismatch
        assert r.lrange("safe", 0, -1) == [str(i).encode() for i in range(50)]
        assert promoted.call("LLEN", f"{{{ns}}}:safe") == 50
        items = [x.decode() for x in r.lrange("live", 0, -1)]
        assert len(items) == len(set(items)) and not set(w.redirected) & set(items)
        wait_until(lambda: ready(mport), "ready on the promoted replica")
        # the slot served by nobody: not ready, and the reason says so
        slot = key_slot(ns.encode())

        def uncovered() -> bool:
            c.unassign(slot)  # (again on every try: see unassign)
            return "no owner for hash slot" in readiness_text(mport)
        wait_until(uncovered, "not ready while the slot is uncovered")
    finally:
        c.stop()


def ready(mport: int) -> bool:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def readiness_text(mport: int) -> str:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


def test_not_ready_while_no_seed_answers(start_proxy):
    """No slot map: not ready, and a request gets an error naming why (never a hang)."""
    mport = free_port()
    p = start_proxy(["--upstream", f"redis+cluster://127.0.0.1:{free_port()}", "--namespace", "x",
                     "--slot", "pinned", "--metrics-listen", f"127.0.0.1:{mport}", "--connect-timeout", "1"])
    assert "no slot map" in readiness_text(mport) and not ready(mport)
    with pytest.raises(redis.RedisError, match="no slot map"):
        client(p).get("k")


def test_other_dbs_refused_on_a_cluster(cluster):
    """Fail closed: a cluster has db 0; a pinned route's dbs share its slot. (A spread
    route is accepted: tests/test_cluster_spread.py.)"""
    from proxy.config import ConfigError, from_dict
    seeds = f"redis+cluster://{cluster.seeds()}"
    assert from_dict({"listener": [{"listen": "127.0.0.1:0", "upstream": seeds, "namespace": "a"}]}
                     ).routes[0].upstream.slot is None
    with pytest.raises(ConfigError, match="db 0 only"):
        from_dict({"listener": [{"listen": "127.0.0.1:0", "upstream": seeds, "namespace": "a",
                                 "databases": {"1": {"db": 1, "namespace": "a"}}}]})
    with pytest.raises(ConfigError, match="db 0 only"):
        from_dict({"listener": [{"listen": "127.0.0.1:0", "upstream": seeds, "namespace": "a", "slot": "pinned",
                                 "databases": {"1": {"db": 1, "namespace": "a"}}}]})
    with pytest.raises(ConfigError, match="one hash slot"):
        from_dict({"listener": [{"listen": "127.0.0.1:0", "upstream": seeds, "namespace": "a", "slot": "pinned",
                                 "databases": {"1": {"db": 0, "namespace": "b"}}}]})
    cfg = from_dict({"listener": [{"listen": "127.0.0.1:0", "upstream": seeds, "namespace": "a", "slot": "pinned",
                                   "databases": {"1": {"db": 0, "namespace": "a"}}}]})
    assert cfg.routes[0].upstream.slot == key_slot(b"a")


def test_check_names_the_node(cluster, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    ns = ns_on(cluster, cluster.primaries[1], "chk")
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--listen", "127.0.0.1:0", "--upstream",
                          f"redis+cluster://{cluster.seeds()}", "--namespace", ns, "--slot", "pinned"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    node = cluster.primaries[1]
    assert f"pinned hash slot {key_slot(ns.encode())} served by {node.host}:{node.port}: ok" in out.stdout


def test_proxy_process_seed_list_with_a_dead_seed(cluster, start_proxy):
    """The map is read from any seed that answers."""
    ns = ns_on(cluster, cluster.primaries[0], "seed")
    p = start_proxy(["--upstream", f"redis+cluster://127.0.0.1:{free_port()},{cluster.seeds()}", "--namespace", ns,
                     "--slot", "pinned"])
    assert client(p).set("k", "v") and client(p).get("k") == b"v"
    assert isinstance(p, ProxyProcess)


def test_redirect_error_words_what_happened():
    from proxy.cluster_route import redirect_error
    out, r = redirect_error(b"-MOVED 3999 10.0.0.2:6381\r\n")
    assert out.startswith(b"-TRYAGAIN proxy: hash slot 3999 of this namespace moved to 10.0.0.2:6381 ")
    assert out.endswith(b"\r\n") and b"\r\n" not in out[:-2] and (r.kind, r.slot, r.port) == ("MOVED", 3999, 6381)
    out, r = redirect_error(b"-ASK 12 ::1:7000\r\n")
    assert b"being migrated to ::1:7000" in out and b"(-ASK)" in out and r.kind == "ASK"
    assert redirect_error(b"-CLUSTERDOWN The cluster is down\r\n") == (b"-CLUSTERDOWN The cluster is down\r\n", None)
    assert redirect_error(b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n") is None
    assert redirect_error(b"-ERR MOVED 1 h:1\r\n") is None and redirect_error(b"-MOVED nonsense\r\n") is None


def test_reload_adds_a_pinned_route_on_another_cluster_slot(cluster, start_proxy):
    """SIGHUP: a new pinned route on the cluster (another namespace, another primary)
    works at once; the running one is untouched."""
    import os
    import signal
    na, nb = ns_on(cluster, cluster.primaries[0], "ra"), ns_on(cluster, cluster.primaries[1], "rb")
    seeds = f"redis+cluster://{cluster.seeds()}"
    pa, pb = free_port(), free_port()
    a = {"listen": f"127.0.0.1:{pa}", "upstream": seeds, "namespace": na, "slot": "pinned"}
    p = start_proxy(config_text=proxy_toml([a]), port=pa)
    ca = redis.Redis(host="127.0.0.1", port=pa, socket_timeout=10)
    assert ca.set("k", "a")
    with open(os.path.join(p.tmp, "proxy.toml"), "w") as f:
        f.write(proxy_toml([a, {"listen": f"127.0.0.1:{pb}", "upstream": seeds, "namespace": nb, "slot": "pinned"}]))
    p.process.send_signal(signal.SIGHUP)

    def b_works():
        try:
            return redis.Redis(host="127.0.0.1", port=pb, socket_timeout=10).set("k", "b")
        except redis.ConnectionError:
            return False
    wait_until(b_works, "the reloaded route")
    assert ca.get("k") == b"a" and redis.Redis(host="127.0.0.1", port=pb).get("k") == b"b"
    assert cluster.primaries[1].call("GET", f"{{{nb}}}:k") == b"b"


def test_select_between_client_dbs_mapped_to_db_0(cluster, start_proxy):
    ns = ns_on(cluster, cluster.primaries[2], "sel")
    port = free_port()
    start_proxy(config_text=proxy_toml([{"listen": f"127.0.0.1:{port}", "upstream": f"redis+cluster://{cluster.seeds()}",
                                         "namespace": ns, "slot": "pinned",
                                         "databases": {"1": {"db": 0, "namespace": ns}}}]), port=port)
    c = redis.Redis(host="127.0.0.1", port=port, db=1, socket_timeout=10)
    assert c.set("k", "v") and c.get("k") == b"v"
    assert redis.Redis(host="127.0.0.1", port=port, db=0).get("k") == b"v"
    with c.pipeline(transaction=True) as tx:
        tx.execute_command("SELECT", "0").get("k").execute_command("SELECT", "1").incr("n")
        assert tx.execute() == [True, b"v", True, 1]


def test_a_seed_list_table_instead_of_the_url(cluster, start_proxy):
    """[cluster] seeds = [...] at the top, [listener.cluster] for one listener: the same
    cluster upstream as the URL (config.cluster_table), here with a dead seed first."""
    na, nb = ns_on(cluster, cluster.primaries[0], "ta"), ns_on(cluster, cluster.primaries[2], "tb")
    seeds = ", ".join(f'"{n.host}:{n.port}"' for n in cluster.primaries)
    pa, pb = free_port(), free_port()
    start_proxy(config_text=(
        f'[cluster]\nseeds = ["127.0.0.1:{free_port()}", {seeds}]\n'
        f'[[listener]]\nlisten = "127.0.0.1:{pa}"\nnamespace = "{na}"\nslot = "pinned"\n'
        f'[[listener]]\nlisten = "127.0.0.1:{pb}"\nnamespace = "{nb}"\nslot = "pinned"\n'
        f'[listener.cluster]\nseeds = ["{cluster.primaries[1].host}:{cluster.primaries[1].port}"]\n'), port=pa)
    ca = redis.Redis(host="127.0.0.1", port=pa, socket_timeout=10)
    cb = redis.Redis(host="127.0.0.1", port=pb, socket_timeout=10)
    assert ca.set("k", "a") and cb.set("k", "b") and ca.get("k") == b"a" and cb.get("k") == b"b"
    assert cluster.primaries[0].call("GET", f"{{{na}}}:k") == b"a"
    assert cluster.primaries[2].call("GET", f"{{{nb}}}:k") == b"b"
