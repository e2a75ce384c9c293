"""The server-move runbook (docs/runbook-server-move.md), walked end to end both ways with real
Sidekiq under continuous enqueueing: a managed Redis (ElastiCache in the story) holding Sidekiq 6
+ redis-namespace data (`sidekiq:*`) moves to a self-hosted Redis (appendonly yes, as the
compose file runs it) as plain keys, then back to the managed one under the namespace again.

Three redis-servers: `managed`, `selfhosted`, and one for the test's own results (not part of
the move). The proxy runs deploy/runbook/server-move/'s step configs, with this test's
addresses, and gets the managed URL from REDIS_URL as docker-compose.yml gives it. Sidekiq 6.4 +
redis-namespace (listener `old`) and Sidekiq 7.3 (listener `new`), clients (perform_async and
perform_in) and workers, run throughout. Each way: flip the routes by reload, check the old
server has no connection left, wait for jobs failing into the new server's retry and dead sets,
`migrate --move --state` across servers (merging 600 jobs left in the old queue into the live one,
and the live schedule, retry and dead sets),
then `--move --overwrite --verify`, and check the old server is empty (DBSIZE 0). At the end
every job ran exactly as often as it should, no enqueue was refused, and the jobs that always
fail are in the dead set once each (tests/runbook_helpers.py)."""

import os
import shutil
import subprocess
import sys
import time

import redis

from proxy.embedded import free_port, start_server
from runbook_helpers import (RELOAD_TOKEN, ROOT, RUNBOOK, Fleet, account, migrate, reload, require_sidekiq, sidekiq_job,
                             summary)

require_sidekiq()

SERVER_MOVE = os.path.join(RUNBOOK, "server-move")
ME = "runbook-test"  # the test's own connections, told apart in CLIENT LIST


def step_config(name: str, selfhosted_url: str, new: int, old: int, metrics: int) -> str:
    """A step's TOML, as in deploy/runbook/server-move/, with this test's addresses (the managed
    server comes from REDIS_URL, as in docker-compose.yml)."""
    with open(os.path.join(SERVER_MOVE, name)) as f:
        text = f.read()
    return (text.replace("redis://redis:6379/0", selfhosted_url)
            .replace("0.0.0.0:6380", f"127.0.0.1:{new}")
            .replace("0.0.0.0:6381", f"127.0.0.1:{old}")
            .replace("0.0.0.0:9121", f"127.0.0.1:{metrics}")
            .replace("reload_grace = 10.0", "reload_grace = 4.0"))


def others(r: redis.Redis) -> list:
    """Connections to the server that are not the test's own (the proxy's, Sidekiq's)."""
    return [c["addr"] for c in r.client_list() if c.get("name") != ME]


