"""Sentinel upstreams against real processes: a redis-server primary and replica and
three sentinels (`redis-server --sentinel`, generated configs) on free ports, with a low
down-after-milliseconds and failover-timeout so a failover takes a few seconds.

Cases: discovery at start (and `keyspace-proxy check` through the sentinels); SENTINEL
FAILOVER under a steady write load through the proxy; a SIGKILLed primary with its
replica promoted; readiness false while the route has no answering primary, true after.
Every request gets its own reply or an error, never another request's (ECHO of a value
unique to the request), and every acknowledged write is on the new primary except what
asynchronous replication itself can lose (see _check_writes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest
import redis

from conftest import ROOT
from integration_helpers import wait_for
from proxy.embedded import free_port, start_server

MASTER = "mymaster"
pytestmark = pytest.mark.skipif(not shutil.which("redis-server") and os.environ.get("CI") != "true",
                                reason="needs redis-server (Sentinel)")


class Sentinels:
    """The topology: two data nodes (one primary, one replica) and three sentinels."""

    def __init__(self):
        self.nodes = {}      # port -> RunningServer
        self.sentinels = []  # (port, Popen, workdir)
        primary = start_server("redis")
        self.nodes[primary.port] = primary
        self.add_replica(primary.port)
        for _ in range(3):
            self._start_sentinel(primary.port)
        wait_for(self._settled, 30, "sentinels to see the replica and each other")

    def add_replica(self, primary_port: int, port: int | None = None):
        r = start_server("redis", port=port, extra=["--replicaof", "127.0.0.1", str(primary_port)])
        self.nodes[r.port] = r
        wait_for(lambda: redis.Redis(port=r.port).info("replication").get("master_link_status") == "up",
                 20, "the replica to sync")
        return r

    def _start_sentinel(self, primary_port: int) -> None:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="ksp-sentinel-")
        conf = os.path.join(workdir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {workdir}\n"
                    f"logfile {workdir}/sentinel.log\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} 1000\n"
                    f"sentinel failover-timeout {MASTER} 3000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n")
        p = subprocess.Popen(["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        self.sentinels.append((port, p, workdir))
        wait_for(lambda: self._ping(port), 10, "a sentinel to start")

    @staticmethod
    def _ping(port) -> bool:
        try:
            return redis.Redis(port=port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def ask(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5, decode_responses=True)

    def _settled(self) -> bool:
        try:
            for port, _, _ in self.sentinels:
                s = self.ask(port)
                replicas = [r for r in s.execute_command("SENTINEL", "REPLICAS", MASTER)
                            if "s_down" not in str(r) and "disconnected" not in str(r)]
                others = s.execute_command("SENTINEL", "SENTINELS", MASTER)
                if len(replicas) < 1 or len(others) < 2:
                    return False
            return True
        except redis.RedisError:
            return False

    def primary(self) -> int:
        """The primary's port as every sentinel names it, once they agree and it says so."""
        def agreed():
            try:
                ports = {int(self.ask(p).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1])
                         for p, _, _ in self.sentinels}
                if len(ports) == 1:
                    port = ports.pop()
                    if redis.Redis(port=port).execute_command("ROLE")[0] == b"master":
                        return port
            except (redis.RedisError, TypeError):
                return None
        return wait_for(agreed, 30, "the sentinels to agree on a primary")

    def url(self, path: str = f"{MASTER}/0") -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p, _, _ in self.sentinels) + "/" + path

    def failover(self) -> None:
        self.ask(self.sentinels[0][0]).execute_command("SENTINEL", "FAILOVER", MASTER)

    def settle_after_failover(self, old: int) -> int:
        """The new primary, once the old one is its replica again and the sentinels
        see it as one (so the next test can fail over again)."""
        new = wait_for(lambda: (p := self.primary()) != old and p, 30, "a new primary")
        wait_for(lambda: redis.Redis(port=old).info("replication").get("master_link_status") == "up"
                 and redis.Redis(port=old).info("replication").get("master_port") == new, 30,
                 "the old primary to follow the new one")
        wait_for(self._settled, 30, "the sentinels to see the replica")
        return new

    def stop(self) -> None:
        for _, p, workdir in self.sentinels:
            p.terminate()
            p.wait(10)
            shutil.rmtree(workdir, ignore_errors=True)
        for n in self.nodes.values():
            n.stop()


@pytest.fixture(scope="module")
def topology():
    t = Sentinels()
    yield t
    t.stop()


def start(start_proxy, t: "Sentinels", mport: int, ns: str = "app"):
    port = free_port()
    return start_proxy([], config_text=proxy_config(t, port, mport, ns), port=port)


def proxy_config(t: Sentinels, port: int, mport: int, ns: str = "app") -> str:
    return (f'upstream = "{t.url()}"\n[metrics]\nlisten = "127.0.0.1:{mport}"\n'
            f'[[listener]]\nlisten = "127.0.0.1:{port}"\nnamespace = "{ns}"\n')


