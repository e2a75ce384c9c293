"""The Sidekiq 6 -> 7 runbook of the README, walked end to end with real Sidekiq 6.4 and
redis-namespace (Debian's ruby-sidekiq and ruby-redis-namespace), under continuous enqueueing.

Namespaced Sidekiq processes (redis-namespace, `sidekiq:*`) and un-namespaced ones (as
Sidekiq 7 is) run side by side through the proxy; the route flip is a reload; the old
keyspace's jobs (queues, schedule) are moved with `keyspace-proxy migrate` while jobs keep
arriving. At the end every job ran exactly once, no enqueue was refused, and no key is left
in the old keyspace."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

from proxy.embedded import free_port, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNBOOK = os.path.join(ROOT, "deploy", "runbook")
JOBS = os.path.join(ROOT, "tests", "sidekiq")
CI = os.environ.get("CI", "").lower() == "true"


def have_sidekiq() -> bool:
    if not shutil.which("ruby") or not shutil.which("sidekiq"):
        return False
    r = subprocess.run(["ruby", "-e", 'require "sidekiq"; require "redis-namespace"'], capture_output=True)
    return r.returncode == 0


if not have_sidekiq():
    if CI:
        pytest.fail("CI=true but Sidekiq 6 / redis-namespace (ruby-sidekiq, ruby-redis-namespace) are missing",
                    pytrace=False)
    pytest.skip("ruby-sidekiq and ruby-redis-namespace are not installed (.ci/run installs them)",
                allow_module_level=True)


def step_config(name: str, upstream: str, new: int, old: int, metrics: int) -> str:
    """A runbook step's TOML, as in deploy/runbook/, with this test's addresses."""
    with open(os.path.join(RUNBOOK, name)) as f:
        text = f.read()
    return (text.replace("redis://127.0.0.1:6379", upstream)
            .replace("127.0.0.1:6380", f"127.0.0.1:{new}")
            .replace("127.0.0.1:6381", f"127.0.0.1:{old}")
            .replace("127.0.0.1:9121", f"127.0.0.1:{metrics}")
            .replace("reload_grace = 10.0", "reload_grace = 4.0"))


def test_sidekiq_runbook_end_to_end(tmp_path):
    """Walked once, with the default (shared) upstream mode: it is the slowest test."""
    from conftest import ProxyProcess
    proxy = None
    srv = start_server("redis" if shutil.which("redis-server") else "valkey")
    procs = []
    try:
        upstream = f"redis://127.0.0.1:{srv.port}"
        results_url = f"{upstream}/9"
        results = redis.Redis(port=srv.port, db=9)
        old_db = redis.Redis(port=srv.port, db=0)
        new_db = redis.Redis(port=srv.port, db=1)
        new_port, old_port, mport = free_port(), free_port(), free_port()
        proxy = ProxyProcess([], step_config("step1-shared-data.toml", upstream, new_port, old_port, mport),
                             port=old_port)
        cfg = tmp_path.__class__(os.path.join(proxy.tmp, "proxy.toml"))
        stop = tmp_path / "stop"
        logs = []

        def ruby(args, namespace, port, tag=""):
            env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{port}/0", RESULTS_URL=results_url,
                       SIDEKIQ_NAMESPACE=namespace, TAG=tag, STOP_FILE=str(stop))
            log = open(tmp_path / f"{tag or 'worker'}-{namespace or 'plain'}-{len(procs)}.log", "w")
            logs.append(log.name)
            p = subprocess.Popen(args, env=env, cwd=JOBS, stdout=log, stderr=subprocess.STDOUT)
            procs.append(p)
            return p

        worker = ["sidekiq", "-r", os.path.join(JOBS, "jobs.rb"), "-c", "3", "-t", "8", "-q", "default"]
        # Step 1: old (namespaced) and new (plain) clients and workers, all on the old data.
        enq_old = ruby(["ruby", "enqueue.rb"], "sidekiq", old_port, "old")
        enq_new = ruby(["ruby", "enqueue.rb"], "", new_port, "new")
        ruby(worker, "sidekiq", old_port)
        ruby(worker, "", new_port)
        time.sleep(5)
        assert results.scard("enqueued") > 20, [open(f).read()[-2000:] for f in logs]
        assert old_db.keys("sidekiq:*") and not new_db.keys("*")  # one keyspace, under sidekiq:

        # Jobs waiting for a retry an hour from now, as Sidekiq 6 keeps them: they must survive the move.
        import json
        later = time.time() + 3600
        retries = {json.dumps({"class": "CountJob", "args": [f"retry-{i}"], "jid": f"r{i}", "retry": True,
                               "queue": "default"}): later + i for i in range(5)}
        old_db.zadd("sidekiq:retry", retries)

        # Step 2: flip both routes to the new keyspace with a reload.
        cfg.write_text(step_config("step2-new-keyspace.toml", upstream, new_port, old_port, mport))
        req = urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST")
        assert b"2 route(s) changed" in urllib.request.urlopen(req, timeout=30).read()
        time.sleep(5)  # the old routes' connections drain (grace 4 s in this test)

        # Step 3: move the old keyspace's jobs over while both sides keep working.
        migrate = [sys.executable, "-m", "proxy", "migrate", "--from", f"{upstream}/0", "--from-namespace",
                   "sidekiq", "--to", f"{upstream}/1", "--move"]
        r = subprocess.run(migrate, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        print("migrate --move:", r.stdout)
        assert " merged 0," not in r.stdout  # live collections (queues, schedule, ...) were merged
        # Step 4: what is left are string counters (stats): the old values replace the new.
        r = subprocess.run(migrate + ["--overwrite", "--verify"], capture_output=True, text=True, timeout=120,
                           cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        print("migrate --move --overwrite --verify:", r.stdout)
        time.sleep(3)

        # Stop enqueueing; wait until every job ran.
        stop.write_text("")
        for p in (enq_old, enq_new):
            p.wait(30)
        enqueued = {x.decode() for x in results.smembers("enqueued")}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ran = {k.decode(): int(v) for k, v in results.hgetall("runs").items()}
            if enqueued <= set(ran):
                break
            time.sleep(0.5)
        ran = {k.decode(): int(v) for k, v in results.hgetall("runs").items()}
        missing = enqueued - set(ran)
        assert not missing, f"{len(missing)} of {len(enqueued)} jobs never ran, e.g. {sorted(missing)[:5]}"
        twice = {k: v for k, v in ran.items() if v != 1}
        assert not twice, f"jobs ran more than once: {twice}"
        assert set(ran) <= enqueued
        assert results.lrange("enqueue_errors", 0, -1) == []
        assert {i.split("-")[0] for i in enqueued} == {"old", "new"} and len(enqueued) > 100
        assert old_db.keys("sidekiq:*") == [], old_db.keys("sidekiq:*")  # nothing left in the old keyspace
        print(f"{len(enqueued)} jobs enqueued ({sum(1 for i in enqueued if i.startswith('old'))} by namespaced "
              f"clients), each ran once")
        assert new_db.exists("queues")
        assert set(new_db.zrange("retry", 0, -1)) >= {m.encode() for m in retries}
        failed = {i for i in enqueued if i.endswith("7")}
        dead = {json.loads(m)["args"][0] for m in new_db.zrange("dead", 0, -1)}
        assert failed and failed == dead, (len(failed), len(dead))  # old side's dead jobs moved, none lost
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if proxy is not None:
            proxy.stop()
        srv.stop()