def test_server_move_there_and_back(tmp_path):
    from conftest import ProxyProcess
    kind = "redis" if shutil.which("redis-server") else "valkey"
    servers = []
    try:
        for extra in ([], ["--appendonly", "yes", "--maxmemory-policy", "noeviction"], []):  # as in the compose file
            servers.append(start_server(kind, extra=extra))
    except Exception:
        for s in servers:
            s.stop()
        raise
    managed, selfhosted, app = servers
    managed_url = f"redis://127.0.0.1:{managed.port}/0"
    self_url = f"redis://127.0.0.1:{selfhosted.port}/0"
    M = redis.Redis(port=managed.port, client_name=ME)
    S = redis.Redis(port=selfhosted.port, client_name=ME)
    results = redis.Redis(port=app.port)
    new_port, old_port, mport = free_port(), free_port(), free_port()
    fleet = Fleet(tmp_path, f"redis://127.0.0.1:{app.port}/0", new_port, old_port)
    try:
        fleet.proxy = proxy = ProxyProcess([], step_config("step1-managed.toml", self_url, new_port, old_port, mport),
                                           port=old_port, env={"REDIS_URL": managed_url,
                                                               "PROXY_ADMIN_TOKEN": RELOAD_TOKEN})
        cfg = tmp_path.__class__(os.path.join(proxy.tmp, "proxy.toml"))

        def check() -> None:
            """`keyspace-proxy check` on the step's file, beside the running proxy, as the runbook says."""
            env = dict(os.environ, PYTHONPATH=ROOT, REDIS_URL=managed_url)
            r = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)], env=env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "keyspace-proxy check: ok" in r.stdout, r.stdout + r.stderr

        check()

        def flip(step: str, old_server: redis.Redis) -> None:
            """cp the step's file over proxy.toml, reload, and wait until the old server has no
            connection but the test's: every client and worker reconnected through the new routes."""
            cfg.write_text(step_config(step, self_url, new_port, old_port, mport))
            check()
            assert b"2 route(s) changed" in reload(mport)
            fleet.wait_for(lambda: not others(old_server), "old server without connections (drained)")

        def left_behind(old_server: redis.Redis, prefix: str, tag: str, n: int = 600) -> None:
            """What the old server still holds after a flip, as nothing reads it any more: jobs
            enqueued just before it and not fetched yet (migrate moves them in chunks into the
            live queue of the new server), and jobs due in a few seconds in its schedule."""
            ids = [f"backlog-{tag}-{i}" for i in range(n)]
            old_server.lpush(f"{prefix}queue:default", *(sidekiq_job(i) for i in ids))
            due = [f"sched-{tag}-{i}" for i in range(5)]
            old_server.zadd(f"{prefix}schedule", {sidekiq_job(i): time.time() + 3 for i in due})
            results.sadd("enqueued", *ids, *due)

        # Step 1: everyone through the proxy, on the managed server: Sidekiq 6 + redis-namespace
        # on `old` (passed through), Sidekiq 7 on `new` (namespace added).
        fleet.enqueuer(6, "old")
        fleet.enqueuer(7, "new")
        fleet.worker("worker6", 6)
        fleet.worker("worker7", 7)
        fleet.wait_for(lambda: results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10, "jobs run by both")
        fleet.wait_for(lambda: M.keys("sidekiq:j|*"), "Sidekiq 7 metrics on the managed server")
        fleet.wait_for(lambda: M.zcard("sidekiq:dead") > 0, "a job in the managed server's dead set")
        assert all(k.startswith(b"sidekiq:") for k in M.keys()) and S.dbsize() == 0
        # retries due in an hour: they must just survive both moves
        retries = {sidekiq_job(f"later-{i}"): time.time() + 3600 + i for i in range(5)}
        M.zadd("sidekiq:retry", retries)
        there = ["--from", managed_url, "--from-namespace", "sidekiq", "--to", self_url]
        out = migrate(*there, "--move", "--dry-run")  # what will move; changes nothing
        assert "would merge 0" in out and S.dbsize() == 0

        # Step 2: flip both routes to the self-hosted server (namespace stripped) by reload.
        flip("step2-self-hosted.toml", M)
        left_behind(M, "sidekiq:", "there")
        fleet.wait_for(lambda: S.zcard("retry") > 0 and S.zcard("dead") > 0,
                       "jobs in the self-hosted server's retry and dead sets")

        # Step 3: migrate across servers while both Sidekiqs keep enqueueing and working.
        before = {k: (M.zcard(f"sidekiq:{k}"), S.zcard(k)) for k in ("schedule", "retry", "dead")}
        print("zcard managed/self-hosted before migrate:", before, "queue:", M.llen("sidekiq:queue:default"))
        assert all(m > 0 for m, _ in before.values()) and before["retry"][1] > 0 and before["dead"][1] > 0
        state = str(tmp_path / "there.json")
        assert " merged 0," not in migrate(*there, "--move", "--state", state)  # live sets merged
        # Step 4: the counters (the old values replace the new), and check.
        assert "verify: 0 difference(s)" in migrate(*there, "--move", "--state", state, "--overwrite", "--verify")
        assert M.dbsize() == 0, M.keys()  # drained: not a key left, migrate's own included
        assert not os.path.exists(state)  # a finished run removes its state file
        assert set(S.zrange("retry", 0, -1)) >= {m.encode() for m in retries}
        assert not [k for k in S.keys() if k.startswith(b"sidekiq:")]  # plain keys only

        # The way back (or a rollback): step 1's file again, then migrate the other way, the
        # namespace added back.
        flip("step1-managed.toml", S)
        left_behind(S, "", "back")
        fleet.wait_for(lambda: M.zcard("sidekiq:retry") > 0 and M.zcard("sidekiq:dead") > 0,
                       "jobs in the managed server's retry and dead sets again")
        back = ["--from", self_url, "--to", managed_url, "--to-namespace", "sidekiq"]
        state = str(tmp_path / "back.json")
        assert " merged 0," not in migrate(*back, "--move", "--state", state)
        assert "verify: 0 difference(s)" in migrate(*back, "--move", "--state", state, "--overwrite", "--verify")
        assert S.dbsize() == 0, S.keys()
        assert set(M.zrange("sidekiq:retry", 0, -1)) >= {m.encode() for m in retries}

        # Stop enqueueing; every job ran exactly as often as it should, across both moves.
        fleet.stop_enqueueing()
        enqueued, ran, dead = account(results, M, "sidekiq:dead")
        assert {i.split("-")[0] for i in enqueued} == {"old", "new", "sched", "backlog"} and len(enqueued) > 1300
        assert S.dbsize() == 0 and all(k.startswith(b"sidekiq:") for k in M.keys())
        assert M.exists("sidekiq:queues")
        print(summary(enqueued, ran, dead, results))
    finally:
        fleet.close()
        if fleet.proxy is not None:
            fleet.proxy.stop()
        for s in servers:
            s.stop()
