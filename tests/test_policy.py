"""The per-route policy (README "Policies"), against real servers: `tenant` (the default
on namespaced routes) and `app`, each bullet on both, including issue 13's reproductions.
No mocks: Valkey 8 and Redis 7 as the suite starts them, real ACL users for the fence probe."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest
import redis

from integration_helpers import client, direct, uniq

ROOT_CONFIG = """
[[listener]]
name = "{name}"
listen = "127.0.0.1:{port}"
upstream = "redis://{auth}{host}:{sport}/{db}"
namespace = "{ns}"
{policy}
[listener.databases]
1 = {{ db = {db2}, namespace = "{ns}" }}
2 = {{ db = {db}, namespace = "other" }}
{metrics}
"""


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(start_proxy, server, db, policy=None, ns="ns", auth="", name="r", metrics=False, db2=None):
    port = _port()
    mport = _port() if metrics else None
    text = ROOT_CONFIG.format(
        name=name, port=port, auth=auth, host=server.host, sport=server.port, db=db, ns=ns,
        policy=f'policy = "{policy}"' if policy else "", db2=db2 if db2 is not None else (db % 15) + 1,
        metrics=f'[metrics]\nlisten = "127.0.0.1:{mport}"' if metrics else "")
    p = start_proxy(config_text=text, port=port)
    p.metrics_port = mport
    return p


@pytest.fixture(params=["tenant", "app"])
def policy(request):
    return request.param


def _err(fn, *a):
    with pytest.raises(redis.ResponseError) as e:
        fn(*a)
    return str(e.value)


# ---- scripts and functions

SCRIPT_COMMANDS = [
    ("EVAL", "return 1", 0), ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 0),
    ("EVAL_RO", "return 1", 0), ("EVALSHA_RO", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 0),
    ("FCALL", "f", 0), ("FCALL_RO", "f", 0), ("SCRIPT", "LOAD", "return 1"),
    ("FUNCTION", "LIST"), ("FUNCTION", "DUMP"), ("FUNCTION", "STATS"),
    ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() return 1 end)"),
]


def test_scripts_on_tenant_are_refused_naming_the_setting(server, fresh_db, start_proxy, d):
    d.set("ns:mine", 1)
    d.set("other-tenant:secret", 1)
    p = start(start_proxy, server, fresh_db)
    c = client(p)
    # issue 13: EVAL "return redis.call('KEYS','*')" 0 listed every tenant's keys
    msg = _err(c.eval, "return redis.call('KEYS','*')", 0)
    assert msg == ("command 'EVAL' is refused on namespace 'ns' of route r (policy \"tenant\": a script can "
                   "reach any key); set policy = \"app\" on listener[0], or give the route an upstream user "
                   "fenced by a Redis ACL (docs/security.md)")
    for cmd in SCRIPT_COMMANDS:
        msg = _err(c.execute_command, *cmd)
        assert "(policy \"tenant\": " in msg and 'set policy = "app" on listener[0]' in msg, (cmd, msg)
    assert "SCRIPT FLUSH" in _err(c.execute_command, "SCRIPT", "FLUSH")  # refused on both policies
    # a refused script inside MULTI aborts the transaction, as a rejected command does
    pipe = c.pipeline(transaction=True)
    pipe.set("a", 1).eval("return 1", 0)
    with pytest.raises(redis.ResponseError):  # redis-py raises the refusal, EXEC answered EXECABORT
        pipe.execute()
    assert c.get("a") is None
    assert "refused EVAL" in p.output() and "upstream user not fenced by a Redis ACL" in p.output()


def test_scripts_on_app_pass_and_see_everything(server, fresh_db, start_proxy, d):
    # app trusts the code: a script's declared keys are rewritten, the rest is up to it
    d.set("ns:mine", 1)
    d.set("other-tenant:secret", 1)
    p = start(start_proxy, server, fresh_db, policy="app")
    c = client(p)
    seen = sorted(c.eval("return redis.call('KEYS','*')", 0))
    assert b"other-tenant:secret" in seen and b"ns:mine" in seen
    sha = c.script_load("return redis.call('GET', KEYS[1])")
    assert c.evalsha(sha, 1, "mine") == b"1"  # Sidekiq's EVALSHA over KEYS
    assert c.execute_command("EVAL_RO", "return redis.call('GET', KEYS[1])", 1, "mine") == b"1"
    assert "policy app" in p.output()


# ---- the ACL fence probe

FENCED_USER = ["on", ">pw", "~{ns}:*", "&{ns}:*", "+@all", "-@admin", "-@dangerous", "-keys", "-scan",
               "-randomkey", "-flushdb", "-flushall"]


@pytest.fixture
def acl_users(server):
    """Two users on `server`: one fenced to `pol:*` by an ACL, one that is not."""
    admin = direct(server)
    fenced, loose = uniq("fenced"), uniq("loose")
    admin.execute_command("ACL", "SETUSER", fenced, "reset", *[a.format(ns="pol") for a in FENCED_USER])
    admin.execute_command("ACL", "SETUSER", loose, "reset", "on", ">pw", "~*", "&*", "+@all", "-@admin",
                          "-@dangerous")
    yield fenced, loose
    admin.execute_command("ACL", "DELUSER", fenced, loose)
    admin.close()


def _metric(p, name: str, route: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(rf'^keyspace_proxy_{name}{{route="{route}"}} (\S+)$', body, re.M)
    assert m, body
    return float(m.group(1))


def test_fenced_upstream_user_allows_scripts_on_tenant(server, fresh_db, start_proxy, acl_users, d):
    fenced, _ = acl_users
    d.set("pol:k", "v")
    d.set("elsewhere", "x")
    p = start(start_proxy, server, fresh_db, ns="pol", auth=f"{fenced}:pw@", metrics=True)
    assert "upstream user fenced by a Redis ACL" in p.output()
    assert _metric(p, "route_upstream_fenced", "r") == 1
    c = client(p)
    assert c.eval("return redis.call('GET', KEYS[1])", 1, "k") == b"v"
    # the server's ACL is the fence now: a script reaching outside gets NOPERM from it
    denied = ("permission", "can't access", "can't run")  # Valkey 8, Redis 7
    assert any(w in _err(c.eval, "return redis.call('GET', 'elsewhere')", 0).lower() for w in denied)
    assert any(w in _err(c.eval, "return redis.call('KEYS', '*')", 0).lower() for w in denied)
    # the price (README): the proxy's own bounded KEYS / SCAN are denied to this user too
    for fn in (c.dbsize, lambda: c.keys("*"), lambda: c.scan(0)):
        with pytest.raises(redis.ResponseError, match="(?i)no permissions|NOPERM"):
            fn()



def test_a_reload_checking_the_fence_again_leaves_the_running_route_fenced(server, fresh_db, start_proxy,
                                                                          acl_users):
    """A reload changes the route (here: another upstream, which is slow to answer the
    check): while the new route's fence is being checked, the running route's clients keep
    what the last check found (scripts pass), instead of being refused for the duration."""
    import signal

    from integration_helpers import Raw
    from proxy.embedded import free_port
    from test_reload import wait_log, write
    fenced, _ = acl_users
    silent = socket.socket()  # accepts and never answers: the check of the new route waits
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(20)
    port = free_port()

    def text(upstream):
        return (f'[limits]\nconnect_timeout = 5\n[[listener]]\nname = "r"\nlisten = "127.0.0.1:{port}"\n'
                f'namespace = "pol"\npolicy = "tenant"\nupstream = "{upstream}"\n')
    p = start_proxy(config_text=text(f"redis://{fenced}:pw@{server.host}:{server.port}/{fresh_db}"), port=port)
    assert "upstream user fenced by a Redis ACL" in p.output()
    c = Raw("127.0.0.1", port)
    assert c.call("MULTI") == b"+OK\r\n"  # inside MULTI: not drained by the reload until EXEC/DISCARD
    write(p, text(f"redis://127.0.0.1:{silent.getsockname()[1]}/0"))
    p.process.send_signal(signal.SIGHUP)
    probe, _ = silent.accept()  # the new route's fence check is under way
    try:
        assert c.call("EVAL", "return 1", "0") == b"+QUEUED\r\n"
        assert c.call("EXEC") == b"*1\r\n:1\r\n"
        wait_log(p, "reload: generation 2", timeout=30)
    finally:
        c.close()
        probe.close()
        silent.close()



def test_a_refused_reload_leaves_the_fence_as_it_was(server, fresh_db, start_proxy, acl_users, d):
    """A reload that would move a tenant route onto an ACL-fenced user is refused (a new
    listener's port is taken): the route stays on its unfenced user, and its scripts stay
    refused. (The refused reload's check had marked the route fenced: fail open, a script
    of the running route could read any key.)"""
    import signal

    from integration_helpers import Raw
    from proxy.embedded import free_port
    from test_reload import wait_log, write
    fenced, loose = acl_users
    d.set("elsewhere", "another tenant's")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = free_port()

    def text(user, extra=""):
        return (f'[[listener]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nnamespace = "pol"\npolicy = "tenant"\n'
                f'upstream = "redis://{user}:pw@{server.host}:{server.port}/{fresh_db}"\n' + extra)
    p = start_proxy(config_text=text(loose), port=port)
    assert "upstream user not fenced by a Redis ACL" in p.output()
    write(p, text(fenced, f'[[listener]]\nname = "b"\nlisten = "127.0.0.1:{busy.getsockname()[1]}"\n'
                          'namespace = "b"\n'))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "reload refused")
    c = Raw("127.0.0.1", port)
    got = c.call("EVAL", "return redis.call('GET', 'elsewhere')", "0")
    assert got.startswith(b"-ERR command 'EVAL' is refused"), got
    c.close()
    busy.close()



def test_a_route_moved_onto_a_fenced_user_does_not_fence_its_old_connections(server, fresh_db, start_proxy,
                                                                            acl_users, d):
    """A reload moves a tenant route from an unfenced upstream user to an ACL-fenced one:
    the new route's scripts pass, but a connection still on the old route (busy in a MULTI
    until the grace period) is still on the unfenced user: its scripts stay refused (they
    passed, and read another tenant's key)."""
    import signal

    from integration_helpers import Raw
    from proxy.embedded import free_port
    from test_reload import wait_log, write
    fenced, loose = acl_users
    d.set("elsewhere", "another tenant's")
    port = free_port()

    def text(user):
        return (f'[[listener]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nnamespace = "pol"\npolicy = "tenant"\n'
                f'upstream = "redis://{user}:pw@{server.host}:{server.port}/{fresh_db}"\n')
    p = start_proxy(config_text=text(loose), port=port)
    old = Raw("127.0.0.1", port)
    assert old.call("MULTI") == b"+OK\r\n"  # busy: on the old route until EXEC or the grace period
    write(p, text(fenced))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "reload: generation 2")
    assert "upstream user fenced by a Redis ACL" in p.output()
    new = Raw("127.0.0.1", port)
    assert new.call("EVAL", "return redis.call('GET', KEYS[1])", "1", "k") == b"$-1\r\n"  # fenced: passes
    got = old.call("EVAL", "return redis.call('GET', 'elsewhere')", "0")
    assert got.startswith(b"-ERR command 'EVAL' is refused"), got
    assert old.call("DISCARD") == b"+OK\r\n"
    old.close()
    new.close()


