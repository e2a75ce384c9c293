"""Session tests whose server replies come from a real server, not from the test.

A `Live` wires one sans-IO Session to a real Valkey/Redis connection through a
blocking socket: what the session sends upstream is sent, and the server's bytes,
as they arrive, are fed back until the session owes the client nothing more. So a
reply Redis never sends cannot certify anything here (a hand-written reply in
tests/test_session.py once certified the CLIENT REPLY SKIP misdelivery).
"""

from __future__ import annotations

import socket
import time

import pytest

from proxy.config import DbTarget, Route, Upstream
from proxy.embedded import start_server
from proxy.keyspace import Keyspace
from proxy.resp import encode_command
from proxy.session import LOCAL, Session

from integration_helpers import direct, uniq


def c(*args) -> bytes:
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


def route_for(server, ns: str, db: int = 0, databases: dict | None = None, password: str | None = None) -> Route:
    ks = Keyspace("add", ns.encode(), b":", "r")
    return Route("r", ("127.0.0.1", 1), Upstream(server.host, server.port, db, None, password),
                 DbTarget(db, ks), databases or {})


class Live:
    def __init__(self, server, route: Route):
        self.s = Session(route)
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.pump()

    def owes_upstream(self) -> bool:
        return any(e is None or e.kind != LOCAL for e in self.s.pending)

    def pump(self) -> None:
        """Send what the session has for the server; feed its replies until none is owed."""
        deadline = time.monotonic() + 5
        while True:
            out = self.s.take_upstream()
            if out:
                self.sock.sendall(out)
            if not self.owes_upstream():
                return
            assert time.monotonic() < deadline, "the server did not answer what the session waits for"
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.s.upstream_data(data)

    def send(self, *cmds: bytes) -> bytes:
        self.s.client_data(b"".join(cmds))
        self.pump()
        return self.s.take_client()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ns():
    return uniq("sr")


def test_skip_then_refused_then_reads_stay_paired(server, ns):
    d = direct(server)
    d.set(f"{ns}:a", "va")
    d.set(f"{ns}:b", "vb")
    live = Live(server, route_for(server, ns))
    out = live.send(c("CLIENT", "REPLY", "SKIP"), c("FLUSHALL"), c("GET", "a"), c("GET", "b"))
    assert out == b"$2\r\nva\r\n$2\r\nvb\r\n"  # as Redis gives it for SKIP + an error + two GETs
    live.close()


def test_reply_off_then_reset_answers_reset(server, ns):
    live = Live(server, route_for(server, ns))
    assert live.send(c("CLIENT", "REPLY", "OFF"), c("SET", "k", "v"), c("RESET"), c("PING")) == \
        b"+RESET\r\n+PONG\r\n"
    assert direct(server).get(f"{ns}:k") == b"v"
    live.close()


def test_replication_commands_refused_and_replies_stay_paired(server, ns):
    direct(server).set(f"{ns}:k", "v")
    live = Live(server, route_for(server, ns))
    out = live.send(c("REPLCONF", "ACK", "0"), c("GET", "k"), c("SYNC"), c("PSYNC", "?", "-1"), c("GET", "k"))
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"-ERR command 'REPLCONF' is refused by the proxy on every route")
    assert lines[1:3] == [b"$1", b"v"]
    assert lines[3].startswith(b"-ERR command 'SYNC' is refused") and lines[4].startswith(b"-ERR command 'PSYNC'")
    assert lines[5:7] == [b"$1", b"v"]
    live.close()


def test_select_in_aborted_multi_changes_nothing(server, ns):
    other = DbTarget(3, Keyspace("add", b"reports-" + ns.encode(), b":", "r"))
    live = Live(server, route_for(server, ns, db=2, databases={1: other}))
    watcher = direct(server, db=2)
    assert live.send(c("WATCH", "w")) == b"+OK\r\n"
    watcher.set(f"{ns}:w", "changed")
    out = live.send(c("MULTI"), c("SELECT", "1"), c("EXEC"))
    assert out == b"+OK\r\n+QUEUED\r\n*-1\r\n"  # aborted by WATCH, as Redis answers
    assert live.send(c("SET", "x", "v")) == b"+OK\r\n"
    assert direct(server, db=2).get(f"{ns}:x") == b"v"  # the route's db and namespace
    assert direct(server, db=3).get(f"reports-{ns}:x") is None
    # and a SELECT that runs does switch, on EXEC's confirmation
    assert live.send(c("MULTI"), c("SELECT", "1"), c("SET", "y", "w"), c("EXEC"), c("SET", "z", "1")) == \
        b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n+OK\r\n"
    assert direct(server, db=3).get(f"reports-{ns}:y") == b"w"
    assert direct(server, db=3).get(f"reports-{ns}:z") == b"1"
    live.close()


def test_select_the_server_rejects_changes_nothing(server, ns):
    bad = DbTarget(999, Keyspace("add", b"bad-" + ns.encode(), b":", "r"))
    live = Live(server, route_for(server, ns, db=2, databases={5: bad}))
    out = live.send(c("SELECT", "5"), c("SET", "a", "1"))
    assert out.startswith(b"-ERR") and out.endswith(b"+OK\r\n")
    assert direct(server, db=2).get(f"{ns}:a") == b"1"
    # inside MULTI it is refused before EXEC: later queued commands would be rewritten for it
    out = live.send(c("MULTI"), c("SELECT", "5"), c("SET", "b", "1"), c("EXEC"), c("SET", "c", "1"))
    assert out.startswith(b"+OK\r\n-ERR SELECT 5 inside MULTI is refused")
    assert out.endswith(b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n+OK\r\n")
    assert direct(server, db=2).get(f"{ns}:b") is None and direct(server, db=2).get(f"{ns}:c") == b"1"
    live.close()


def test_hello_in_discarded_multi_keeps_the_protocol(server, ns):
    live = Live(server, route_for(server, ns))
    out = live.send(c("MULTI"), c("HELLO", "3"), c("DISCARD"), c("GET", "nothing"))
    assert out == b"+OK\r\n+QUEUED\r\n+OK\r\n$-1\r\n"  # RESP2 nil: the protocol did not change
    assert live.s.proto == 2
    out = live.send(c("MULTI"), c("HELLO", "3"), c("EXEC"), c("GET", "nothing"))
    assert out.endswith(b"_\r\n") and live.s.proto == 3  # RESP3 null after EXEC ran HELLO 3
    live.close()


def test_reset_on_a_password_route_logs_in_again(server, ns):
    pw = start_server(server.kind)
    try:
        direct(pw).config_set("requirepass", "s3cret")
        live = Live(pw, route_for(pw, ns, db=5, password="s3cret"))
        assert live.send(c("SELECT", "0"), c("RESET"), c("SET", "a", "1"), c("AUTH", "s3cret"),
                         c("SET", "b", "1")) == b"+OK\r\n+RESET\r\n+OK\r\n+OK\r\n+OK\r\n"
        d = direct(pw, db=5, password="s3cret")
        assert d.get(f"{ns}:a") == b"1" and d.get(f"{ns}:b") == b"1"
        live.close()
    finally:
        pw.stop()


def test_owed_replies_before_a_malformed_request(server, ns):
    live = Live(server, route_for(server, ns))
    out = live.send(c("MULTI"), c("SET", "k", "v"), c("EXEC"), b"*1\r\n$x\r\n")
    assert out == b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n-ERR Protocol error: invalid bulk length\r\n"
    assert direct(server).get(f"{ns}:k") == b"v"
    assert live.s.close_when_done and not live.s.pending
    live.close()
