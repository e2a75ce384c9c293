"""`keyspace-proxy migrate` against real servers: copy, move, merge, TTLs, conflicts, dry run,
verify, resume, and a second server as target."""

import subprocess
import sys

import pytest
import redis

from proxy.config import parse_url
from proxy.embedded import start_server
from proxy.migrate import Migration, verify


def migrate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "migrate", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def dbs(server):
    a = redis.Redis(host=server.host, port=server.port, db=14)
    b = redis.Redis(host=server.host, port=server.port, db=15)
    a.flushdb()
    b.flushdb()
    yield a, b, f"redis://{server.host}:{server.port}"
    a.flushdb()
    b.flushdb()


def sidekiq6_data(a):
    a.zadd("sidekiq:schedule", {"job1": 100, "job2": 200})
    a.zadd("sidekiq:retry", {"r1": 5})
    a.sadd("sidekiq:queues", "default")
    a.rpush("sidekiq:queue:default", "j1", "j2")
    a.hset("sidekiq:stat:x", mapping={"f": "1"})
    a.set("sidekiq:stat:processed", "42", px=600_000)
    a.set("other:key", "not mine")


def test_copy_keeps_ttls_and_strips_the_namespace(dbs):
    a, b, base = dbs
    sidekiq6_data(a)
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keys seen 6, copied 6, moved 0, merged 0, conflicts 0" in r.stdout
    assert "verify: 0 difference(s)" in r.stdout
    assert sorted(b.keys()) == [b"queue:default", b"queues", b"retry", b"schedule", b"stat:processed", b"stat:x"]
    assert b.zrange("schedule", 0, -1, withscores=True) == [(b"job1", 100.0), (b"job2", 200.0)]
    assert b.lrange("queue:default", 0, -1) == [b"j1", b"j2"]
    assert 0 < b.pttl("stat:processed") <= 600_000 and b.ttl("schedule") == -1
    assert a.exists("sidekiq:schedule") and a.get("other:key") == b"not mine"  # copy leaves the source


def test_live_target_is_merged_never_overwritten_and_move_empties_the_source(dbs):
    a, b, base = dbs
    sidekiq6_data(a)
    # new (un-namespaced) clients already write to the target
    b.zadd("schedule", {"job1": 999, "new": 300})
    b.sadd("queues", "critical")
    b.rpush("queue:default", "n1")
    b.hset("stat:x", mapping={"f": "live", "g": "2"})
    b.set("stat:processed", "7")
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15", "--move")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merged 4" in r.stdout and "moved 1" in r.stdout and "conflicts 1" in r.stdout
    assert "conflict: sidekiq:stat:processed (target string exists (use --overwrite))" in r.stdout
    assert dict(b.zrange("schedule", 0, -1, withscores=True)) == {b"job1": 999.0, b"job2": 200.0, b"new": 300.0}
    assert b.smembers("queues") == {b"default", b"critical"}
    assert b.lrange("queue:default", 0, -1) == [b"n1", b"j1", b"j2"]  # appended in order
    assert b.hgetall("stat:x") == {b"f": b"live", b"g": b"2"}         # field by field, live values kept
    assert b.get("stat:processed") == b"7"
    assert sorted(a.keys()) == [b"other:key", b"sidekiq:stat:processed"]  # only the conflict stays
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15", "--move",
                "--overwrite", "--verify")
    assert r.returncode == 0 and b.get("stat:processed") == b"42" and a.keys() == [b"other:key"]


def test_dry_run_changes_nothing_and_match_limits(dbs):
    a, b, base = dbs
    sidekiq6_data(a)
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15",
                "--match", "schedule", "--dry-run", "--move")
    assert r.returncode == 0 and "dry run: keys seen 1," in r.stdout and "skipped 1" in r.stdout
    assert b.keys() == [] and a.exists("sidekiq:schedule")
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15",
                "--match", "schedule", "--move")
    assert b.keys() == [b"schedule"] and not a.exists("sidekiq:schedule") and a.exists("sidekiq:retry")


def test_into_a_namespace_on_another_server_and_verify_finds_differences(dbs, server):
    a, _, base = dbs
    sidekiq6_data(a)
    other = start_server(server.kind)
    try:
        r = migrate("--from", f"{base}/14", "--to", f"{other.url}", "--to-namespace", "app", "--match", "sidekiq:*")
        assert r.returncode == 0 and "copied 6" in r.stdout
        o = redis.Redis(port=other.port)
        assert o.zrange("app:sidekiq:schedule", 0, -1) == [b"job1", b"job2"]
        assert verify(parse_url(f"{base}/14"), parse_url(other.url), "", "app", match="sidekiq:*") == []
        o.zrem("app:sidekiq:schedule", "job1")
        o.srem("app:sidekiq:queues", "default")  # its only member: the set is gone
        problems = verify(parse_url(f"{base}/14"), parse_url(other.url), "", "app", match="sidekiq:*")
        assert sorted(problems) == ["sidekiq:queues: set in the source, none in the target",
                                    "sidekiq:schedule: 1 members missing in the target"]
    finally:
        other.stop()


def test_resume_file_continues_after_the_last_finished_batch(dbs, tmp_path):
    a, b, base = dbs
    for i in range(300):
        a.set(f"ns:k{i}", i)
    state = str(tmp_path / "state.json")
    m = Migration(parse_url(f"{base}/14"), parse_url(f"{base}/15"), "ns", "", batch=50, state=state)
    seen = []
    m.progress = lambda s: (seen.append(s.seen), (_ for _ in ()).throw(KeyboardInterrupt) if len(seen) == 2 else None)
    with pytest.raises(KeyboardInterrupt):
        m.run()
    done = b.dbsize()
    assert 0 < done < 300
    m2 = Migration(parse_url(f"{base}/14"), parse_url(f"{base}/15"), "ns", "", batch=50, state=state)
    s = m2.run()
    assert b.dbsize() == 300 and s.conflicts == [] and s.seen <= 300 - done + 60  # resumed, not restarted


def test_same_keyspace_and_bad_urls_are_refused(dbs):
    _, _, base = dbs
    r = migrate("--from", f"{base}/14", "--to", f"{base}/14")
    assert r.returncode == 2 and "same keyspace" in r.stderr
    r = migrate("--from", "http://x/0", "--to", f"{base}/14")
    assert r.returncode == 2 and "--from: scheme must be redis://" in r.stderr
