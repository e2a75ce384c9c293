"""`rediss+cluster://`: a pinned route over a real TLS cluster, as ElastiCache runs one.

The cluster (tests/cluster_helpers.py, `tls=`): Debian's redis-server (the Valkey wheel is
built without TLS) with `tls-port`, `tls-cluster yes` (the bus over TLS) and
`tls-replication yes`; every node announces the hostname `localhost`
(`cluster-announce-hostname` + `cluster-preferred-endpoint-type hostname`, what
ElastiCache answers) and presents a certificate for `localhost` only, made here with
trustme. So a node is verified against the name it announces, as with ElastiCache's
`*.cache.amazonaws.com` certificates, and an IP address fails verification.

Through the proxy: plain commands, MULTI, BRPOP, the slot migrated under writes (ASK and
MOVED answered -TRYAGAIN, then traffic on the new owner over TLS); `check`; `migrate`
from a plain server onto the TLS cluster and back (--to-tls-* / --from-tls-*)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import redis

from cluster_helpers import start_cluster, tls_config, wait_until
from conftest import ROOT
from integration_helpers import client
from proxy.cluster import key_slot
from proxy.embedded import ServerStartError, free_port, start_server
from test_cluster_routing import Writer, _check_writes, ns_on, ready, readiness_text

import trustme  # noqa: E402  (the test extra: a missing one is a failure, not a skip)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster-certs")
    ca, other = trustme.CA(), trustme.CA()
    node = ca.issue_cert("localhost")  # the announced hostname only: no IP address in it
    paths = {"ca": str(d / "ca.pem"), "other_ca": str(d / "other.pem"), "cert": str(d / "node.crt"),
             "key": str(d / "node.key")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other_ca"])
    with open(paths["cert"], "wb") as f:
        for pem in node.cert_chain_pems:
            f.write(pem.bytes())
    node.private_key_pem.write_to_path(paths["key"])
    return paths


@pytest.fixture(scope="module")
def tcluster(certs):
    try:
        c = start_cluster("redis", tls=tls_config(certs["cert"], certs["key"], certs["ca"]),
                          extra=["--cluster-announce-hostname", "localhost",
                                 "--cluster-preferred-endpoint-type", "hostname"])
    except ServerStartError as e:
        pytest.fail(f"cannot start a TLS cluster of redis-server: {e}")
    try:
        yield c
    finally:
        c.stop()


def url(c) -> str:
    """The seeds as ElastiCache's configuration endpoint is given: a hostname, TLS ports."""
    return "rediss+cluster://" + ",".join(f"localhost:{n.tls_port}" for n in c.primaries)


def tls_proxy(start_proxy, c, certs, ns: str, *extra):
    return start_proxy(["--upstream", url(c), "--upstream-tls-ca-file", certs["ca"], "--namespace", ns,
                        "--slot", "pinned", "--policy", "app", *extra])


def tls_conns(node) -> list[dict]:
    """Clients of `node` on its TLS port (the proxy's)."""
    r = node.client()
    try:
        return [x for x in r.client_list() if x.get("laddr", "").endswith(f":{node.tls_port}")]
    finally:
        r.close()


def test_a_pinned_route_over_a_tls_cluster(tcluster, certs, start_proxy):
    owner = tcluster.primaries[1]
    ns = ns_on(tcluster, owner, "tls")
    mport = free_port()
    p = tls_proxy(start_proxy, tcluster, certs, ns, "--metrics-listen", f"127.0.0.1:{mport}")
    assert ready(mport), readiness_text(mport)
    c = client(p)
    assert c.set("a", "1") and c.get("a") == b"1"
    assert c.mset({"b": "2", "{u}:c": "3"}) and c.mget("a", "b", "{u}:c") == [b"1", b"2", b"3"]
    with c.pipeline(transaction=True) as tx:
        tx.incr("n").rpush("q", "x").lrange("q", 0, -1)
        assert tx.execute() == [1, 1, [b"x"]]
    assert sorted(owner.call("KEYS", f"{{{ns}}}:*")) == [f"{{{ns}}}:{k}".encode() for k in ("a", "b", "n", "q", "{u}:c")]
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", client(p).brpop(["q1", "q2"], timeout=20)))
    t.start()
    wait_until(lambda: owner.blocked("brpop"), "the BRPOP blocked on the owner")
    client(p).lpush("q2", "job")
    t.join(20)
    assert box["v"] == (b"q2", b"job")
    assert tls_conns(owner), "the proxy's connections are on the owner's TLS port"
    c.flushdb()


