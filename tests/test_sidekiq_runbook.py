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

import collections
import json
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
SIDEKIQ7_HOME = os.environ.get("SIDEKIQ7_GEM_HOME") or os.path.join(ROOT, ".gems", "sidekiq7")
SIDEKIQ7_BIN = os.path.join(SIDEKIQ7_HOME, "bin", "sidekiq")


def ruby_env(version: int) -> dict:
    """Sidekiq 6: Debian's gems (no GEM_HOME/GEM_PATH); Sidekiq 7: the isolated gem home only."""
    env = {k: v for k, v in os.environ.items() if k not in ("GEM_HOME", "GEM_PATH", "RUBYOPT", "BUNDLE_GEMFILE")}
    if version == 7:
        env.update(GEM_HOME=SIDEKIQ7_HOME, GEM_PATH=SIDEKIQ7_HOME)
    return env


def sidekiq_version(version: int, requires: str) -> str:
    r = subprocess.run(["ruby", "-e", f'{requires}; print Sidekiq::VERSION'], capture_output=True, text=True,
                       env=ruby_env(version), timeout=60)
    return r.stdout if r.returncode == 0 else ""


def missing() -> str:
    if not shutil.which("ruby") or not shutil.which("sidekiq"):
        return "ruby and Sidekiq 6 (ruby-sidekiq, ruby-redis-namespace) are not installed"
    if not sidekiq_version(6, 'require "sidekiq"; require "redis-namespace"').startswith("6."):
        return "Sidekiq 6 / redis-namespace (ruby-sidekiq, ruby-redis-namespace) do not load"
    if not os.access(SIDEKIQ7_BIN, os.X_OK) or \
            not sidekiq_version(7, 'require "sidekiq"; require "redis_client"').startswith("7."):
        return (f"Sidekiq 7 is not in the gem home {SIDEKIQ7_HOME} (.ci/run installs it: "
                f"sh ../shared/gems/install.sh {SIDEKIQ7_HOME})")
    return ""


_missing = missing()
if _missing:
    if CI:
        pytest.fail(f"CI=true but {_missing}", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)


def step_config(name: str, upstream: str, new: int, old: int, metrics: int) -> str:
    """A runbook step's TOML, as in deploy/runbook/, with this test's addresses."""
    with open(os.path.join(RUNBOOK, name)) as f:
        text = f.read()
    return (text.replace("redis://127.0.0.1:6379", upstream)
            .replace("127.0.0.1:6380", f"127.0.0.1:{new}")
            .replace("127.0.0.1:6381", f"127.0.0.1:{old}")
            .replace("127.0.0.1:9121", f"127.0.0.1:{metrics}")
            .replace("reload_grace = 10.0", "reload_grace = 4.0")
            .replace("/etc/keyspace-proxy/admin-token", _token_file()))


RELOAD_TOKEN = "runbook-reload-token"


def _token_file() -> str:
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"ksp-runbook-token-{os.getpid()}")
    with open(path, "w") as f:
        f.write(RELOAD_TOKEN + "\n")
    return path


def expected_runs(job_id: str) -> int:
    """As tests/sidekiq/jobs.rb fails them: ids ending in 3 once (then the retry succeeds),
    ids ending in 7 always (one retry, then the dead set)."""
    return 2 if job_id.endswith(("3", "7")) else 1


def sidekiq_job(job_id: str) -> str:
    return json.dumps({"class": "CountJob", "args": [job_id], "jid": os.urandom(12).hex(), "retry": 1,
                       "queue": "default", "created_at": time.time()})


