"""The sans-IO part of spread routes over a cluster (proxy/spread.py): the node of each
request, splits and merges, the SCAN cursor, and the reorder queue. No servers here
(tests/test_cluster_spread.py runs it against real clusters)."""

from __future__ import annotations

import random

from proxy.cluster import key_slot
from proxy.resp import encode_command
from proxy.rules import default_rules
from proxy.spread import (CROSSSLOT, CURSOR_NODES, TO_EVERY, TO_HOME, TO_INDEX, TO_NODE, TO_SLOT, TO_TX, Mux,
                          Router,
                          encode_cursor, scan_reply)

RULES = default_rules()
A, B = b"x1", b"x2"   # two keys of different slots
assert key_slot(A) != key_slot(B)


def router() -> Router:
    return Router(RULES, "r1")


def dest(*args, in_tx=False, r=None):
    return (r or router()).dest([a if isinstance(a, bytes) else a.encode() for a in args], in_tx)


def test_keyed_commands_go_to_the_slot_of_their_keys():
    d = dest("SET", "{t}a", "1")
    assert d.local is None and [(w, a) for w, a, _ in d.parts] == [(TO_SLOT, key_slot(b"{t}a"))]
    assert d.parts[0][2] == encode_command([b"SET", b"{t}a", b"1"])
    assert dest("EVAL", "return 1", "0").parts[0][0] == TO_HOME   # no keys: any node
    assert dest("RENAME", A, B).local == CROSSSLOT
    assert dest("SINTERSTORE", "{t}d", "{t}a", "{t}b").parts[0][:2] == (TO_SLOT, key_slot(b"{t}a"))
    assert dest("SORT", "{t}a", "BY", "{t}w_*").parts[0][:2] == (TO_SLOT, key_slot(b"{t}a"))


def test_keyless_and_fan_out():
    assert dest("PING").parts[0][0] == TO_HOME
    assert dest("INFO").parts[0][0] == TO_HOME
    for cmd in (("SCRIPT", "LOAD", "return 1"), ("KEYS", "*"), ("DBSIZE",), ("FLUSHDB",), ("RANDOMKEY",)):
        assert dest(*cmd).parts[0][0] == TO_EVERY, cmd
    d = dest("HELLO", "3")
    assert d.parts[0][0] == TO_EVERY and d.state  # replayed on node connections opened later


def test_not_routed_is_refused_naming_command_route_and_why():
    for cmd, why in ((("WAIT", "0", "0"), "own writes"), (("CLIENT", "TRACKING", "on"), "invalidations"),
                     (("RESET",), "log out"), (("NOSUCHCMD",), "does not know it")):
        d = dest(*cmd)
        assert d.local.startswith(f"ERR {' '.join(cmd[:2]) if cmd[0] == 'CLIENT' else cmd[0]} is refused on route r1: on a spread route over a Redis Cluster")
        assert why in d.local and 'slot = "pinned"' in d.local, d.local


def test_split_and_merge_in_key_order():
    keys = [f"k{i}".encode() for i in range(20)]
    d = dest("MGET", *keys)
    slots = [key_slot(k) for k in keys]
    assert sorted(a for _, a, _ in d.parts) == sorted(set(slots))
    # each part: MGET of its slot's keys, in order; the merge puts values back in place
    replies = []
    for _, slot, data in d.parts:
        part = [k for k in keys if key_slot(k) == slot]
        assert data == encode_command([b"MGET", *part])
        replies.append(b"*%d\r\n" % len(part) + b"".join(b"$%d\r\nv%s\r\n" % (len(k) + 1, k) for k in part))
    assert d.merge(replies) == b"*20\r\n" + b"".join(b"$%d\r\nv%s\r\n" % (len(k) + 1, k) for k in keys)
    d = dest("MSET", A, "1", B, "2")
    assert {p[2] for p in d.parts} == {encode_command([b"MSET", A, b"1"]), encode_command([b"MSET", B, b"2"])}
    assert d.merge([b"+OK\r\n", b"+OK\r\n"]) == b"+OK\r\n"
    assert d.merge([b"+OK\r\n", b"-OOM no\r\n"]) == b"-OOM no\r\n"
    d = dest("DEL", A, B, A)
    assert d.merge([b":2\r\n", b":1\r\n"]) == b":3\r\n"
    # a part redirected while another ran: not "the command was not run"
    out = d.merge([b":1\r\n", b"-MOVED 3999 127.0.0.1:7001\r\n"])
    assert out.startswith(b"-TRYAGAIN proxy: hash slot 3999 moved to 127.0.0.1:7001") and b"other slots" in out
    # keys of one slot: not split
    assert len(dest("MGET", "{t}a", "{t}b").parts) == 1