def test_slot_migrated_under_writes_over_tls(tcluster, certs, start_proxy):
    src, dst = tcluster.primaries[0], tcluster.primaries[2]
    ns = ns_on(tcluster, src, "tmig")
    slot = key_slot(ns.encode())
    p = tls_proxy(start_proxy, tcluster, certs, ns)
    w = Writer(p.port, "list", "w", readback=True)
    asking = lambda: int(dst.client().info("commandstats").get("cmdstat_asking", {}).get("calls", 0))  # noqa: E731
    before = asking()
    w.start()
    try:
        wait_until(lambda: len(w.acked) >= 20, "traffic before the migration")
        tcluster.begin_migration(slot, src, dst)
        tcluster.move_keys(slot, src, dst)
        # the proxy follows -ASK over TLS (ASKING on the importing node's TLS port)
        wait_until(lambda: asking() >= before + 1, "ASK followed by the proxy")
        tcluster.move_keys(slot, src, dst)
        tcluster.finish_migration(slot, dst)
        mark = len(w.acked)
        wait_until(lambda: len(w.acked) >= mark + 20, "traffic on the new owner")
    finally:
        w.stop.set()
        w.join(30)
    _check_writes([w], client(p).lrange("list", 0, -1))
    assert not w.redirected, w.redirected[:3]
    assert dst.call("LLEN", f"{{{ns}}}:list") > 0 and src.call("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert tls_conns(dst), "on the new owner over TLS"
    client(p).flushdb()


def test_nodes_are_verified_against_the_announced_hostname(tcluster, certs, start_proxy):
    ns = ns_on(tcluster, tcluster.primaries[0], "tver")
    # seeds given by IP: the certificate names localhost only, so the seeds fail verification
    ip_url = "rediss+cluster://" + ",".join(f"127.0.0.1:{n.tls_port}" for n in tcluster.primaries)
    mport = free_port()
    p = start_proxy(["--upstream", ip_url, "--upstream-tls-ca-file", certs["ca"], "--namespace", ns, "--slot", "pinned",
                     "--metrics-listen", f"127.0.0.1:{mport}", "--connect-timeout", "2"])
    assert not ready(mport) and "IP address mismatch" in readiness_text(mport)
    with pytest.raises(redis.RedisError, match="IP address mismatch"):
        client(p).get("k")
    # upstream_tls.server_name names what every node is checked against
    p2 = start_proxy(["--upstream", ip_url, "--upstream-tls-ca-file", certs["ca"], "--upstream-tls-server-name",
                      "localhost", "--namespace", ns, "--slot", "pinned"])
    assert client(p2).set("k", "v") and client(p2).get("k") == b"v"
    # a CA that did not sign the nodes' certificates
    mport3 = free_port()
    start_proxy(["--upstream", url(tcluster), "--upstream-tls-ca-file", certs["other_ca"], "--namespace", ns,
                 "--slot", "pinned", "--metrics-listen", f"127.0.0.1:{mport3}", "--connect-timeout", "2"])
    assert "certificate verify failed" in readiness_text(mport3)
    client(p2).delete("k")


def run_cli(*args):
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k in ("REDIS_URL", "SSL_CERT_FILE"))}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


def test_check_over_a_tls_cluster(tcluster, certs):
    node = tcluster.primaries[2]
    ns = ns_on(tcluster, node, "tchk")
    out = run_cli("check", "--listen", "127.0.0.1:0", "--upstream", url(tcluster), "--upstream-tls-ca-file",
                  certs["ca"], "--namespace", ns, "--slot", "pinned")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"pinned hash slot {key_slot(ns.encode())} served by localhost:{node.tls_port}: ok" in out.stdout
    bad = run_cli("check", "--listen", "127.0.0.1:0", "--upstream", url(tcluster), "--upstream-tls-ca-file",
                  certs["other_ca"], "--namespace", ns, "--slot", "pinned")
    assert bad.returncode == 2 and "certificate verify failed" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_migrate_onto_a_tls_cluster_and_back(tcluster, certs):
    plain = start_server("redis")  # DUMP payloads go between servers of one kind
    try:
        s = redis.Redis(host=plain.host, port=plain.port)
        s.rpush("sk:queue:default", *[f"j{i}" for i in range(50)])
        s.set("sk:stat:processed", "7")
        s.hset("sk:h", mapping={"f": "v"})
        source = f"redis://{plain.host}:{plain.port}/0"
        ca = ["--to-tls-ca-file", certs["ca"]]
        refused = run_cli("migrate", "--from", source, "--from-namespace", "sk", "--to", url(tcluster),
                          "--to-namespace", "{sk}", "--move")
        assert refused.returncode == 1 and "certificate verify failed" in refused.stderr, refused.stderr
        done = run_cli("migrate", "--from", source, "--from-namespace", "sk", "--to", url(tcluster),
                       "--to-namespace", "{sk}", "--move", "--verify", *ca)
        assert done.returncode == 0, done.stdout + done.stderr
        owner = tcluster.primary_for(key_slot(b"sk"))
        assert owner.call("LLEN", "{sk}:queue:default") == 50 and owner.call("GET", "{sk}:stat:processed") == b"7"
        assert s.dbsize() == 0
        back = run_cli("migrate", "--from", url(tcluster), "--from-namespace", "{sk}", "--to", source,
                       "--to-namespace", "sk", "--move", "--verify", "--from-tls-ca-file", certs["ca"])
        assert back.returncode == 0, back.stdout + back.stderr
        assert s.lrange("sk:queue:default", 0, -1) == [f"j{i}".encode() for i in range(50)]
        assert s.hgetall("sk:h") == {b"f": b"v"} and owner.call("CLUSTER", "COUNTKEYSINSLOT", key_slot(b"sk")) == 0
    finally:
        plain.stop()
