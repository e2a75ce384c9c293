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


def data_keys(r) -> list:
    """The keys, without migrate's journal (keyspace-proxy:migrate:*)."""
    return sorted(k for k in r.keys() if not k.startswith(b"keyspace-proxy:migrate:"))


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
    assert data_keys(b) == [b"queue:default", b"queues", b"retry", b"schedule", b"stat:processed", b"stat:x"]
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
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run: keys seen 1, would copy 0, would move 1, would merge 0, conflicts 0" in r.stdout
    assert "would move zset sidekiq:schedule -> schedule: 2 member(s)" in r.stdout
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
        o.zrem("app:sidekiq:schedule", "job1")   # consumed on the target: delivered, not lost
        a.zadd("sidekiq:schedule", {"job3": 300})  # new in the source, not copied yet: missing
        o.srem("app:sidekiq:queues", "default")  # its only member: the set is gone
        problems = verify(parse_url(f"{base}/14"), parse_url(other.url), "", "app", match="sidekiq:*")
        assert sorted(problems) == ["sidekiq:queues: set in the source, none in the target",
                                    "sidekiq:schedule: 1 member(s) of the source missing in the target (e.g. b'job3')"]
    finally:
        other.stop()


def test_move_to_another_server_leaves_the_source_db_empty(dbs, server):
    """A finished cross-server --move drains the source: no data key and none of migrate's own
    (in-flight chunks, the chunk counter) is left, so `DBSIZE` 0 tells the old server is done."""
    a, _, base = dbs
    sidekiq6_data(a)
    a.delete("other:key")
    other = start_server(server.kind)
    try:
        o = redis.Redis(port=other.port)
        o.zadd("schedule", {"live": 1})        # a live target: merged chunk by chunk, through the journal
        o.rpush("queue:default", "j0")
        r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", other.url, "--move",
                    "--batch", "1", "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verify: 0 difference(s)" in r.stdout
        assert a.dbsize() == 0, a.keys()
        assert o.lrange("queue:default", 0, -1) == [b"j0", b"j1", b"j2"]
        assert data_keys(o) == sorted(o.keys())  # no applied marks left on the target either
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


def test_rerun_copy_and_copy_then_move_never_duplicate(dbs):
    """The issue's case: a copy run twice gave 1, 2, 1, 2 and said 0 differences; copy then --move
    gave j0 j1 j2 j1 j2."""
    a, b, base = dbs
    a.rpush("sidekiq:queue:default", "j1", "j2")
    a.zadd("sidekiq:schedule", {"s1": 1})
    args = ["--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15"]
    for _ in range(2):
        r = migrate(*args, "--verify")
        assert r.returncode == 0 and "verify: 0 difference(s)" in r.stdout, r.stdout + r.stderr
    assert b.lrange("queue:default", 0, -1) == [b"j1", b"j2"]
    a.rpush("sidekiq:queue:default", "j3")  # new since the copy: a rerun copies only this one
    b.lpush("queue:default", "j0")          # a live client on the target
    r = migrate(*args)
    assert b.lrange("queue:default", 0, -1) == [b"j0", b"j1", b"j2", b"j3"]
    r = migrate(*args, "--move", "--verify")
    assert r.returncode == 0 and "verify: 0 difference(s)" in r.stdout, r.stdout + r.stderr
    assert "4 element(s) not added again" in r.stdout  # 3 jobs, 1 schedule member
    assert b.lrange("queue:default", 0, -1) == [b"j0", b"j1", b"j2", b"j3"]
    assert a.keys() == [] and data_keys(b) == [b"queue:default", b"schedule"]
    assert b.keys("keyspace-proxy:*") == []  # the copy journal went with the moved list


