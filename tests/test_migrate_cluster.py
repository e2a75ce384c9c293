"""`keyspace-proxy migrate` to and from a real Redis/Valkey Cluster (the `cluster` fixture: three
primaries with a replica each), with a single server of the same kind on the other side: single
node -> cluster with the namespace stripped and with pinning (`{NS}`: one slot), one cluster slot
to another, cluster -> single node; every data type; --verify over the cluster; reruns that
duplicate nothing; a slot of the target migrated between nodes during the run (ASK, TRYAGAIN and
MOVED followed); and migrate SIGKILLed at random points and rerun under producers and consumers."""

import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import redis

from migrate_chaos import scenario
from proxy.cluster import key_slot
from proxy.embedded import start_server
from proxy.migrate import RESERVED, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("MIGRATE_CHAOS_SEED", random.randrange(1 << 30)))


@pytest.fixture(scope="module")
def single(cluster):
    s = start_server(cluster.kind)
    yield s
    s.stop()


def migrate(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def curl(c) -> str:
    return f"redis+cluster://{c.seeds()}"


def everywhere(c, pattern: str) -> dict[bytes, int]:
    """Every key matching `pattern` on the cluster's primaries -> the port of the node holding it."""
    out = {}
    for n in c.primaries:
        r = n.client()
        for k in r.scan_iter(match=pattern, count=1000):
            out[k] = n.port
        r.close()
    return out


def rc(c) -> redis.RedisCluster:
    n = c.primaries[0]
    return redis.RedisCluster(host=n.host, port=n.port)


def fill(r, p: str) -> dict:
    """One key of each type under prefix `p` (names in many slots), and what each holds."""
    r.rpush(f"{p}queue:default", *[f'{{"jid":"{i}"}}' for i in range(2500)])
    r.rpush(f"{p}queue:mail", "a", "b", "c")
    r.sadd(f"{p}set", *range(300))
    r.zadd(f"{p}schedule", {f"job{i}": i for i in range(1200)})
    r.hset(f"{p}hash", mapping={f"f{i}": i for i in range(700)})
    r.set(f"{p}string", "value", px=600_000)
    r.set(f"{p}counter", 41)
    r.xadd(f"{p}stream", {"a": "1"})
    r.xadd(f"{p}stream", {"b": "2"})
    for i in range(40):
        r.set(f"{p}k{i}", i)
    return {"queue:default": 2500, "queue:mail": 3, "set": 300, "schedule": 1200, "hash": 700}


def check_copy(r, p: str, sizes: dict) -> None:
    assert r.lrange(f"{p}queue:default", 0, -1) == [f'{{"jid":"{i}"}}'.encode() for i in range(2500)]
    assert r.lrange(f"{p}queue:mail", 0, -1) == [b"a", b"b", b"c"]
    assert r.scard(f"{p}set") == 300 and r.zcard(f"{p}schedule") == 1200 and r.hlen(f"{p}hash") == 700
    assert r.zscore(f"{p}schedule", "job7") == 7.0 and r.hget(f"{p}hash", "f9") == b"9"
    assert r.get(f"{p}string") == b"value" and 0 < r.pttl(f"{p}string") <= 600_000
    assert r.get(f"{p}counter") == b"41" and r.xlen(f"{p}stream") == 2
    assert [r.get(f"{p}k{i}") for i in range(40)] == [str(i).encode() for i in range(40)]


def test_single_to_cluster_namespace_stripped_copy_rerun_then_move(cluster, single, capsys):
    src = redis.Redis(port=single.port, db=1)
    sizes = fill(src, "app:")
    dst = f"{curl(cluster)}"
    args = ["--from", f"redis://127.0.0.1:{single.port}/1", "--from-namespace", "app", "--to", dst,
            "--to-namespace", "", "--batch", 100]
    code, out = migrate(capsys, *args, "--dry-run")
    assert code == 0 and "would copy 48" in out and "would copy list app:queue:default -> queue:default: 2500" in out, out
    assert everywhere(cluster, "*") == {}
    code, out = migrate(capsys, *args, "--verify")
    assert code == 0 and "verify: 0 difference(s)" in out, out
    c = rc(cluster)
    try:
        check_copy(c, "", sizes)
        placed = everywhere(cluster, "queue:*") | everywhere(cluster, "k*")
        assert len(set(placed.values())) == 3, placed   # the keys live on all three primaries
        # a rerun copy adds nothing (the copy journal, in each target key's slot)
        code, out = migrate(capsys, *args, "--verify")
        assert code == 0 and "verify: 0 difference(s)" in out, out
        check_copy(c, "", sizes)
        journals = everywhere(cluster, "keyspace-proxy:migrate:*")
        # each copy journal lies in its target name's slot (the source name minus "app:")
        copied = [j for j in journals if b":copied:" in j]
        assert len(copied) == 4 and all(
            key_slot(j) == key_slot(j.split(b":copied:", 1)[1].split(b":", 2)[2][len(b"app:"):]) for j in copied), copied
        # then --move: what the copies delivered is dropped from the source, never added again
        code, out = migrate(capsys, *args, "--move", "--verify")
        assert code == 0 and "verify: 0 difference(s)" in out, out
        check_copy(c, "", sizes)
        assert src.dbsize() == 0
        assert everywhere(cluster, "keyspace-proxy:migrate:*") == {}
        for k in c.scan_iter(match="*"):
            c.delete(k)
    finally:
        c.close()
        src.close()


def test_pinned_cluster_slot_to_slot_and_back_to_a_single_server(cluster, single, capsys):
    src = redis.Redis(port=single.port, db=2)
    sizes = fill(src, "sidekiq:")
    one = f"redis://127.0.0.1:{single.port}/2"
    code, out = migrate(capsys, "--from", one, "--from-namespace", "sidekiq", "--to", curl(cluster),
                        "--to-namespace", "{sidekiq}", "--move", "--verify", "--batch", 300)
    assert code == 0 and "verify: 0 difference(s)" in out, out
    assert src.dbsize() == 0
    keys = everywhere(cluster, "*")
    assert len(keys) == 48 and {key_slot(k) for k in keys} == {key_slot(b"sidekiq")}, keys
    c = rc(cluster)
    try:
        check_copy(c, "{sidekiq}:", sizes)
        # within the cluster, to another namespace's slot: a cross-slot move (in-flight chunks)
        code, out = migrate(capsys, "--from", curl(cluster), "--from-namespace", "{sidekiq}", "--to", curl(cluster),
                            "--to-namespace", "{other}", "--move", "--verify", "--batch", 300)
        assert code == 0 and "verify: 0 difference(s)" in out, out
        keys = everywhere(cluster, "*")
        assert len(keys) == 48 and {key_slot(k) for k in keys} == {key_slot(b"other")}, keys
        check_copy(c, "{other}:", sizes)
        # to a name in the same slot ({other}x:k hashes by "other"): one script per chunk takes
        # from the source and merges into the target (it has a list already), RENAMENX the rest
        c.rpush("{other}x:queue:default", "pre")
        code, out = migrate(capsys, "--from", curl(cluster), "--from-namespace", "{other}", "--to", curl(cluster),
                            "--to-namespace", "{other}x", "--move", "--verify", "--batch", 300)
        assert code == 0 and "verify: 0 difference(s)" in out and "merged 1" in out, out
        assert c.lpop("{other}x:queue:default") == b"pre"
        check_copy(c, "{other}x:", sizes)
        # and back to a single server, under a plain namespace; a rerun finds nothing to do
        back = f"redis://127.0.0.1:{single.port}/3"
        for _ in range(2):
            code, out = migrate(capsys, "--from", curl(cluster), "--from-namespace", "{other}x", "--to", back,
                                "--to-namespace", "sk", "--move", "--verify", "--batch", 300)
            assert code == 0 and "verify: 0 difference(s)" in out, out
        assert everywhere(cluster, "*") == {}
        r3 = redis.Redis(port=single.port, db=3)
        check_copy(r3, "sk:", sizes)
        assert r3.dbsize() == 48   # no journal left behind either
        r3.flushdb()
        r3.close()
    finally:
        c.close()
        src.close()


def test_cluster_urls_refused_clearly(cluster, single, capsys):
    code, out = migrate(capsys, "--from", f"redis://127.0.0.1:{single.port}/1", "--to", f"{curl(cluster)}/2")
    assert code == 2 and "a cluster has db 0 only" in out and "--to" in out, out
    code, out = migrate(capsys, "--from", f"redis+cluster://127.0.0.1:{single.port}", "--to",
                        f"redis://127.0.0.1:{single.port}/4")
    assert code == 1 and "source" in out and "not a usable cluster" in out, out
    code, out = migrate(capsys, "--from", curl(cluster), "--to", curl(cluster))
    assert code == 2 and "same keyspace" in out, out
    # the TLS flags apply to a cluster side as to a server (checked before anything connects)
    code, out = migrate(capsys, "--from", f"redis://127.0.0.1:{single.port}/1", "--to", curl(cluster),
                        "--to-tls-ca-file", "/nonexistent/ca.pem")
    assert code == 2 and "plain TCP; write rediss+cluster://" in out, out
    code, out = migrate(capsys, "--from", f"redis://127.0.0.1:{single.port}/1", "--to",
                        f"rediss+cluster://:secret@{cluster.seeds()}", "--to-tls-ca-file", "/nonexistent/ca.pem")
    assert code == 2 and "/nonexistent/ca.pem" in out and "secret" not in out, out


def test_a_target_slot_migrated_during_the_run(cluster, single, capsys):
    """The pinned slot is MIGRATING/IMPORTING when the run starts (single-key commands get -ASK,
    scripts -TRYAGAIN: they never run half), then finished (the next commands get -MOVED)."""
    slot = key_slot(b"mv")
    a = cluster.primary_for(slot)
    b = next(p for p in cluster.primaries if p is not a)
    src = redis.Redis(port=single.port, db=5)
    jobs = [f"job{i}".encode() for i in range(3000)]
    src.rpush("mv:queue", *jobs)
    src.set("mv:string", "s")
    cluster.begin_migration(slot, a, b)
    p = subprocess.Popen([sys.executable, "-m", "proxy", "migrate", "--from", f"redis://127.0.0.1:{single.port}/5",
                          "--from-namespace", "mv", "--to", curl(cluster), "--to-namespace", "{mv}", "--move",
                          "--batch", "50"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the string goes by RESTORE: ASK to the importing node (the run is under way)
        from cluster_helpers import wait_until
        # under way: the string RESTOREd after ASK, or a chunk of the list in flight (its
        # script answered TRYAGAIN until the slot is settled)
        def under_way():
            r = b.client()
            try:   # the importing node answers for the slot only after ASKING
                restored = r.pipeline(transaction=False).execute_command("ASKING").exists("{mv}:string").execute()[1]
            finally:
                r.close()
            return src.hlen(RESERVED + b"inflight") or restored or p.poll() is not None
        wait_until(under_way, "the run to reach the slot")
        cluster.move_keys(slot, a, b)
        cluster.finish_migration(slot, b)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    assert "MOVED/ASK redirection(s) followed" in out, out
    assert src.dbsize() == 0
    r = b.client()
    assert Counter(r.lrange("{mv}:queue", 0, -1)) == Counter(jobs) and r.get("{mv}:string") == b"s"
    r.delete("{mv}:queue", "{mv}:string")
    assert [k for k in r.keys("*") if k.startswith(RESERVED)] == []
    r.close()
    src.close()


def test_a_source_slot_migrated_during_the_run(cluster, single, capsys):
    """The source's slot is MIGRATING/IMPORTING when the run reaches it (its scripts answer
    TRYAGAIN: nothing is taken), then its keys move to another node and the slot is handed over
    (MOVED, the map read again, the walk done again)."""
    slot = key_slot(b"srcmv")
    a = cluster.primary_for(slot)
    b = next(p for p in cluster.primaries if p is not a)
    r = a.client()
    jobs = [f"job{i}".encode() for i in range(3000)]
    r.rpush("{srcmv}:queue", *jobs)
    r.zadd("{srcmv}:schedule", {f"s{i}": i for i in range(500)})
    r.set("{srcmv}:string", "s")
    r.close()
    cluster.begin_migration(slot, a, b)
    p = subprocess.Popen([sys.executable, "-m", "proxy", "migrate", "--from", curl(cluster), "--from-namespace",
                          "{srcmv}", "--to", f"redis://127.0.0.1:{single.port}/8", "--move", "--batch", "50"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from cluster_helpers import wait_until

        def connected():   # migrate has read the slot map and works on the slot's owner
            c = a.client()
            try:
                return p.poll() is not None or any(x.get("cmd") in ("scan", "type", "pttl", "eval", "exists")
                                                   for x in c.client_list())
            finally:
                c.close()
        wait_until(connected, "migrate to work on the migrating node")
        cluster.move_keys(slot, a, b)
        cluster.finish_migration(slot, b)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    assert "MOVED/ASK redirection(s) followed" in out, out
    t = redis.Redis(port=single.port, db=8)
    assert Counter(t.lrange("queue", 0, -1)) == Counter(jobs) and t.zcard("schedule") == 500 and t.get("string") == b"s"
    t.flushdb()
    t.close()
    assert everywhere(cluster, "*srcmv*") == {} and everywhere(cluster, "keyspace-proxy:*") == {}


def test_killed_and_rerun_migrate_to_a_pinned_cluster_slot(cluster, single, tmp_path):
    """As tests/test_migrate_exactly_once.py, single node -> cluster (pinned, so consumers pop the
    one slot's owner): producers keep pushing to the source and consumers popping from the
    target while copies, then moves, are SIGKILLed at random points and rerun (with and without
    --state); every job is consumed or left exactly once. Copy then move: consumers on the source
    as well (the "move" scenario) drain it faster than a move that waits for the replicas at each
    step, so few runs would be killed with work to do."""
    owner = cluster.primary_for(key_slot(b"chaos"))
    r = scenario(f"redis://127.0.0.1:{single.port}/6", f"redis://127.0.0.1:{owner.port}/0", "copy-then-move",
                 rounds=8,
                 state_dir=str(tmp_path), seed=SEED, preload=3000, max_delay=1.0, dst_ns="{chaos}",
                 migrate_to=curl(cluster))
    print(f"single -> pinned cluster slot: {r}")
    why = f"seed {SEED}: {r}"
    assert r["duplicates"] == 0 and r["losses"] == 0, why
    assert r["pushed"] > 5_000 and r["kills"] >= 2, why
    assert r["in flight"] == 0 and r["applied marks"] == 0, why
    assert r["final"][-1] == "verify: 0 difference(s)", why


def test_killed_and_rerun_migrate_from_a_pinned_cluster_slot(cluster, single, tmp_path):
    """The other way, cluster -> single node: the in-flight chunks live on the cluster, in the
    slot of the source key (found again by a rerun with SCAN over every primary)."""
    owner = cluster.primary_for(key_slot(b"back"))
    r = scenario(f"redis://127.0.0.1:{owner.port}/0", f"redis://127.0.0.1:{single.port}/7", "copy-then-move",
                 rounds=8,
                 state_dir=str(tmp_path), seed=SEED, preload=3000, max_delay=1.0, src_ns="{back}",
                 migrate_from=curl(cluster))
    print(f"pinned cluster slot -> single: {r}")
    why = f"seed {SEED}: {r}"
    assert r["duplicates"] == 0 and r["losses"] == 0, why
    assert r["pushed"] > 5_000 and r["kills"] >= 2, why
    assert r["in flight"] == 0 and r["applied marks"] == 0, why
    assert r["final"][-1] == "verify: 0 difference(s)", why
    left = [k for k in cluster.primary_for(key_slot(b"back")).client().keys("*") if k.startswith(RESERVED)]
    assert left == [], left   # a finished --move leaves no journal key on the source


def test_an_interrupted_single_server_run_of_the_previous_layout_resumes(single, capsys, tmp_path):
    """The single-server journal names are unchanged by the cluster layout: a chunk left in flight
    and an applied mark written by the previous version (by hand here, exactly as its scripts
    wrote them) are finished once by this one, and its --state file is taken."""
    import json
    src, dst = redis.Redis(port=single.port, db=9), redis.Redis(port=single.port, db=10)
    src.rpush("ns:queue", "j3", "j4")
    # the previous version's cross-server step 1 (LUA_TAKE) for chunk 7: j1, j2 taken into flight
    rec = {"to": f"127.0.0.1:{single.port}/10", "tgt": "queue", "type": "list",
           "journal": f"keyspace-proxy:migrate:copied:127.0.0.1:{single.port}/9:ns:queue", "ttl": 0, "last": 0}
    src.set(RESERVED + b"seq", 7)
    src.rpush(RESERVED + b"inflight:7", "j1", "j2")
    src.hset(RESERVED + b"inflight", "7", json.dumps(rec))
    # and chunk 6 applied to the target (step 2) but killed before step 3
    src.rpush(RESERVED + b"inflight:6", "j0")
    src.hset(RESERVED + b"inflight", "6", json.dumps(rec))
    dst.rpush("queue", "j0")
    dst.hset(RESERVED + f"applied:127.0.0.1:{single.port}/9".encode(), "6", 1)
    state = tmp_path / "s.json"
    state.write_text(json.dumps({"from": f"redis://127.0.0.1:{single.port}/9", "to": f"redis://127.0.0.1:{single.port}/10",
                                 "match": "ns:*", "to_prefix": "", "cursor": "0"}))
    code, out = migrate(capsys, "--from", f"redis://127.0.0.1:{single.port}/9", "--from-namespace", "ns",
                        "--to", f"redis://127.0.0.1:{single.port}/10", "--move", "--verify", "--state", state)
    assert code == 0 and "2 in-flight chunk(s) of an interrupted run finished" in out, out
    assert "verify: 0 difference(s)" in out, out
    assert sorted(dst.lrange("queue", 0, -1)) == [b"j0", b"j1", b"j2", b"j3", b"j4"]
    assert src.dbsize() == 0 and dst.keys(RESERVED + b"*") == []
    dst.flushdb()
    src.close()
    dst.close()


def test_a_chunk_counter_left_by_a_killed_run_is_tidied(cluster, single, capsys):
    """A run killed after its last chunk was done but before its end leaves the slot's chunk
    counter: the next run, even with nothing to move, drops it (a drained source is empty)."""
    from proxy.migrate import slot_tag
    seq = RESERVED + b"{" + slot_tag(key_slot(b"tidy")) + b"}:seq"
    c = rc(cluster)
    try:
        c.set(seq, 12)
        code, out = migrate(capsys, "--from", curl(cluster), "--from-namespace", "{tidy}",
                            "--to", f"redis://127.0.0.1:{single.port}/11", "--move", "--verify")
        assert code == 0 and "verify: 0 difference(s)" in out, out
        assert c.exists(seq) == 0
    finally:
        c.close()


def test_no_script_runs_half_on_a_slot_being_migrated(cluster, capsys):
    """Within one slot of one cluster, after a copy (so the source, the target and the copy journal
    all exist on the node): the slot is MIGRATING when --move runs. A script that empties the
    source there would be stopped by the node at its next command on it ("non local key"), after
    its LPOPs; the probe key makes the node refuse the script before it runs (TRYAGAIN) until the
    slot is handed over. Every element ends in the target once."""
    slot = key_slot(b"half")
    a = cluster.primary_for(slot)
    b = next(p for p in cluster.primaries if p is not a)
    r = a.client()
    r.rpush("{half}:q", "e1", "e2", "e3")
    args = ["--from", curl(cluster), "--from-namespace", "{half}", "--to", curl(cluster), "--to-namespace", "{half}x"]
    code, out = migrate(capsys, *args)
    assert code == 0 and r.lrange("{half}x:q", 0, -1) == [b"e1", b"e2", b"e3"], out
    r.rpush("{half}:q", "e4")   # pushed after the copy: only the move delivers it
    r.close()
    cluster.begin_migration(slot, a, b)
    p = subprocess.Popen([sys.executable, "-m", "proxy", "migrate", *args, "--move"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from cluster_helpers import wait_until

        def trying():   # migrate's script is being refused on the migrating node
            c = a.client()
            try:
                return p.poll() is not None or any(x.get("cmd") == "eval" for x in c.client_list())
            finally:
                c.close()
        wait_until(trying, "migrate's script on the migrating node")
        cluster.move_keys(slot, a, b)
        cluster.finish_migration(slot, b)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out + err
    r = b.client()
    assert r.lrange("{half}x:q", 0, -1) == [b"e1", b"e2", b"e3", b"e4"] and r.exists("{half}:q") == 0
    r.delete("{half}x:q")
    assert [k for k in r.keys("*") if k.startswith(RESERVED)] == []
    r.close()


def test_a_target_primary_killed_during_the_run_then_rerun(cluster, single):
    """Destructive, so last: the primary of the pinned slot is SIGKILLed while migrate moves a
    queue onto it; its replica takes over (every step migrate took was confirmed by it, WAIT),
    the run stops naming the node, and a rerun with the same seeds (the dead one among them: the
    map is read from any that answers) finishes: every job once."""
    slot = key_slot(b"fo")
    owner = cluster.primary_for(slot)
    src = redis.Redis(port=single.port, db=12)
    jobs = [f"job{i}".encode() for i in range(20000)]
    src.rpush("fo:queue", *jobs)
    args = [sys.executable, "-m", "proxy", "migrate", "--from", f"redis://127.0.0.1:{single.port}/12",
            "--from-namespace", "fo", "--to-namespace", "{fo}", "--move", "--batch", "50"]
    seeds = curl(cluster)   # the seed list names the cluster in the journal: the rerun gives the same
    p = subprocess.Popen(args + ["--to", seeds], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        from cluster_helpers import wait_until
        wait_until(lambda: owner.call("LLEN", "{fo}:queue") > 0 or p.poll() is not None, "the first chunks")
        promoted = cluster.kill_primary(owner)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    print(f"run killed under: exit {p.returncode}: {err.strip()[-300:]}")
    if p.returncode:
        assert "target" in err and "rerun" in err, err
    again = subprocess.run(args + ["--to", seeds, "--verify"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "verify: 0 difference(s)" in again.stdout, again.stdout + again.stderr
    r = promoted.client()
    assert Counter(r.lrange("{fo}:queue", 0, -1)) == Counter(jobs)
    r.delete("{fo}:queue")
    r.close()
    assert src.dbsize() == 0
    src.close()
