"""Sentinel upstreams against real processes: a redis-server primary and replica and
three sentinels (`redis-server --sentinel`, generated configs) on free ports, with a low
down-after-milliseconds and failover-timeout so a failover takes a few seconds.

Cases: URLs, settings and the parsed replies and events; discovery at start (and
`keyspace-proxy check` through the sentinels, with a sentinel password, over TLS, and
migrate); SENTINEL FAILOVER under a steady write load through the proxy, after its
subscriptions were cut and renewed, the route leaving the old primary when the
failover begins; a watcher that missed every message; a SIGKILLed primary with its
replica promoted; readiness false while the route has no answering primary, true after.
Every request gets its own reply or an error, never another request's (ECHO of a value
unique to the request), and every acknowledged write is on the new primary except what
asynchronous replication itself can lose (see _check_writes)."""

from __future__ import annotations

import contextlib
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
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import ROOT, ProxyProcess
from integration_helpers import wait_for
from proxy.config import ConfigError, from_dict, parse_upstream, render_toml
from proxy.embedded import free_port, start_server
from proxy.schema import Invalid
from proxy.sentinel import Order, event_master, is_primary, master_addr, switch_master, SentinelError


# -- the plain parts: replies, events, URLs, settings

def test_replies_and_events_are_parsed():
    assert master_addr([b"10.0.0.5", b"6380"]) == ("10.0.0.5", 6380)
    assert master_addr(None) is None  # a master name the sentinel does not monitor
    with pytest.raises(SentinelError):
        master_addr([b"10.0.0.5"])
    assert switch_master(b"mymaster 10.0.0.5 6379 10.0.0.6 6380") == \
        ("mymaster", ("10.0.0.5", 6379), ("10.0.0.6", 6380))
    assert switch_master(b"mymaster 10.0.0.5 6379") is None
    assert event_master(b"slave 10.0.0.6:6380 10.0.0.6 6380 @ mymaster 10.0.0.5 6379") == \
        ("mymaster", ("10.0.0.5", 6379))
    assert event_master(b"master mymaster 10.0.0.5 6379") == ("mymaster", ("10.0.0.5", 6379))
    assert event_master(b"sentinel x") is None
    assert is_primary([b"master", 10, []]) and not is_primary([b"slave", b"10.0.0.5", 6379, b"connected", 1])


def test_the_sentinel_that_answered_is_asked_first():
    o = Order([("a", 1), ("b", 2), ("c", 3)])
    o.good(("c", 3))
    assert list(o) == [("c", 3), ("a", 1), ("b", 2)]


def test_sentinel_urls():
    up = parse_upstream("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380,sentinel-3/mymaster/2")
    assert (up.username, up.password, up.db, up.tls) == ("app", "s@cret", 2, None)
    assert up.sentinel.nodes == (("10.0.0.1", 26379), ("::1", 26380), ("sentinel-3", 26379))
    assert up.sentinel.master == "mymaster" and up.sentinel.password is None
    assert up.masked() == "redis+sentinel://app:***@10.0.0.1:26379,[::1]:26380,sentinel-3:26379/mymaster/2"
    assert parse_upstream("rediss+sentinel://h:1/m").tls is not None
    assert parse_upstream("redis+sentinel://h:1/m").db == 0
    for url, msg in [("redis+sentinel://h:1/", "missing the master's name"),
                     ("redis+sentinel://h:1/m/x", "db must be a number"),
                     ("redis+sentinel://h:1,,h:2/m", "missing sentinel address"),
                     ("redis+sentinel://h:x/m", "expected HOST:PORT with a numeric port"),
                     ("redis+sentinel://h:1/m?db=1", "takes no query")]:
        with pytest.raises(Invalid, match=msg):
            parse_upstream(url)


def test_sentinel_url_password_with_a_slash_is_neither_cut_nor_shown():
    """The credentials end at the last '@' (as mask_url and redis+cluster:// read them): a
    password holding '/' or '@' unencoded is the password, never part of a sentinel
    address (whose error message would have shown it)."""
    up = parse_upstream("redis+sentinel://app:se/cr@t@10.0.0.1:26379,10.0.0.2/mymaster/2")
    assert (up.username, up.password, up.db, up.sentinel.master) == ("app", "se/cr@t", 2, "mymaster")
    assert up.sentinel.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    with pytest.raises(Invalid) as e:
        parse_upstream("redis+sentinel://app:Zq/9wX@10.0.0.1:x/mymaster")
    assert "Zq" not in str(e.value) and "9wX" not in str(e.value)


