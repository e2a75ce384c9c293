"""Hot reload (issue 5, item 1): SIGHUP and POST /-/reload re-read the TOML; new connections get
the new route at once, existing ones are closed at their next safe point; a bad file is refused."""

import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
import redis

from integration_helpers import Raw
from proxy.embedded import free_port


TOKEN = "reload-token-for-tests"


def toml(server, db, port, ns, extra="", mport=None, grace=30):
    text = f'upstream = "redis://{server.host}:{server.port}/{db}"\n'
    text += f"[limits]\nreload_grace = {grace}\n"
    if mport:
        # POST /-/reload needs a token since issue 13 (item 6): the tests send it
        text += f'[metrics]\nlisten = "127.0.0.1:{mport}"\n[admin]\ntoken_file = "{token_file()}"\n'
    text += f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "{ns}"\n'
    return text + extra


def token_file() -> str:
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"ksp-reload-token-{os.getpid()}")
    with open(path, "w") as f:
        f.write(TOKEN + "\n")
    return path


def post_reload(mport, token=TOKEN):
    req = urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=10)


def config_path(proxy) -> str:
    return os.path.join(proxy.tmp, "proxy.toml")


def write(proxy, text) -> None:
    with open(config_path(proxy), "w") as f:
        f.write(text)


def wait_log(proxy, needle, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proxy.output():
            return
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not logged:\n{proxy.output()}")


def closed_by_peer(sock: socket.socket, timeout=5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_sighup_moves_new_connections_and_drains_idle_ones(server, fresh_db, start_proxy):
    port, port2 = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one"), port=port)
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    old = Raw("127.0.0.1", port)
    assert old.call("SET", "k", "1") == b"+OK\r\n"
    write(p, toml(server, fresh_db, port, "two",
                  extra=f'[[listener]]\nname = "b"\nlisten = "127.0.0.1:{port2}"\nstrip_namespace = "two"\n'))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 2: 1 listener(s) added, 0 removed, 1 route(s) changed")
    assert closed_by_peer(old.sock)  # idle: closed at once, the client reconnects onto the new route
    new = Raw("127.0.0.1", port)
    assert new.call("SET", "k", "2") == b"+OK\r\n"
    assert d.get("one:k") == b"1" and d.get("two:k") == b"2"
    d.set("plain", "3")
    assert Raw("127.0.0.1", port2).call("GET", "two:plain") == b"$1\r\n3\r\n"  # the added listener, strip mode


def test_busy_connection_finishes_its_reply_before_it_is_closed(server, fresh_db, start_proxy):
    port = free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one"), port=port)
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    busy = Raw("127.0.0.1", port)
    busy.send(("BLPOP", "q", "5"))
    time.sleep(0.3)
    write(p, toml(server, fresh_db, port, "two"))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 2")
    d.rpush("one:q", "job")
    assert busy.read()[0] == b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n"  # delivered, in the old namespace's names
    assert closed_by_peer(busy.sock)  # then closed at the safe point


def test_multi_is_not_cut_and_grace_period_bounds_a_stuck_client(server, fresh_db, start_proxy):
    port = free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one", grace=1), port=port)
    tx = Raw("127.0.0.1", port)
    assert tx.call("MULTI") == b"+OK\r\n"
    write(p, toml(server, fresh_db, port, "two", grace=1))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 2")
    assert tx.call("SET", "k", "v") == b"+QUEUED\r\n"  # still open inside MULTI
    assert closed_by_peer(tx.sock, timeout=5)           # ... until the 1 s grace period ends
    wait_log(p, "grace period over, closing 1 connection(s)")


def test_invalid_config_is_refused_and_the_running_one_stays(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one", mport=mport), port=port)
    write(p, toml(server, fresh_db, port, "bad*ns", mport=mport))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "reload refused, the running configuration stays")
    assert "listener[0].namespace: \"bad*ns\" must not contain '*'" in p.output()
    with pytest.raises(urllib.error.HTTPError) as e:
        post_reload(mport)
    assert e.value.code == 400 and b"listener[0].namespace: \"bad*ns\" must not contain" in e.value.read()
    assert Raw("127.0.0.1", port).call("SET", "k", "1") == b"+OK\r\n"
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert d.get("one:k") == b"1"


def test_post_reload_applies_and_counts_generations(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one", mport=mport), port=port)
    write(p, toml(server, fresh_db, port, "two", mport=mport))
    reply = post_reload(mport)
    assert reply.status == 200 and b"generation 2" in reply.read()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"keyspace_proxy_config_generation 2.0" in metrics
    assert Raw("127.0.0.1", port).call("SET", "k", "1") == b"+OK\r\n"
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert d.get("two:k") == b"1"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/-/reload", timeout=10)  # GET
    assert e.value.code == 405


# -- the reload token and the separate admin address (issue 13, item 6)

def _post_error(mport, token=TOKEN, path="/-/reload"):
    with pytest.raises(urllib.error.HTTPError) as e:
        post_reload(mport, token) if path == "/-/reload" else urllib.request.urlopen(
            f"http://127.0.0.1:{mport}{path}", timeout=10)
    return e.value.code, e.value.read().decode()


def test_reload_over_http_is_off_without_a_token_and_sighup_still_reloads(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    text = toml(server, fresh_db, port, "one", mport=mport).replace(f'[admin]\ntoken_file = "{token_file()}"\n', "")
    p = start_proxy(config_text=text, port=port)
    assert "POST /-/reload is off: no admin token" in p.output()
    code, body = _post_error(mport, token=None)
    assert code == 403 and "reload over HTTP is off" in body and "[admin] token_file" in body \
        and "PROXY_ADMIN_TOKEN" in body and "SIGHUP" in body
    code, _ = _post_error(mport, token="anything")  # no token configured: no token opens it
    assert code == 403
    write(p, text.replace('namespace = "one"', 'namespace = "two"'))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 2")
    assert Raw("127.0.0.1", port).call("SET", "k", "1") == b"+OK\r\n"
    assert redis.Redis(host=server.host, port=server.port, db=fresh_db).get("two:k") == b"1"


def test_reload_needs_the_right_bearer_token(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one", mport=mport), port=port)
    write(p, toml(server, fresh_db, port, "two", mport=mport))
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        code, body = _post_error(mport, token=token)
        assert code == 401 and "Authorization: Bearer" in body, (token, code, body)
    assert "POST /-/reload refused: wrong token" in p.output()
    assert TOKEN not in p.output() and "wrong" not in p.output().replace("wrong token", "")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"keyspace_proxy_config_generation 1.0" in metrics   # nothing reloaded
    assert post_reload(mport).status == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"keyspace_proxy_config_generation 2.0" in metrics


def test_admin_listen_serves_reload_apart_from_metrics(server, fresh_db, start_proxy, monkeypatch):
    port, mport, aport = free_port(), free_port(), free_port()
    monkeypatch.setenv("PROXY_ADMIN_TOKEN", "from-the-environment")
    text = toml(server, fresh_db, port, "one", mport=mport).replace(
        f'[admin]\ntoken_file = "{token_file()}"\n', f'[admin]\nlisten = "127.0.0.1:{aport}"\n')
    p = start_proxy(config_text=text, port=port)
    assert f"admin on http://127.0.0.1:{aport}: POST /-/reload with the admin token" in p.output()
    code, body = _post_error(mport, token="from-the-environment")
    assert code == 404 and f"served on the admin port 127.0.0.1:{aport} ([admin] listen)" in body
    code, body = _post_error(aport, path="/metrics")
    assert code == 404 and "[metrics] listen" in body
    assert urllib.request.urlopen(f"http://127.0.0.1:{aport}/healthz", timeout=10).status == 200
    assert _post_error(aport, token=TOKEN)[0] == 401
    write(p, text.replace('namespace = "one"', 'namespace = "two"'))
    reply = post_reload(aport, token="from-the-environment")
    assert reply.status == 200 and b"generation 2" in reply.read()


def test_token_settings_are_checked_at_start(server, fresh_db, tmp_path):
    import subprocess
    import sys
    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = ["--listen", "127.0.0.1:0", "--upstream", f"redis://{server.host}:{server.port}/{fresh_db}"]
    for extra, needle in (
            (["--admin-token-file", str(tmp_path / "missing")], "--admin-token-file: cannot read"),
            (["--admin-token-file", str(empty)], "--admin-token-file: " + repr(str(empty)) + " is empty"),
            (["--admin-token-file", str(empty), "--admin-token", "x"], "give the token or a file holding it")):
        r = subprocess.run([sys.executable, "-m", "proxy", *base, *extra], capture_output=True, text=True,
                           timeout=30, env={k: v for k, v in os.environ.items() if not k.startswith("PROXY_")})
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)


def test_a_reload_waits_for_the_one_under_way(server, fresh_db, start_proxy):
    """Two reloads at once (SIGHUP while the previous one is still checking a tenant
    route's fence) run one after the other: the second sees what the first applied. Run
    side by side, the second compared the new file with the listeners as they were
    before the first, and kept a listener its file no longer has."""
    port, port_b = free_port(), free_port()
    silent = socket.socket()  # an upstream that accepts and never answers: the fence check waits
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(20)
    base = (f'upstream = "redis://{server.host}:{server.port}/{fresh_db}"\n[limits]\nconnect_timeout = 5\n'
            f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "one"\n')
    p = start_proxy(config_text=base, port=port)
    with_b = (base + f'[[listener]]\nname = "b"\nlisten = "127.0.0.1:{port_b}"\nnamespace = "t"\npolicy = "tenant"\n'
              f'upstream = "redis://127.0.0.1:{silent.getsockname()[1]}/0"\n')
    write(p, with_b)
    p.process.send_signal(signal.SIGHUP)
    probe, _ = silent.accept()  # the first reload is checking b's fence now
    write(p, base)  # b removed again
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "reload: generation 3", timeout=30)
    assert "reload refused" not in p.output()
    with pytest.raises(OSError):  # b is gone: the running listeners are the file's
        socket.create_connection(("127.0.0.1", port_b), timeout=5).close()
    probe.close()
    silent.close()


def test_a_shared_link_owing_replies_at_the_end_of_grace_closes_once_they_are_in(server, fresh_db, start_proxy):
    """The route moves to another db while a client waits on its shared link for a reply
    (the server paused): the grace period closes the client, and the old link, whose route
    no reload will use again, closes once the reply owed on it is in; it is not kept open
    to the old server."""
    port = free_port()
    other = fresh_db % 15 + 1

    def text(db):
        return (f'upstream = "redis://{server.host}:{server.port}/{db}"\n[limits]\nreload_grace = 0.5\n'
                f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "one"\n')
    p = start_proxy(config_text=text(fresh_db), port=port)
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db, socket_timeout=30)
    me = d.client_id()

    def on_old_db():
        return [c for c in d.client_list() if int(c["db"]) == fresh_db and int(c["id"]) != me]
    c = Raw("127.0.0.1", port)
    assert c.call("PING") == b"+PONG\r\n"
    d.client_pause(4000, all=False)  # writes wait: the SET below is owed on the link
    try:
        c.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        write(p, text(other))
        p.process.send_signal(signal.SIGHUP)
        wait_log(p, "reload: generation 2")
        assert closed_by_peer(c.sock, timeout=10)  # closed at the end of the grace period
    finally:
        c.close()
    wait_log(p, "grace period over, closing 1 connection(s) still busy")
    deadline = time.monotonic() + 20  # the pause ends, the reply comes in, the link closes
    while on_old_db() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not on_old_db(), on_old_db()
    d.close()


def test_the_reconnect_loop_of_an_upstream_no_route_uses_stops(server, fresh_db, start_proxy):
    """An upstream marked down is probed with backoff until it answers; once a reload took
    its last route away (after the grace period) nobody needs it: the probing stops."""
    import threading
    dead_port, port = free_port(), free_port()

    def text(upstream):
        return (f'upstream = "{upstream}"\n[limits]\nreload_grace = 0.2\nreconnect_delay_max = 0.2\n'
                f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "one"\n')
    p = start_proxy(config_text=text(f"redis://127.0.0.1:{dead_port}/0"), port=port)
    c = Raw("127.0.0.1", port)
    assert c.call("PING").startswith(b"-ERR upstream unavailable")  # refused: marked down, probed from now on
    c.close()
    wait_log(p, "is down")
    # now something listens there, accepting and closing: each probe is seen, and still fails
    dead = socket.socket()
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dead.bind(("127.0.0.1", dead_port))
    dead.listen(64)
    dead.settimeout(0.2)
    seen: list[float] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = dead.accept()
            except OSError:
                continue
            seen.append(time.monotonic())
            conn.close()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen, "the down upstream is probed"
        write(p, text(f"redis://{server.host}:{server.port}/{fresh_db}"))
        p.process.send_signal(signal.SIGHUP)
        wait_log(p, "reload: generation 2")
        assert Raw("127.0.0.1", port).call("PING") == b"+PONG\r\n"
        time.sleep(1.0)  # the grace period (0.2 s) is over, and a probe under way has come
        after = time.monotonic()
        time.sleep(2.0)  # ten reconnect delays
        assert not [ts for ts in seen if ts > after], "nothing probes the old upstream any more"
    finally:
        stop.set()
        t.join(5)
        dead.close()


def test_a_route_changed_by_the_second_reload_drains_connections_of_the_first(server, fresh_db, start_proxy):
    """A connection accepted before a reload that left its route unchanged (the route is
    then an equal new object) is still drained by a later reload that changes the route."""
    port, port2 = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one"), port=port)
    old = Raw("127.0.0.1", port)
    assert old.call("SET", "k", "1") == b"+OK\r\n"
    write(p, toml(server, fresh_db, port, "one",
                  extra=f'[[listener]]\nname = "b"\nlisten = "127.0.0.1:{port2}"\nstrip_namespace = "two"\n'))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 2: 1 listener(s) added, 0 removed, 0 route(s) changed")
    assert old.call("GET", "k") == b"$1\r\n1\r\n"  # unchanged: it stays
    write(p, toml(server, fresh_db, port, "two",
                  extra=f'[[listener]]\nname = "b"\nlisten = "127.0.0.1:{port2}"\nstrip_namespace = "two"\n'))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "generation 3: 0 listener(s) added, 0 removed, 1 route(s) changed")
    assert closed_by_peer(old.sock)  # its route changed: closed, it reconnects onto the new one