def test_unfenced_upstream_user_leaves_scripts_refused(server, fresh_db, start_proxy, acl_users):
    _, loose = acl_users
    p = start(start_proxy, server, fresh_db, ns="pol", auth=f"{loose}:pw@", metrics=True)
    out = p.output()
    assert "upstream user not fenced by a Redis ACL (a key outside the namespace is allowed" in out
    assert _metric(p, "route_upstream_fenced", "r") == 0
    assert "policy \"tenant\"" in _err(client(p).eval, "return 1", 0)


def test_probe_names_the_keyless_commands_an_acl_pattern_does_not_cover(server, fresh_db, start_proxy):
    admin = direct(server)
    user = uniq("keyless")
    # keys fenced, but KEYS, SCAN, RANDOMKEY, FLUSHDB, FLUSHALL allowed (valkey issue #370's gap)
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", "~pol:*", "&pol:*", "+@all", "-@admin")
    try:
        p = start(start_proxy, server, fresh_db, ns="pol", auth=f"{user}:pw@", metrics=True)
        line = next(ln for ln in p.output().splitlines() if "not fenced" in ln)
        for name in ("KEYS", "SCAN", "RANDOMKEY", "FLUSHDB", "FLUSHALL"):
            assert name in line, line
        assert _metric(p, "route_upstream_fenced", "r") == 0
        assert direct(server, fresh_db).dbsize() == 0  # the probe changed nothing
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_app_route_is_not_probed(server, fresh_db, start_proxy):
    p = start(start_proxy, server, fresh_db, policy="app", metrics=True)
    assert "policy app: scripts and read-only server commands pass" in p.output()
    assert _metric(p, "route_upstream_fenced", "r") == 0