def test_sentinel_credentials_are_their_own_setting():
    listener = [{"listen": "127.0.0.1:6380"}]
    cfg = from_dict({"upstream": "redis+sentinel://:datapass@h:1/m", "listener": listener,
                     "sentinel": {"username": "sen", "password": "senpass"}})
    up = cfg.routes[0].upstream
    assert up.password == "datapass" and (up.sentinel.username, up.sentinel.password) == ("sen", "senpass")
    text = render_toml(cfg)
    assert "senpass" not in text and "datapass" not in text and '[sentinel]\nusername = "sen"' in text
    with pytest.raises(ConfigError, match="sentinel.password: no upstream is redis\\+sentinel://"):
        from_dict({"upstream": "redis://h:1/0", "listener": listener, "sentinel": {"password": "x"}})
    with pytest.raises(ConfigError, match="sentinel.username: given without sentinel.password"):
        from_dict({"upstream": "redis+sentinel://h:1/m", "listener": listener, "sentinel": {"username": "x"}})
    with pytest.raises(ConfigError, match="sentinel.colour: unknown field"):
        from_dict({"upstream": "redis+sentinel://h:1/m", "listener": listener, "sentinel": {"colour": "x"}})


def test_sentinel_password_from_the_environment():
    from proxy.cli import apply_env, build_parser, config_from_args
    a = build_parser().parse_args(["--listen", "127.0.0.1:0", "--upstream", "redis+sentinel://h:1/m/3"])
    apply_env(a, {"PROXY_SENTINEL_PASSWORD": "from-env"})
    cfg = config_from_args(a, {})
    assert cfg.routes[0].upstream.sentinel.password == "from-env" and cfg.routes[0].default.db == 3


# -- against real sentinels

MASTER = "mymaster"


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
        """SENTINEL FAILOVER, once the sentinel accepts it: right after a previous
        failover it may still answer -NOGOODSLAVE (its view of the replica is older
        than its INFO period) or -INPROG."""
        def accepted():
            try:
                return self.ask(self.sentinels[0][0]).execute_command("SENTINEL", "FAILOVER", MASTER)
            except redis.ResponseError as e:
                if "NOGOODSLAVE" in str(e) or "INPROG" in str(e):
                    time.sleep(0.2)
                    return False
                raise
        wait_for(accepted, 30, "SENTINEL FAILOVER to be accepted")

    def settle_after_failover(self, old: int) -> int:
        """The new primary, once the old one is its replica again and the sentinels
        see it as one (so the next test can fail over again)."""
        new = wait_for(lambda: (p := self.primary()) != old and p, 30, "a new primary")
        # what the sentinels do at their next look at the old primary (up to 10 s away),
        # done now so the next test starts sooner; nothing here is checked any more
        old_node = redis.Redis(port=old)
        if old_node.execute_command("ROLE")[0] == b"master":
            old_node.replicaof("127.0.0.1", new)
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
    if not shutil.which("redis-server") and os.environ.get("CI") != "true":
        pytest.skip("needs redis-server (Sentinel)")  # under CI=true a missing one fails
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


SENTINEL_SECRET = "sen-s3cret-never-printed"


