"""--workers N (issue 3): N processes on the same listeners under one supervisor that sums
their metrics, forwards reloads and signals, and restarts a worker that dies."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from conftest import ROOT, ProxyProcess
from integration_helpers import Raw
from proxy.embedded import free_port
from proxy.workers import merge_metrics
from test_reload import TOKEN, toml, wait_log, write


def get(url: str, method: str = "GET", token: str | None = TOKEN) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if method == "POST" and token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        sample = head.split("{")[0]
        if sample != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"{name} {labels} not in metrics"
    return total


def workers_of(proc: subprocess.Popen) -> list[int]:
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_for(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_workers(server, db, ns="w", n=2, extra=None):
    mport = free_port()
    p = ProxyProcess(["--upstream", f"redis://{server.host}:{server.port}/{db}", "--namespace", ns,
                      "--workers", str(n), "--metrics-listen", f"127.0.0.1:{mport}", *(extra or [])])
    wait_log(p, f"{n} workers listening")
    p.admin = f"http://127.0.0.1:{mport}"
    return p


def test_merge_sums_counters_and_histograms_and_keeps_shared_facts():
    a = ('# HELP keyspace_proxy_commands_total Commands\n# TYPE keyspace_proxy_commands_total counter\n'
         'keyspace_proxy_commands_total{route="r",command="get"} 3.0\n'
         '# TYPE keyspace_proxy_upstream_up gauge\nkeyspace_proxy_upstream_up{route="r"} 1.0\n'
         '# TYPE keyspace_proxy_build_info gauge\nkeyspace_proxy_build_info{version="1"} 1.0\n'
         '# TYPE keyspace_proxy_request_duration_seconds histogram\n'
         'keyspace_proxy_request_duration_seconds_bucket{route="r",le="0.001"} 2.0\n'
         'keyspace_proxy_request_duration_seconds_bucket{route="r",le="+Inf"} 3.0\n'
         'keyspace_proxy_request_duration_seconds_sum{route="r"} 0.5\n'
         'keyspace_proxy_request_duration_seconds_count{route="r"} 3.0\n')
    b = a.replace("} 3.0", "} 4.0").replace("upstream_up{route=\"r\"} 1.0", "upstream_up{route=\"r\"} 0.0")
    b = b.replace('command="get"} 4.0\n', 'command="get"} 4.0\nkeyspace_proxy_commands_total{route="r",command="set"} 5.0\n')
    fams = {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
            for f in merge_metrics([a, b])}
    cmds = fams["keyspace_proxy_commands"]
    assert cmds[("keyspace_proxy_commands_total", (("command", "get"), ("route", "r")))] == 7.0
    assert cmds[("keyspace_proxy_commands_total", (("command", "set"), ("route", "r")))] == 5.0
    assert fams["keyspace_proxy_upstream_up"][("keyspace_proxy_upstream_up", (("route", "r"),))] == 0.0  # min
    assert fams["keyspace_proxy_build_info"][("keyspace_proxy_build_info", (("version", "1"),))] == 1.0   # max
    h = fams["keyspace_proxy_request_duration_seconds"]
    assert h[("keyspace_proxy_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "r")))] == 7.0
    assert h[("keyspace_proxy_request_duration_seconds_count", (("route", "r"),))] == 7.0
    assert h[("keyspace_proxy_request_duration_seconds_sum", (("route", "r"),))] == 1.0


def test_workers_share_the_listener_and_the_admin_port_sums_them(server, fresh_db):
    p = start_workers(server, fresh_db)
    try:
        d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
        clients = [Raw("127.0.0.1", p.port) for _ in range(40)]  # plain clients: on shared connections
        for i, c in enumerate(clients):
            assert c.call("SET", f"k{i}", str(i)) == b"+OK\r\n"
            assert c.call("GET", f"k{i}") == b"$%d\r\n%d\r\n" % (len(str(i)), i)
        assert sorted(d.keys()) == sorted(f"w:k{i}".encode() for i in range(40))
        status, text = get(p.admin + "/metrics")
        assert status == 200
        assert metric(text, "keyspace_proxy_workers") == 2
        assert metric(text, "keyspace_proxy_commands_total", command="set") == 40
        assert metric(text, "keyspace_proxy_commands_total", command="get") == 40
        assert metric(text, "keyspace_proxy_client_connections") == 40
        # one shared upstream connection per worker: both workers took clients
        assert metric(text, "keyspace_proxy_upstream_connections") == 2
        assert get(p.admin + "/readyz")[0] == 200 and get(p.admin + "/healthz")[0] == 200
        for c in clients:
            c.sock.close()
        # every line a worker writes names it; the supervisor's do not
        out = p.output()
        for n in (0, 1):
            assert f" INFO keyspace-proxy worker={n}: listening on 127.0.0.1:{p.port} -> " in out
        assert " INFO keyspace-proxy: 2 workers listening" in out
        assert all("worker=" in ln for ln in out.splitlines() if "hot path" in ln or "listening on" in ln)
    finally:
        assert p.stop() == 0


def test_worker_json_lines_carry_the_worker(server, fresh_db):
    import json
    p = start_workers(server, fresh_db, extra=["--log-format", "json"])
    try:
        recs = [json.loads(ln) for ln in p.output().splitlines() if ln.startswith("{")]
        listening = [r for r in recs if r["msg"].startswith("listening on")]
        assert sorted(r["worker"] for r in listening) == [0, 1]
        workers = [r for r in recs if r["msg"].startswith("hot path") or
                   (r["msg"].startswith("metrics on") and "summed" not in r["msg"])]
        assert len(workers) == 4 and all(r["worker"] in (0, 1) for r in workers)
        supervisor = [r for r in recs if "workers listening" in r["msg"] or "summed over" in r["msg"]]
        assert len(supervisor) == 2 and not any("worker" in r for r in supervisor)
    finally:
        assert p.stop() == 0


def test_a_dead_worker_is_restarted_and_health_follows(server, fresh_db):
    p = start_workers(server, fresh_db)
    try:
        victim = workers_of(p.process)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: get(p.admin + "/healthz")[0] == 503, what="/healthz to report the dead worker")
        wait_log(p, "exited with code -9; restarting it")
        wait_for(lambda: get(p.admin + "/healthz")[0] == 200, what="the worker to come back")
        wait_for(lambda: metric(get(p.admin + "/metrics")[1], "keyspace_proxy_workers") == 2, what="2 workers")
        assert metric(get(p.admin + "/metrics")[1], "keyspace_proxy_worker_restarts") == 1
        assert victim not in workers_of(p.process) and len(workers_of(p.process)) == 2
        c = redis.Redis(host="127.0.0.1", port=p.port)
        assert all(c.ping() for _ in range(10))
    finally:
        assert p.stop() == 0


def test_reload_reaches_every_worker_and_a_bad_file_reaches_none(server, fresh_db):
    port, mport = free_port(), free_port()
    p = ProxyProcess(["--workers", "2"], config_text=toml(server, fresh_db, port, "one", mport=mport), port=port)
    try:
        wait_log(p, "2 workers listening")
        admin = f"http://127.0.0.1:{mport}"
        d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
        write(p, "this is = = not toml")
        status, body = get(admin + "/-/reload", "POST")
        assert status == 400 and "reload refused" in body
        assert get(admin + "/-/reload", "POST", token="wrong")[0] == 401  # the supervisor checks the token
        write(p, toml(server, fresh_db, port, "two", mport=mport))
        status, body = get(admin + "/-/reload", "POST")
        assert status == 200, body
        assert "worker 0: generation 2" in body and "worker 1: generation 2" in body
        assert metric(get(admin + "/metrics")[1], "keyspace_proxy_config_generation") == 2
        for i in range(20):  # new connections, spread over both workers, all on the new route
            redis.Redis(host="127.0.0.1", port=port, single_connection_client=True).set(f"k{i}", 1)
        assert sorted(d.keys()) == sorted(f"two:k{i}".encode() for i in range(20))
        write(p, toml(server, fresh_db, port, "three", mport=mport))
        p.process.send_signal(signal.SIGHUP)
        wait_for(lambda: metric(get(admin + "/metrics")[1], "keyspace_proxy_config_generation") == 3,
                 what="generation 3 in both workers")
    finally:
        assert p.stop() == 0


def test_workers_serve_the_admin_address_apart_from_metrics(server, fresh_db):
    port, mport, aport = free_port(), free_port(), free_port()

    def config(ns):
        text = toml(server, fresh_db, port, ns, mport=mport)
        return text.replace("[admin]\n", f'[admin]\nlisten = "127.0.0.1:{aport}"\n')
    p = ProxyProcess(["--workers", "2"], config_text=config("one"), port=port)
    try:
        wait_log(p, "2 workers listening")
        assert f"admin on http://127.0.0.1:{aport}: POST /-/reload with the admin token" in p.output()
        status, body = get(f"http://127.0.0.1:{mport}/-/reload", "POST")
        assert status == 404 and f"127.0.0.1:{aport}" in body
        assert get(f"http://127.0.0.1:{aport}/metrics")[0] == 404
        assert get(f"http://127.0.0.1:{aport}/-/reload", "POST", token="wrong")[0] == 401
        write(p, config("two"))
        status, body = get(f"http://127.0.0.1:{aport}/-/reload", "POST")
        assert status == 200 and "worker 0: generation 2" in body and "worker 1: generation 2" in body, body
    finally:
        assert p.stop() == 0


def test_workers_refuse_port_zero_and_bad_counts():
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "proxy", "--listen", "127.0.0.1:0", "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "listen port 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "proxy", "--listen", "127.0.0.1:1", "--workers", "0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--workers: expected an integer 1 to 256, got '0'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "proxy", "--listen", "127.0.0.1:1"],
                       capture_output=True, text=True, env=dict(env, PROXY_WORKERS="two"), timeout=60)
    assert r.returncode == 2 and "PROXY_WORKERS" in r.stderr


def test_workers_stop_with_the_supervisor(server, fresh_db):
    p = start_workers(server, fresh_db)
    kids = workers_of(p.process)
    p.process.kill()  # no SIGTERM to forward: the workers notice the supervisor is gone
    p.process.wait()
    try:
        wait_for(lambda: not any(os.path.exists(f"/proc/{k}") and _running(k) for k in kids),
                 what="orphaned workers to stop")
    finally:
        for k in kids:
            if _running(k):
                os.kill(k, signal.SIGKILL)
        p.stop()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_every_worker_cleanly(server, fresh_db, sig):
    p = start_workers(server, fresh_db)
    kids = workers_of(p.process)
    c = redis.Redis(host="127.0.0.1", port=p.port)
    assert c.set("k", "v")
    p.process.send_signal(sig)
    assert p.process.wait(30) == 0
    assert not any(_running(k) for k in kids)
    assert "stopped" in p.output()
    p.stop()