def test_verify_finds_duplicates_and_losses_per_key(dbs):
    a, b, base = dbs
    a.rpush("ns:q", "1", "2", "3")
    b.rpush("q", "1", "2", "1", "2")  # 1 and 2 twice, 3 lost
    a.rpush("ns:ok", "x", "x")
    b.rpush("ok", "x", "x", "live")
    a.sadd("ns:s", "m1", "m2")
    b.sadd("s", "m1")
    problems = verify(parse_url(f"{base}/14"), parse_url(f"{base}/15"), "ns", "")
    assert sorted(problems) == [
        "ns:q: 2 duplicate element(s) in the target, 1 element(s) of the source missing in the target (e.g. b'1')",
        "ns:s: 1 member(s) of the source missing in the target (e.g. b'm2')"]
    a.delete("ns:q", "ns:ok", "ns:s")  # as after a move: target lists must not hold an element twice
    problems = verify(parse_url(f"{base}/14"), parse_url(f"{base}/15"), "ns", "", moved=True)
    assert sorted(problems) == ["ok: 1 duplicate element(s) in the target (e.g. b'x')",
                                "q: 2 duplicate element(s) in the target (e.g. b'1')"]


def test_move_across_dbs_with_a_live_target_is_element_by_element(dbs):
    a, b, base = dbs
    a.rpush("sidekiq:queue:default", *[f"j{i}" for i in range(25)])
    a.zadd("sidekiq:retry", {f"r{i}": i for i in range(25)})
    a.pexpire("sidekiq:retry", 600_000)
    b.rpush("queue:default", "n1")
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15", "--move",
                "--batch", "4", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "moved 1, merged 1," in r.stdout and "elements 50" in r.stdout
    assert b.lrange("queue:default", 0, -1) == [b"n1"] + [f"j{i}".encode() for i in range(25)]
    assert b.zcard("retry") == 25 and 0 < b.pttl("retry") <= 600_000  # the TTL of a key created here
    assert a.keys() == []


def test_dry_run_reports_copy_move_merge_and_verify_runs(dbs):
    a, b, base = dbs
    sidekiq6_data(a)
    b.rpush("queue:default", "n1")
    b.set("stat:processed", "42")
    r = migrate("--from", f"{base}/14", "--from-namespace", "sidekiq", "--to", f"{base}/15", "--dry-run",
                "--verify")
    assert r.returncode == 1, r.stdout + r.stderr  # the target lacks what would be copied
    assert "dry run: keys seen 6, would copy 4, would move 0, would merge 1, conflicts 0, already there 1" \
        in r.stdout
    assert "would merge (copy) list sidekiq:queue:default -> queue:default: 2 element(s)" in r.stdout
    assert "would skip string sidekiq:stat:processed -> stat:processed: already there" in r.stdout
    assert "verify: 5 difference(s) (dry run: the sides as they are now, nothing was changed)" in r.stdout
    assert data_keys(b) == [b"queue:default", b"stat:processed"] and b.llen("queue:default") == 1


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be a positive number, got 0"),
    (["--batch", "x"], "argument --batch: invalid int value: 'x'"),
    (["--match", ""], "--match must not be empty"),
    (["--state", "/nonexistent/dir/s.json"], "--state /nonexistent/dir/s.json: folder /nonexistent/dir does not exist"),
])
def test_bad_arguments_are_refused_on_one_line_before_anything_moves(dbs, args, message):
    a, b, base = dbs
    a.rpush("ns:q", "1")
    r = migrate("--from", f"{base}/14", "--from-namespace", "ns", "--to", f"{base}/15", "--move", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert a.lrange("ns:q", 0, -1) == [b"1"] and b.keys() == []


def test_unreachable_servers_are_named_and_state_mentioned_only_when_given(dbs, tmp_path):
    from proxy.embedded import free_port
    _, _, base = dbs
    dead = f"redis://127.0.0.1:{free_port()}/3"
    r = migrate("--from", f"{base}/14", "--to", dead)
    assert r.returncode == 1 and "cannot connect to the target redis://127.0.0.1:" in r.stderr, r.stderr
    assert "--state" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = migrate("--from", dead, "--to", f"{base}/14", "--state", str(tmp_path / "s.json"))
    assert r.returncode == 1 and f"cannot connect to the source {dead}" in r.stderr
    assert "rerun with the same --state to resume" in r.stderr
