"""Unit tests of proxy.session.Session, driven with byte strings only.

Client bytes go in with client_data, what the proxy sends upstream comes out of
take_upstream; upstream reply bytes go in with upstream_data, what the client
gets comes out of take_client. No sockets, no servers.
"""

from __future__ import annotations

import pytest

from proxy.config import DbTarget, Limits, Route, Upstream
from proxy.keyspace import Keyspace
from proxy.resp import encode_command
from proxy.session import Session

OTHER = DbTarget(7, Keyspace("add", b"other", b":", "r"))


def ks(mode: str, ns: bytes = b"app") -> Keyspace:
    return Keyspace(mode, ns if mode != "none" else b"", b":", "r")


def make_route(mode: str = "add", databases=None, db: int = 0, password: str | None = None) -> Route:
    return Route("r", ("127.0.0.1", 1), Upstream("h", 1, db, None, password),
                 DbTarget(db, ks(mode)), databases if databases is not None else {1: OTHER})


def c(*args) -> bytes:
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


def enc(obj) -> bytes:
    """RESP2 reply bytes from Python values (str -> bulk, int -> integer, list -> array, None -> nil)."""
    if obj is None:
        return b"$-1\r\n"
    if isinstance(obj, int):
        return b":%d\r\n" % obj
    if isinstance(obj, str):
        obj = obj.encode()
    if isinstance(obj, bytes):
        return b"$%d\r\n%s\r\n" % (len(obj), obj)
    return b"*%d\r\n" % len(obj) + b"".join(enc(x) for x in obj)


def push(*items) -> bytes:
    return b">%d\r\n" % len(items) + b"".join(enc(x) for x in items)


class Drive:
    def __init__(self, route=None, answer_handshake: bool = True, **kw):
        self.s = Session(route or make_route(**kw))
        self.handshake = self.s.take_upstream()
        if answer_handshake:  # the server accepts the proxy's set-up (AUTH, SELECTs of the mapped dbs)
            self.s.upstream_data(b"+OK\r\n" * len(self.s.pending))
            assert self.s.take_client() == b"" and not self.s.pending

    def client(self, *cmds: bytes) -> bytes:
        self.s.client_data(b"".join(cmds))
        return self.s.take_upstream()

    def server(self, *replies: bytes) -> bytes:
        self.s.upstream_data(b"".join(replies))
        return self.s.take_client()

    def out(self) -> bytes:
        return self.s.take_client()


REFUSED_FLUSHALL = (b"-ERR command 'FLUSHALL' is refused on namespace 'app' of route r: "
                    b"it would delete every namespace and every db (a route without namespace passes it)\r\n")


# ------------------------------------------------------------------ ordering


def test_refusal_with_nothing_pending_is_immediate():
    d = Drive()
    assert d.client(c("FLUSHALL")) == b""
    assert d.out() == REFUSED_FLUSHALL


def test_local_refusals_keep_their_place_in_a_pipeline():
    d = Drive()
    up = d.client(c("GET", "a"), c("FLUSHALL"), c("GET", "b"), c("CONFIG", "GET", "x"), c("CONFIG", "SET", "y", "1"),
                  c("GET", "c"))
    assert up == c("GET", "app:a") + c("GET", "app:b") + c("GET", "app:c")
    assert d.out() == b""
    assert d.server(b"$1\r\n1\r\n") == b"$1\r\n1\r\n" + REFUSED_FLUSHALL
    out = d.server(b"$1\r\n2\r\n")
    assert out.startswith(b"$1\r\n2\r\n-ERR command 'CONFIG GET' is refused")
    assert out.count(b"\r\n-ERR command 'CONFIG") == 2 and out.index(b"CONFIG GET") < out.index(b"CONFIG SET")
    # replies split at odd places still come out whole and in order
    assert d.server(b"$1\r") == b""
    assert d.server(b"\n3\r\n") == b"$1\r\n3\r\n"
    assert not d.s.pending


def test_reply_bytes_pass_untouched():
    d = Drive()
    d.client(c("HGETALL", "h"))
    raw = b"*4\r\n$1\r\nf\r\n$5\r\napp:x\r\n$1\r\ng\r\n+h\r\n"
    assert d.server(raw) == raw


# ------------------------------------------------------------------ MULTI / EXEC