# ---- INFO keyspace

def test_info_keyspace(server, fresh_db, start_proxy, d, policy):
    db2 = (fresh_db % 15) + 1
    d.set("ns:a", 1)
    d.set("ns:b", 1)
    d.set("other:c", 1)
    d.set("stranger", 1)
    d2 = direct(server, db2)
    d2.flushdb()
    d2.set("ns:x", 1)
    p = start(start_proxy, server, fresh_db, policy=policy, db2=db2)
    for proto in (2, 3):
        c = client(p, protocol=proto)
        ks = c.info("keyspace")
        if policy == "tenant":
            # client db 0 and 2 share backend db fresh_db (namespaces ns and other), client db 1 is db2
            assert ks == {"db0": {"keys": 2, "expires": 0, "avg_ttl": 0},
                          "db1": {"keys": 1, "expires": 0, "avg_ttl": 0},
                          "db2": {"keys": 1, "expires": 0, "avg_ttl": 0}}, ks
            for section in ("default", "all", "everything"):
                assert c.info(section)["db0"]["keys"] == 2
            assert "db0" in c.info() and "redis_version" in c.info()
            assert "db0" not in c.info("server")
            c.select(1) if proto == 2 else None
        else:
            assert f"db{fresh_db}" in ks  # the server's own section: backend dbs
        c.close()
    d2.close()


