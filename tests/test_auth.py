"""Client authentication at the proxy ([[listener.user]], proxy/auth.py), against real
servers in every upstream mode: -NOAUTH before AUTH (pipelines in order), AUTH with and
without a user name, HELLO 3 AUTH, wrong passwords counted and logged without the
password, one listener serving two tenants with their own Redis ACL users, AUTH again,
RESET, passwords from files and variables, real clients (redis-py, redis-cli)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
import redis

from conftest import ROOT
from integration_helpers import Raw, client, decode, direct, uniq, wait_for
from proxy.config import ConfigError, from_dict
from proxy.embedded import free_port

NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"


def sha(pw: str) -> str:
    return hashlib.sha256(pw.encode()).hexdigest()


def toml_for(port: int, upstream: str, users: list[dict], listener: str = 'namespace = "lst"\n') -> str:
    out = f'[[listener]]\nname = "main"\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\n{listener}'
    for u in users:
        out += "[[listener.user]]\n" + "".join(f'{k} = "{v}"\n' for k, v in u.items())
    return out


@pytest.fixture
def ns():
    """Namespaces no other test uses."""
    return uniq("a"), uniq("b")


@pytest.fixture
def two_users(server, fresh_db, start_proxy, ns):
    """A proxy whose listener has users alice (namespace A) and default (namespace B)."""
    port = free_port()
    a, b = ns
    text = toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}", [
        {"name": "alice", "password_sha256": sha("apw"), "namespace": a},
        {"name": "default", "password_sha256": sha("dpw"), "namespace": b},
    ])
    return start_proxy(config_text=text, port=port)


def raw(proxy) -> Raw:
    return Raw("127.0.0.1", proxy.port)


def test_noauth_before_auth_then_a_pipeline_in_order(two_users, d, ns):
    r = raw(two_users)
    r.send(("GET", "k"))
    assert r.read() == [NOAUTH]
    r.send(("PING",))
    assert r.read() == [NOAUTH]
    r.send(b"PING\r\n")  # inline
    assert r.read() == [NOAUTH]
    # one write: refused, refused, AUTH, then commands of alice's route
    r.send(("SET", "k", "early"), ("MULTI",), ("AUTH", "alice", "apw"), ("SET", "k", "v"), ("GET", "k"),
           ("INCR", "n"))
    assert r.read(6) == [NOAUTH, NOAUTH, b"+OK\r\n", b"+OK\r\n", b"$1\r\nv\r\n", b":1\r\n"]
    assert sorted(d.keys()) == sorted([f"{ns[0]}:k".encode(), f"{ns[0]}:n".encode()])


def test_auth_with_a_user_name_and_the_default_user(two_users, d, ns):
    a = client(two_users, username="alice", password="apw")
    assert a.set("k", "from-alice") and a.get("k") == b"from-alice"
    b = client(two_users, password="dpw")  # AUTH password: the default user
    assert b.set("k", "from-default") and b.get("k") == b"from-default"
    assert d.get(f"{ns[0]}:k") == b"from-alice" and d.get(f"{ns[1]}:k") == b"from-default"
    with pytest.raises(redis.AuthenticationError):
        client(two_users, username="alice", password="dpw").ping()
    with pytest.raises(redis.AuthenticationError):
        client(two_users, password="apw").ping()
    a.close()
    b.close()


def test_arity_and_syntax_of_auth_and_hello_before_auth(two_users):
    r = raw(two_users)
    r.send(("AUTH",), ("AUTH", "a", "b", "c"), ("HELLO", "3"), ("HELLO", "4"), ("HELLO", "x"),
           ("HELLO", "3", "AUTH", "alice"), ("HELLO", "3", "SETNAME", "a b"), ("RESET", "x"), ("RESET",))
    replies = r.read(9)
    assert replies[0] == b"-ERR wrong number of arguments for 'auth' command\r\n"
    assert replies[1] == b"-ERR syntax error\r\n"
    assert replies[2].startswith(b"-NOAUTH HELLO must be called with the client already authenticated")
    assert replies[3] == b"-NOPROTO unsupported protocol version\r\n"
    assert replies[4] == b"-ERR Protocol version is not an integer or out of range\r\n"
    assert replies[5] == b"-ERR Syntax error in HELLO option 'AUTH'\r\n"
    assert replies[6] == b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    assert replies[7] == b"-ERR wrong number of arguments for 'reset' command\r\n"
    assert replies[8] == b"+RESET\r\n"
    # Redis's limits for input before AUTH
    r.send(b"*11\r\n")
    assert r.read() == [b"-ERR Protocol error: unauthenticated multibulk length\r\n"]
    r2 = raw(two_users)
    r2.send(b"*1\r\n$16385\r\n")
    assert r2.read() == [b"-ERR Protocol error: unauthenticated bulk length\r\n"]
    r3 = raw(two_users)
    r3.send(("QUIT",))
    assert r3.read() == [b"+OK\r\n"]
    assert r3.sock.recv(10) == b""


def test_one_argument_auth_without_a_default_user(server, fresh_db, start_proxy):
    port = free_port()
    p = start_proxy(config_text=toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}",
                                         [{"name": "alice", "password_sha256": sha("apw")}]), port=port)
    r = raw(p)
    r.send(("AUTH", "apw"), ("GET", "k"))
    assert r.read(2) == [b"-ERR AUTH <password> called without any password configured for the default user. "
                         b"Are you sure your configuration is correct?\r\n", NOAUTH]


def test_hello_3_auth_switches_protocol_and_keeps_setname(two_users, d, ns):
    r = raw(two_users)
    r.send(("HELLO", "3", "AUTH", "alice", "apw", "SETNAME", "worker1"), ("CLIENT", "GETNAME"),
           ("SET", "k", "v"), ("HGETALL", "nothing"))
    hello, name, ok, empty = r.read(4)
    info = decode(hello)
    assert hello[:1] == b"%" and info[b"proto"] == 3
    assert name == b"$7\r\nworker1\r\n" and ok == b"+OK\r\n"
    assert empty == b"%0\r\n"  # a RESP3 map
    assert d.get(f"{ns[0]}:k") == b"v"
    # a wrong password in HELLO: nothing happens (still RESP2, not authenticated)
    r2 = raw(two_users)
    r2.send(("HELLO", "3", "AUTH", "alice", "nope"), ("GET", "k"))
    assert r2.read(2) == [WRONGPASS, NOAUTH]


def test_redis_py_resp3_with_a_user_name(two_users, d, ns):
    c = client(two_users, username="alice", password="apw", protocol=3)
    c.hset("h", "f", "v")
    assert c.hgetall("h") == {b"f": b"v"}
    assert d.hgetall(f"{ns[0]}:h") == {b"f": b"v"}
    c.close()


def test_wrong_passwords_are_refused_counted_and_logged_without_the_password(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    text = toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}",
                    [{"name": "alice", "password_sha256": sha("apw")}])
    p = start_proxy(["--metrics-listen", f"127.0.0.1:{mport}"], config_text=text, port=port)
    r = raw(p)
    r.send(("AUTH", "alice", "Secret-Guess-1"), ("AUTH", "mallory", "Secret-Guess-2"),
           ("HELLO", "3", "AUTH", "alice", "Secret-Guess-3"), ("AUTH", "alice", "apw"), ("PING",))
    assert r.read(5) == [WRONGPASS, WRONGPASS, WRONGPASS, b"+OK\r\n", b"+PONG\r\n"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    assert 'keyspace_proxy_auth_failures_total{listener="main"} 3.0' in body
    assert 'keyspace_proxy_auth_successes_total{listener="main"} 1.0' in body
    assert 'keyspace_proxy_client_connections{route="main/alice"} 1.0' in body
    out = wait_for(lambda: p.output() if p.output().count("authentication failed") == 3 else None,
                   what="three log lines")
    assert "authentication failed for user 'alice' from 127.0.0.1:" in out
    assert "authentication failed for user 'mallory'" in out and "(no such user)" in out
    assert "Secret-Guess" not in out


@pytest.fixture
def acl_users(server):
    """Two Redis ACL users on the server, each fenced to its own key prefix."""
    d = direct(server)
    a, b = uniq("ta"), uniq("tb")
    users = {a: (uniq("pw"), a), b: (uniq("pw"), b)}
    for name, (pw, prefix) in users.items():
        d.execute_command("ACL", "SETUSER", name, "on", f">{pw}", f"~{prefix}:*", "&*", "+@all")
    yield users
    for name in users:
        d.execute_command("ACL", "DELUSER", name)
    d.close()


def test_two_users_on_one_listener_are_two_tenants_with_their_own_acl_users(server, fresh_db, start_proxy, acl_users,
                                                                             d):
    (ua, (pwa, nsa)), (ub, (pwb, nsb)) = acl_users.items()
    port = free_port()
    text = toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}", [
        {"name": "alice", "password_sha256": sha("apw"), "namespace": nsa,
         "upstream": f"redis://{ua}:{pwa}@{server.host}:{server.port}/{fresh_db}"},
        {"name": "bob", "password_sha256": sha("bpw"), "namespace": nsb,
         "upstream": f"redis://{ub}:{pwb}@{server.host}:{server.port}/{fresh_db}"},
    ])
    p = start_proxy(config_text=text, port=port)
    a = client(p, username="alice", password="apw")
    b = client(p, username="bob", password="bpw")
    a.set("k", "A")
    b.set("k", "B")
    assert a.get("k") == b"A" and b.get("k") == b"B"
    assert d.get(f"{nsa}:k") == b"A" and d.get(f"{nsb}:k") == b"B"
    # each upstream connection is its tenant's Redis user
    assert a.execute_command("ACL", "WHOAMI") == ua.encode()
    assert b.execute_command("ACL", "WHOAMI") == ub.encode()
    assert sorted(a.keys("*")) == [b"k"]
    a.close()
    b.close()


def test_auth_again(server, fresh_db, start_proxy, ns):
    a_ns, b_ns = ns
    port = free_port()
    up = f"redis://{server.host}:{server.port}/{fresh_db}"
    p = start_proxy(config_text=toml_for(port, up, [
        {"name": "alice", "password_sha256": sha("apw"), "namespace": a_ns},
        {"name": "carol", "password_sha256": sha("cpw"), "namespace": a_ns},   # the same routing as alice
        {"name": "bob", "password_sha256": sha("bpw"), "namespace": b_ns},
        {"name": "dave", "password_sha256": sha("dpw"), "namespace": a_ns, "policy": "app"},  # alice's keys, app
    ]), port=port)
    r = raw(p)
    # a tenant connection never becomes an app one by AUTH, even over the same keys
    r.send(("AUTH", "alice", "apw"), ("AUTH", "dave", "dpw"), ("EVAL", "return 1", "0"))
    ok, dave, script = r.read(3)
    assert ok == b"+OK\r\n" and dave.startswith(b"-ERR user 'dave' is on route main/dave and this connection")
    assert script.startswith(b"-ERR") and b'policy "tenant"' in script
    r.send(("AUTH", "alice", "apw"), ("SET", "k", "v"), ("AUTH", "alice", "wrong"), ("GET", "k"),
           ("AUTH", "bob", "bpw"), ("GET", "k"), ("AUTH", "carol", "cpw"), ("GET", "k"),
           ("HELLO", "3", "AUTH", "bob", "bpw"), ("HELLO", "3", "AUTH", "alice", "apw"), ("GET", "k"))
    out = r.read(11)
    assert out[:4] == [b"+OK\r\n", b"+OK\r\n", WRONGPASS, b"$1\r\nv\r\n"]  # the user stays
    assert out[4].startswith(b"-ERR user 'bob' is on route main/bob and this connection is on route main/alice: "
                             b"a connection's route cannot change; reconnect")
    assert out[5] == b"$1\r\nv\r\n"
    assert out[6:8] == [b"+OK\r\n", b"$1\r\nv\r\n"]
    assert out[8].startswith(b"-ERR user 'bob'")
    assert decode(out[9])[b"proto"] == 3 and out[10] == b"$1\r\nv\r\n"
    # inside MULTI: refused (EXEC answers EXECABORT), never queued upstream
    r.send(("MULTI",), ("AUTH", "alice", "apw"), ("EXEC",))
    m, refused, execabort = r.read(3)
    assert m == b"+OK\r\n" and refused.startswith(b"-ERR AUTH inside MULTI is refused by the proxy on route main/alice")
    assert execabort.startswith(b"-EXECABORT")
    # a HELLO whose client name is "auth" is a plain HELLO
    r.send(("HELLO", "3", "SETNAME", "auth"), ("CLIENT", "GETNAME"))
    hello, name = r.read(2)
    assert decode(hello)[b"proto"] == 3 and name == b"$4\r\nauth\r\n"


def test_reset_logs_the_connection_out(two_users, d, ns):
    r = raw(two_users)
    r.send(("AUTH", "alice", "apw"), ("SET", "k", "v"), ("RESET",), ("GET", "k"), ("HELLO", "3"),
           ("AUTH", "default", "dpw"), ("AUTH", "alice", "apw"), ("GET", "k"))
    out = r.read(8)
    assert out[:4] == [b"+OK\r\n", b"+OK\r\n", b"+RESET\r\n", NOAUTH]
    assert out[4].startswith(b"-NOAUTH HELLO must be called")
    assert out[5].startswith(b"-ERR user 'default' is on route main/default")  # the route cannot change
    assert out[6:] == [b"+OK\r\n", b"$1\r\nv\r\n"]


def test_passwords_from_a_file_and_from_a_variable(server, fresh_db, start_proxy, ns, tmp_path, monkeypatch):
    pwfile = tmp_path / "pw"
    pwfile.write_text("file-secret\n")  # one trailing newline is not part of it
    monkeypatch.setenv("KSP_TEST_PASSWORD", "env-secret")
    port = free_port()
    p = start_proxy(config_text=toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}", [
        {"name": "filer", "password_file": str(pwfile), "namespace": ns[0]},
        {"name": "enver", "password_env": "KSP_TEST_PASSWORD", "namespace": ns[1]},
    ]), port=port)
    assert client(p, username="filer", password="file-secret").ping()
    assert client(p, username="enver", password="env-secret").ping()
    with pytest.raises(redis.AuthenticationError):
        client(p, username="filer", password="file-secret\n").ping()


def test_flags_password_file_and_proxy_password(server, fresh_db, start_proxy, tmp_path, monkeypatch, d):
    pwfile = tmp_path / "pw"
    pwfile.write_text("flag-secret\n")
    up = f"redis://{server.host}:{server.port}/{fresh_db}"
    p = start_proxy(["--upstream", up, "--namespace", "fl", "--password-file", str(pwfile)])
    c = client(p, password="flag-secret")
    c.set("k", "v")
    assert d.get("fl:k") == b"v"
    r = raw(p)
    r.send(("GET", "k"))
    assert r.read() == [NOAUTH]
    monkeypatch.setenv("PROXY_PASSWORD", "var-secret")
    p2 = start_proxy(["--upstream", up, "--namespace", "fl"])
    assert client(p2, password="var-secret").get("k") == b"v"
    with pytest.raises(redis.AuthenticationError):
        client(p2, password="flag-secret").ping()


@pytest.mark.skipif(not shutil.which("redis-cli") and os.environ.get("CI") != "true",
                    reason="redis-cli is not installed (apt-get install redis-tools); under CI=true it must be")
def test_redis_cli_user_and_pass(two_users, d, ns):
    out = subprocess.run(["redis-cli", "-p", str(two_users.port), "--user", "alice", "--pass", "apw",
                          "--no-auth-warning", "SET", "cli", "yes"], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "OK", out
    assert d.get(f"{ns[0]}:cli") == b"yes"
    out = subprocess.run(["redis-cli", "-p", str(two_users.port), "GET", "cli"], capture_output=True, text=True,
                         timeout=20)
    assert "NOAUTH Authentication required." in out.stdout + out.stderr


def test_reload_applies_user_changes_to_new_connections(server, fresh_db, start_proxy, ns, tmp_path):
    pwfile = tmp_path / "pw"
    pwfile.write_text("one")
    port = free_port()
    up = f"redis://{server.host}:{server.port}/{fresh_db}"
    p = start_proxy(config_text=toml_for(port, up, [
        {"name": "alice", "password_file": str(pwfile), "namespace": ns[0]},
        {"name": "bob", "password_sha256": sha("bpw"), "namespace": ns[1]}]), port=port)
    bob = raw(p)
    bob.send(("AUTH", "bob", "bpw"))
    assert bob.read() == [b"+OK\r\n"]
    alice = raw(p)
    alice.send(("AUTH", "alice", "one"))
    assert alice.read() == [b"+OK\r\n"]
    waiting = raw(p)  # connected, not authenticated yet
    waiting.send(("PING",))
    assert waiting.read() == [NOAUTH]
    pwfile.write_text("two")  # a rotated password, re-read on reload
    p.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "generation 2" in p.output(), what="the reload")
    assert client(p, username="alice", password="two").ping()
    with pytest.raises(redis.AuthenticationError):
        client(p, username="alice", password="one").ping()
    # alice's old connection is logged out (closed at its next safe point); bob's stays
    assert alice.sock.recv(10) == b""
    bob.send(("PING",))
    assert bob.read() == [b"+PONG\r\n"]
    waiting.send(("AUTH", "alice", "one"), ("AUTH", "alice", "two"), ("PING",))
    assert waiting.read(3) == [WRONGPASS, b"+OK\r\n", b"+PONG\r\n"]


def test_readme_authentication_example_is_a_valid_configuration(tmp_path):
    import tomllib
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Authentication at the proxy"):]
    text = section[section.index("```toml\n") + 8:section.index("```\n", section.index("```toml\n") + 8)]
    secret = tmp_path / "billing"
    secret.write_text("b-secret\n")
    cfg = from_dict(tomllib.loads(text.replace("/run/secrets/billing", str(secret))),
                    environ={"SIDEKIQ_PROXY_PASSWORD": "s"})
    users = cfg.routes[0].users
    assert [r.name for r in cfg.traffic_routes()] == ["tenants/billing", "tenants/reports", "tenants/default"]
    assert users["billing"].route.upstream.username == "billing"
    assert users["reports"].route.default.db == 2 and users["reports"].digest == hashlib.sha256(b"password").digest()
    assert users["default"].route.default.keyspace.namespace == b"shared"


def test_check_shows_users_with_secrets_masked(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KSP_TEST_PASSWORD", "env-secret")
    path = tmp_path / "p.toml"
    path.write_text(toml_for(free_port(), f"redis://{server.host}:{server.port}/0", [
        {"name": "alice", "password_sha256": sha("apw"), "namespace": "a",
         "upstream": f"redis://u:upstream-secret@{server.host}:{server.port}/0"},
        {"name": "env", "password_env": "KSP_TEST_PASSWORD"}]))
    out = subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert '[[listener.user]]\nname = "alice"\npassword_sha256 = "***"' in out.stdout
    assert 'password_env = "KSP_TEST_PASSWORD"' in out.stdout
    # probed with its own credentials (the listener's own route carries no traffic: not probed)
    assert re.search(r"route main/alice \(127\.0\.0\.1:\d+\): upstream redis://u:\*\*\*@", out.stdout)
    assert re.search(r"route main/env \(127\.0\.0\.1:\d+\): upstream redis://127", out.stdout)
    assert "route main " not in out.stdout
    for secret in (sha("apw"), "upstream-secret", "env-secret"):
        assert secret not in out.stdout + out.stderr


BASE = '[[listener]]\nlisten = "127.0.0.1:6380"\n[[listener.user]]\nname = "alice"\n'


@pytest.mark.parametrize("extra, environ, message", [
    ('password_sha256 = "abc"\n', {}, "listener[0].user[0].password_sha256: expected a SHA-256 digest as 64 hex "
                                      "digits (echo -n PASSWORD | sha256sum), got 3 characters"),
    (f'password_sha256 = "{"z" * 64}"\n', {}, "got 64 characters that are not all hex digits"),
    (f'password_sha256 = "{sha("x")}"\npassword_env = "X"\n', {},
     "listener[0].user[0].password_sha256, listener[0].user[0].password_env: give exactly one of "
     "password_sha256, password_file, password_env (got 2)"),
    ('namespace = "a"\n', {}, "listener[0].user[0].password_sha256: give exactly one of"),
    ('password_file = "/nonexistent/pw"\n', {},
     "listener[0].user[0].password_file: cannot read '/nonexistent/pw': no such file"),
    ('password_env = "KSP_UNSET"\n', {}, "listener[0].user[0].password_env: the environment variable KSP_UNSET "
                                         "is not set"),
    ('password_env = "KSP_EMPTY"\n', {"KSP_EMPTY": ""}, "the environment variable KSP_EMPTY is empty"),
    (f'password_sha256 = "{sha("x")}"\ncolour = "red"\n', {}, "listener[0].user[0].colour: unknown field"),
    (f'password_sha256 = "{sha("x")}"\nlisten = "127.0.0.1:1"\n', {}, "listener[0].user[0].listen: unknown field"),
    (f'password_sha256 = "{sha("x")}"\nnamespace = "a*"\n', {}, "listener[0].user[0].namespace:"),
    (f'password_sha256 = "{sha("x")}"\n[[listener.user]]\nname = "alice"\npassword_sha256 = "{sha("y")}"\n', {},
     "listener[0].user[1].name: user 'alice' is already listener 127.0.0.1:6380's user"),
])
def test_configuration_errors_name_the_field(extra, environ, message, tmp_path):
    import tomllib
    with pytest.raises(ConfigError) as e:
        from_dict(tomllib.loads(BASE + extra), environ=environ)
    assert message in str(e.value)
    assert sha("x") not in str(e.value) and sha("y") not in str(e.value)


def test_an_empty_or_unreadable_password_file(tmp_path):
    import tomllib
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"password_file: '.*empty' is empty"):
        from_dict(tomllib.loads(BASE + f'password_file = "{empty}"\n'), environ={})
    with pytest.raises(ConfigError, match="is a directory"):
        from_dict(tomllib.loads(BASE + f'password_file = "{tmp_path}"\n'), environ={})
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("pw")
        locked.chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            from_dict(tomllib.loads(BASE + f'password_file = "{locked}"\n'), environ={})


def test_a_user_inherits_the_listener_and_overrides_field_by_field():
    import tomllib
    cfg = from_dict(tomllib.loads(
        '[[listener]]\nname = "L"\nlisten = "127.0.0.1:6380"\nupstream = "redis://h:1/2"\nnamespace = "base"\n'
        '[listener.databases]\n1 = 5\n'
        f'[[listener.user]]\nname = "same"\npassword_sha256 = "{sha("x")}"\n'
        f'[[listener.user]]\nname = "own"\npassword_sha256 = "{sha("y")}"\nstrip_namespace = "s"\n'
        'upstream = "redis://u:p@h2:3/4"\n[listener.user.databases]\n7 = 8\n'), environ={})
    listener = cfg.routes[0]
    same, own = listener.users["same"].route, listener.users["own"].route
    assert [r.name for r in cfg.all_routes()] == ["L", "L/same", "L/own"]
    assert [r.name for r in cfg.traffic_routes()] == ["L/same", "L/own"]
    assert same.default.keyspace.namespace == b"base" and same.databases[1].db == 5
    assert same.upstream == listener.upstream
    assert own.default.keyspace.mode == "strip" and own.upstream.username == "u" and own.default.db == 4
    assert set(own.databases) == {7} and own.databases[7].keyspace.mode == "strip"
    assert listener.users["same"].digest == hashlib.sha256(b"x").digest()


def test_the_gate_reads_byte_by_byte_and_hands_the_rest_over():
    """Sans-IO: the gate answers in order however the bytes are split, stops at the
    request that authenticates, and hands over exactly the bytes after it."""
    import tomllib
    from integration_helpers import encode
    from proxy.auth import Gate, Login, no_auth_commands
    from proxy.commands import default_table
    from proxy.config import Limits
    from proxy.stats import RouteStats
    cfg = from_dict(tomllib.loads(BASE + f'password_sha256 = "{sha("pw")}"\n'), environ={})
    listener = cfg.routes[0]
    stats = RouteStats(listener.name)
    gate = Gate(Login(listener.name, lambda: listener.users, stats, "test"), Limits(),
                no_auth_commands(default_table()))
    after = encode("SET", "k", "v") + encode("GET", "k")[:5]  # the next request, and half of one
    data = encode("GET", "k") + b"PING\r\n" + encode("HELLO", "3", "AUTH", "alice", "pw", "SETNAME", "n") + after
    for i in range(len(data)):
        gate.client_data(data[i:i + 1])
        if gate.user is not None:
            rest = data[i + 1:]
            break
    assert b"".join(gate.out_client) == NOAUTH + NOAUTH
    assert gate.user.name == "alice" and gate.first == [b"HELLO", b"3", b"SETNAME", b"n"]
    assert gate.rest + rest == after
    assert stats.auth_successes == 1 and stats.auth_failures == 0
    assert no_auth_commands(default_table()) == {"auth", "hello", "quit", "reset"}


def test_a_listener_without_users_asks_nothing_and_forwards_auth(ns_proxy):
    r = raw(ns_proxy)
    r.send(("SET", "k", "v"), ("AUTH", "whatever"))
    ok, auth = r.read(2)
    assert ok == b"+OK\r\n"
    # the server's own answer (it has no password): AUTH went upstream, as before
    assert auth.startswith(b"-ERR AUTH <password> called without any password configured")


def test_password_flags_belong_to_the_flags_listener(tmp_path):
    from proxy.cli import apply_env, build_parser, config_from_args
    path = tmp_path / "p.toml"
    path.write_text('[[listener]]\nlisten = "127.0.0.1:6380"\n')
    a = apply_env(build_parser().parse_args(["--config", str(path), "--password-file", "/x"]), environ={})
    with pytest.raises(ConfigError, match="--password-file: give `password_file` in the config file"):
        config_from_args(a, environ={})
    # their variables (and PROXY_PASSWORD) yield to the file's listeners
    env = {"PROXY_PASSWORD_FILE": "/x", "PROXY_PASSWORD": "pw"}
    a = apply_env(build_parser().parse_args(["--config", str(path)]), environ=env)
    assert config_from_args(a, environ=env).routes[0].users is None
    # without a file: the default user of the single listener
    a = apply_env(build_parser().parse_args(["--listen", "127.0.0.1:6380"]), environ={"PROXY_PASSWORD": "pw"})
    users = config_from_args(a, environ={"PROXY_PASSWORD": "pw"}).routes[0].users
    assert list(users) == ["default"] and users["default"].digest == hashlib.sha256(b"pw").digest()
    a = apply_env(build_parser().parse_args(["--listen", "127.0.0.1:6380", "--password-sha256", "x"]), environ={})
    with pytest.raises(ConfigError, match="--password-sha256: expected a SHA-256 digest"):
        config_from_args(a, environ={})


def test_rendered_configuration_keeps_each_field_in_its_table():
    """check's TOML: a route's own fields before its sub-tables, for a listener and each
    user (a field written after [listener.databases] would belong to that table)."""
    import tomllib
    from proxy.config import render_toml
    cfg = from_dict(tomllib.loads(
        '[[listener]]\nname = "L"\nlisten = "127.0.0.1:6380"\nupstream = "rediss://h:1/2"\nnamespace = "n"\n'
        '[listener.databases]\n1 = 5\n[listener.upstream_tls]\nserver_name = "redis.internal"\n'
        f'[[listener.user]]\nname = "a"\npassword_sha256 = "{sha("x")}"\n'
        f'[[listener.user]]\nname = "b"\npassword_env = "V"\nnamespace = "bn"\n[listener.user.databases]\n3 = 4\n'),
        environ={"V": "secret"})
    data = tomllib.loads(render_toml(cfg))
    (listener,) = data["listener"]
    assert listener["upstream"] == "rediss://h:1/2" and listener["namespace"] == "n"
    assert set(listener["databases"]) == {"1"} and listener["upstream_tls"]["server_name"] == "redis.internal"
    a, b = listener["user"]
    assert a == {"name": "a", "password_sha256": "***", "upstream": "rediss://h:1/2", "namespace": "n",
                 "separator": ":", "policy": "tenant", "slot": "spread", "databases": listener["databases"],
                 "upstream_tls": listener["upstream_tls"]}
    assert b["password_env"] == "V" and b["namespace"] == "bn" and set(b["databases"]) == {"3"}
    assert "secret" not in render_toml(cfg) and sha("x") not in render_toml(cfg)


def test_client_list_with_a_user_name_outside_latin1(server, fresh_db, start_proxy, ns):
    """A user name is any TOML string: CLIENT LIST / CLIENT INFO on a tenant route show
    it (UTF-8), and cost nobody their connection."""
    port = free_port()
    text = toml_for(port, f"redis://{server.host}:{server.port}/{fresh_db}", [
        {"name": "用户", "password_sha256": sha("upw"), "namespace": ns[0], "policy": "tenant"}])
    p = start_proxy(config_text=text, port=port)
    r = raw(p)
    r.send(("AUTH", "用户", "upw"), ("CLIENT", "INFO"), ("CLIENT", "LIST"), ("PING",))
    ok, info, listing, pong = r.read(4)
    assert ok == b"+OK\r\n" and pong == b"+PONG\r\n"
    assert "user=用户 ".encode() in info and "user=用户 ".encode() in listing
    assert "internal error" not in p.output()


def test_reload_logs_out_a_connection_that_authenticated_again_as_the_rotated_user(
        server, fresh_db, start_proxy, ns, tmp_path):
    """AUTH as alice, then AUTH again as carol (same namespace: the connection stays on
    its route): a reload that rotates carol's password logs that connection out, as it
    does carol's own; alice's connections stay (Redis too drops the clients of a user it
    deletes, whichever user they authenticated as first)."""
    pwfile = tmp_path / "pw"
    pwfile.write_text("one")
    port = free_port()
    up = f"redis://{server.host}:{server.port}/{fresh_db}"
    p = start_proxy(config_text=toml_for(port, up, [
        {"name": "alice", "password_sha256": sha("apw"), "namespace": ns[0]},
        {"name": "carol", "password_file": str(pwfile), "namespace": ns[0]}]), port=port)
    both = raw(p)
    both.send(("AUTH", "alice", "apw"), ("AUTH", "carol", "one"), ("PING",))
    assert both.read(3) == [b"+OK\r\n", b"+OK\r\n", b"+PONG\r\n"]
    alice = raw(p)
    alice.send(("AUTH", "alice", "apw"))
    assert alice.read() == [b"+OK\r\n"]
    pwfile.write_text("two")  # carol's password rotated
    p.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "generation 2" in p.output(), what="the reload")
    assert both.sock.recv(10) == b""  # logged out: it was carol's
    alice.send(("PING",))
    assert alice.read() == [b"+PONG\r\n"]