def ready(mport: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def test_discovery_at_start_and_check(topology, start_proxy, tmp_path):
    t = topology
    primary = t.primary()
    mport = free_port()
    p = start(start_proxy, t, mport)
    c = redis.Redis(port=p.port, socket_timeout=10)
    c.set("greeting", "hello")
    assert redis.Redis(port=primary).get("app:greeting") == b"hello"
    assert c.get("greeting") == b"hello"
    assert ready(mport)
    assert "primary is 127.0.0.1:%d" % primary in p.output()
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(proxy_config(t, free_port(), free_port()))
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"upstream {t.url(MASTER)}, client db 0 -> db 0: ok" in out.stdout


def test_check_names_each_sentinel_when_none_knows_the_master(topology, tmp_path):
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(f'upstream = "{topology.url("nosuchmaster/0")}"\n[[listener]]\nlisten = "127.0.0.1:0"\n')
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 2
    port = topology.sentinels[0][0]
    assert ("unreachable: no primary for master 'nosuchmaster' from the sentinels" in out.stdout
            and f"sentinel 127.0.0.1:{port}: does not know master 'nosuchmaster'" in out.stdout), out.stdout


class Writers:
    """Clients writing through the proxy until stopped: each RPUSHes its own sequence
    numbers to its own list (recording which were acknowledged) and ECHOes a value
    unique to the request (checking it gets that value back, never another's)."""

    def __init__(self, port: int, n: int = 4):
        self.port = port
        self.acked = [[] for _ in range(n)]
        self.errors = [0] * n
        self.wrong: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]
        for th in self.threads:
            th.start()

    def run(self, i: int) -> None:
        c = redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=10)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                c.rpush(f"w{i}", seq)
                self.acked[i].append(seq)
            except redis.RedisError:
                self.errors[i] += 1   # an error, or -READONLY from the demoted primary: allowed
            token = f"{i}:{seq}:echo"
            try:
                got = c.echo(token)
                if got != token.encode():
                    self.wrong.append(f"ECHO {token} got {got!r}")
            except redis.RedisError:
                self.errors[i] += 1
        c.close()

    def total(self) -> int:
        return sum(len(a) for a in self.acked)

    def finish(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(30)


def _check_writes(w: Writers, primary: int, ns: str) -> int:
    """Every acknowledged RPUSH is on the new primary, except one run of consecutive
    ones per writer: those the old primary acknowledged after its replica stopped
    copying from it (promotion) and before it was demoted or the proxy left it. Redis
    replication is asynchronous and Sentinel does not wait for the replica to catch up
    (not even for SENTINEL FAILOVER: it promotes at once), so that window is what
    Redis itself can lose; nothing before it or after it may be missing. Returns the
    number lost."""
    direct = redis.Redis(port=primary)
    lost_total = 0
    for i, acked in enumerate(w.acked):
        stored = [int(x) for x in direct.lrange(f"{ns}:w{i}", 0, -1)]
        assert len(stored) == len(set(stored)), f"writer {i}: a value stored twice"
        assert stored == sorted(stored), f"writer {i}: values out of order"
        have = set(stored)
        missing = [k for k, s in enumerate(acked) if s not in have]
        if missing:
            assert missing == list(range(missing[0], missing[-1] + 1)), \
                f"writer {i}: acknowledged writes lost outside one window: {[acked[k] for k in missing]}"
            assert missing[-1] < len(acked) - 1, f"writer {i}: its last acknowledged writes are lost"
        lost_total += len(missing)
        if missing:
            print(f"DEBUG writer {i}: acked {len(acked)} {acked[:2]}..{acked[-2:]} stored {len(stored)} "
                  f"{stored[:2]}..{stored[-2:]} missing {acked[missing[0]]}..{acked[missing[-1]]} errors {w.errors[i]}")
    return lost_total


def _watch_readiness(mport: int, stop: threading.Event, seen: list) -> threading.Thread:
    def run():
        while not stop.is_set():
            seen.append(ready(mport))
            time.sleep(0.02)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_failover_under_load(topology, start_proxy):
    t = topology
    old = t.primary()
    mport = free_port()
    p = start(start_proxy, t, mport)
    for i in range(4):
        redis.Redis(port=old).delete(f"app:w{i}")
    w = Writers(p.port)
    wait_for(lambda: w.total() >= 200, 30, "writes before the failover")
    t.failover()
    new = wait_for(lambda: (q := t.primary()) != old and q, 30, "the new primary")
    before = w.total()
    wait_for(lambda: w.total() >= before + 200, 30, "writes acknowledged after the failover")
    w.finish()
    assert not w.wrong, w.wrong[:5]
    assert ready(mport)
    lost = _check_writes(w, new, "app")
    assert lost <= w.total() // 4, f"{lost} acknowledged writes lost in the failover window" + p.output()[-3000:]
    assert f"moved from 127.0.0.1:{old}" in p.output()
    t.settle_after_failover(old)


def test_killed_primary_is_replaced(topology, start_proxy):
    t = topology
    old = t.primary()
    mport = free_port()
    p = start(start_proxy, t, mport, ns="kill")
    for i in range(4):
        redis.Redis(port=old).delete(f"kill:w{i}")
    w = Writers(p.port)
    wait_for(lambda: w.total() >= 200, 30, "writes before the kill")
    assert ready(mport)
    seen: list = []
    stop = threading.Event()
    watcher = _watch_readiness(mport, stop, seen)
    node = t.nodes.pop(old)
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)
    new = wait_for(lambda: (q := t.primary()) != old and q, 60, "the replica to be promoted")
    before = w.total()
    wait_for(lambda: w.total() >= before + 200, 30, "writes acknowledged after the promotion")
    wait_for(lambda: ready(mport), 30, "readiness back")
    stop.set()
    watcher.join(10)
    w.finish()
    node.stop()  # its work directory
    assert False in seen, "readiness stayed true with the primary killed"
    assert seen[-1] is True
    assert not w.wrong, w.wrong[:5]
    _check_writes(w, new, "kill")
    # a new replica on the old port, so the next test has a failover target again
    t.add_replica(new, port=old)
    wait_for(t._settled, 30, "the sentinels to see the new replica")
