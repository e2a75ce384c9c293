"""limits.blocking_pool (proxy/bpool.py): in shared mode a blocking command borrows a
pooled upstream connection for the call and gives it back with the reply; the client
stays on its shared link. Real servers; connection counts read from CLIENT LIST."""

from __future__ import annotations

import threading
import time

import pytest

from integration_helpers import Raw, client, decode, encode, wait_blocked, wait_for
from proxy.embedded import free_port
from test_limits import metric, scrape


@pytest.fixture
def upstream_mode():
    """The pool exists in shared mode only (dedicated mode: every client has its own)."""
    return "shared"


def upstream(server, db):
    return ["--upstream", f"redis://{server.host}:{server.port}/{db}", "--namespace", "ns"]


def server_conns(d, db: int) -> list[dict]:
    """The server's connections on backend db `db` (the proxy's: links and pooled ones)."""
    me = d.client_id()
    return [c for c in d.client_list() if int(c["db"]) == db and int(c["id"]) != me]


def in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by result()
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result(timeout=20):
        t.join(timeout)
        assert not t.is_alive(), "blocked call did not return"
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def test_blocking_commands_through_the_pool(server, fresh_db, start_proxy, d, proto):
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--metrics-listen", f"127.0.0.1:{mport}"])
    r = client(p, protocol=proto)
    r.client_setname("worker-1")  # a named client keeps its shared link (and the pool)
    r.rpush("l", "a", "b", "c")
    assert list(r.brpop(["nothing", "l"], timeout=1)) == [b"l", b"c"]
    assert list(r.blpop(["l"], timeout=1)) == [b"l", b"a"]
    assert r.blmove("l", "m", timeout=1, src="LEFT", dest="RIGHT") == b"b"
    assert d.lrange("ns:m", 0, -1) == [b"b"]
    r.zadd("z", {"x": 1, "y": 2})
    got = r.bzpopmin(["z"], timeout=1)
    assert list(got)[:2] == [b"z", b"x"]
    r.xadd("s", {"f": "v"}, id="1-0")
    got = r.xread({"s": "0-0"}, block=100)
    names = [e[0] for e in got] if isinstance(got, list) else list(got)
    assert names == [b"s"]
    assert r.brpop(["empty"], timeout=0.1) is None  # timed out: nil, the connection is reusable
    assert r.get("after") is None and r.set("after", 1) and r.get("after") == b"1"
    assert r.client_getname() in ("worker-1", b"worker-1")
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_blocking_pool_borrows_total") >= 6
    assert metric(text, "keyspace_proxy_blocking_pool_connections", state="busy") == 0
    assert metric(text, "keyspace_proxy_blocking_pool_connections", state="idle") == 1
    # shared links (RESP2, and RESP3 after HELLO 3) and one pooled connection: the
    # client never got its own
    assert len(server_conns(d, fresh_db)) == 2 + (proto == 3)
    r.close()


def test_pipelined_requests_wait_for_the_blocking_reply(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db))
    raw = Raw("127.0.0.1", p.port)
    # SET before, BLPOP that must wait, then GET and RPUSH behind it: replies in order
    raw.send(encode("SET", "k", "1"), encode("BLPOP", "q", "5"), encode("GET", "k"), encode("LLEN", "q"))
    assert decode(raw.read(1)[0]) == b"OK"
    wait_blocked(server, 1, "blpop")
    assert raw.nothing_pending(0.1)  # GET waits behind the blocked BLPOP
    d.rpush("ns:q", "v")
    rest = [decode(x) for x in raw.read(3)]
    assert rest == [[b"q", b"v"], b"1", 0]
    raw.close()