def test_scan_cursor_carries_the_node():
    d = dest("SCAN", "0", "COUNT", "10")
    assert d.parts[0][:2] == (TO_INDEX, 0)
    d = dest("SCAN", str(77 * CURSOR_NODES + 2))
    assert d.parts[0][:2] == (TO_INDEX, 2) and d.parts[0][2] == encode_command([b"SCAN", b"77"])
    assert encode_cursor(5, 1, 3) == 5 * CURSOR_NODES + 1
    assert encode_cursor(0, 0, 3) == 1 and encode_cursor(0, 1, 3) == 2 and encode_cursor(0, 2, 3) == 0
    raw = b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\na\r\n"
    assert scan_reply(raw, 0, 3) == b"*2\r\n$1\r\n1\r\n*1\r\n$1\r\na\r\n"
    assert scan_reply(raw, 2, 3) == raw


def test_a_walk_over_three_nodes_sees_every_key_once():
    """The cursor as a client uses it, against three fake nodes' cursors (lists of batches)."""
    nodes = [("n", i) for i in range(3)]
    data = {n: [[f"{n[1]}:{j}".encode() for j in range(b * 3, b * 3 + 3)] for b in range(4)] for n in nodes}
    mux = Mux(lambda s: nodes[0], lambda: nodes)
    cursor, seen = 0, []
    while True:
        mux.submit(dest("SCAN", str(cursor)))
        (addr, (req,)), = mux.take_writes().items()
        server = int(req.split(b"\r\n")[4])
        batches = data[addr]
        nxt = server + 1 if server + 1 < len(batches) else 0
        mux.node_reply(addr, b"*2\r\n$%d\r\n%d\r\n" % (len(str(nxt)), nxt) + b"*3\r\n" +
                       b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in batches[server]))
        (reply,) = mux.ready()
        cursor = int(reply.split(b"\r\n")[2])
        seen += [x for x in reply.split(b"\r\n")[5::2] if x]
        if cursor == 0:
            break
    assert sorted(seen) == sorted(k for n in nodes for b in data[n] for k in b)


def test_transactions_take_one_slot():
    r = router()
    multi = dest("MULTI", r=r)
    assert multi.parts[0][0] == TO_TX and multi.parts[0][1].slot is None
    assert dest("PING", r=r, in_tx=True).parts[0][0] == TO_TX
    assert dest("SET", "{a}1", "v", r=r, in_tx=True).local is None
    assert multi.parts[0][1].slot == key_slot(b"{a}1")
    assert dest("SET", "{b}1", "v", r=r, in_tx=True).local == CROSSSLOT
    assert "inside MULTI it is not routed" in dest("KEYS", "*", r=r, in_tx=True).local
    assert dest("EXEC", r=r).parts[0][0] == TO_TX and r.tx is None
    # WATCH names the slot before MULTI; another slot is CROSSSLOT
    r = router()
    assert dest("WATCH", "{a}1", r=r).parts[0][:2] == (TO_SLOT, key_slot(b"{a}1"))
    assert dest("MULTI", r=r).parts[0][1].slot == key_slot(b"{a}1")
    assert dest("GET", "{b}", r=r, in_tx=True).local == CROSSSLOT


def test_mux_holds_multi_until_a_key_names_the_node():
    owner = {key_slot(b"{a}1"): ("n", 1)}
    mux = Mux(lambda s: owner.get(s, ("n", 0)), lambda: [("n", 0), ("n", 1)])
    r = router()
    mux.submit(dest("MULTI", r=r))
    mux.submit(dest("PING", r=r, in_tx=True))
    assert mux.take_writes() == {} and mux.ready() == [b"+OK\r\n", b"+QUEUED\r\n"]  # answered by the proxy
    mux.submit(dest("INCR", "{a}1", r=r, in_tx=True))
    mux.submit(dest("EXEC", r=r))
    (addr, chunks), = mux.take_writes().items()
    assert addr == ("n", 1) and [c.split(b"\r\n")[2] for c in chunks] == [b"MULTI", b"PING", b"INCR", b"EXEC"]
    for raw in (b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"*2\r\n+PONG\r\n:1\r\n"):
        mux.node_reply(addr, raw)
    assert mux.ready() == [b"+QUEUED\r\n", b"*2\r\n+PONG\r\n:1\r\n"]   # the server's own +OK/+QUEUED dropped