# ---- CLIENT LIST / CLIENT INFO

def test_client_list_and_info(server, fresh_db, start_proxy, policy):
    p = start(start_proxy, server, fresh_db, policy=policy)
    other = start(start_proxy, server, fresh_db, policy=policy, name="other")
    a, b = client(p, protocol=2), client(p, protocol=2)
    stranger = client(other)
    outsider = direct(server)
    outsider.client_setname("outsider")
    a.client_setname("alpha")
    a.execute_command("SELECT", 1)
    stranger.client_setname("stranger")
    b.ping()
    info = a.client_info()
    if policy == "tenant":
        assert info["db"] == 1 and info["name"] == "alpha" and info["resp"] == "2"
        listed = a.client_list()
        assert len(listed) == 2 and {c["name"] for c in listed} == {"alpha", ""}
        assert all(c["addr"].startswith("127.0.0.1:") and "laddr" in c for c in listed)
        assert [int(c["id"]) for c in a.client_list(client_id=[info["id"]])] == [info["id"]]
        assert a.client_list(_type="pubsub") == []
    else:
        assert info["db"] == (fresh_db % 15) + 1  # the server's answer: client db 1's backend db
        assert "outsider" in {c["name"] for c in a.client_list()}  # the server's whole list
    for c in (a, b, stranger, outsider):
        c.close()


# ---- MONITOR

def test_monitor(server, fresh_db, start_proxy, policy):
    p = start(start_proxy, server, fresh_db, policy=policy)
    other = start(start_proxy, server, fresh_db, policy=policy, name="other")
    mon = client(p)
    m = mon.monitor()
    m.__enter__()
    worker, stranger = client(p), client(other)
    tag = uniq("m")
    stranger.set("stranger-" + tag, 1)
    worker.execute_command("SELECT", 1)
    worker.set(tag, "v\n")
    seen = []
    while True:
        ev = m.next_command()
        seen.append(ev)
        if re.match(rf"SET (ns:)?{tag} ", ev["command"]):
            break
    last = seen[-1]
    if policy == "tenant":
        assert last["command"] == f"SET {tag} v\\n" and last["db"] == 1  # client terms: key, client db
        assert not any("stranger" in e["command"] for e in seen)
    else:
        assert last["command"].startswith("SET ns:" + tag)  # the server's own stream: backend names
    m.__exit__(None, None, None)
    for c in (mon, worker, stranger):
        c.close()


# ---- CONFIG GET

def test_config_get(server, fresh_db, start_proxy, policy):
    p = start(start_proxy, server, fresh_db, policy=policy)
    c = client(p)
    assert c.config_get("maxmemory-policy")["maxmemory-policy"]
    if policy == "tenant":
        msg = _err(c.config_get, "requirepass")
        assert "(policy \"tenant\": CONFIG GET answers only maxmemory-policy" in msg
        assert 'set policy = "app" on listener[0]' in msg
        got = c.config_get("*")
        assert "maxmemory-policy" in got and "requirepass" not in got and "dir" not in got
        assert c.config_get("no-such-*") == {}
    else:
        assert "requirepass" in c.config_get("requirepass")
    assert "CONFIG SET" in _err(c.config_set, "maxmemory", "0")  # refused on both


# ---- MIGRATE

