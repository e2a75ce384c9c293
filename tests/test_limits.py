"""Limits and timeouts (issue 13, item 7): max clients per process and per listener, the
file-descriptor limit, the client idle timeout, TCP keepalive, the upstream reply timeout
with a black-holed upstream, and reconnects with backoff. Real servers and real proxy
processes; nothing asserts how long anything took, only what happened."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import ROOT
from integration_helpers import Raw, wait_for
from proxy.embedded import free_port, start_server

MAX_CLIENTS_ERROR = b"-ERR max number of clients reached\r\n"


def upstream(server, db) -> list[str]:
    return ["--upstream", f"redis://{server.host}:{server.port}/{db}"]


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def ping(sock: socket.socket) -> bytes:
    """PING on a raw socket: +PONG, or what the proxy said before closing."""
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    sock.settimeout(10)
    data = b""
    try:
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def take_slot(port: int, hello: bytes = b"*1\r\n$4\r\nPING\r\n", answer: bytes = b"+PONG\r\n"):
    """A client connection that got in: the start-up check's connection (conftest) holds a
    slot until the proxy has seen it close, so a client turned away meanwhile tries again."""
    def attempt():
        s = connect(port)
        s.sendall(hello)
        got = read_line(s)
        if got == answer:
            return s
        assert got == MAX_CLIENTS_ERROR, got
        s.close()
        return None
    return wait_for(attempt, what="a client slot")


def read_line(sock: socket.socket) -> bytes:
    data = b""
    try:
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def scrape(mport: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def readyz(mport: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- max clients

def test_max_clients_answers_as_redis_and_frees_the_slot(server, fresh_db, start_proxy):
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--max-clients", "3", "--metrics-listen", f"127.0.0.1:{mport}"])
    assert "max clients 3 ([limits] max_clients)" in p.output()
    held = [take_slot(p.port) for _ in range(3)]
    extra = connect(p.port)
    assert read_all(extra) == MAX_CLIENTS_ERROR          # told, then closed: never a bare reset
    assert "client turned away with -ERR max number of clients reached ([limits] max_clients = 3)" in p.output()
    held.pop().close()
    # the slot is given back once the proxy has seen the close
    wait_for(lambda: ping(connect(p.port)) == b"+PONG\r\n", what="a slot to free up")
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_client_connections_rejected_total", reason="max_clients") >= 1
    for s in held:
        s.close()


def test_max_clients_per_listener(server, fresh_db, start_proxy):
    a, b, mport = free_port(), free_port(), free_port()
    text = (f'upstream = "redis://{server.host}:{server.port}/{fresh_db}"\n'
            f'[metrics]\nlisten = "127.0.0.1:{mport}"\n'
            f'[[listener]]\nname = "small"\nlisten = "127.0.0.1:{a}"\nmax_clients = 1\n'
            f'[[listener]]\nname = "big"\nlisten = "127.0.0.1:{b}"\n')
    p = start_proxy(config_text=text, port=a)
    first = take_slot(a)
    assert read_all(connect(a)) == MAX_CLIENTS_ERROR
    assert "listener max_clients = 1" in p.output()
    others = [connect(b) for _ in range(3)]             # the other listener is not limited by it
    assert all(ping(s) == b"+PONG\r\n" for s in others)
    for s in others + [first]:
        s.close()


def _run_with_nofile(args: list[str], nofile: int, port: int) -> subprocess.Popen:
    """A proxy process whose soft and hard RLIMIT_NOFILE are `nofile` (so it cannot raise them)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    import tempfile
    log = tempfile.NamedTemporaryFile("w+", prefix="ksp-limits-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{port}", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=limit)
    proc.log = log
    proc.log_path = log.name

    def output() -> str:
        with open(log.name) as f:
            return f.read()
    proc.output = output
    wait_for(lambda: "listening on" in output() or proc.poll() is not None, what="the proxy to start")
    assert proc.poll() is None, output()
    return proc


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()
    os.unlink(proc.log_path)