def test_mux_gives_replies_in_request_order():
    """Requests over three nodes, each node answering in its own order at random times:
    the client gets reply i for request i, always."""
    nodes = [("n", i) for i in range(3)]
    rnd = random.Random(7)
    for _ in range(50):
        mux = Mux(lambda s: nodes[s % 3], lambda: nodes)
        want = []
        for i in range(30):
            k = f"k{rnd.randrange(1000)}"
            mux.submit(dest("ECHO", f"e{i}") if i % 3 == 0 else dest("GET", k))
            want.append(i)
        writes = mux.take_writes()
        queues = {a: [(c, n) for n, c in enumerate(chunks)] for a, chunks in writes.items()}
        got = []
        order = [a for a, q in queues.items() for _ in q]
        rnd.shuffle(order)
        for a in order:
            req, _ = queues[a].pop(0)
            mux.node_reply(a, req)  # the "reply" is the request's own bytes: integrity is checkable
            got += mux.ready()
        assert len(got) == 30
        # reply i must be request i's bytes
        for i, raw in enumerate(got):
            assert (b"e%d\r\n" % i in raw) if i % 3 == 0 else raw.startswith(b"*2\r\n$3\r\nGET")


def test_no_owner_is_an_error_in_place():
    mux = Mux(lambda s: None, lambda: [])
    mux.submit(dest("GET", "a"))
    (reply,) = mux.ready()
    assert reply.startswith(b"-CLUSTERDOWN proxy: no primary serves this hash slot")


def test_subscriptions_keep_the_connection_on_one_node():
    nodes = {key_slot(b"{a}c"): ("n", 1)}
    r = Router(RULES, "r1", owner=lambda s: nodes.get(s, ("n", 0)), home=lambda: ("n", 0))
    d = dest("SSUBSCRIBE", "{a}c", "{a}d", r=r)
    assert d.sub and d.parts[0][:2] == (TO_NODE, ("n", 1)) and r.sticky == ("n", 1)
    assert dest("SUBSCRIBE", "x", r=r).parts[0][1] == ("n", 1)         # classic: where the connection is
    assert "served by" in dest("SSUBSCRIBE", "zz", r=r).local           # shard channels of another node
    assert dest("SSUBSCRIBE", "{a}c", "zz", r=r).local == CROSSSLOT
    assert dest("PING", r=r).parts[0][:2] == (TO_NODE, ("n", 1))
    assert dest("GET", "{a}k", r=r).parts[0][:2] == (TO_NODE, ("n", 1))
    assert "stays on the node of its subscriptions" in dest("GET", "other", r=r).local
    assert "stays on the node" in dest("KEYS", "*", r=r).local
    r.sticky = None  # unsubscribed (the shell clears it)
    assert dest("GET", "other", r=r).parts[0][0] == TO_SLOT


def test_moved_and_ask_are_sent_again_in_place():
    nodes = [("n", 0), ("n", 1), ("n", 2)]
    mux = Mux(lambda s: nodes[0], lambda: nodes)
    for cmd in (("SET", "a", "1"), ("ECHO", "e"), ("GET", "a")):
        mux.submit(dest(*cmd))
    (addr, chunks), = mux.take_writes().items()
    assert addr == nodes[0] and len(chunks) == 3
    mux.node_reply(addr, b"-MOVED 15495 n:1\r\n")   # not run: sent again to n:1
    mux.node_reply(addr, b"$1\r\ne\r\n")
    mux.node_reply(addr, b"-ASK 15495 n:2\r\n")     # ASKING + the request to n:2
    assert mux.ready() == []                          # the first reply is not in yet: order kept
    w = mux.take_writes()
    assert w == {nodes[1]: [chunks[0]], nodes[2]: [b"*1\r\n$6\r\nASKING\r\n", chunks[2]]}
    assert [r.kind for r in mux.redirects] == ["MOVED", "ASK"]
    mux.node_reply(nodes[2], b"+OK\r\n")            # ASKING's reply: the proxy's own
    mux.node_reply(nodes[2], b"$1\r\n1\r\n")
    mux.node_reply(nodes[1], b"+OK\r\n")
    assert mux.ready() == [b"+OK\r\n", b"$1\r\ne\r\n", b"$1\r\n1\r\n"]
    # a request redirected again and again: after MAX_REDIRECTS the client gets the redirect
    from proxy.spread import MAX_REDIRECTS
    mux.submit(dest("GET", "b"))
    for _ in range(MAX_REDIRECTS):
        (addr, _), = mux.take_writes().items()
        mux.node_reply(addr, b"-MOVED 3300 n:0\r\n")
    (addr, _), = mux.take_writes().items()
    mux.node_reply(addr, b"-MOVED 3300 n:0\r\n")
    assert mux.ready() == [b"-MOVED 3300 n:0\r\n"]   # Session._redirected makes it -TRYAGAIN


