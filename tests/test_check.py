"""`keyspace-proxy check` against real servers: a good configuration exits 0; a wrong
password, an out-of-range db (the URL's or a mapped one) and an unreachable host exit 2
naming the route; the effective configuration is printed with credentials masked.
Also the proxy's own start-up check names the route whose password is wrong."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import redis

from conftest import ROOT, ProxyProcess
from proxy.config import from_dict
from proxy.embedded import free_port, start_server

SECRET = "chk-s3cret-never-printed"


def check(args, env=None, config_text=None, tmp_path=None):
    e = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}
    e.update(PYTHONPATH=ROOT, **(env or {}))
    if config_text is not None:
        path = tmp_path / "proxy.toml"
        path.write_text(config_text)
        args = ["--config", str(path), *args]
    return subprocess.run([sys.executable, "-m", "proxy", "check", *args], capture_output=True, text=True,
                          timeout=60, env=e, cwd=ROOT)


@pytest.fixture(scope="module")
def locked():
    """A server that wants a password (set after start: start_server pings without one)."""
    s = start_server("redis" if shutil.which("redis-server") else "valkey", port=free_port())
    redis.Redis(host=s.host, port=s.port).config_set("requirepass", SECRET)
    yield s
    try:
        redis.Redis(host=s.host, port=s.port, password=SECRET).config_set("requirepass", "")
    finally:
        s.stop()


def routes_toml(server, locked, extra=""):
    return (f'upstream = "redis://{server.host}:{server.port}/0"\n'
            f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{free_port()}"\nnamespace = "sidekiq"\n'
            f'[listener.databases]\n1 = {{ db = 3, namespace = "reports" }}\n2 = 4\n'
            f'[[listener]]\nname = "locked"\nlisten = "127.0.0.1:{free_port()}"\n'
            f'upstream = "redis://:{SECRET}@{locked.host}:{locked.port}/2"\nstrip_namespace = "s"\n' + extra)


def test_good_configuration_exits_0_and_prints_it_masked(server, locked, tmp_path):
    p = check(["--max-bulk-len", "1000"], config_text=routes_toml(server, locked), tmp_path=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert SECRET not in p.stdout + p.stderr
    out = p.stdout
    assert out.rstrip().endswith("keyspace-proxy check: ok")
    for line in ("route app (", "client db 0 -> db 0: ok", "client db 1 -> db 3: ok", "client db 2 -> db 4: ok"):
        assert line in out
    assert "route locked (127.0.0.1:" in out and f"redis://:***@{locked.host}:{locked.port}, client db 0 -> db 2: ok" in out
    # the effective configuration: TOML that gives the same routes, the flag applied
    toml_text = out.split("\nroute ")[0]
    cfg = from_dict(tomllib.loads(toml_text))
    assert [r.name for r in cfg.routes] == ["app", "locked"]
    assert cfg.routes[1].upstream.password == "***" and cfg.limits.max_bulk == 1000
    assert cfg.routes[0].target(2).keyspace.prefix == b"sidekiq:"


def test_flags_and_environment_are_checked_too(locked):
    p = check(["--listen", "127.0.0.1:1", "--namespace", "ns"],
              env={"REDIS_URL": f"redis://:{SECRET}@{locked.host}:{locked.port}/0"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert SECRET not in p.stdout and "route 127.0.0.1:1: upstream redis://:***@" in p.stdout


def test_wrong_password_exits_2_naming_the_route(server, locked, tmp_path):
    text = routes_toml(server, locked).replace(f":{SECRET}@", ":wrong-password@")
    p = check([], config_text=text, tmp_path=tmp_path)
    assert p.returncode == 2
    assert "wrong-password" not in p.stdout + p.stderr
    bad = [ln for ln in p.stdout.splitlines() if ln.startswith("route ") and not ln.endswith(": ok")]
    assert len(bad) == 1 and bad[0].startswith("route locked (")
    assert "authentication failed: WRONGPASS" in bad[0]
    assert p.stdout.rstrip().endswith("keyspace-proxy check: 1 problem(s)")


def test_no_password_for_a_server_that_wants_one(locked):
    p = check(["--listen", "127.0.0.1:1", "--upstream", f"redis://{locked.host}:{locked.port}/0"])
    assert p.returncode == 2
    assert "authentication required and the URL has no password: NOAUTH" in p.stdout


def test_db_out_of_range_exits_2_for_the_url_and_for_a_mapped_db(server, locked, tmp_path):
    p = check(["--listen", "127.0.0.1:1", "--upstream", f"redis://{server.host}:{server.port}/99"])
    assert p.returncode == 2
    assert "client db 0 -> db 99: SELECT 99 failed: ERR DB index is out of range" in p.stdout
    text = routes_toml(server, locked).replace("2 = 4\n", "2 = 99\n")
    p = check([], config_text=text, tmp_path=tmp_path)
    assert p.returncode == 2
    bad = [ln for ln in p.stdout.splitlines() if ln.startswith("route ") and not ln.endswith(": ok")]
    assert len(bad) == 1 and bad[0].startswith("route app (")
    assert bad[0].endswith("client db 2 -> db 99: SELECT 99 failed: ERR DB index is out of range")


def test_unreachable_upstream_exits_2_naming_the_route(server, locked, tmp_path):
    port = free_port()  # nobody listens there
    text = routes_toml(server, locked).replace(f"{server.host}:{server.port}/0", f"127.0.0.1:{port}/0")
    p = check([], config_text=text, tmp_path=tmp_path)
    assert p.returncode == 2
    bad = [ln for ln in p.stdout.splitlines() if ln.startswith("route ") and not ln.endswith(": ok")]
    assert len(bad) == 3 and all(ln.startswith("route app (") for ln in bad)
    assert all(ln.endswith(": unreachable: connection refused") for ln in bad)
    p = check(["--listen", "127.0.0.1:1", "--upstream", "redis://nohost.invalid:6379/0"])
    assert p.returncode == 2 and "unreachable: cannot resolve 'nohost.invalid'" in p.stdout


def test_configuration_errors_exit_2_before_connecting(tmp_path):
    p = check(["--listen", "127.0.0.1:1", "--upstream", f"redis://:{SECRET}@h:1/0?db=2"])
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == ("keyspace-proxy check: configuration error: --upstream: db given twice, /0 and ?db=2, "
                        "in 'redis://:***@h:1/0?db=2': give one\n")
    p = check([], config_text='[[listener]]\nlisten = "127.0.0.1:1"\n[limits]\nmax_bulk = "lots"\n', tmp_path=tmp_path)
    assert p.returncode == 2
    assert p.stderr == ('keyspace-proxy check: configuration error: limits.max_bulk: expected an integer >= 1 '
                        '(bytes), got "lots"\n')
    p = check(["--listen", "127.0.0.1:0", "--workers", "2"])
    assert p.returncode == 2 and "listen port 0 gives each worker a different port" in p.stderr


def test_check_help_lists_the_proxy_flags():
    p = check(["--help"])
    assert p.returncode == 0 and "keyspace-proxy check" in p.stdout
    for flag in ("--config", "--listen", "--upstream", "--max-bulk-len", "REDIS_URL"):
        assert flag in p.stdout


def test_proxy_start_names_the_route_whose_password_is_wrong(locked):
    p = ProxyProcess(["--upstream", f"redis://:wrong-{SECRET}@{locked.host}:{locked.port}/0", "--namespace", "n"])
    try:
        import time
        deadline = time.monotonic() + 10
        while "authentication failed" not in p.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = p.output()
        line = next(ln for ln in out.splitlines() if "authentication failed" in ln)
        assert f" ERROR keyspace-proxy: route 127.0.0.1:{p.port}: upstream redis://:***@{locked.host}:{locked.port}/0: " \
               "authentication failed: WRONGPASS" in line
        assert "NOAUTH" not in out and SECRET not in out
    finally:
        p.stop()


def test_proxy_start_names_a_db_out_of_range(server):
    p = ProxyProcess(["--upstream", f"redis://{server.host}:{server.port}/99"])
    try:
        import time
        deadline = time.monotonic() + 10
        while "SELECT 99" not in p.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (f"route 127.0.0.1:{p.port}: upstream redis://{server.host}:{server.port}/99: "
                "SELECT 99 failed: ERR DB index is out of range") in p.output()
    finally:
        p.stop()
