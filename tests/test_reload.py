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


def toml(server, db, port, ns, extra="", mport=None, grace=30):
    text = f'upstream = "redis://{server.host}:{server.port}/{db}"\n'
    text += f"[limits]\nreload_grace = {grace}\n"
    if mport:
        text += f'[metrics]\nlisten = "127.0.0.1:{mport}"\n'
    text += f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "{ns}"\n'
    return text + extra


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
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST"),
                               timeout=10)
    assert e.value.code == 400 and b"listener[0].namespace: \"bad*ns\" must not contain" in e.value.read()
    assert Raw("127.0.0.1", port).call("SET", "k", "1") == b"+OK\r\n"
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert d.get("one:k") == b"1"


def test_post_reload_applies_and_counts_generations(server, fresh_db, start_proxy):
    port, mport = free_port(), free_port()
    p = start_proxy(config_text=toml(server, fresh_db, port, "one", mport=mport), port=port)
    write(p, toml(server, fresh_db, port, "two", mport=mport))
    reply = urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST"), timeout=10)
    assert reply.status == 200 and b"generation 2" in reply.read()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"keyspace_proxy_config_generation 2.0" in metrics
    assert Raw("127.0.0.1", port).call("SET", "k", "1") == b"+OK\r\n"
    d = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert d.get("two:k") == b"1"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/-/reload", timeout=10)  # GET
    assert e.value.code == 405