def test_default_max_clients_leaves_descriptors_for_upstream_connections(server, fresh_db):
    port = free_port()
    proc = _run_with_nofile(upstream(server, fresh_db) + ["--upstream-mode", "dedicated"], 100, port)
    try:
        # (100 - 64) / 2: every client can hold its own upstream connection
        assert "file descriptors: 100 (hard limit 100); max clients 18 (the default" in proc.output()
        held = [connect(port) for _ in range(18)]
        assert all(ping(s) == b"+PONG\r\n" for s in held)   # 18 clients with 18 upstream connections
        assert read_all(connect(port)) == MAX_CLIENTS_ERROR
        for s in held:
            s.close()
    finally:
        _stop(proc)


def test_out_of_descriptors_the_listener_answers_and_survives(server, fresh_db):
    """max_clients set above what the descriptors allow: accept() fails with EMFILE. uvloop
    would close the listener for good; the proxy tells the client and goes on accepting."""
    port = free_port()
    proc = _run_with_nofile(upstream(server, fresh_db) + ["--max-clients", "1000"], 64, port)
    try:
        assert "may need more file descriptors than the 64 allowed" in proc.output()
        held, rejected = [], []
        while len(rejected) < 5 and len(held) < 200:
            s = connect(port)
            reply = ping(s)
            if reply == b"+PONG\r\n":
                held.append(s)
            else:
                rejected.append(reply + read_all(s))
                s.close()
        assert len(rejected) == 5 and held, (len(held), rejected)
        assert all(r == MAX_CLIENTS_ERROR for r in rejected), rejected
        assert "out of file descriptors (RLIMIT_NOFILE)" in proc.output()
        for s in held:
            s.close()
        # the listener is alive: once descriptors are free, clients are served again
        wait_for(lambda: ping(connect(port)) == b"+PONG\r\n", what="a client served after the shortage")
        assert proc.poll() is None
    finally:
        _stop(proc)


# -- client idle timeout

def test_idle_clients_are_closed_but_not_blocked_subscribed_or_monitoring(server, fresh_db, start_proxy, d):
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--idle-timeout", "1", "--metrics-listen", f"127.0.0.1:{mport}"])
    idle = connect(p.port)
    assert ping(idle) == b"+PONG\r\n"
    blocked = Raw("127.0.0.1", p.port)
    blocked.send(("BLPOP", "list", "3"))                  # blocked longer than the idle timeout
    sub = Raw("127.0.0.1", p.port)
    assert b"subscribe" in sub.call("SUBSCRIBE", "chan")
    mon = Raw("127.0.0.1", p.port)
    assert mon.call("MONITOR") == b"+OK\r\n"
    assert read_all(idle) == b""                        # closed by the proxy
    assert blocked.read()[0] == b"*-1\r\n"                 # BLPOP timed out as asked, connection still there
    assert blocked.call("PING") == b"+PONG\r\n"
    d.publish("chan", "hello")
    assert b"hello" in sub.read()[0]
    while b"hello" not in mon.read()[0]:      # MONITOR's connection is still open: it sees the PUBLISH
        pass
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_client_connections_closed_total",
                            reason="idle_timeout") >= 1, what="the idle close to be counted")


# -- TCP keepalive

