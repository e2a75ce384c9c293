"""The Sidekiq 6 -> 7 runbook of the README, walked end to end with real Sidekiq on both sides,
under continuous enqueueing:

- the namespaced side is Sidekiq 6.4 with redis-namespace (Debian's ruby-sidekiq and
  ruby-redis-namespace), `sidekiq:*` keys;
- the un-namespaced side is Sidekiq 7.3 (RESP3 through redis-client), loaded from the isolated
  gem home `.ci/run` fills from ../shared/gems ($SIDEKIQ7_GEM_HOME, default .gems/sidekiq7).

Clients (perform_async and perform_in) and workers of both versions run side by side through
the proxy; the route flip is a reload; the old keyspace's jobs (queues, schedule, retry and dead
sets) are moved with `keyspace-proxy migrate` while jobs keep arriving; then the namespaced
worker is replaced by a second Sidekiq 7 one. At the end every job ran exactly as often as it
should (once; twice for the ones that fail once and are retried), no enqueue was refused, the
jobs that always fail are in the dead set once each, and no key is left in the old keyspace."""

import os
import shutil
import time

import redis

from proxy.embedded import free_port, start_server
from runbook_helpers import (RUNBOOK, Fleet, account, migrate, reload, require_sidekiq, sidekiq_job, summary,
                             token_file)

require_sidekiq()


def step_config(name: str, upstream: str, new: int, old: int, metrics: int) -> str:
    """A runbook step's TOML, as in deploy/runbook/, with this test's addresses."""
    with open(os.path.join(RUNBOOK, name)) as f:
        text = f.read()
    return (text.replace("redis://127.0.0.1:6379", upstream)
            .replace("127.0.0.1:6380", f"127.0.0.1:{new}")
            .replace("127.0.0.1:6381", f"127.0.0.1:{old}")
            .replace("127.0.0.1:9121", f"127.0.0.1:{metrics}")
            .replace("reload_grace = 10.0", "reload_grace = 4.0")
            .replace("/etc/keyspace-proxy/admin-token", token_file()))


def test_sidekiq_runbook_end_to_end(tmp_path):
    """Walked once, with the default (shared) upstream mode: it is the slowest test."""
    from conftest import ProxyProcess
    srv = start_server("redis" if shutil.which("redis-server") else "valkey")
    upstream = f"redis://127.0.0.1:{srv.port}"
    results = redis.Redis(port=srv.port, db=9)
    old_db = redis.Redis(port=srv.port, db=0)
    new_db = redis.Redis(port=srv.port, db=1)
    new_port, old_port, mport = free_port(), free_port(), free_port()
    fleet = Fleet(tmp_path, f"{upstream}/9", new_port, old_port)
    try:
        fleet.proxy = proxy = ProxyProcess(
            [], step_config("step1-shared-data.toml", upstream, new_port, old_port, mport), port=old_port)
        cfg = tmp_path.__class__(os.path.join(proxy.tmp, "proxy.toml"))

        # Step 1: namespaced Sidekiq 6 and plain Sidekiq 7, clients and workers, all on the old data.
        fleet.enqueuer(6, "old")
        fleet.enqueuer(7, "new")
        fleet.worker("worker6", 6)
        fleet.worker("worker7", 7)
        fleet.wait_for(lambda: results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10, "jobs run by both")
        # Sidekiq 7 flushes its metrics (`j|...` hashes, BITFIELD histograms) on its 10 s heartbeat:
        # wait for them, so keys only Sidekiq 7 writes are in the old keyspace too.
        fleet.wait_for(lambda: old_db.keys("sidekiq:j|*"), "Sidekiq 7 metrics in the old keyspace")
        fleet.wait_for(lambda: old_db.zcard("sidekiq:dead") > 0, "a job in the old dead set")
        assert old_db.keys("sidekiq:*") and not new_db.keys("*"), new_db.keys("*")  # one keyspace, under sidekiq:
        stray = [k for k in old_db.keys("*") if not k.startswith(b"sidekiq:")]
        assert not stray, f"Sidekiq 7 wrote outside the namespace: {stray}"

        # Jobs in the old keyspace the new side must pick up after the move: scheduled a few
        # seconds ahead, and waiting for a retry an hour from now (these must just survive it).
        sched_at = time.time() + 8
        scheduled = {sidekiq_job(f"sched-{i}"): sched_at for i in range(5)}
        old_db.zadd("sidekiq:schedule", scheduled)
        results.sadd("enqueued", *(f"sched-{i}" for i in range(5)))
        later = time.time() + 3600
        retries = {sidekiq_job(f"later-{i}"): later + i for i in range(5)}
        old_db.zadd("sidekiq:retry", retries)

        # Step 2: flip both routes to the new keyspace with a reload.
        cfg.write_text(step_config("step2-new-keyspace.toml", upstream, new_port, old_port, mport))
        assert b"2 route(s) changed" in reload(mport)
        time.sleep(5)  # the old routes' connections drain (grace 4 s in this test)
        fleet.check_alive()
        fleet.wait_for(lambda: new_db.zcard("retry") > 0 and new_db.zcard("dead") > 0,
                       "jobs in the new retry and dead sets")

        # Step 3: move the old keyspace's jobs over while both sides keep working. Both keyspaces
        # hold live retry and dead sets here (jobs failed on both sides of the flip): a merge.
        print("old keyspace before migrate:", sorted(old_db.keys("*")))
        before = {k: (old_db.zcard(f"sidekiq:{k}"), new_db.zcard(k)) for k in ("schedule", "retry", "dead")}
        print("zcard old/new before migrate:", before)
        assert all(o > 0 for o, _ in before.values()), before
        assert before["retry"][1] > 0 and before["dead"][1] > 0, before
        args = ["--from", f"{upstream}/0", "--from-namespace", "sidekiq", "--to", f"{upstream}/1", "--move"]
        out = migrate(*args)
        assert " merged 0," not in out  # live collections (queues, schedule, ...) were merged
        # Step 4: what is left are string counters (stats): the old values replace the new.
        migrate(*args, "--overwrite", "--verify")
        assert old_db.keys("sidekiq:*") == [], old_db.keys("sidekiq:*")
        assert set(new_db.zrange("retry", 0, -1)) >= {m.encode() for m in retries}

        # Then the namespaced worker moves to Sidekiq 7 (the namespaced client keeps enqueueing
        # through listener `old`): a graceful stop, a second Sidekiq 7 worker.
        fleet.retire("worker6")
        fleet.worker("worker7b", 7)
        time.sleep(4)
        fleet.check_alive()

        # Stop enqueueing; wait until every job ran as often as it should.
        fleet.stop_enqueueing()
        enqueued, ran, dead = account(results, new_db)
        assert {i.split("-")[0] for i in enqueued} == {"old", "new", "sched"} and len(enqueued) > 100
        assert old_db.keys("sidekiq:*") == [], old_db.keys("sidekiq:*")  # nothing left in the old keyspace
        assert new_db.exists("queues")
        assert set(new_db.zrange("retry", 0, -1)) >= {m.encode() for m in retries}
        print(summary(enqueued, ran, dead, results))
    finally:
        fleet.close()
        if fleet.proxy is not None:
            fleet.proxy.stop()
        srv.stop()