def test_many_blocked_clients_bounded_by_the_pool(server, fresh_db, start_proxy, d):
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--blocking-pool", "3",
                                                  "--metrics-listen", f"127.0.0.1:{mport}"])
    n = 8
    clients = [client(p) for _ in range(n)]
    for c in clients:
        assert c.ping()
    before = len(server_conns(d, fresh_db))  # the shared link (and whatever else the server has)
    results = [in_thread(lambda c=c: c.brpop(["jobs"], timeout=15)) for c in clients]
    wait_blocked(server, 3, "brpop")
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_borrow_waits_total") >= n - 3,
             what="the others waiting for the pool")
    # 8 clients blocked or waiting, 3 connections more on the server
    assert len(server_conns(d, fresh_db)) <= before + 3
    for i in range(n):
        d.lpush("ns:jobs", f"j{i}")
    got = sorted(res()[1] for res in results)
    assert got == sorted(f"j{i}".encode() for i in range(n))  # each job to exactly one client
    assert d.llen("ns:jobs") == 0
    assert len(server_conns(d, fresh_db)) <= before + 3
    for c in clients:
        assert c.ping()
        c.close()


def test_client_killed_while_blocked_loses_no_job(server, fresh_db, start_proxy, d):
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--metrics-listen", f"127.0.0.1:{mport}"])
    raw = Raw("127.0.0.1", p.port)
    raw.send(encode("BRPOP", "jobs", "0"))
    wait_blocked(server, 1, "brpop")
    raw.sock.close()  # gone while blocked
    # the proxy unblocks its pooled connection (CLIENT UNBLOCK), then closes it
    wait_for(lambda: not any("b" in c["flags"] for c in server_conns(d, fresh_db)), what="unblocked")
    # unblocked by the proxy from another connection (then pooled), not by a close alone
    assert [c for c in server_conns(d, fresh_db) if c["cmd"] == "client|unblock"]
    d.lpush("ns:jobs", "job-1")
    # the job is not given to the dead client's connection: the next worker gets it
    w = client(p)
    assert w.brpop(["jobs"], timeout=5) == (b"jobs", b"job-1")
    text = scrape(mport)
    assert metric(text, "keyspace_proxy_errors_total", kind="orphan_reply") == 0
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_connections", state="orphan") == 0,
             what="the orphan closed")
    w.close()


def test_blocking_reply_timeout_not_applied(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db) + ["--reply-timeout", "0.5"])
    r = client(p)
    t = in_thread(lambda: r.blpop(["q"], timeout=3))
    wait_blocked(server, 1, "blpop")
    time.sleep(1.5)  # past the reply timeout: a blocked call owes no timed reply
    d.rpush("ns:q", "v")
    assert list(t()) == [b"q", b"v"]
    r.close()


def test_pool_off_moves_to_a_dedicated_connection(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db) + ["--blocking-pool", "0"])
    r = client(p)
    assert r.brpop(["q"], timeout=0.1) is None
    assert r.client_id() is not None  # PIN: works on its own connection
    r.close()


def test_wait_still_pins(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db))
    r = client(p)
    assert r.execute_command("WAIT", 0, 10) == 0
    # it moved to a connection of its own: CLIENT ID is this connection's, stable
    assert r.client_id() == r.client_id()
    r.close()


def test_hello_3_then_blocking_borrows_a_resp3_connection(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db))
    raw = Raw("127.0.0.1", p.port)
    # HELLO 3 moves the client to the RESP3 link; the BLPOP behind it then borrows a RESP3
    # pooled connection (its timeout reply is RESP3's null)
    raw.send(encode("HELLO", "3"), encode("BLPOP", "q", "0.1"), encode("RPUSH", "q", "v"),
             encode("BLPOP", "q", "1"))
    hello, timed_out, pushed, popped = raw.read(4)
    assert hello.startswith(b"%") and timed_out == b"_\r\n" and pushed == b":1\r\n"
    assert decode(popped) == [b"q", b"v"]
    assert [c for c in server_conns(d, fresh_db) if c.get("resp") == "3"]
    raw.close()