def test_a_redirect_is_not_followed_past_a_later_request_of_its_slot():
    """The client's order: a request redirected after a later request of the same slot
    went to the new owner (the map changed in between) would run after it if sent again;
    it gets the redirect (-TRYAGAIN to the client) instead."""
    owner = {"now": ("n", 0)}
    mux = Mux(lambda s: owner["now"], lambda: [("n", 0), ("n", 1)])
    slot = key_slot(b"a")
    mux.submit(dest("SET", "a", "1"))      # to n:0
    owner["now"] = ("n", 1)                 # the map moved the slot meanwhile
    mux.submit(dest("GET", "a"))           # to n:1: it may run first
    w = mux.take_writes()
    assert set(w) == {("n", 0), ("n", 1)}
    mux.node_reply(("n", 1), b"$-1\r\n")
    mux.node_reply(("n", 0), b"-MOVED %d n:1\r\n" % slot)
    assert mux.take_writes() == {}          # not sent again
    assert mux.ready() == [b"-MOVED %d n:1\r\n" % slot, b"$-1\r\n"]


def _frame(*items) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(
        b":%d\r\n" % x if isinstance(x, int) else b"$%d\r\n%s\r\n" % (len(x), x) for x in items)


def test_keyspace_subscriptions_go_to_every_primary_and_their_confirmations_are_dropped():
    """Sans-IO: the notification channels of a SUBSCRIBE also go to the other primaries
    (classic ones do not), one confirmation per name is owed there and dropped; their
    messages reach the Session while subscribed; UNSUBSCRIBE without arguments names them."""
    from proxy.spread import NOTIFY_DROP, NOTIFY_NONE, NOTIFY_SESSION
    n0, n1, n2 = ("n", 0), ("n", 1), ("n", 2)
    r = Router(RULES, "r1", home=lambda: n0)
    mux = Mux(lambda s: n0, lambda: [n0, n1, n2])
    ks = b"__keyspace@0__:a"
    d = dest("SUBSCRIBE", "news", ks, r=r)
    mux.sticky = n0
    mux.submit(d)
    w = mux.take_writes()
    assert w[n0] == [encode_command([b"SUBSCRIBE", b"news", ks])]
    assert w[n1] == w[n2] == [encode_command([b"SUBSCRIBE", ks])]
    assert mux.notify_frame(n1, _frame(b"subscribe", ks, 1)) == NOTIFY_DROP
    assert mux.notify_frame(n1, _frame(b"message", ks, b"set")) == NOTIFY_SESSION
    assert mux.notify_frame(n1, _frame(b"message", b"news", b"x")) == NOTIFY_DROP   # not subscribed there
    assert mux.notify_frame(n0, _frame(b"message", ks, b"set")) == NOTIFY_NONE      # the Session's node
    assert not mux.confirms[n1] and mux.confirms[n2]
    mux.submit(dest("UNSUBSCRIBE", r=r))
    w = mux.take_writes()
    assert w[n0] == [encode_command([b"UNSUBSCRIBE"])]
    assert w[n1] == w[n2] == [encode_command([b"UNSUBSCRIBE", ks])]
    assert not mux.notify_nodes
    # n2 still owes its SUBSCRIBE's and UNSUBSCRIBE's confirmations: dropped, then plain replies
    assert mux.notify_frame(n2, _frame(b"subscribe", ks, 1)) == NOTIFY_DROP
    assert mux.notify_frame(n2, _frame(b"message", ks, b"del")) == NOTIFY_DROP   # left already
    assert mux.notify_frame(n2, _frame(b"unsubscribe", ks, 0)) == NOTIFY_DROP
    assert mux.notify_frame(n2, _frame(b"unsubscribe", ks, 0)) == NOTIFY_NONE    # none owed: a reply
    # a classic-only SUBSCRIBE stays on one node
    assert dest("SUBSCRIBE", "news", r=r).notify is None
