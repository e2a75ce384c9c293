"""Logging: text and JSON formats, extra fields, credentials never printed."""

import io
import json
import logging
import os
import subprocess
import sys

import pytest
import redis

from proxy.logs import mask_credentials, setup_logging
from tests.conftest import ROOT, ProxyProcess


@pytest.fixture
def capture():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()

    def configure(level="info", fmt="text"):
        setup_logging(level, fmt, stream=stream)
        return stream

    yield configure
    for h in list(root.handlers):
        if getattr(h, "_keyspace_proxy", False):
            root.removeHandler(h)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_with_extra_fields(capture):
    out = capture("debug", "json")
    log = logging.getLogger("keyspace-proxy")
    log.info("client closed", extra={"route": "app", "peer": ("10.1.2.3", 50000), "event": "client_closed",
                                      "reason": "protocol_error"})
    log.debug("upstream %s failed", "redis://u:hunter2@h:1/0", extra={"event": "upstream_error"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["level"] == "info" and first["logger"] == "keyspace-proxy" and first["msg"] == "client closed"
    assert (first["route"], first["peer"], first["event"], first["reason"]) == (
        "app", "10.1.2.3:50000", "client_closed", "protocol_error")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["msg"] == "upstream redis://u:***@h:1/0 failed" and second["level"] == "debug"
    assert "hunter2" not in out.getvalue()


def test_text_format_and_level(capture):
    out = capture("warning", "text")
    log = logging.getLogger("keyspace-proxy")
    log.info("hidden")
    log.warning("route %s: cannot connect", "app", extra={"event": "upstream_error", "peer": "a b"})
    text = out.getvalue()
    assert "hidden" not in text
    assert text.count("\n") == 1
    assert " WARNING keyspace-proxy: route app: cannot connect event=upstream_error peer=\"a b\"" in text


def test_exceptions_are_masked_too(capture):
    out = capture("info", "json")
    try:
        raise ConnectionError("redis://:pw-in-exc@h:1/0 refused")
    except ConnectionError:
        logging.getLogger("keyspace-proxy").exception("failed")
    rec = json.loads(out.getvalue())
    assert "pw-in-exc" not in out.getvalue() and "ConnectionError" in rec["exc"]


@pytest.mark.parametrize("text, masked", [
    ("redis://user:secret@h:1/0", "redis://user:***@h:1/0"),
    ("x redis://:secret@h y rediss://a:b@c", "x redis://:***@h y rediss://a:***@c"),
    ("redis://h:1/0", "redis://h:1/0"),
    ("redis+sentinel://:pw@h1:1,h2:2/m rediss+sentinel://u:pw@h:1/m", "redis+sentinel://:***@h1:1,h2:2/m "
                                                                     "rediss+sentinel://u:***@h:1/m"),
])
def test_mask_credentials(text, masked):
    assert mask_credentials(text) == masked


def test_bad_level_or_format_rejected():
    with pytest.raises(ValueError):
        setup_logging("verbose", "text", stream=io.StringIO())
    with pytest.raises(ValueError):
        setup_logging("info", "xml", stream=io.StringIO())


# -- the proxy process never prints a password

SECRET = "s3cr3t-Pw-do-not-log"


def run_proxy(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for k in list(env):
        if k.startswith("PROXY_") or k == "REDIS_URL":
            del env[k]
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          timeout=30, env=env, cwd=ROOT)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("url", [
    f"redis://user:{SECRET}@h:1/abc",          # bad db
    f"redis://user:{SECRET}@:1/0",             # missing host
    f"rediss://user:{SECRET}@h:1/abc",         # TLS URL, bad db (rediss:// itself is valid now)
    f"http://user:{SECRET}@h:1/0",             # scheme
    f"redis://user:{SECRET}@h:notaport/0",     # port
    f"redis://user:{SECRET}@h:99999/0",        # port range
    f"redis+sentinel://user:{SECRET}@h:1/m/x",  # sentinel URL, bad db
    f"redis+sentinel://user:{SECRET}@h:1/",    # sentinel URL, no master name
])
def test_config_errors_never_print_the_password(url, fmt):
    for args, env in (
        (["--listen", "127.0.0.1:1", "--upstream", url, "--log-format", fmt], {}),
        (["--listen", "127.0.0.1:1", "--log-format", fmt], {"REDIS_URL": url}),
        ([], {"PROXY_LISTEN": "127.0.0.1:1", "REDIS_URL": url, "PROXY_LOG_FORMAT": fmt}),
    ):
        p = run_proxy(args, env)
        assert p.returncode == 2, p.stderr
        assert "configuration error" in p.stderr
        assert SECRET not in p.stdout + p.stderr


def test_argparse_errors_never_print_the_password():
    p = run_proxy(["--listen", "127.0.0.1:1", "--upstream", f"redis://u:{SECRET}@h/0",
                   "--namespace", "a", "--strip-namespace", "b"])
    assert p.returncode == 2 and SECRET not in p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_running_proxy_never_prints_the_password(server, fresh_db, fmt):
    """Listening line, command-table check, connections, a wrong password and a protocol error."""
    admin = redis.Redis(host=server.host, port=server.port)
    admin.execute_command("ACL", "SETUSER", "ksp-logtest", "reset", "on", f">{SECRET}", "~*", "&*", "+@all")
    procs = []
    try:
        good = ProxyProcess(["--upstream", f"redis://ksp-logtest:{SECRET}@{server.host}:{server.port}/{fresh_db}",
                             "--namespace", "ns", "--log-level", "debug", "--log-format", fmt])
        procs.append(good)
        bad = ProxyProcess(["--upstream", f"redis://ksp-logtest:wrong-{SECRET}@{server.host}:{server.port}/{fresh_db}",
                            "--namespace", "ns", "--log-level", "debug", "--log-format", fmt])
        procs.append(bad)
        r = redis.Redis(port=good.port)
        assert r.set("k", "v") and r.get("k") == b"v"
        r.close()
        with pytest.raises(redis.RedisError):
            rb = redis.Redis(port=bad.port)
            rb.set("k", "v")
        import socket
        with socket.create_connection(("127.0.0.1", good.port)) as s:
            s.sendall(b"*1\r\n$x\r\n")
            s.recv(1000)
        for p in procs:
            p.process.terminate()
            assert p.process.wait(15) == 0
        outputs = [p.output() for p in procs]
        assert "listening on" in outputs[0] and "ksp-logtest:***@" in outputs[0]
        for out in outputs:
            assert SECRET not in out
    finally:
        for p in procs:
            p.stop()
        admin.execute_command("ACL", "DELUSER", "ksp-logtest")
        admin.close()


# -- which worker wrote a line; the real port for port 0

@pytest.mark.parametrize("fmt", ["text", "json"])
def test_worker_lines_name_the_worker(capture, monkeypatch, fmt):
    from proxy.logs import WORKER_ENV
    monkeypatch.setenv(WORKER_ENV, "3")
    out = capture("info", fmt)
    logging.getLogger("keyspace-proxy").info("listening", extra={"route": "app"})
    line = out.getvalue().strip()
    if fmt == "json":
        rec = json.loads(line)
        assert rec["worker"] == 3 and rec["msg"] == "listening" and rec["route"] == "app"
    else:
        assert line.endswith(" INFO keyspace-proxy worker=3: listening route=app")


def test_ipv6_peers_in_brackets(capture):
    out = capture("info", "text")
    logging.getLogger("keyspace-proxy").info("x", extra={"peer": ("::1", 5000, 0, 0), "other": ("10.0.0.1", 1)})
    assert out.getvalue().rstrip().endswith("x peer=[::1]:5000 other=10.0.0.1:1")


def test_no_worker_field_outside_workers(capture, monkeypatch):
    from proxy.logs import WORKER_ENV
    monkeypatch.delenv(WORKER_ENV, raising=False)
    out = capture("info", "json")
    logging.getLogger("keyspace-proxy").info("x")
    assert "worker" not in json.loads(out.getvalue())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_port_0_logs_the_real_port_and_ipv6_in_brackets(host):
    import re
    import socket
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}
    shown = f"[{host}]" if ":" in host else host
    p = subprocess.Popen([sys.executable, "-m", "proxy", "--listen", f"{shown}:0", "--upstream",
                          "redis://[::1]:1/0", "--metrics-listen", f"{shown}:0", "--log-level", "debug"],
                         stderr=subprocess.PIPE, text=True, env=dict(env, PYTHONPATH=ROOT), cwd=ROOT)
    try:
        lines = []
        while not any("listening on" in ln for ln in lines):
            lines.append(p.stderr.readline())
            assert lines[-1], "".join(lines)
        text = "".join(lines)
        m = re.search(rf"listening on {re.escape(shown)}:(\d+) -> redis://\[::1\]:1/0 \(no namespace\)", text)
        assert m and int(m.group(1)) != 0, text
        assert re.search(rf"metrics on http://{re.escape(shown)}:[1-9]\d*/metrics", text), text
        socket.create_connection((host, int(m.group(1))), timeout=5).close()  # that is where it listens
        while "client connected" not in lines[-1]:
            lines.append(p.stderr.readline())
            assert lines[-1], "".join(lines)
        assert re.search(rf" peer={re.escape(shown)}:[1-9]\d*$", lines[-1].rstrip()), lines[-1]
    finally:
        p.terminate()
        p.wait(15)