def test_sentinels_with_a_password(topology, tmp_path):
    """A sentinel with `requirepass` (its own, not the data nodes'): without the
    [sentinel] password `check` says so and names the setting; with it (from the
    file or PROXY_SENTINEL_PASSWORD) check and the proxy find the primary."""
    primary = topology.primary()
    port, workdir = free_port(), tempfile.mkdtemp(prefix="ksp-sentinel-")
    with open(os.path.join(workdir, "sentinel.conf"), "w") as f:
        # a master name of its own, never failed over: the other sentinels ignore it
        f.write(f"port {port}\nbind 127.0.0.1\ndir {workdir}\nrequirepass {SENTINEL_SECRET}\n"
                f"sentinel monitor authmaster 127.0.0.1 {primary} 1\n"
                "sentinel down-after-milliseconds authmaster 600000\n")
    sen = subprocess.Popen(["redis-server", os.path.join(workdir, "sentinel.conf"), "--sentinel"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: Sentinels._ping(port) or b"NOAUTH" in _raw_ping(port), 10, "the sentinel")
        url = f"redis+sentinel://127.0.0.1:{port}/authmaster/4"
        cfg = tmp_path / "proxy.toml"
        cfg.write_text(f'upstream = "{url}"\n[[listener]]\nlisten = "127.0.0.1:0"\nnamespace = "pw"\n')
        env = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}
        env["PYTHONPATH"] = ROOT
        out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)], capture_output=True,
                             text=True, timeout=60, env=env, cwd=ROOT)
        assert out.returncode == 2
        assert (f"sentinel 127.0.0.1:{port}: SENTINEL GET-MASTER-ADDR-BY-NAME failed: NOAUTH" in out.stdout
                and "[sentinel] password / PROXY_SENTINEL_PASSWORD" in out.stdout), out.stdout
        out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)], capture_output=True,
                             text=True, timeout=60, env=dict(env, PROXY_SENTINEL_PASSWORD=SENTINEL_SECRET), cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        assert SENTINEL_SECRET not in out.stdout + out.stderr and 'password = "***"' in out.stdout
        pport = free_port()
        p = ProxyProcess([], f'upstream = "{url}"\n[sentinel]\npassword = "{SENTINEL_SECRET}"\n'
                             f'[[listener]]\nlisten = "127.0.0.1:{pport}"\nnamespace = "pw"\n', port=pport)
        try:
            redis.Redis(port=pport).set("k", "v")
            assert redis.Redis(port=primary, db=4).get("pw:k") == b"v"
            assert SENTINEL_SECRET not in p.output()
        finally:
            p.stop()
    finally:
        sen.terminate()
        sen.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_users_route_with_a_sentinel_upstream(topology):
    """A listener with users: a user's own upstream may be a sentinel URL."""
    import hashlib
    primary = topology.primary()
    digest = hashlib.sha256(b"u1-pass").hexdigest()
    pport = free_port()
    p = ProxyProcess([], f'[[listener]]\nlisten = "127.0.0.1:{pport}"\nupstream = "redis://127.0.0.1:1/0"\n'
                         f'[[listener.user]]\nname = "u1"\npassword_sha256 = "{digest}"\nnamespace = "u1"\n'
                         f'upstream = "{topology.url(f"{MASTER}/6")}"\n', port=pport)
    try:
        c = redis.Redis(port=pport, username="u1", password="u1-pass")
        c.set("k", "via-user")
        assert redis.Redis(port=primary, db=6).get("u1:k") == b"via-user"
    finally:
        p.stop()