def test_hello_pipelined_behind_a_borrowed_call_moves_the_link(server, fresh_db, start_proxy, d):
    """The other order: a HELLO held behind a borrowed blocking call is replayed when the call's
    reply is in, and must still move the client to the link of its protocol (it was never
    answered: found by the reply-integrity test, seed 675583094), and what follows it too."""
    p = start_proxy(upstream(server, fresh_db))
    raw = Raw("127.0.0.1", p.port)
    raw.send(encode("BLMOVE", "a", "b", "LEFT", "RIGHT", "0.05"), encode("HELLO", "3"), encode("HGETALL", "h"),
             encode("BLPOP", "q", "0.05"), encode("HELLO", "2"), encode("HGETALL", "h"))
    timed_out, hello3, empty3, timed_out3, hello2, empty2 = raw.read(6)
    assert timed_out == b"*-1\r\n" and hello3.startswith(b"%") and empty3 == b"%0\r\n"
    assert timed_out3 == b"_\r\n"  # borrowed again, now a RESP3 connection
    assert hello2.startswith(b"*") and empty2 == b"*0\r\n"
    raw.close()


def test_which_commands_borrow():
    """The Rules say which pins may borrow: blocking commands with known keys, not WAIT."""
    from proxy.rules import default_rules
    rules = default_rules()
    for name in ("blpop", "brpop", "blmove", "brpoplpush", "blmpop", "bzpopmin", "bzpopmax", "bzmpop",
                 "xread", "xreadgroup"):
        assert rules.lookup([name.encode()]).poolable, name
    for name in ("wait", "waitaof", "subscribe", "get", "multi", "watch"):
        assert not rules.lookup([name.encode()]).poolable, name


def test_several_clients_killed_while_blocked(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db) + ["--blocking-pool", "3"])
    raws = [Raw("127.0.0.1", p.port) for _ in range(3)]
    for raw in raws:
        raw.send(encode("BRPOP", "jobs", "0"))
    wait_blocked(server, 3, "brpop")
    for raw in raws:
        raw.sock.close()
    wait_for(lambda: not any("b" in c["flags"] for c in server_conns(d, fresh_db)), what="all unblocked")
    d.lpush("ns:jobs", "a", "b", "c")
    w = client(p)
    got = sorted(w.brpop(["jobs"], timeout=5)[1] for _ in range(3))
    assert got == [b"a", b"b", b"c"]  # none went to a dead client's connection
    w.close()


def test_shared_link_lost_while_blocked_on_the_pool(server, fresh_db, start_proxy, d):
    p = start_proxy(upstream(server, fresh_db))
    raw = Raw("127.0.0.1", p.port)  # (redis-py would retry the call on a new connection)
    assert raw.call("PING") == b"+PONG\r\n"
    raw.send(encode("BRPOP", "jobs", "0"), encode("PING"))
    wait_blocked(server, 1, "brpop")
    for c in server_conns(d, fresh_db):
        if "b" not in c["flags"]:
            d.client_kill_filter(_id=c["id"])  # the shared link: this client owes it nothing
    other = Raw("127.0.0.1", p.port)

    def new_link():  # (a request that meets the dying link gets its error, as on any shared link)
        return other.call("PING") == b"+PONG\r\n" or other.close() or setattr(other, "sock", Raw(
            "127.0.0.1", p.port).sock)
    wait_for(new_link, what="the proxy on a new shared link")
    other.close()
    # still blocked on its pooled connection: served there, then on a new shared link
    d.lpush("ns:jobs", "job")
    popped, pong = raw.read(2)
    assert decode(popped) == [b"jobs", b"job"] and pong == b"+PONG\r\n"
    raw.close()


def test_reload_retires_every_idle_pooled_connection(server, fresh_db, start_proxy, d):
    """A reload that moves the route to another upstream closes every idle pooled
    connection to the old one at once (BlockingPool.retire), not one in two."""
    import signal

    from test_reload import wait_log, write
    port = free_port()

    def toml(db):
        return (f'[limits]\nupstream_mode = "shared"\nreload_grace = 60\n'
                f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\n'
                f'upstream = "redis://{server.host}:{server.port}/{db}"\nnamespace = "ns"\n')
    p = start_proxy(config_text=toml(fresh_db), port=port)
    clients = [client(p) for _ in range(4)]
    results = [in_thread(lambda c=c: c.brpop(["jobs"], timeout=15)) for c in clients]
    wait_blocked(server, 4, "brpop")
    d.lpush("ns:jobs", "a", "b", "c", "d")
    assert sorted(res()[1] for res in results) == [b"a", b"b", b"c", b"d"]

    def pooled():  # the pool's connections: their last command was the blocking one
        return [c for c in server_conns(d, fresh_db) if c["cmd"] == "brpop"]
    assert len(pooled()) == 4  # idle in the pool, all of one db and protocol
    other = fresh_db % 15 + 1
    write(p, toml(other))
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "reload: generation 2")
    wait_for(lambda: not pooled(), timeout=10, what="every idle pooled connection to the old db closed")
    for c in clients:
        c.close()



