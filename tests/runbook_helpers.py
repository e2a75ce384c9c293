"""What the two runbook tests share: real Sidekiq 6.4 (Debian's ruby-sidekiq, with
redis-namespace) and Sidekiq 7.3 (RESP3 through redis-client, from the isolated gem home `.ci/run`
fills from ../shared/gems: $SIDEKIQ7_GEM_HOME, default .gems/sidekiq7) processes, clients and
workers, started against a proxy's two listeners, and the final exactly-once count.

- tests/test_sidekiq_runbook.py: one server, `sidekiq:*` in db 0 -> plain keys in db 1;
- tests/test_server_move_runbook.py: one server to another (managed -> self-hosted) and back.

The app is tests/sidekiq/jobs.rb (CountJob counts its runs in a results db the test reads
directly) and tests/sidekiq/enqueue.rb (perform_async and perform_in until a stop file exists)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

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


def require_sidekiq() -> None:
    """At a test module's top: skip it without both Sidekiqs, fail under CI=true."""
    why = missing()
    if why:
        if CI:
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def expected_runs(job_id: str) -> int:
    """As tests/sidekiq/jobs.rb fails them: ids ending in 3 once (then the retry succeeds),
    ids ending in 7 always (one retry, then the dead set)."""
    return 2 if job_id.endswith(("3", "7")) else 1


def sidekiq_job(job_id: str) -> str:
    now = time.time()
    return json.dumps({"class": "CountJob", "args": [job_id], "jid": os.urandom(12).hex(), "retry": 1,
                       "queue": "default", "created_at": now, "enqueued_at": now})


# POST /-/reload needs a token (issue 13): the runbooks' proxies are given this one
RELOAD_TOKEN = "runbook-reload-token"


def token_file() -> str:
    """A file holding RELOAD_TOKEN, for a step's `[admin] token_file`."""
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"ksp-runbook-token-{os.getpid()}")
    with open(path, "w") as f:
        f.write(RELOAD_TOKEN + "\n")
    return path


def reload(metrics_port: int) -> bytes:
    """POST /-/reload with the admin token, as the runbooks say; the answer names the routes
    that changed."""
    req = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/-/reload", method="POST",
                                 headers={"Authorization": f"Bearer {RELOAD_TOKEN}"})
    return urllib.request.urlopen(req, timeout=30).read()


def migrate(*args: str) -> str:
    """`keyspace-proxy migrate ARGS`, which must succeed; its summary."""
    r = subprocess.run([sys.executable, "-m", "proxy", "migrate", *args], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"migrate {' '.join(args)}:\n{r.stdout}")
    return r.stdout


class Fleet:
    """The Sidekiq processes of a runbook test: Sidekiq 6 ones use the proxy's listener `old` with
    redis-namespace, Sidekiq 7 ones listener `new`; all record into the results db."""

    def __init__(self, tmp_path, results_url: str, new_port: int, old_port: int):
        self.tmp_path, self.results_url = tmp_path, results_url
        self.new_port, self.old_port = new_port, old_port
        self.stop_file = tmp_path / "stop"
        self.procs: dict[str, subprocess.Popen] = {}
        self.retired: set[str] = set()
        self.logs: list[str] = []
        self.proxy = None  # a conftest.ProxyProcess, for its output in failure messages

    def tails(self) -> str:
        out = []
        for name in self.logs:
            with open(name, errors="replace") as f:
                out.append(f"--- {os.path.basename(name)}:\n{f.read()[-1500:]}")
        if self.proxy is not None:
            out.append(f"--- proxy:\n{self.proxy.output()[-1500:]}")
        return "\n".join(out)

    def start(self, name: str, version: int, args: list[str], tag: str = "") -> subprocess.Popen:
        port = self.old_port if version == 6 else self.new_port
        env = dict(ruby_env(version), RESULTS_URL=self.results_url, TAG=tag, STOP_FILE=str(self.stop_file),
                   REDIS_URL=f"redis://127.0.0.1:{port}/0", SIDEKIQ_NAMESPACE="sidekiq" if version == 6 else "")
        log = open(self.tmp_path / f"{name}.log", "w")
        self.logs.append(log.name)
        self.procs[name] = subprocess.Popen(args, env=env, cwd=JOBS, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def enqueuer(self, version: int, tag: str) -> subprocess.Popen:
        """perform_async and perform_in, continuously, until stop_enqueueing()."""
        return self.start(f"enqueue{version}", version, ["ruby", "enqueue.rb"], tag)

    def worker(self, name: str, version: int) -> subprocess.Popen:
        return self.start(name, version, [shutil.which("sidekiq") if version == 6 else SIDEKIQ7_BIN,
                                          "-r", os.path.join(JOBS, "jobs.rb"), "-c", "3", "-t", "8", "-q", "default"])

    def retire(self, name: str) -> None:
        """A graceful stop (Sidekiq finishes or pushes back its running jobs)."""
        self.retired.add(name)
        self.procs[name].terminate()
        self.procs[name].wait(30)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None and n not in self.retired}
        assert not dead, f"processes exited early: {dead}\n{self.tails()}"

    def wait_for(self, cond, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.check_alive()
            assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{self.tails()}"
            time.sleep(0.5)

    def stop_enqueueing(self) -> None:
        self.stop_file.write_text("")
        for name in [n for n in self.procs if n.startswith("enqueue")]:
            self.procs[name].wait(30)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def account(results, dead_db, dead_key: str = "dead", timeout: float = 60):
    """After stop_enqueueing(): wait until every job accepted ran as often as it should, then
    check that none ran more often, none was refused, and every job that always fails is in the
    dead set (`dead_key` of `dead_db`) once. Returns (enqueued ids, runs per id, dead per id)."""
    enqueued = {x.decode() for x in results.smembers("enqueued")}

    def state():
        ran = {k.decode(): int(v) for k, v in results.hgetall("runs").items()}
        dead = collections.Counter(json.loads(m)["args"][0] for m in dead_db.zrange(dead_key, 0, -1))
        return ran, dead

    deadline = time.monotonic() + timeout
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
    assert results.lrange("enqueue_errors", 0, -1) == []  # no enqueue refused
    failed = {i for i in enqueued if i.endswith("7")}
    assert failed and set(dead) == failed, (len(failed), len(dead), sorted(failed ^ set(dead))[:10])
    assert max(dead.values()) == 1, [i for i, n in dead.items() if n > 1]  # dead once each
    assert results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10  # both versions ran jobs
    return enqueued, ran, dead


def summary(enqueued, ran, dead, results) -> str:
    return (f"{len(enqueued)} jobs enqueued ({sum(1 for i in enqueued if i.startswith('old'))} by Sidekiq 6 "
            f"with redis-namespace, {sum(1 for i in enqueued if i.startswith('new'))} by Sidekiq 7); "
            f"{sum(ran.values())} runs ({results.hlen('runs:6')} ids run by Sidekiq 6, {results.hlen('runs:7')} "
            f"by Sidekiq 7), each as expected; {len(dead)} in the dead set once each")