def test_sidekiq_runbook_end_to_end(tmp_path):
    """Walked once, with the default (shared) upstream mode: it is the slowest test."""
    from conftest import ProxyProcess
    proxy = None
    srv = start_server("redis" if shutil.which("redis-server") else "valkey")
    procs = {}
    logs = []

    def tails() -> str:
        out = []
        for name in logs:
            with open(name, errors="replace") as f:
                out.append(f"--- {os.path.basename(name)}:\n{f.read()[-1500:]}")
        if proxy is not None:
            out.append(f"--- proxy:\n{proxy.output()[-1500:]}")
        return "\n".join(out)

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

        def start(name, version, args, tag=""):
            """Sidekiq 6 processes use listener `old` with the namespace; Sidekiq 7 ones listener `new`."""
            env = dict(ruby_env(version), RESULTS_URL=results_url, TAG=tag, STOP_FILE=str(stop),
                       REDIS_URL=f"redis://127.0.0.1:{old_port if version == 6 else new_port}/0",
                       SIDEKIQ_NAMESPACE="sidekiq" if version == 6 else "")
            log = open(tmp_path / f"{name}.log", "w")
            logs.append(log.name)
            procs[name] = subprocess.Popen(args, env=env, cwd=JOBS, stdout=log, stderr=subprocess.STDOUT)
            return procs[name]

        def worker(version):
            return [shutil.which("sidekiq") if version == 6 else SIDEKIQ7_BIN,
                    "-r", os.path.join(JOBS, "jobs.rb"), "-c", "3", "-t", "8", "-q", "default"]

        def wait_for(cond, what, timeout=30):
            deadline = time.monotonic() + timeout
            while not cond():
                check_alive()
                assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{tails()}"
                time.sleep(0.5)

        def check_alive():
            dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None and n != "worker6"}
            assert not dead, f"processes exited early: {dead}\n{tails()}"

        # Step 1: namespaced Sidekiq 6 and plain Sidekiq 7, clients and workers, all on the old data.
        start("enqueue6", 6, ["ruby", "enqueue.rb"], "old")
        start("enqueue7", 7, ["ruby", "enqueue.rb"], "new")
        start("worker6", 6, worker(6))
        start("worker7", 7, worker(7))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10):
            check_alive()
            time.sleep(0.5)
        assert results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10, tails()
        # Sidekiq 7 flushes its metrics (`j|...` hashes, BITFIELD histograms) on its 10 s heartbeat:
        # wait for them, so keys only Sidekiq 7 writes are in the old keyspace too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not old_db.keys("sidekiq:j|*"):
            check_alive()
            time.sleep(0.5)
        assert old_db.keys("sidekiq:j|*"), (sorted(old_db.keys("*")), tails())
        wait_for(lambda: old_db.zcard("sidekiq:dead") > 0, "a job in the old dead set")
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
        req = urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST",
                                     headers={"Authorization": f"Bearer {RELOAD_TOKEN}"})
        assert b"2 route(s) changed" in urllib.request.urlopen(req, timeout=30).read()
        time.sleep(5)  # the old routes' connections drain (grace 4 s in this test)
        check_alive()
        wait_for(lambda: new_db.zcard("retry") > 0 and new_db.zcard("dead") > 0, "jobs in the new retry and dead sets")

        # Step 3: move the old keyspace's jobs over while both sides keep working. Both keyspaces
        # hold live retry and dead sets here (jobs failed on both sides of the flip): a merge.
        print("old keyspace before migrate:", sorted(old_db.keys("*")))
        before = {k: (old_db.zcard(f"sidekiq:{k}"), new_db.zcard(k)) for k in ("schedule", "retry", "dead")}
        print("zcard old/new before migrate:", before)
        assert all(o > 0 for o, _ in before.values()), before
        assert before["retry"][1] > 0 and before["dead"][1] > 0, before
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
        assert old_db.keys("sidekiq:*") == [], old_db.keys("sidekiq:*")
        assert set(new_db.zrange("retry", 0, -1)) >= {m.encode() for m in retries}

        # Then the namespaced worker moves to Sidekiq 7 (the namespaced client keeps enqueueing
        # through listener `old`): a graceful stop, a second Sidekiq 7 worker.
        procs["worker6"].terminate()
        procs["worker6"].wait(30)
        start("worker7b", 7, worker(7))
        time.sleep(4)
        check_alive()

        # Stop enqueueing; wait until every job ran as often as it should.
        stop.write_text("")
        for name in ("enqueue6", "enqueue7"):
            procs[name].wait(30)
        enqueued = {x.decode() for x in results.smembers("enqueued")}

        def state():
            ran = {k.decode(): int(v) for k, v in results.hgetall("runs").items()}
            dead = collections.Counter(json.loads(m)["args"][0] for m in new_db.zrange("dead", 0, -1))
            return ran, dead

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ran, dead = state()
            if all(ran.get(i, 0) >= expected_runs(i) for i in enqueued) and \
                    sum(1 for i in enqueued if i.endswith("7")) <= len(dead):
                break
            time.sleep(0.5)
        time.sleep(2)  # anything run twice shows up now
        ran, dead = state()
        done = {k.decode(): int(v) for k, v in results.hgetall("done").items()}
        short = {i: ran.get(i, 0) for i in enqueued if ran.get(i, 0) < expected_runs(i)}
        assert not short, f"{len(short)} of {len(enqueued)} jobs did not run (enough), e.g. {sorted(short.items())[:5]}"
        extra = {i: n for i, n in ran.items() if i not in enqueued or n != expected_runs(i)}
        assert not extra, f"jobs ran too often: {sorted(extra.items())[:20]}"
        assert all(done.get(i) == 1 for i in enqueued if not i.endswith("7")), "a job succeeded twice or never"
        assert not any(i.endswith("7") for i in done)
        assert results.lrange("enqueue_errors", 0, -1) == []
        failed = {i for i in enqueued if i.endswith("7")}
        assert failed and set(dead) == failed, (len(failed), len(dead), sorted(failed ^ set(dead))[:10])
        assert max(dead.values()) == 1, [i for i, n in dead.items() if n > 1]  # dead once each
        assert {i.split("-")[0] for i in enqueued} == {"old", "new", "sched"} and len(enqueued) > 100
        by6 = results.hlen("runs:6")
        by7 = results.hlen("runs:7")
        assert by6 > 10 and by7 > 10  # both versions ran jobs
        assert old_db.keys("sidekiq:*") == [], old_db.keys("sidekiq:*")  # nothing left in the old keyspace
        assert new_db.exists("queues")
        assert set(new_db.zrange("retry", 0, -1)) >= {m.encode() for m in retries}
        print(f"{len(enqueued)} jobs enqueued ({sum(1 for i in enqueued if i.startswith('old'))} by Sidekiq 6 "
              f"with redis-namespace, {sum(1 for i in enqueued if i.startswith('new'))} by Sidekiq 7); "
              f"{sum(ran.values())} runs ({by6} ids run by Sidekiq 6, {by7} by Sidekiq 7), each as expected; "
              f"{len(dead)} in the dead set once each")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if proxy is not None:
            proxy.stop()
        srv.stop()