class Gate:
    """A TCP forwarder to `server` that, once shut(), accepts no more connections: its
    accept queue is full, so a new connect neither succeeds nor is refused (it times out),
    while the connections already forwarded go on working."""

    def __init__(self, server):
        import socket
        self.target = (server.host, server.port)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        self.socks = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        while self.open:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            if not self.open:
                c.close()
                return
            u = socket.create_connection(self.target)
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def shut(self):
        import socket
        self.open = False
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes the accept loop
        time.sleep(0.2)
        for _ in range(3):  # fill the accept queue
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.socks.append(s)

    def close(self):
        for s in self.socks:
            s.close()
        self.lsock.close()


def test_waiter_of_another_protocol_gets_the_error_of_a_pool_that_cannot_connect(server, fresh_db, start_proxy):
    """A pooled connection that fails before it connects frees its slot: a waiter of
    another protocol queued behind it gets a connection attempt (here: the upstream's error),
    not a wait for ever (BlockingPool.fail refills)."""
    gate = Gate(server)
    mport = free_port()
    p = start_proxy(["--upstream", f"redis://127.0.0.1:{gate.port}/{fresh_db}", "--namespace", "ns",
                     "--blocking-pool", "1", "--connect-timeout", "3", "--metrics-listen", f"127.0.0.1:{mport}"])
    try:
        a = Raw("127.0.0.1", p.port)
        assert a.call("PING") == b"+PONG\r\n"
        b = Raw("127.0.0.1", p.port)
        assert b.call("HELLO", "3")[:1] == b"%"  # RESP3: the pool's connections of another protocol
        assert b.call("PING") == b"+PONG\r\n"
        gate.shut()  # new connections to the upstream now hang in connect
        a.send(encode("BRPOP", "q", "0"))
        wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_connections", state="opening") == 1,
                 what="the pooled connection opening")
        b.send(encode("BRPOP", "q", "0"))  # another protocol: waits for the pool's one slot
        wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_borrow_waits_total") >= 1,
                 what="the second client waiting for the pool")
        assert a.read(1)[0][:1] == b"-"
        assert b.read(1)[0][:1] == b"-"  # its own attempt failed too: an error, not a wait for ever
        a.close()
        b.close()
    finally:
        gate.close()


def test_orphan_closed_when_its_unblock_connection_cannot_be_opened(server, fresh_db, start_proxy, d):
    """The connection opened to send CLIENT UNBLOCK for an orphan is refused (maxclients):
    the orphan is closed instead, so the server frees its blocked client (BRPOP 0 would
    otherwise stay blocked for good)."""
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--metrics-listen", f"127.0.0.1:{mport}"])
    raw = Raw("127.0.0.1", p.port)
    raw.send(encode("BRPOP", "jobs", "0"))
    wait_blocked(server, 1, "brpop")
    before = d.config_get("maxclients")["maxclients"]
    d.config_set("maxclients", d.info("clients")["connected_clients"])
    try:
        raw.sock.close()  # gone while blocked; no new connection can reach the server
        wait_for(lambda: not any("b" in c["flags"] for c in server_conns(d, fresh_db)),
                 what="the orphan closed, its blocked client freed")
    finally:
        d.config_set("maxclients", before)
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_connections", state="orphan") == 0,
             what="no orphan left")
    assert metric(scrape(mport), "keyspace_proxy_errors_total", kind="upstream") >= 1  # counted (and logged)
    d.lpush("ns:jobs", "job")
    w = client(p)
    assert w.brpop(["jobs"], timeout=5) == (b"jobs", b"job")  # not given to the dead client's connection
    w.close()