def test_multi_with_refused_command_becomes_discard_and_execabort():
    d = Drive(make_route("add", {}))  # no db map: no db probe before MULTI
    up = d.client(c("MULTI"), c("SET", "k", "v"), c("FLUSHALL"), c("GET", "k"), c("EXEC"))
    assert up == c("MULTI") + c("SET", "app:k", "v") + c("GET", "app:k") + c("DISCARD")
    out = d.server(b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"+OK\r\n")
    assert out == (b"+OK\r\n+QUEUED\r\n" + REFUSED_FLUSHALL + b"+QUEUED\r\n"
                   b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert d.s.tx is None and not d.s.pending


def test_refused_select_in_multi_restores_db():
    d = Drive()
    up = d.client(c("MULTI"), c("SELECT", "1"), c("SELECT", "9"), c("EXEC"))
    # before the first MULTI the mapped dbs are tried (then the current one again), so a
    # SELECT queued in MULTI can be checked against what the server accepts
    assert up == c("SELECT", "7") + c("SELECT", "0") + c("MULTI")
    assert d.server(b"+OK\r\n+OK\r\n") == b""
    # a SELECT queued in MULTI also waits for MULTI's +OK (a MULTI the server refused
    # would make it run at once)
    assert d.s.take_upstream() == b""
    assert d.server(b"+OK\r\n") == b"+OK\r\n"
    assert d.s.take_upstream() == c("SELECT", "7") + c("DISCARD")
    out = d.server(b"+QUEUED\r\n+OK\r\n")
    assert out == b"+QUEUED\r\n-ERR db 9 is not mapped on route r\r\n" \
                  b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    assert d.s.target == d.s.route.default
    assert d.client(c("GET", "k")) == c("GET", "app:k")


def test_exec_array_elements_transformed():
    d = Drive(make_route("add", {}))  # no db map: no db probe before MULTI
    up = d.client(c("MULTI"), c("BLPOP", "l", "0"), c("GET", "k"), c("KEYS", "*"), c("EXEC"))
    assert up == c("MULTI") + c("BLPOP", "app:l", "0") + c("GET", "app:k") + c("KEYS", "app:*") + c("EXEC")
    out = d.server(b"+OK\r\n", b"+QUEUED\r\n" * 3,
                   enc([["app:l", "app:v"], "app:x", ["app:a", "app:b"]]))
    assert out == b"+OK\r\n" + b"+QUEUED\r\n" * 3 + enc([["l", "app:v"], "app:x", ["a", "b"]])


def test_exec_nil_and_error_pass():
    d = Drive(make_route("add", {}))  # no db map: no db probe before MULTI
    d.client(c("MULTI"), c("BLPOP", "l", "0"), c("EXEC"))
    assert d.server(b"+OK\r\n+QUEUED\r\n*-1\r\n") == b"+OK\r\n+QUEUED\r\n*-1\r\n"
    d.client(c("MULTI"), c("BLPOP", "l", "0"), c("EXEC"))
    err = b"-EXECABORT Transaction discarded\r\n"
    assert d.server(b"+OK\r\n+QUEUED\r\n" + err) == b"+OK\r\n+QUEUED\r\n" + err


def test_emulated_command_refused_inside_multi():
    d = Drive(make_route("add", {}))  # no db map: no db probe before MULTI
    d.client(c("MULTI"), c("DBSIZE"), c("EXEC"))
    out = d.server(b"+OK\r\n", b"+OK\r\n")
    assert b"'DBSIZE' is refused" in out and b"cannot run inside MULTI" in out
    assert out.endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n")


# ------------------------------------------------------------------ pub/sub RESP2


def test_resp2_subscribe_confirmations_counted_with_message_between():
    d = Drive()
    up = d.client(c("SUBSCRIBE", "a", "b"), c("FLUSHALL"), c("PING"))
    assert up == c("SUBSCRIBE", "app:a", "app:b") + c("PING")
    assert d.out() == b""
    out = d.server(enc(["subscribe", "app:a", 1]))
    assert out == enc(["subscribe", "a", 1])
    # a message between the confirmations pops nothing
    out = d.server(enc(["message", "app:a", "hello"]))
    assert out == enc(["message", "a", "hello"])
    assert len(d.s.pending) == 3
    # the second confirmation completes SUBSCRIBE: the queued refusal follows it
    out = d.server(enc(["subscribe", "app:b", 2]))
    assert out == enc(["subscribe", "b", 2]) + REFUSED_FLUSHALL
    # PING in subscribed RESP2 mode answers with an array that is a reply, not a message
    assert d.server(enc(["pong", ""])) == enc(["pong", ""])
    assert not d.s.pending and d.s.sub_waiting == 0
    # messages from other namespaces are dropped
    assert d.server(enc(["message", "zzz:a", "x"])) == b""
    assert d.s.subs["channel"] == {b"app:a", b"app:b"}


def test_resp2_unsubscribe_without_args():
    d = Drive()
    d.client(c("SUBSCRIBE", "a", "b"))
    d.server(enc(["subscribe", "app:a", 1]), enc(["subscribe", "app:b", 2]))
    up = d.client(c("UNSUBSCRIBE"), c("GET", "k"))
    assert up == c("UNSUBSCRIBE") + c("GET", "app:k")
    assert d.server(enc(["unsubscribe", "app:b", 1])) == enc(["unsubscribe", "b", 1])
    assert len(d.s.pending) == 2
    assert d.server(enc(["unsubscribe", "app:a", 0])) == enc(["unsubscribe", "a", 0])
    assert len(d.s.pending) == 1
    assert d.server(b"$1\r\nv\r\n") == b"$1\r\nv\r\n"
    assert not d.s.pending and not d.s.subs["channel"]


def test_resp2_unsubscribe_when_not_subscribed():
    d = Drive()
    d.client(c("UNSUBSCRIBE"), c("GET", "k"))
    assert d.server(enc(["unsubscribe", None, 0])) == enc(["unsubscribe", None, 0])
    assert d.server(b"$1\r\nv\r\n") == b"$1\r\nv\r\n"
    assert not d.s.pending


def test_resp2_psubscribe_pattern_and_pmessage():
    d = Drive()
    assert d.client(c("PSUBSCRIBE", "n*")) == c("PSUBSCRIBE", "app:n*")
    assert d.server(enc(["psubscribe", "app:n*", 1])) == enc(["psubscribe", "n*", 1])
    out = d.server(enc(["pmessage", "app:n*", "app:news", "hi"]))
    assert out == enc(["pmessage", "n*", "news", "hi"])


def test_subscribe_error_reply_pops_the_entry():
    d = Drive()
    d.client(c("SUBSCRIBE", "a"), c("GET", "k"))
    err = b"-NOPERM this user has no permissions to access one of the channels\r\n"
    assert d.server(err) == err
    assert d.s.sub_waiting == 0
    assert d.server(b"$1\r\nv\r\n") == b"$1\r\nv\r\n"


# ------------------------------------------------------------------ RESP3


def hello3(d: Drive) -> None:
    assert d.client(c("HELLO", "3")) == c("HELLO", "3")
    d.server(b"%1\r\n$5\r\nproto\r\n:3\r\n")
    assert d.s.proto == 3


def test_hello_3_switches_proto_and_error_does_not():
    d = Drive()
    d.client(c("HELLO", "3"))
    assert d.server(b"-NOPROTO unsupported protocol version\r\n") == b"-NOPROTO unsupported protocol version\r\n"
    assert d.s.proto == 2
    hello3(d)
    d.client(c("HELLO", "2"))
    d.server(enc(["proto", 2]))
    assert d.s.proto == 2


def test_resp3_push_does_not_pop_pending():
    d = Drive()
    hello3(d)
    d.client(c("SUBSCRIBE", "ch"))
    assert d.server(push("subscribe", "app:ch", 1)) == push("subscribe", "ch", 1)
    assert not d.s.pending
    d.client(c("GET", "k"))
    out = d.server(push("message", "app:ch", "hi"))
    assert out == push("message", "ch", "hi")
    assert len(d.s.pending) == 1
    # in RESP3 an array reply is a reply, even while subscribed
    out = d.server(b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n")
    assert out == b"*2\r\n$7\r\nmessage\r\n$1\r\nx\r\n"
    assert not d.s.pending


def test_resp3_invalidation_push():
    d = Drive()
    hello3(d)
    d.client(c("GET", "k"))
    out = d.server(push("invalidate", ["app:k", "zzz:k"]), b"$1\r\nv\r\n")
    assert out == push("invalidate", ["k"]) + b"$1\r\nv\r\n"


# ------------------------------------------------------------------ CLIENT REPLY


def test_client_reply_off_skip_on():
    # CLIENT REPLY is carried out by the proxy and never sent: every request sent
    # upstream gets its reply, which the proxy drops when the client asked so.
    d = Drive()
    up = d.client(c("CLIENT", "REPLY", "OFF"), c("SET", "k", "v"), c("FLUSHALL"))
    assert up == c("SET", "app:k", "v")
    assert len(d.s.pending) == 1 and d.out() == b""          # not even the refusal
    assert d.server(b"+OK\r\n") == b""                      # SET's reply, dropped
    up = d.client(c("CLIENT", "REPLY", "ON"), c("GET", "k"))
    assert up == c("GET", "app:k")
    assert d.server(b"$1\r\nv\r\n") == b"+OK\r\n$1\r\nv\r\n"
    # SKIP: the next command's reply is skipped, the one after is not
    up = d.client(c("CLIENT", "REPLY", "SKIP"), c("SET", "k", "v"), c("GET", "k"))
    assert up == c("SET", "app:k", "v") + c("GET", "app:k")
    assert len(d.s.pending) == 2
    assert d.server(b"+OK\r\n$1\r\nv\r\n") == b"$1\r\nv\r\n"
    # SKIP applies to a local refusal too, and the replies after it stay paired
    up = d.client(c("CLIENT", "REPLY", "SKIP"), c("FLUSHALL"), c("GET", "a"), c("GET", "b"))
    assert up == c("GET", "app:a") + c("GET", "app:b")
    assert d.out() == b""
    assert d.server(b"$1\r\na\r\n$1\r\nb\r\n") == b"$1\r\na\r\n$1\r\nb\r\n"
    assert not d.s.pending


def test_client_reply_off_then_reset_shows_reset():
    d = Drive(make_route("add", {}))
    up = d.client(c("CLIENT", "REPLY", "OFF"), c("RESET"), c("PING"))
    assert up == c("RESET")  # PING waits for RESET's confirmation
    assert d.server(b"+RESET\r\n") == b"+RESET\r\n"
    assert d.s.take_upstream() == c("PING")
    assert d.server(b"+PONG\r\n") == b"+PONG\r\n"


def test_client_reply_inside_multi_is_refused():
    d = Drive(make_route("add", {}))  # no db map: no db probe before MULTI
    up = d.client(c("MULTI"), c("CLIENT", "REPLY", "OFF"), c("SET", "k", "v"), c("EXEC"))
    assert up == c("MULTI") + c("SET", "app:k", "v") + c("DISCARD")
    out = d.server(b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert out.startswith(b"+OK\r\n-ERR CLIENT REPLY inside MULTI is refused")
    assert out.endswith(b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n")


# ------------------------------------------------------------------ emulations


def scan_cmd(cursor: str, ns: str = "app") -> bytes:
    return c("SCAN", cursor, "MATCH", ns + ":*", "COUNT", "1000")


def test_dbsize_emulated_by_scan_and_held_requests():
    d = Drive()
    up = d.client(c("DBSIZE"), c("GET", "z"), c("FLUSHALL"))
    assert up == scan_cmd("0")
    assert d.out() == b""
    assert d.server(enc(["12", ["app:a", "app:b"]])) == b""
    assert d.s.take_upstream() == scan_cmd("12")
    out = d.server(enc(["0", ["app:c"]]))
    assert out == b":3\r\n"
    # the held requests run now, in order: GET is sent, the refusal waits for its reply
    assert d.s.take_upstream() == c("GET", "app:z")
    assert d.server(b"$-1\r\n") == b"$-1\r\n" + REFUSED_FLUSHALL
    assert not d.s.pending and not d.s.held


def test_flushdb_emulated_deletes_in_batches():
    d = Drive()
    assert d.client(c("FLUSHDB")) == scan_cmd("0")
    d.server(enc(["5", ["app:a", "app:b"]]))
    assert d.s.take_upstream() == c("DEL", "app:a", "app:b")
    d.server(b":2\r\n")
    assert d.s.take_upstream() == scan_cmd("5")
    d.server(enc(["9", []]))
    assert d.s.take_upstream() == scan_cmd("9")
    assert d.server(enc(["0", ["app:c"]])) == b""
    assert d.s.take_upstream() == c("DEL", "app:c")
    assert d.server(b":1\r\n") == b"+OK\r\n"
    assert d.s.take_upstream() == b""


def test_flushdb_async_uses_unlink_and_errors_surface():
    d = Drive()
    d.client(c("FLUSHDB", "ASYNC"))
    d.server(enc(["0", ["app:a"]]))
    assert d.s.take_upstream() == c("UNLINK", "app:a")
    assert d.server(b"-READONLY You can't write against a read only replica.\r\n") == \
        b"-READONLY You can't write against a read only replica.\r\n"
    d.client(c("FLUSHDB", "LATER"))
    assert d.out() == b"-ERR syntax error\r\n"


def test_randomkey_emulated():
    d = Drive()
    assert d.client(c("RANDOMKEY")) == scan_cmd("0")
    d.server(enc(["3", []]))
    assert d.s.take_upstream() == scan_cmd("3")
    assert d.server(enc(["0", ["app:only"]])) == b"$4\r\nonly\r\n"
    d.client(c("RANDOMKEY"))
    assert d.server(enc(["0", []])) == b"$-1\r\n"


def test_randomkey_empty_resp3_is_null():
    d = Drive()
    hello3(d)
    d.client(c("RANDOMKEY"))
    assert d.server(enc(["0", []])) == b"_\r\n"


def test_emulation_in_db_with_other_namespace():
    d = Drive()
    d.client(c("SELECT", "1"))
    d.server(b"+OK\r\n")
    assert d.client(c("DBSIZE")) == scan_cmd("0", "other")
    assert d.server(enc(["0", ["other:a"]])) == b":1\r\n"


def test_emulation_with_client_reply_off():
    d = Drive()
    d.client(c("CLIENT", "REPLY", "OFF"))
    up = d.client(c("DBSIZE"))
    assert up == scan_cmd("0")  # nothing to switch on the server: replies are the proxy's to drop
    assert d.server(enc(["0", []])) == b""
    assert not d.s.pending and d.s.emu is None


def test_strip_mode_dbsize_is_the_real_command():
    d = Drive(make_route("strip", {}))
    assert d.client(c("DBSIZE")) == c("DBSIZE")
    assert d.server(b":5\r\n") == b":5\r\n"
    assert d.client(c("RANDOMKEY")) == c("RANDOMKEY")
    assert d.server(b"$1\r\nk\r\n") == b"$5\r\napp:k\r\n"


# ------------------------------------------------------------------ faults


def test_upstream_lost_order_exact():
    d = Drive()
    d.client(c("GET", "a"), c("FLUSHALL"), c("GET", "b"), c("DBSIZE"), c("GET", "held"))
    first = d.server(b"$1\r\n1\r\n")
    assert first == b"$1\r\n1\r\n" + REFUSED_FLUSHALL
    d.s.upstream_lost("connection reset")
    err = b"-ERR upstream unavailable (connection reset)\r\n"
    # GET b, then DBSIZE (its emulation), then the held GET
    assert d.out() == err * 3
    assert d.s.take_upstream() == b""
    assert (d.s.close_when_done and not d.s.pending)
    # later requests are not sent
    d.client(c("GET", "x"))
    assert d.s.take_upstream() == b""


def test_upstream_lost_keeps_local_entries_in_place():
    d = Drive()
    d.client(c("GET", "a"), c("FLUSHALL"), c("GET", "b"))
    d.s.upstream_lost("gone")
    err = b"-ERR upstream unavailable (gone)\r\n"
    assert d.out() == err + REFUSED_FLUSHALL + err
    assert (d.s.close_when_done and not d.s.pending)


def test_upstream_garbage_is_upstream_lost():
    d = Drive()
    d.client(c("GET", "a"))
    d.s.upstream_data(b"?what\r\n")
    out = d.out()
    assert out.startswith(b"-ERR upstream unavailable (upstream sent bytes that are not RESP")
    assert (d.s.close_when_done and not d.s.pending)


def test_protocol_error_then_close():
    d = Drive()
    up = d.client(c("GET", "a"), b"*1\r\n$x\r\n", c("GET", "never"))
    assert up == c("GET", "app:a")
    assert d.out() == b""
    assert not (d.s.close_when_done and not d.s.pending)  # a reply is still owed
    out = d.server(b"$1\r\nv\r\n")
    assert out.startswith(b"$1\r\nv\r\n-ERR Protocol error: ") and out.endswith(b"length\r\n")
    assert out.count(b"\r\n") == 3
    assert (d.s.close_when_done and not d.s.pending)
    d.client(c("GET", "b"))
    assert d.s.take_upstream() == b""


def test_protocol_error_with_reply_off_still_answers():
    d = Drive()
    d.client(c("CLIENT", "REPLY", "OFF"))
    d.client(b'SET "unbalanced\r\n')
    assert d.out().startswith(b"-ERR Protocol error: unbalanced quotes")
    assert (d.s.close_when_done and not d.s.pending)


def test_quit():
    d = Drive()
    d.client(c("GET", "a"), c("QUIT"), c("GET", "b"))
    assert d.server(b"$1\r\nv\r\n") == b"$1\r\nv\r\n+OK\r\n"
    assert (d.s.close_when_done and not d.s.pending)


# ------------------------------------------------------------------ connection state


def test_handshake_auth_and_select():
    d = Drive(make_route("add", {}, db=3, password="s3cret"), answer_handshake=False)
    assert d.handshake == c("AUTH", "s3cret") + c("SELECT", "3")
    d.client(c("GET", "k"))
    assert d.server(b"+OK\r\n+OK\r\n$1\r\nv\r\n") == b"$1\r\nv\r\n"


def test_handshake_refused():
    d = Drive(make_route("add", {}, password="bad"), answer_handshake=False)
    d.client(c("GET", "k"))
    out = d.server(b"-WRONGPASS invalid username-password pair\r\n")
    assert out == b"-ERR upstream unavailable (upstream refused the proxy's handshake: " \
                  b"WRONGPASS invalid username-password pair)\r\n"
    assert (d.s.close_when_done and not d.s.pending)


def test_select_mapping():
    d = Drive()
    assert d.client(c("SELECT", "1")) == c("SELECT", "7")
    assert d.server(b"+OK\r\n") == b"+OK\r\n"
    assert d.client(c("GET", "k")) == c("GET", "other:k")
    d.server(b"$-1\r\n")
    d.client(c("SELECT", "5"))
    assert d.out() == b"-ERR db 5 is not mapped on route r\r\n"
    assert d.client(c("GET", "k")) == c("GET", "other:k")
    assert d.client(c("SELECT", "0")) == c("SELECT", "0")
    d.server(b"$-1\r\n+OK\r\n")
    assert d.client(c("GET", "k")) == c("GET", "app:k")


def test_reset_reselects_route_db():
    d = Drive(make_route("add", {1: OTHER}, db=3), answer_handshake=False)
    assert d.handshake == c("SELECT", "3")
    d.server(b"+OK\r\n")
    d.client(c("SELECT", "1"))
    d.server(b"+OK\r\n")
    hello3(d)
    d.client(c("SUBSCRIBE", "ch"))
    d.server(push("subscribe", "other:ch", 1))
    assert d.client(c("RESET")) == c("RESET") + c("SELECT", "3")
    assert d.server(b"+RESET\r\n", b"+OK\r\n") == b"+RESET\r\n"
    assert d.s.proto == 2 and not d.s.subs["channel"] and not d.s.pending
    assert d.client(c("GET", "k")) == c("GET", "app:k")


def test_monitor_emulated_on_tenant_route():
    # deliberate change: a tenant route's MONITOR shows the route's own traffic (test_policy.py)
    d = Drive()
    assert d.client(c("MONITOR")) == b""
    assert d.out() == b"+OK\r\n"
    assert d.s.local_monitor and d.s in d.s.view.monitors


def test_monitor_on_plain_route():
    d = Drive(make_route("none", {}))
    assert d.client(c("MONITOR")) == c("MONITOR")
    assert d.server(b"+OK\r\n") == b"+OK\r\n"
    line = b'+1700000000.1 [0 127.0.0.1:5] "GET" "k"\r\n'
    assert d.server(line * 2) == line * 2
    assert not d.s.pending


# ------------------------------------------------------------------ keyspace notifications


def test_keyspace_notifications_with_db_map():
    d = Drive()
    up = d.client(c("PSUBSCRIBE", "__keyspace@1__:*"), c("SUBSCRIBE", "__keyevent@1__:del"),
                  c("SUBSCRIBE", "__keyspace@0__:k"))
    assert up == (c("PSUBSCRIBE", "__keyspace@7__:other:*") + c("SUBSCRIBE", "__keyevent@7__:del")
                  + c("SUBSCRIBE", "__keyspace@0__:app:k"))
    out = d.server(enc(["psubscribe", "__keyspace@7__:other:*", 1]),
                   enc(["subscribe", "__keyevent@7__:del", 2]),
                   enc(["subscribe", "__keyspace@0__:app:k", 3]))
    assert out == (enc(["psubscribe", "__keyspace@1__:*", 1]) + enc(["subscribe", "__keyevent@1__:del", 2])
                   + enc(["subscribe", "__keyspace@0__:k", 3]))
    assert not d.s.pending
    out = d.server(enc(["pmessage", "__keyspace@7__:other:*", "__keyspace@7__:other:x", "set"]))
    assert out == enc(["pmessage", "__keyspace@1__:*", "__keyspace@1__:x", "set"])
    out = d.server(enc(["message", "__keyevent@7__:del", "other:x"]))
    assert out == enc(["message", "__keyevent@1__:del", "x"])
    # an event about a key outside the db's namespace is dropped
    assert d.server(enc(["message", "__keyevent@7__:del", "app:x"])) == b""
    out = d.server(enc(["message", "__keyspace@0__:app:k", "del"]))
    assert out == enc(["message", "__keyspace@0__:k", "del"])


def test_keyspace_notification_unmapped_db_refused():
    d = Drive()
    d.client(c("SUBSCRIBE", "__keyspace@4__:k"))
    assert d.out() == b"-ERR db 4 is not mapped on route r\r\n"
    assert not d.s.pending and d.s.sub_waiting == 0


def test_keyspace_wildcard_db_pattern_means_current_db():
    d = Drive()
    d.client(c("SELECT", "1"))
    d.server(b"+OK\r\n")
    assert d.client(c("PSUBSCRIBE", "__keyspace@*__:*")) == c("PSUBSCRIBE", "__keyspace@7__:other:*")
    out = d.server(enc(["psubscribe", "__keyspace@7__:other:*", 1]))
    assert out == enc(["psubscribe", "__keyspace@*__:*", 1])
    out = d.server(enc(["pmessage", "__keyspace@7__:other:*", "__keyspace@7__:other:k", "set"]))
    assert out == enc(["pmessage", "__keyspace@*__:*", "__keyspace@1__:k", "set"])


def test_resp2_array_reply_before_subscribe_is_not_a_message():
    # LRANGE pipelined before SUBSCRIBE may answer ["message", x, y]: it is LRANGE's reply.
    d = Drive()
    d.client(c("LRANGE", "l", "0", "-1"), c("SUBSCRIBE", "a"), c("FLUSHALL"))
    looks_like = enc(["message", "x", "y"])
    assert d.server(looks_like) == looks_like
    assert d.server(enc(["subscribe", "app:a", 1])) == enc(["subscribe", "a", 1]) + REFUSED_FLUSHALL
    assert not d.s.pending and d.s.sub_waiting == 0
    d.client(c("UNSUBSCRIBE"), c("LRANGE", "l", "0", "-1"))
    d.server(enc(["unsubscribe", "app:a", 0]))
    looks_like = enc(["subscribe", "x", 1])
    assert d.server(looks_like) == looks_like
    assert not d.s.pending and not d.s.subs["channel"]


# ---------------------------------------------------------------- shared upstream connections

def shared_replies(s: Session, *replies: bytes) -> bytes:
    """Replies as a SharedLink hands them over: one framed reply at a time."""
    for r in replies:
        s.shared_reply(r, r[0])
    return s.take_client()


def test_shared_session_sends_no_handshake_and_plain_commands_stay_shared():
    s = Session(make_route(db=3, password="pw"), shared=True)
    assert s.take_upstream() == b""  # the link does AUTH/SELECT once for everyone
    s.client_data(c("SET", "k", "v") + c("CLIENT", "SETINFO", "LIB-NAME", "x") + c("GET", "k"))
    assert s.take_upstream() == c("SET", "app:k", "v") + c("CLIENT", "SETINFO", "LIB-NAME", "x") + c("GET", "app:k")
    assert s.owed_sent == 3 and s.shared and not s.need_dedicated


@pytest.mark.parametrize("cmd", [("MULTI",), ("WATCH", "k"), ("SELECT", "1"), ("BLPOP", "q", "0"),
                                 ("SUBSCRIBE", "ch"), ("HELLO", "3", "SETNAME", "n"), ("HELLO",),
                                 ("CLIENT", "NO-EVICT", "on")])
def test_stateful_command_moves_to_dedicated_after_shared_replies(cmd):
    # blocking_pool = 0: a blocking command moves too (with a pool it borrows; below)
    s = Session(make_route(db=3), shared=True, limits=Limits(blocking_pool=0))
    s.client_data(c("GET", "a") + c(*cmd) + c("GET", "b"))
    assert s.take_upstream() == c("GET", "app:a")  # the rest waits
    assert s.need_dedicated and not s.shared_quiet
    assert shared_replies(s, enc("1")) == enc("1")
    assert s.shared_quiet
    s.switch_to_dedicated()
    out = s.take_upstream()
    assert out.startswith(c("SELECT", "3"))  # the dedicated connection's own handshake
    if cmd[0] in ("SELECT", "HELLO", "MULTI"):
        # a state change (or the db probe before MULTI): what follows waits for the server
        assert not out.endswith(c("GET", "app:b")) and s.confirming
        s.upstream_data(b"+OK\r\n" + {"HELLO": b"%1\r\n$5\r\nproto\r\n:3\r\n", "SELECT": b"+OK\r\n",
                                       "MULTI": b"+OK\r\n+OK\r\n"}[cmd[0]])
        out = s.take_upstream()
    b = c("GET", "other:b") if cmd[0] == "SELECT" else c("GET", "app:b")  # SELECT 1 -> db 7, namespace other
    assert not s.shared and out.endswith(b)


def test_blocking_command_borrows_a_pooled_connection_in_order():
    s = Session(make_route(db=3), shared=True)
    s.client_data(c("GET", "a") + c("BLPOP", "q", "0") + c("GET", "b"))
    assert s.take_upstream() == c("GET", "app:a")  # the rest waits for GET a's reply
    assert s.need_borrow and not s.need_dedicated and not s.shared_quiet
    assert shared_replies(s, enc("1")) == enc("1")
    assert s.shared_quiet
    s.start_borrow()  # the shell lent a pooled connection: no handshake, it has its own
    assert s.take_upstream() == c("BLPOP", "app:q", "0")
    assert s.borrowing and not s.shared
    s.client_data(c("GET", "c"))
    assert s.take_upstream() == b""  # one request at a time on a pooled connection
    s.upstream_data(b"*2\r\n$5\r\napp:q\r\n$1\r\nv\r\n")
    assert s.take_client() == b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n" and not s.pending
    s.end_borrow()  # given back: the shared link again, the held requests in order
    assert s.shared and not s.borrowing
    assert s.take_upstream() == c("GET", "app:b") + c("GET", "app:c")


def test_blocking_command_inside_state_does_not_borrow():
    s = Session(make_route(db=3), shared=True)
    s.client_data(c("CLIENT", "REPLY", "SKIP") + c("BLPOP", "q", "0"))
    assert s.need_dedicated and not s.need_borrow


def test_plain_hello_moves_to_the_shared_link_of_its_protocol_in_order():
    s = Session(make_route(db=3), shared=True)
    s.client_data(c("GET", "a") + c("HELLO", "3") + c("GET", "b"))
    assert s.take_upstream() == c("GET", "app:a")  # the rest waits for GET a's reply
    assert s.need_link == 3 and not s.need_dedicated and not s.shared_quiet
    assert shared_replies(s, enc("1")) == enc("1")
    assert s.shared_quiet
    s.switch_link()  # the shell moved it to the RESP3 link
    assert s.shared and s.link_proto == 3 and s.need_link is None
    assert s.take_upstream() == c("HELLO", "3")  # no handshake: the link has its own
    hello = b"%1\r\n$5\r\nproto\r\n:3\r\n"
    assert shared_replies(s, hello) == hello
    assert s.take_upstream() == c("GET", "app:b")  # after HELLO's confirmation
    assert shared_replies(s, enc("2")) == enc("2")
    assert s.proto == 3
    # HELLO 3 again: already on that link, sent as it is
    s.client_data(c("HELLO", "3"))
    assert s.take_upstream() == c("HELLO", "3") and s.need_link is None
    shared_replies(s, hello)
    # WATCH later (a blocking command borrows a pooled connection instead): the dedicated
    # connection speaks RESP3 from its handshake on
    s.client_data(c("WATCH", "q"))
    assert s.need_dedicated and s.shared_quiet
    s.switch_to_dedicated()
    assert s.take_upstream() == c("HELLO", "3") + c("SELECT", "3") + c("WATCH", "app:q")


def test_a_refused_client_subcommand_stays_shared():
    s = Session(make_route(), shared=True)
    s.client_data(c("GET", "a") + c("CLIENT", "MAINT_NOTIFICATIONS", "ON") + c("GET", "b"))
    assert s.take_upstream() == c("GET", "app:a") + c("GET", "app:b")
    assert s.shared and not s.need_dedicated
    out = shared_replies(s, enc("1"), enc("2"))
    assert out.startswith(enc("1") + b"-ERR") and out.endswith(enc("2")) and b"client" in out.lower()


def test_push_frames_on_a_resp3_link_are_not_replies():
    s = Session(make_route(), shared=True)
    s.client_data(c("HELLO", "3"))
    s.switch_link()
    s.take_upstream()
    shared_replies(s, b"%0\r\n")
    s.client_data(c("GET", "a") + c("GET", "b"))
    push = b">2\r\n$4\r\nnote\r\n$1\r\nx\r\n"
    buf = enc("1") + push + enc("2")
    pos, m = s.shared_run(buf, 0, 2)
    assert (pos, m) == (len(enc("1")), 1)  # stops at the push; the link skips it
    assert s.shared_run(buf, pos + len(push), 1) == (len(buf), 1)
    assert s.take_client() == enc("1") + enc("2")


def test_emulation_then_dedicated_keeps_request_order():
    # FLUSHDB is emulated (requests held), then a blocking command needs a dedicated
    # connection (blocking_pool = 0): the requests after it must not overtake it.
    s = Session(make_route(), shared=True, limits=Limits(blocking_pool=0))
    s.client_data(c("FLUSHDB") + c("GET", "a") + c("BLPOP", "q", "1") + c("GET", "b"))
    scan = s.take_upstream()
    assert scan == c("SCAN", "0", "MATCH", "app:*", "COUNT", "1000")
    assert shared_replies(s, enc(["0", []])) == b"+OK\r\n"
    assert s.take_upstream() == c("GET", "app:a")
    assert [a[0] for a in s.held] == [b"BLPOP", b"GET"]
    assert shared_replies(s, enc("x")) == enc("x")
    s.switch_to_dedicated()
    assert s.take_upstream() == c("BLPOP", "app:q", "1") + c("GET", "app:b")


def test_deep_pipeline_moves_to_dedicated():
    from proxy.session import SHARED_MAX_OWED
    s = Session(make_route(), shared=True)
    s.client_data(c("GET", "k") * (SHARED_MAX_OWED + 10))
    assert s.take_upstream() == c("GET", "app:k") * SHARED_MAX_OWED
    assert s.need_dedicated and len(s.held) == 10


def test_shared_run_passes_plain_replies_as_one_slice_and_stops_at_a_transform():
    s = Session(make_route(), shared=True)
    s.client_data(c("GET", "a") + c("GET", "b") + c("KEYS", "*") + c("GET", "c"))
    s.take_upstream()
    buf = enc("1") + enc("2") + enc(["app:x"]) + enc("3")
    pos, m = s.shared_run(buf, 0, 10)
    assert m == 2 and pos == len(enc("1") + enc("2"))        # stops before KEYS (a transform)
    assert s.take_client() == enc("1") + enc("2")
    s.shared_reply(enc(["app:x"]), ord("*"))
    pos2, m2 = s.shared_run(buf, pos + len(enc(["app:x"])), 1)  # the limit is the run's length
    assert m2 == 1 and pos2 == len(buf)
    assert s.take_client() == enc(["x"]) + enc("3")
    assert not s.pending
    # an incomplete reply is left for the next read
    s.client_data(c("GET", "d"))
    assert s.shared_run(b"$5\r\nhel", 0, 1) == (0, 0)


def test_refusals_are_logged_at_info_and_rate_limited(caplog):
    import logging
    from proxy.stats import REFUSAL_LOG_BURST
    d = Drive()
    with caplog.at_level(logging.INFO, logger="keyspace-proxy"):
        d.client(*[c("FLUSHALL")] * (REFUSAL_LOG_BURST + 5), c("CONFIG", "GET", "x"))
    lines = [r for r in caplog.records if getattr(r, "event", None) == "refused"]
    assert len(lines) == REFUSAL_LOG_BURST  # the rest of the window stays quiet
    first = lines[0]
    assert first.levelno == logging.INFO and first.route == "r" and first.command == "flushall"
    assert "route r: refused FLUSHALL: ERR command 'FLUSHALL' is refused on namespace 'app'" in first.getMessage()
    assert d.s.stats.errors["refused"] == REFUSAL_LOG_BURST + 6  # every refusal is counted
    # the next window says how many went unlogged
    d.s.stats._refusal_log.window -= 60
    with caplog.at_level(logging.INFO, logger="keyspace-proxy"):
        caplog.clear()
        d.client(c("FLUSHALL"))
    assert "(6 more refusals not logged)" in caplog.records[-1].getMessage()


# ---------------------------------------------------------------- issue 16: named clients and transactions share


def test_client_name_is_held_by_the_proxy_on_a_shared_link():
    s = Session(make_route(db=3), shared=True)
    s.client_data(c("CLIENT", "SETNAME", "worker-1") + c("GET", "a") + c("CLIENT", "GETNAME"))
    assert s.take_upstream() == c("GET", "app:a")  # the name never reaches the shared connection
    assert s.shared and not s.need_dedicated
    assert shared_replies(s, enc("1")) == b"+OK\r\n" + enc("1") + enc("worker-1")
    s.client_data(c("CLIENT", "SETNAME", "has space"))
    assert s.take_client() == b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    s.client_data(c("CLIENT", "SETNAME", "") + c("CLIENT", "GETNAME"))
    assert s.take_client() == b"+OK\r\n$-1\r\n"
    # a later move to a connection of its own takes the name along
    # (WATCH; a blocking command borrows a pooled connection, and the name stays here)
    s.client_data(c("CLIENT", "SETNAME", "w2") + c("WATCH", "q"))
    assert s.take_client() == b"+OK\r\n" and s.need_dedicated
    s.switch_to_dedicated()
    assert s.take_upstream() == c("SELECT", "3") + c("CLIENT", "SETNAME", "w2") + c("WATCH", "app:q")


def test_a_whole_multi_block_goes_to_the_shared_link_in_one_piece():
    s = Session(make_route(db=3), shared=True)
    block = c("MULTI") + c("SADD", "queues", "default") + c("LPUSH", "queue:default", "job") + c("EXEC")
    s.client_data(c("GET", "a") + block + c("GET", "b"))
    assert s.take_upstream() == (c("GET", "app:a") + c("MULTI") + c("SADD", "app:queues", "default")
                                 + c("LPUSH", "app:queue:default", "job") + c("EXEC") + c("GET", "app:b"))
    assert s.shared and not s.need_dedicated and s.tx is None
    out = shared_replies(s, enc("1"), b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*2\r\n:1\r\n:1\r\n", enc("2"))
    assert out == enc("1") + b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n" + enc("2")
    assert not s.pending


def test_a_shared_multi_block_with_a_refused_command_ends_in_execabort():
    s = Session(make_route(), shared=True)
    s.client_data(c("MULTI") + c("SET", "k", "v") + c("FLUSHALL") + c("EXEC"))
    assert s.take_upstream() == c("MULTI") + c("SET", "app:k", "v") + c("DISCARD")
    out = shared_replies(s, b"+OK\r\n", b"+QUEUED\r\n", b"+OK\r\n")
    assert out.startswith(b"+OK\r\n+QUEUED\r\n-ERR command 'FLUSHALL' is refused")
    assert out.endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    assert s.shared and not s.need_dedicated


@pytest.mark.parametrize("sent, replayed", [
    # the rest of the block is not here yet (typed, or split over reads)
    (c("MULTI") + c("SET", "k", "v"), c("MULTI") + c("SET", "app:k", "v")),
    # WATCH pins
    (c("WATCH", "k") + c("MULTI") + c("SET", "k", "v") + c("EXEC"),
     c("WATCH", "app:k") + c("MULTI") + c("SET", "app:k", "v") + c("EXEC")),
    # connection state inside the block (GET b then waits for EXEC's confirmation of the name)
    (c("MULTI") + c("CLIENT", "SETNAME", "x") + c("EXEC"), c("MULTI") + c("CLIENT", "SETNAME", "x") + c("EXEC")),
])
def test_a_multi_block_that_cannot_share_moves_in_order(sent, replayed):
    waits = b"SETNAME" in sent
    s = Session(make_route(databases={}), shared=True)
    s.client_data(c("GET", "a") + sent + c("GET", "b"))
    assert s.take_upstream() == c("GET", "app:a")
    assert s.need_dedicated
    shared_replies(s, enc("1"))
    s.switch_to_dedicated()
    if waits:  # CLIENT SETNAME waits for MULTI's +OK, GET b for EXEC's confirmation of the name
        assert s.take_upstream() == c("MULTI")
        s.upstream_data(b"+OK\r\n")
        assert s.take_upstream() == c("CLIENT", "SETNAME", "x") + c("EXEC")
        s.upstream_data(b"+QUEUED\r\n*1\r\n+OK\r\n")
        assert s.client_name == b"x" and s.take_upstream() == c("GET", "app:b")
    else:
        assert s.take_upstream() == replayed + c("GET", "app:b")


def test_a_select_queued_behind_a_multi_the_server_refuses_changes_nothing():
    # RESP2 subscriber: the server refuses MULTI; the SELECT after it must not be taken
    # as queued (the server would run it at once), so it waits for MULTI's answer
    d = Drive(make_route("add", {}))
    d.client(c("SUBSCRIBE", "ch"))
    d.server(enc(["subscribe", "app:ch", 1]))
    up = d.client(c("MULTI"), c("SELECT", "0"), c("PING"))
    assert up == c("MULTI")
    err = b"-ERR Can't execute 'multi': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed\r\n"
    assert d.server(err) == err
    assert d.s.tx is None
    assert d.s.take_upstream() == c("SELECT", "0")  # a plain SELECT now, waiting for its answer
    err = b"-ERR Can't execute 'select': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed\r\n"
    assert d.server(err) == err
    assert d.s.take_upstream() == c("PING")


def test_a_bug_in_a_handler_costs_that_client_alone(monkeypatch, caplog):
    """An exception while handling a request (a proxy bug) answers that request with an
    error naming it internal, after the replies owed before it, closes the connection, is
    counted and logged with its traceback; nothing after it is sent upstream."""
    d = Drive()

    def boom(args, show):
        raise KeyError("bug")
    monkeypatch.setattr(d.s, "_cmd_multi", boom)
    sent = d.client(c("GET", "a"), c("MULTI"), c("SET", "b", "1"))
    assert sent == c("GET", "app:a")
    d.s.upstream_data(enc("x"))
    assert d.s.take_client() == enc("x") + b"-ERR proxy internal error (KeyError); closing the connection\r\n"
    assert d.s.close_when_done and d.s.input_closed
    assert d.s.stats.errors["internal"] == 1
    assert "internal error handling MULTI" in caplog.text and "KeyError: 'bug'" in caplog.text


def test_a_shared_block_counts_a_command_past_the_plan_cache_once():
    """Past the plan cache's bound (1024 names as sent), a command in a MULTI block on a
    shared link is one request: counted once in uncached_commands (the `other` of
    commands_total), not once when _shared_block looks at it and again when it is handled."""
    s = Session(make_route(), shared=True)
    for name in (b"MULTI", b"EXEC", b"GET"):
        s._plan(name)
    i = 0
    while len(s.plans) < 1024:
        s._plan(b"nosuch%d" % i)
        i += 1
    assert s.stats.uncached_commands == 0
    s.client_data(c("MULTI") + c("Get", "a") + c("EXEC"))
    assert s.take_upstream() == c("MULTI") + c("Get", "app:a") + c("EXEC")
    assert s.stats.uncached_commands == 1


@pytest.mark.parametrize("plain", [True, False])
def test_a_bug_inside_a_shared_block_sends_none_of_it(monkeypatch, plain):
    """A handler failing half-way through a MULTI block on a shared link (the Python
    path; `plain`: the block sent without transaction state, else with it): nothing of
    the block reaches the link (a MULTI left open there would queue other clients'
    commands); what came before it is sent and answered, then the error, then the close."""
    import proxy.session as session_mod
    monkeypatch.setattr(session_mod, "_rewrite_plain", None)
    s = Session(make_route(), shared=True)
    monkeypatch.setattr(s, "_plain_block", lambda multi, block: plain)
    where = "_pass_edge" if plain else "_cmd_exec"
    calls = []
    real = getattr(s, where)

    def fail_at_exec(*args):
        calls.append(args)
        if not plain or len(calls) == 2:  # EXEC: MULTI and the SADD are queued by now
            raise RuntimeError("bug")
        return real(*args)
    monkeypatch.setattr(s, where, fail_at_exec)
    s.client_data(c("GET", "a") + c("MULTI") + c("SADD", "q", "1") + c("EXEC"))
    assert s.take_upstream() == c("GET", "app:a")
    assert s.tx is None and s.tx_open is None
    s.upstream_data(enc("v"))
    assert s.take_client() == enc("v") + b"-ERR proxy internal error (RuntimeError); closing the connection\r\n"
    assert s.close_when_done and not s.pending
