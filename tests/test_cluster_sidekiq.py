"""Real Sidekiq 6.4 (Debian's, redis-namespace off: the proxy pins the namespace) and
Sidekiq 7.3 (RESP3, $SIDEKIQ7_GEM_HOME) enqueueing and working through pinned routes on
a real Valkey Cluster, every job run exactly once (tests/runbook_helpers.py `account`).
Its own file: it takes about half a minute, run once (shared upstream mode)."""

from __future__ import annotations

import os
import shutil
import subprocess

import redis

from cluster_helpers import start_cluster
from conftest import ProxyProcess
from integration_helpers import proxy_toml
from proxy.cluster import key_slot
from proxy.embedded import free_port, start_server
from runbook_helpers import JOBS, SIDEKIQ7_BIN, Fleet, account, require_sidekiq, ruby_env, summary

require_sidekiq()


class ClusterFleet(Fleet):
    """Fleet, with Sidekiq 6 *without* redis-namespace: the proxy adds (and pins) it."""

    def start(self, name: str, version: int, args: list[str], tag: str = "") -> subprocess.Popen:
        port = self.old_port if version == 6 else self.new_port
        env = dict(ruby_env(version), RESULTS_URL=self.results_url, TAG=tag, STOP_FILE=str(self.stop_file),
                   REDIS_URL=f"redis://127.0.0.1:{port}/0", SIDEKIQ_NAMESPACE="")
        log = open(self.tmp_path / f"{name}.log", "w")
        self.logs.append(log.name)
        self.procs[name] = subprocess.Popen(args, env=env, cwd=JOBS, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def worker(self, name: str, version: int) -> subprocess.Popen:
        return self.start(name, version, [shutil.which("sidekiq") if version == 6 else SIDEKIQ7_BIN,
                                          "-r", os.path.join(JOBS, "jobs.rb"), "-c", "3", "-t", "8", "-q", "default"])


def test_sidekiq_6_and_7_on_a_cluster_through_pinned_routes(tmp_path):
    c = start_cluster("valkey")
    server = start_server("valkey")   # the results db: straight to a server, not through the proxy
    fresh_db = 0
    fleet = None
    try:
        seeds = f"redis+cluster://{c.seeds()}"
        new_port, old_port = free_port(), free_port()
        route = {"upstream": seeds, "namespace": "sidekiq", "slot": "pinned", "policy": "app"}
        results = redis.Redis(host=server.host, port=server.port, db=fresh_db)
        fleet = ClusterFleet(tmp_path, f"redis://{server.host}:{server.port}/{fresh_db}", new_port, old_port)
        fleet.proxy = ProxyProcess([], proxy_toml([{"listen": f"127.0.0.1:{old_port}", **route},
                                                   {"listen": f"127.0.0.1:{new_port}", **route}]), port=old_port)
        fleet.enqueuer(6, "old")
        fleet.enqueuer(7, "new")
        fleet.worker("worker6", 6)
        fleet.worker("worker7", 7)
        fleet.wait_for(lambda: results.hlen("runs:6") > 10 and results.hlen("runs:7") > 10, "jobs run by both")
        via = redis.Redis(port=new_port, socket_timeout=10)
        fleet.wait_for(lambda: via.zcard("dead") > 0, "a job in the dead set")
        fleet.stop_enqueueing()
        enqueued, ran, dead = account(results, via)
        print(summary(enqueued, ran, dead, results))
        # every key Sidekiq wrote is {sidekiq}:..., in one slot, on its owner
        owner = c.primary_for(key_slot(b"sidekiq"))
        keys = owner.call("KEYS", "*")
        assert keys and all(k.startswith(b"{sidekiq}:") for k in keys), keys[:10]
        assert sorted(k.decode() for k in via.keys("*")) == sorted(k.decode()[len("{sidekiq}:"):] for k in keys)
    finally:
        if fleet is not None:
            fleet.close()
            if fleet.proxy is not None:
                fleet.proxy.stop()
        c.stop()
        server.stop()