def test_reply_served_as_unblock_answers_0_is_counted(server, fresh_db, start_proxy, d):
    """CLIENT UNBLOCK answers :0 when the server had already served the call: the orphan's
    reply, still being read, is read and counted as orphan_reply before the orphan closes
    (it was dropped uncounted). The proxy is stopped (SIGSTOP) while its client leaves and
    the server serves a large element, so it learns of the departure before reading the reply."""
    import signal
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--metrics-listen", f"127.0.0.1:{mport}"])
    raw = Raw("127.0.0.1", p.port)
    raw.send(encode("BRPOP", "jobs", "0"))
    wait_blocked(server, 1, "brpop")
    w = client(p)
    assert w.brpop(["other"], timeout=0.1) is None  # a second pooled connection, now idle (sends the UNBLOCK)
    big = b"x" * (32 << 20)
    p.process.send_signal(signal.SIGSTOP)
    try:
        raw.sock.close()              # the proxy sees this first once it runs again,
        d.lpush("ns:jobs", big)       # then the reply served meanwhile, larger than socket buffers
    finally:
        p.process.send_signal(signal.SIGCONT)
    wait_for(lambda: metric(scrape(mport), "keyspace_proxy_blocking_pool_connections", state="orphan") == 0,
             what="the orphan closed")
    assert d.llen("ns:jobs") == 0  # the element went to the dead client's call...
    assert metric(scrape(mport), "keyspace_proxy_errors_total", kind="orphan_reply") == 1  # ...and is counted
    assert w.ping()
    w.close()


def test_idle_pooled_connections_closed_after_blocking_pool_idle(server, fresh_db, start_proxy, d):
    """limits.blocking_pool_idle: a pooled connection given back is kept that long for the
    next blocking call (reused: no new connection), then closed; one in use is never closed."""
    mport = free_port()
    p = start_proxy(upstream(server, fresh_db) + ["--blocking-pool", "2", "--blocking-pool-idle", "1",
                                                  "--metrics-listen", f"127.0.0.1:{mport}"])
    r = client(p)
    assert r.ping()
    before = len(server_conns(d, fresh_db))  # the shared link
    r.rpush("l", "a", "b")
    assert list(r.brpop(["l"], timeout=1)) == [b"l", b"b"]
    assert len(server_conns(d, fresh_db)) == before + 1       # the pooled one, idle now
    opened = metric(scrape(mport), "keyspace_proxy_upstream_connections_opened_total")
    assert list(r.brpop(["l"], timeout=1)) == [b"l", b"a"]   # within the second: the same one
    assert metric(scrape(mport), "keyspace_proxy_upstream_connections_opened_total") == opened
    # one blocked across the idle time: not closed under it
    res = in_thread(lambda: r.brpop(["l"], timeout=3))
    assert res(10) is None
    wait_for(lambda: len(server_conns(d, fresh_db)) == before, what="the idle pooled connection closed")
    assert r.ping()
    assert list(r.brpop(["l"], timeout=0.1) or []) == []      # a new one opened for the next call
    assert metric(scrape(mport), "keyspace_proxy_upstream_connections_opened_total") == opened + 1


def test_a_waiter_that_leaves_is_cancelled_in_the_pool_it_waits_in():
    """A client waiting for a pooled connection waits in the pool it asked (ClientConnection.bpool,
    kept across calls); when it leaves, that pool forgets it, even when the proxy's registry
    has another pool for the route by then (a reload retired and dropped the old one)."""
    from collections import deque
    from types import SimpleNamespace
    from proxy.server import ClientConnection

    class Pool:
        def __init__(self):
            self.waiters = deque()

        def cancel(self, client):
            self.waiters = deque(w for w in self.waiters if w[0] is not client)

    asked, registry = Pool(), Pool()
    c = object.__new__(ClientConnection)
    c.route = SimpleNamespace(name="r")
    c.proxy = SimpleNamespace(blocking_pool=lambda route: registry)
    c.bpool, c.pool_waiting, c.pooled = asked, True, None
    asked.waiters.append([c, (0, 2), True])
    c._leave_pool()
    assert not asked.waiters and not c.pool_waiting