def test_migrate(server, fresh_db, start_proxy, d, policy):
    # A server cannot MIGRATE to itself: it blocks on its own RESTORE for the whole timeout
    # (every client of the server waits), then answers IOERR (tests/test_fence.py found the
    # proxy sending it). Refused on both policies, before anything is sent; tenant refuses
    # MIGRATE whatever the address (another server is outside the fence).
    db2 = (fresh_db % 15) + 1
    p = start(start_proxy, server, fresh_db, policy=policy, db2=db2)
    c = client(p)
    c.set("k", "v")
    for db in (1, 2):
        msg = _err(c.execute_command, "MIGRATE", server.host, server.port, "k", db, 100000)
        if policy == "tenant":
            assert "(policy \"tenant\": to another server the key leaves the fence" in msg, msg
            assert 'set policy = "app"' in msg
        else:
            assert "MIGRATE to the route's own server is refused by the proxy on route r" in msg, msg
    assert d.get("ns:k") == b"v"
    port = _port()
    msg = _err(c.execute_command, "MIGRATE", "127.0.0.1", port, "k", 1, 1)
    if policy == "tenant":
        assert "(policy \"tenant\": to another server the key leaves the fence" in msg
    else:
        assert "IOERR" in msg or "error" in msg.lower()  # app sends it (nothing listens there)
    assert d.get("ns:k") == b"v"


# ---- what the policy does not change

def test_bare_command_passes_on_both(server, fresh_db, start_proxy, policy):
    p = start(start_proxy, server, fresh_db, policy=policy)
    c = client(p)
    assert len(c.execute_command("COMMAND")) > 100


def test_route_without_namespace_is_unchanged_by_the_policy(server, fresh_db, start_proxy, d):
    d.set("plain", 1)
    for policy in ("tenant", "app"):
        port = _port()
        p = start_proxy(config_text=f'[[listener]]\nlisten = "127.0.0.1:{port}"\npolicy = "{policy}"\n'
                                    f'upstream = "redis://{server.host}:{server.port}/{fresh_db}"\n', port=port)
        c = client(p)
        assert c.eval("return redis.call('GET', 'plain')", 0) == b"1"
        assert f"db{fresh_db}" in c.info("keyspace")
        assert "policy changes nothing" in p.output()
        c.close()


def test_flag_configured_listener(server, fresh_db, start_proxy):
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns"])
    msg = _err(client(p).eval, "return 1", 0)
    assert msg.endswith("set --policy app, or give the route an upstream user fenced by a Redis ACL "
                        "(docs/security.md)")
    p2 = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns",
                      "--policy", "app"])
    assert client(p2).eval("return 1", 0) == 1


# ---- docs

def test_readme_policy_table_is_the_rules():
    import os
    from proxy.rules import markdown_policies
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    assert "<!-- policies: generated by python -m proxy.rules -->\n" + markdown_policies() + "\n" in readme, \
        "README's policy table is stale: python -m proxy.rules"


# ---- reload

def test_reload_checks_the_fence_of_new_and_changed_routes(server, fresh_db, start_proxy, acl_users):
    import os
    import signal
    import time
    fenced, loose = acl_users
    port = _port()

    def text(user):
        return (f'[[listener]]\nname = "r"\nlisten = "127.0.0.1:{port}"\nnamespace = "pol"\n'
                f'upstream = "redis://{user}:pw@{server.host}:{server.port}/{fresh_db}"\n')
    p = start_proxy(config_text=text(loose), port=port)
    assert "upstream user not fenced" in p.output()
    with open(os.path.join(p.tmp, "proxy.toml"), "w") as f:
        f.write(text(fenced))
    p.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload: generation 2" not in p.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "upstream user fenced by a Redis ACL" in p.output()
    assert client(p).eval("return 1", 0) == 1  # a new connection, on the new route


# ---- the session alone (sans-IO): MONITOR lines, emulations inside MULTI

def _session(policy="tenant"):
    from proxy.config import DbTarget, Route, Upstream
    from proxy.keyspace import Keyspace
    from proxy.session import RouteView, Session
    ks = Keyspace("add", b"ns", b":", "r")
    route = Route("r", ("127.0.0.1", 1), Upstream("h", 1, 0), DbTarget(0, ks), {}, policy=policy,
                  policy_label="listener[0].policy")
    view = RouteView()
    mon, s = Session(route, view=view), Session(route, view=view)
    view._alone += [mon, s]
    return view, mon, s