def _keepalive_sockets(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-tnoep", "state", "established"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def test_tcp_keepalive_on_client_and_upstream_sockets(server, fresh_db, start_proxy):
    p = start_proxy(upstream(server, fresh_db) + ["--tcp-keepalive", "120"])
    c = Raw("127.0.0.1", p.port)
    assert c.call("SET", "k", "v") == b"+OK\r\n"
    lines = wait_for(lambda: [ln for ln in _keepalive_sockets(p.process.pid) if "keepalive" in ln] or None,
                     what="keepalive sockets")
    client_side = [ln for ln in lines if f"127.0.0.1:{p.port} " in ln]
    upstream_side = [ln for ln in lines if f"{server.host}:{server.port} " in ln.split("users:")[0]]
    assert client_side and upstream_side, lines


def test_tcp_keepalive_zero_turns_it_off(server, fresh_db, start_proxy):
    p = start_proxy(upstream(server, fresh_db) + ["--tcp-keepalive", "0"])
    c = Raw("127.0.0.1", p.port)
    assert c.call("SET", "k", "v") == b"+OK\r\n"
    lines = wait_for(lambda: _keepalive_sockets(p.process.pid) or None, what="the proxy's sockets")
    assert not [ln for ln in lines if "keepalive" in ln], lines


# -- the upstream reply timeout, a black-holed upstream, reconnects

@pytest.fixture
def stoppable():
    """A server of our own, which the test may SIGSTOP (a black hole: connections are
    accepted by the kernel, nothing is ever answered) and SIGCONT."""
    s = start_server("valkey")
    yield s
    try:
        os.kill(s.process.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    s.stop()


def test_black_holed_upstream_fails_requests_marks_down_and_recovers(stoppable, start_proxy, upstream_mode):
    mport = free_port()
    p = start_proxy(["--upstream", f"redis://127.0.0.1:{stoppable.port}/0", "--reply-timeout", "1",
                     "--reconnect-delay", "0.1", "--reconnect-delay-max", "0.5",
                     "--metrics-listen", f"127.0.0.1:{mport}"])
    a, b = Raw("127.0.0.1", p.port), Raw("127.0.0.1", p.port)
    assert a.call("SET", "k", "1") == b"+OK\r\n" and b.call("PING") == b"+PONG\r\n"
    assert readyz(mport)[0] == 200
    os.kill(stoppable.process.pid, signal.SIGSTOP)
    a.send(("GET", "k"))
    a.send(("INCR", "n"))
    b.send(("GET", "k"))
    # every request owed gets its error, in order, then the connection closes
    got_a, got_b = read_all(a.sock, 30), read_all(b.sock, 30)
    err = re.compile(rb"-ERR upstream unavailable \(no reply from 127\.0\.0\.1:\d+ within 1s "
                     rb"\(\[limits\] reply_timeout\); connection declared dead\)\r\n")
    assert len(err.findall(got_a)) == 2 and got_a == b"".join(err.findall(got_a)), got_a
    assert len(err.findall(got_b)) == 1, got_b
    # new clients do not join the dead link: they are told at once, no wait
    c = Raw("127.0.0.1", p.port)
    c.send(("GET", "k"))
    got = read_all(c.sock, 30)
    assert got.startswith(b"-ERR upstream unavailable (no reply from") and b"; reconnecting)" in got, got
    status, body = readyz(mport)
    assert status == 503 and "upstream down" in body, body
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_upstream_reply_timeouts_total") >= 1
    assert metric(text, "keyspace_proxy_upstream_down") == 1
    assert "is down (no reply from" in p.output()
    os.kill(stoppable.process.pid, signal.SIGCONT)
    wait_for(lambda: readyz(mport)[0] == 200, timeout=30, what="readiness after the server answers again")
    assert "answers again after" in p.output()
    assert Raw("127.0.0.1", p.port).call("GET", "k") == b"$1\r\n1\r\n"


def test_blocking_commands_are_not_timed(server, fresh_db, start_proxy):
    p = start_proxy(upstream(server, fresh_db) + ["--reply-timeout", "1"])
    c = Raw("127.0.0.1", p.port)
    assert c.call("BLPOP", "nothing", "3") == b"*-1\r\n"            # 3 s: longer than the reply timeout
    assert c.call("XREAD", "BLOCK", "2500", "STREAMS", "s", "$") == b"*-1\r\n"
    assert c.call("PING") == b"+PONG\r\n"
    assert "reply_timeout" not in p.output()


def test_a_down_upstream_is_retried_with_backoff_not_per_request(start_proxy):
    port, mport = free_port(), free_port()
    p = start_proxy(["--upstream", f"redis://127.0.0.1:{port}/0", "--reconnect-delay", "0.2",
                     "--reconnect-delay-max", "1", "--metrics-listen", f"127.0.0.1:{mport}"])
    first = Raw("127.0.0.1", p.port)
    first.send(("PING",))
    assert b"upstream unavailable (cannot connect to" in read_all(first.sock)
    for _ in range(30):  # clients hammering a dead upstream cost no connection attempts each
        c = Raw("127.0.0.1", p.port)
        c.send(("PING",))
        assert b"reconnecting" in read_all(c.sock)
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_upstream_connect_failures_total") <= 2, text
    assert p.output().count("is down (") == 1
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_upstream_reconnect_failures_total") >= 2,
             what="reconnect attempts")
    status, body = readyz(mport)
    assert status == 503 and "upstream down (cannot connect to" in body
    srv = start_server("valkey", port=port)
    try:
        wait_for(lambda: readyz(mport)[0] == 200, timeout=30, what="readiness once the server is up")
        assert Raw("127.0.0.1", p.port).call("PING") == b"+PONG\r\n"
    finally:
        srv.stop()


def test_black_hole_listener_that_never_answers(start_proxy):
    """A TCP listener that accepts and never answers (a firewall dropping replies, a hung
    host): clients get an error in bounded time instead of hanging."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(hole.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    try:
        p = start_proxy(["--upstream", f"redis://127.0.0.1:{hole.getsockname()[1]}/0", "--reply-timeout", "1"])
        c = Raw("127.0.0.1", p.port)
        c.send(("GET", "k"))
        assert b"within 1s ([limits] reply_timeout)" in read_all(c.sock, 30)
    finally:
        hole.close()
        for s in held:
            s.close()


# -- which replies are timed (sans-IO: the Session alone)

@pytest.mark.parametrize("shared", [False, True])
def test_blocking_requests_are_not_timed_and_others_are(shared):
    from proxy.session import Session
    from test_session import c, make_route
    s = Session(make_route("add"), shared=shared)
    s.client_data(c("GET", "k"))
    assert s.owes_timed_reply()
    s.upstream_data(b"$-1\r\n")
    assert not s.owes_timed_reply() and s.may_idle_close
    if shared:
        return  # a blocking command moves a shared client to a connection of its own first
    s.client_data(c("BLPOP", "q", "0"))
    assert not s.owes_timed_reply() and not s.may_idle_close
    s.upstream_data(b"*-1\r\n")
    s.client_data(c("CLIENT", "REPLY", "OFF") + c("BRPOP", "q", "5") + c("XREAD", "BLOCK", "0", "STREAMS", "s", "$"))
    assert not s.owes_timed_reply()     # still blocking with its reply dropped
    s.upstream_data(b"*-1\r\n*-1\r\n")
    assert not s.pending
    s.client_data(c("SUBSCRIBE", "ch"))
    s.upstream_data(b"*3\r\n$9\r\nsubscribe\r\n$6\r\napp:ch\r\n:1\r\n")
    assert not s.may_idle_close         # subscribed: never idle-closed, as in Redis


def test_limits_at_a_listener_with_users(server, fresh_db, start_proxy):
    """A listener with users (proxy/auth.py): its max_clients counts the client before and
    after AUTH moves it to the user's route, and an unauthenticated client idle past
    idle_timeout is closed as any idle client."""
    import hashlib
    port, mport = free_port(), free_port()
    text = (f'upstream = "redis://{server.host}:{server.port}/{fresh_db}"\n'
            f'[limits]\nidle_timeout = 1\n[metrics]\nlisten = "127.0.0.1:{mport}"\n'
            f'[[listener]]\nname = "gate"\nlisten = "127.0.0.1:{port}"\nmax_clients = 1\nnamespace = "lst"\n'
            f'[[listener.user]]\nname = "alice"\npassword_sha256 = "{hashlib.sha256(b"apw").hexdigest()}"\n'
            f'namespace = "a"\n')
    p = start_proxy(config_text=text, port=port)
    first = take_slot(port, b"*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$3\r\napw\r\n", b"+OK\r\n")
    assert ping(first) == b"+PONG\r\n"
    assert read_all(connect(port)) == MAX_CLIENTS_ERROR     # the authenticated client holds the slot
    first.close()
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_client_connections") == 0, what="the slot freed")
    idle = connect(port)                                     # never authenticates
    assert read_all(idle) == b""                             # closed for idleness
    assert "gate" in p.output()