@contextlib.contextmanager
def tls_sentinel(node, data_tls_port: int, cert: str, key: str, ca: str):
    """One redis-server --sentinel on a TLS port (certificate cert/key) monitoring the TLS
    primary `node` at data_tls_port as `tlsmaster` (never failing it over): yields the
    sentinel's port; stops both at the end."""
    port, workdir = free_port(), tempfile.mkdtemp(prefix="ksp-sentinel-")
    with open(os.path.join(workdir, "sentinel.conf"), "w") as f:
        f.write(f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"tls-cert-file {cert}\ntls-key-file {key}\n"
                f"tls-ca-cert-file {ca}\ntls-auth-clients no\ntls-replication yes\n"
                f"sentinel monitor tlsmaster 127.0.0.1 {data_tls_port} 1\n"
                "sentinel down-after-milliseconds tlsmaster 600000\n")
    sen = subprocess.Popen(["redis-server", os.path.join(workdir, "sentinel.conf"), "--sentinel"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield port
    finally:
        sen.terminate()
        sen.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
        node.stop()


def test_rediss_sentinel_over_tls(tmp_path):
    """rediss+sentinel://: the sentinel and the data node both over TLS, verified with
    [upstream_tls] ca_file (each against its own host); check and the proxy both."""
    if not shutil.which("redis-server") and os.environ.get("CI") != "true":
        pytest.skip("needs redis-server")
    from test_tls import Certs
    certs = Certs(str(tmp_path))
    tls = ["--tls-cert-file", certs.server_cert, "--tls-key-file", certs.server_key,
           "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "no"]
    data_tls_port = free_port()
    node = start_server("redis", extra=["--tls-port", str(data_tls_port), *tls])
    with tls_sentinel(node, data_tls_port, certs.server_cert, certs.server_key, certs.ca) as port:
        text = (f'upstream = "rediss+sentinel://127.0.0.1:{port}/tlsmaster/2"\n'
                f'[upstream_tls]\nca_file = "{certs.ca}"\n')
        cfg = tmp_path / "proxy.toml"
        cfg.write_text(text + '[[listener]]\nlisten = "127.0.0.1:0"\nnamespace = "t"\n')
        env = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}

        def check():
            return subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(cfg)],
                                  capture_output=True, text=True, timeout=60, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
        out = wait_for(lambda: (o := check()).returncode == 0 and o, 20, "check to pass over TLS")
        assert "rediss+sentinel://127.0.0.1:%d/tlsmaster" % port in out.stdout
        pport = free_port()
        p = ProxyProcess([], text + f'[[listener]]\nlisten = "127.0.0.1:{pport}"\nnamespace = "t"\n', port=pport)
        try:
            redis.Redis(port=pport).set("k", "over-tls")
            assert redis.Redis(port=node.port, db=2).get("t:k") == b"over-tls"
            assert node.port != data_tls_port and "primary is 127.0.0.1:%d" % data_tls_port in p.output()
        finally:
            p.stop()


def test_fence_probe_verifies_the_data_node_by_its_own_name(tmp_path):
    """A tenant route on rediss+sentinel://: the fence check's connection to the primary
    checks the primary's certificate against the primary's address, as every other
    connection to it does, not against the first sentinel's name (the sentinel's
    certificate names localhost only, the data node's 127.0.0.1 only)."""
    if not shutil.which("redis-server") and os.environ.get("CI") != "true":
        pytest.skip("needs redis-server")
    import trustme
    ca = trustme.CA()
    paths = {}
    for name, cert in (("sentinel", ca.issue_cert("localhost")), ("node", ca.issue_cert("127.0.0.1"))):
        paths[name] = (str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(paths[name][0])
        cert.private_key_pem.write_to_path(paths[name][1])
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    data_tls_port = free_port()
    node = start_server("redis", extra=["--tls-port", str(data_tls_port), "--tls-cert-file", paths["node"][0],
                                        "--tls-key-file", paths["node"][1], "--tls-ca-cert-file", ca_file,
                                        "--tls-auth-clients", "no"])
    with tls_sentinel(node, data_tls_port, paths["sentinel"][0], paths["sentinel"][1], ca_file) as port:
        pport = free_port()
        text = (f'upstream = "rediss+sentinel://localhost:{port}/tlsmaster/2"\n[upstream_tls]\nca_file = "{ca_file}"\n'
                f'[[listener]]\nlisten = "127.0.0.1:{pport}"\nnamespace = "t"\npolicy = "tenant"\n')
        p = ProxyProcess([], text, port=pport)
        try:
            redis.Redis(port=pport).set("k", "over-tls")  # the data connections verify 127.0.0.1
            assert redis.Redis(port=node.port, db=2).get("t:k") == b"over-tls"
            out = p.output()
            # the default user may touch any key: the check ran, and says so
            assert "not fenced by a Redis ACL (a key outside the namespace is allowed" in out, out
            assert "could not check" not in out
        finally:
            p.stop()


def _raw_ping(port: int) -> bytes:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(100)
    except OSError:
        return b""


def test_migrate_through_the_sentinels(topology):
    """migrate takes sentinel URLs: both sides resolve to the primary."""
    primary = topology.primary()
    d = redis.Redis(port=primary)
    d.flushdb()
    redis.Redis(port=primary, db=5).flushdb()
    d.set("m1:s", "v")
    d.rpush("m1:l", "a", "b", "c")
    out = subprocess.run([sys.executable, "-m", "proxy", "migrate", "--from", topology.url(f"{MASTER}/0"),
                          "--from-namespace", "m1", "--to", topology.url(f"{MASTER}/5"), "--to-namespace", "m2",
                          "--move", "--verify"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    d5 = redis.Redis(port=primary, db=5)
    assert d5.get("m2:s") == b"v" and d5.lrange("m2:l", 0, -1) == [b"a", b"b", b"c"]
    assert d.exists("m1:s", "m1:l") == 0


def test_a_missed_switch_is_found_by_the_periodic_ask(topology):
    """A watcher that heard nothing (not subscribed: its sentinels were unreachable when
    the failover was announced) still moves to the new primary at its next periodic
    ask, and tells the proxy which primary it left."""
    import asyncio

    from proxy.sentinel import Watcher
    t = topology
    old = t.primary()
    changes = []

    async def run():
        w = Watcher(parse_upstream(t.url()), 5.0, lambda a, b: changes.append((a, b)))
        await w.refresh("start")  # no subscription: every message is missed
        assert w.state.primary == ("127.0.0.1", old)
        t.failover()
        new = wait_for(lambda: (q := t.primary()) != old and q, 30, "the new primary")
        await w.refresh("periodic check")
        return new

    new = asyncio.run(run())
    assert changes == [(None, ("127.0.0.1", old)), (("127.0.0.1", old), ("127.0.0.1", new))]
    t.settle_after_failover(old)


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
        # No client retries (redis-py 6+ retries a command 3 times on a connection error or
        # timeout by default): a retried RPUSH whose first copy reached the server is stored
        # twice by the client itself, which is not what this test measures.
        c = redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=10,
                        retry=Retry(NoBackoff(), 0))
        if i == 0:
            return self.run_pipelined(c)
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

    def run_pipelined(self, c: redis.Redis) -> None:
        """Writer 0 sends 8 requests per round trip, so a connection is rarely without
        replies owed when the primary moves."""
        seq = 0
        while not self.stop.is_set():
            p = c.pipeline(transaction=False)
            batch = []
            for _ in range(4):
                seq += 1
                p.rpush("w0", seq)
                p.echo(f"0:{seq}:echo")
                batch.append(seq)
            try:
                replies = p.execute(raise_on_error=False)
            except redis.RedisError:
                self.errors[0] += 1
                continue
            for k, s in enumerate(batch):
                pushed, echoed = replies[2 * k], replies[2 * k + 1]
                if isinstance(pushed, Exception):
                    self.errors[0] += 1
                elif isinstance(pushed, int):
                    self.acked[0].append(s)
                else:
                    self.wrong.append(f"RPUSH {s} got {pushed!r}")
                if not isinstance(echoed, Exception) and echoed != f"0:{s}:echo".encode():
                    self.wrong.append(f"ECHO 0:{s}:echo got {echoed!r}")
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
    # the proxy's subscriptions cut (as a sentinel restart would): it subscribes again
    for port, _, _ in t.sentinels:
        t.ask(port).execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    wait_for(lambda: all(any(c.get("sub") == "2" and c.get("psub") == "1" for c in t.ask(port).client_list())
                         for port, _, _ in t.sentinels), 10, "the proxy to subscribe again")
    t.failover()
    new = wait_for(lambda: (q := t.primary()) != old and q, 30, "the new primary")
    before = w.total()
    wait_for(lambda: w.total() >= before + 200, 30, "writes acknowledged after the failover")
    w.finish()
    assert not w.wrong, w.wrong[:5]
    assert ready(mport)
    lost = _check_writes(w, new, "app")
    assert lost <= w.total() // 4, f"{lost} acknowledged writes lost in the failover window" + p.output()[-3000:]
    # left when the failover began (announced by its leader, the sentinel asked), not
    # a second later at +switch-master
    assert f"+failover-state-send-slaveof-noone slave 127.0.0.1:{new}" in p.output()
    assert f"moved from 127.0.0.1:{old} (Sentinel failover)" in p.output()
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


def test_migrate_to_the_primary_itself_is_refused(topology, start_proxy):
    """policy app: MIGRATE to the route's own server is refused (Redis would serve both
    ends on one thread and stall for the timeout); on a Sentinel upstream that server is
    the primary the connection is on, not the URL's first sentinel."""
    t = topology
    primary = t.primary()
    port, mport = free_port(), free_port()
    p = start_proxy([], config_text=proxy_config(t, port, mport) + 'policy = "app"\n', port=port)
    c = redis.Redis(port=p.port, socket_timeout=10)
    c.set("k", "v")
    with pytest.raises(redis.ResponseError, match="MIGRATE to the route's own server is refused"):
        c.execute_command("MIGRATE", "127.0.0.1", primary, "k", 0, 50)
    assert c.get("k") == b"v"


def test_a_refused_reload_stops_the_sentinel_watcher_it_started(topology, start_proxy):
    """A reload that adds a route on a Sentinel upstream and is then refused (its new
    listener's port is taken) leaves no watcher subscribed to the sentinels."""
    import signal
    import socket

    from test_reload import wait_log, write
    t = topology
    primary = t.primary()
    port, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    plain = f'[[listener]]\nname = "plain"\nlisten = "127.0.0.1:{port}"\nupstream = "redis://127.0.0.1:{primary}/0"\n' \
            'namespace = "app"\n'
    p = start_proxy([], config_text=plain, port=port)

    def watchers():  # the sentinels' pub/sub clients: a watcher's subscriptions
        return sum(1 for sp, _, _ in t.sentinels for c in t.ask(sp).client_list() if "P" in c["flags"])
    assert watchers() == 0
    try:
        write(p, plain + f'[[listener]]\nname = "more"\nlisten = "127.0.0.1:{taken.getsockname()[1]}"\n'
                         f'upstream = "{t.url()}"\nnamespace = "more"\n')
        p.process.send_signal(signal.SIGHUP)
        wait_log(p, "reload refused")
    finally:
        taken.close()
    wait_for(lambda: watchers() == 0, 10, "the refused reload's watcher stopped")
    time.sleep(1)  # (its subscriptions would have come back by now)
    assert watchers() == 0
    assert redis.Redis(port=p.port, socket_timeout=10).ping()