def _c(*args) -> bytes:
    from proxy.resp import encode_command
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


def test_monitor_lines_are_in_client_terms_and_redact_migrate_passwords():
    view, mon, s = _session()
    mon.client_data(_c("MONITOR"))
    assert mon.take_client() == b"+OK\r\n" and mon.take_upstream() == b""
    s.client_data(_c("SET", "k", 'a "q"\n') + _c("MIGRATE", "h", "1", "", "0", "5", "AUTH2", "u", "pw",
                                                 "KEYS", "k") + _c("AUTH", "secret"))
    assert s.take_upstream().startswith(_c("SET", "ns:k", 'a "q"\n'))
    lines = mon.take_client().split(b"\r\n")
    assert re.fullmatch(rb'\+\d+\.\d{6} \[0 \?\] "SET" "k" "a \\"q\\"\\n"', lines[0]), lines[0]
    assert lines[1].endswith(b'"AUTH2" "(redacted)" "(redacted)" "KEYS" "k"') and b"pw" not in lines[1]
    assert lines[2] == b""  # AUTH is not shown
    mon.client_data(_c("RESET"))
    mon.upstream_data(b"+RESET\r\n")
    assert not view.monitors and mon.take_client() == b"+RESET\r\n"


def test_client_list_and_info_refused_inside_multi_on_tenant():
    _, _, s = _session()
    s.client_data(_c("MULTI") + _c("CLIENT", "INFO") + _c("CLIENT", "LIST") + _c("EXEC"))
    s.upstream_data(b"+OK\r\n")
    out = s.take_client()
    assert out.count(b"cannot be queued in MULTI") == 2


def test_app_session_passes_what_tenant_answers_itself():
    _, _, s = _session("app")
    s.client_data(_c("CLIENT", "LIST") + _c("CONFIG", "GET", "requirepass") + _c("MONITOR"))
    assert s.take_upstream() == _c("CLIENT", "LIST") + _c("CONFIG", "GET", "requirepass") + _c("MONITOR")


def test_info_on_a_shared_link_moves_only_when_another_backend_db_is_counted():
    from proxy.config import DbTarget, Route, Upstream
    from proxy.keyspace import Keyspace
    from proxy.session import Session
    ks = Keyspace("add", b"ns", b":", "r")
    same = Route("r", ("127.0.0.1", 1), Upstream("h", 1, 0), DbTarget(0, ks), {2: DbTarget(0, ks)})
    other = Route("r", ("127.0.0.1", 1), Upstream("h", 1, 0), DbTarget(0, ks), {1: DbTarget(5, ks)})
    s = Session(same, shared=True)
    s.client_data(_c("INFO", "keyspace"))
    assert not s.need_dedicated and s.take_upstream() == _c("INFO", "keyspace")
    s = Session(other, shared=True)
    s.client_data(_c("CLIENT", "REPLY", "SKIP") + _c("INFO", "keyspace") + _c("INFO", "server"))
    assert s.need_dedicated and s.take_upstream() == b"" and len(s.held) == 2
    assert s.skip  # not consumed: the INFO replayed on the connection of its own takes it


# ---- per user ([[listener.user]]: each user's route has its own policy)

def test_policy_per_user(server, fresh_db, start_proxy):
    import hashlib
    port = _port()
    sha = hashlib.sha256(b"pw").hexdigest()
    text = (f'[[listener]]\nname = "main"\nlisten = "127.0.0.1:{port}"\n'
            f'upstream = "redis://{server.host}:{server.port}/{fresh_db}"\nnamespace = "{uniq("lst")}"\n'
            f'[[listener.user]]\nname = "trusted"\npassword_sha256 = "{sha}"\npolicy = "app"\n'
            f'[[listener.user]]\nname = "guest"\npassword_sha256 = "{sha}"\n')
    p = start_proxy(config_text=text, port=port)
    out = p.output()
    assert "route main/trusted: policy app" in out and "route main/guest: policy tenant, upstream user not fenced" in out
    trusted = client(p, username="trusted", password="pw")
    guest = client(p, username="guest", password="pw")
    assert trusted.eval("return 1", 0) == 1
    msg = _err(guest.eval, "return 1", 0)
    assert "of route main/guest (policy \"tenant\": a script can reach any key)" in msg
    # the guest's CLIENT LIST: its own route's clients only (not the trusted user's)
    assert [c["user"] for c in guest.client_list()] == ["guest"]
    trusted.close()
    guest.close()
