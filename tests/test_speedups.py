"""The C hot path (proxy/_speedups.c) against the Python reference, on generated input.

The C code may only do what the Python code does: the same bytes upstream, the
same replies to the client, the same counters, the same errors (it hands every
input it does not fully understand back to Python). Each test runs both on the
same input and compares everything observable.
"""

from __future__ import annotations

import os
from collections import deque

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy import resp, session as session_mod
from proxy.rules import default_rules
from proxy.config import DbTarget, Limits, Route, Upstream
from proxy.keyspace import Keyspace
from proxy.resp import ProtocolError, encode_command
from proxy.session import Session
from proxy.speedups import C
from proxy.stats import RouteStats

# A pure-Python install (no compiler) has nothing to compare; in CI the extension is
# built (.ci/run checks it), so there a missing one fails here instead of skipping.
pytestmark = pytest.mark.skipif(C is None and os.environ.get("CI") != "true",
                                reason="proxy._speedups is not compiled (pure-Python install)")

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ replies

def _enc(value) -> bytes:
    kind, v = value
    if kind == "+":
        return b"+" + v + b"\r\n"
    if kind in "-:,(#_":
        return kind.encode() + v + b"\r\n"
    if kind in "$=!":
        return kind.encode() + b"%d\r\n" % len(v) + v + b"\r\n"
    if kind == "nil":
        return b"$-1\r\n"
    if kind in "*~>":
        return kind.encode() + b"%d\r\n" % len(v) + b"".join(_enc(x) for x in v)
    if kind == "%":
        return b"%%%d\r\n" % (len(v) // 2) + b"".join(_enc(x) for x in v[: len(v) // 2 * 2])
    if kind == "|":  # an attribute, then the reply it annotates
        attrs, value_ = v
        return b"|%d\r\n" % (len(attrs) // 2) + b"".join(_enc(x) for x in attrs[: len(attrs) // 2 * 2]) \
            + _enc(value_)
    raise AssertionError(kind)


_text = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n"))
_scalar = st.one_of(
    st.tuples(st.sampled_from("+-(,#_"), _text),
    st.tuples(st.just(":"), st.integers(-10**20, 10**20).map(lambda i: str(i).encode())),
    st.tuples(st.sampled_from("$=!"), st.binary(max_size=20)),
    st.tuples(st.just("nil"), st.none()),
)
_reply = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from("*~>%"), st.lists(inner, max_size=5)),
        st.tuples(st.just("|"), st.tuples(st.lists(inner, max_size=4), inner)),
    ),
    max_leaves=12,
)
# odd bytes a broken or hostile server might send
_noise = st.sampled_from([b"", b"?x\r\n", b"$+3\r\nabc\r\n", b"$ 3\r\nabc\r\n", b"*1_0\r\n", b"$03\r\nabc\r\n",
                          b"*-0\r\n", b"$-5\r\n", b"*x\r\n", b"\r\n", b"$99999999999999999999\r\n",
                          b"*3\r\n:1\r\n", b"+no end", b"-\r"])


def _python_frame_end(buf, pos):
    try:
        return resp._frame_end(buf, pos)
    except ProtocolError as e:
        return ("error", str(e))


def _wrapped_frame_end(buf, pos):
    try:
        return resp.frame_end(buf, pos)
    except ProtocolError as e:
        return ("error", str(e))


@FAST
@given(st.lists(_reply, max_size=6), _noise, st.data())
@example([("*", [("$", b"a"), (":", b"1")])], b"", None)
def test_frame_end_matches_python(replies, noise, data):
    buf = b"".join(_enc(r) for r in replies) + noise
    cut = data.draw(st.integers(0, len(buf))) if data is not None else len(buf)
    for b in (buf, buf[:cut]):
        pos = 0
        for _ in range(20):
            want = _python_frame_end(b, pos)
            c = C.frame_end(b, pos)
            assert c == want or c == -2, (b, pos, c, want)
            assert _wrapped_frame_end(b, pos) == want
            if not isinstance(want, int) or want < 0:
                break
            pos = want


def test_frame_end_deep_nesting_and_long_lines_go_to_python():
    deep = b"*1\r\n" * 70 + b":1\r\n"
    assert C.frame_end(deep, 0) == -2
    with pytest.raises(ProtocolError, match="nested too deeply"):
        resp.frame_end(deep, 0)
    long_line = b"+" + b"x" * (70 * 1024)
    assert C.frame_end(long_line, 0) == -2
    with pytest.raises(ProtocolError, match="too big reply header"):
        resp.frame_end(long_line, 0)
    assert resp.frame_end(bytearray(b"+OK\r\n"), 0) == 5  # not bytes: the Python framer


@FAST
@given(st.lists(_reply, max_size=8), _noise, st.lists(st.sampled_from([None, None, None, "x"]), max_size=10),
       st.integers(0, 12), st.booleans(), st.data())
def test_frame_run_matches_python(replies, noise, entries, limit, push, data):
    buf = b"".join(_enc(r) for r in replies) + noise
    buf = buf[:data.draw(st.integers(0, len(buf)))]
    ref, fast = deque(entries), deque(entries)
    try:
        want = resp._frame_run(buf, 0, limit, push, ref)
    except ProtocolError as e:
        want = ("error", str(e), len(ref))
    # C may stop early where it hands a reply back (unusual syntax, errors); the
    # callers then go on in Python, which must end where Python alone ends.
    pos, m = C.frame_run(buf, 0, limit, push, fast)
    assert len(fast) == len(entries) - m
    try:
        rest_pos, rest_m = resp._frame_run(buf, pos, limit - m, push, fast)
        got = (rest_pos if rest_m else pos, m + rest_m)
    except ProtocolError as e:
        got = ("error", str(e), len(fast))
    assert got == want
    if m < limit and fast and fast[0] is None and pos < len(buf) and not (push and buf[pos] == 0x3E):
        assert C.frame_end(buf, pos) in (-1, -2)  # stopped: unfinished, or handed back


# ------------------------------------------------------------------ requests

ROUTE_MODES = {
    "add": Keyspace("add", b"app", b":", "r"),
    "pinned": Keyspace("add", b"app", b":", "r", pinned=True),  # prefix {app}: (braces through the C path)
    "strip": Keyspace("strip", b"app", b":", "r"),
    "none": Keyspace("none", b"", b":", "r"),
}
RULES = default_rules()
TABLE = RULES.table

# Commands of every kind the session meets: C-path ones (fixed keys, ranges, steps,
# keyless), ones with reply transforms, connection state, refusals, unknown names.
TEMPLATES = [
    ["GET", "k"], ["get", "app:k"], ["GeT", "x"], ["SET", "k", "v"], ["SET", "app:k", "v", "EX", "10"],
    ["MGET", "a", "app:b", "c"], ["MSET", "a", "1", "app:b", "2"], ["MSET", "a"], ["DEL", "app:a", "app:b"],
    ["DEL"], ["GET"], ["PING"], ["ECHO", "hi"], ["EXPIRE", "app:k", "10"], ["RENAME", "app:a", "app:b"],
    ["LPUSH", "app:l", "a", "b"], ["HSET", "h", "f", "v"], ["INCR", "app:n"], ["ZADD", "z", "1", "m"],
    ["EXISTS", "app:a", "b"], ["FOO", "bar"], ["SCAN", "0"], ["KEYS", "*"], ["FLUSHALL"], ["CONFIG", "GET", "x"],
    ["BLPOP", "app:l", "0"], ["EVAL", "return 1", "1", "app:k"], ["MULTI"], ["EXEC"], ["DISCARD"],
    ["CLIENT", "REPLY", "SKIP"], ["CLIENT", "SETINFO", "LIB-NAME", "x"], ["SELECT", "1"], ["HELLO", "3"],
    ["DBSIZE"], ["OBJECT", "ENCODING", "app:k"], ["SET", "app:k\r\n", "v\r\nx"], ["GET", ""],
]


def _variant(args: list[str], how: str) -> bytes:
    b = [a.encode() for a in args]
    if how == "canonical":
        return encode_command(b)
    if how == "inline":
        return b" ".join(x or b'""' for x in b if b"\r" not in x and b"\n" not in x) + b"\r\n"
    if how == "leading-zero":
        return b"*%d\r\n" % len(b) + b"".join(b"$0%d\r\n%s\r\n" % (len(x), x) for x in b)
    if how == "count-leading-zero":
        return b"*0%d\r\n" % len(b) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in b)
    if how == "empty":
        return b"*0\r\n"
    if how == "no-crlf":  # a bulk whose payload is not followed by CRLF
        return b"*%d\r\n" % len(b) + b"".join(b"$%d\r\n%sXY" % (len(x), x) for x in b)
    if how == "plus":  # a simple string where a bulk belongs
        return b"*%d\r\n" % len(b) + b"".join(b"+%s\r\n" % x for x in b)
    raise AssertionError(how)


# Variants of a request, anywhere in a read: the C path takes the canonical ones and
# hands the rest of the read to the Python reader, which reads everything as Redis does,
# so the two paths agree on all of them.
_request = st.tuples(st.sampled_from(TEMPLATES),
                     st.sampled_from(["canonical"] * 12 + ["leading-zero", "count-leading-zero", "empty",
                                                            "no-crlf", "inline", "plus"]))
_first_request = st.tuples(st.sampled_from(TEMPLATES), st.sampled_from(["inline", "plus"]))


def _norm(entry):
    if entry is None:
        return entry
    return (entry.kind, entry.show, entry.data if isinstance(entry.data, (bytes, int, type(None))) else "data",
            entry.fn is not None)


def _run(mode, shared, chunks, use_c, max_bulk, monkeypatch):
    monkeypatch.setattr(session_mod, "_rewrite_plain", C.rewrite_plain if use_c else None)
    route = Route("r", ("127.0.0.1", 1), Upstream("h", 1, 0, None, None), DbTarget(0, ROUTE_MODES[mode]),
                  {1: DbTarget(1, ROUTE_MODES[mode])})
    stats = RouteStats("r")
    s = Session(route, RULES, Limits(max_bulk=max_bulk), stats, shared=shared)
    for args in TEMPLATES:  # every name has its plan (and Spec) before the run, as on a busy route
        for raw in (args[0].encode(), args[0].lower().encode(), args[0].upper().encode()):
            s._plan(raw)
    up, client = [], []
    for chunk in chunks:
        s.client_data(chunk)
        up.append(s.take_upstream())
        client.append(s.take_client())
    return dict(
        up=up, client=client, pending=[_norm(e) for e in s.pending],
        held=[h if isinstance(h, list) else ("fault", h.message) for h in s.held], owed=s.owed_sent,
        keys=stats.keys_rewritten, commands=stats.commands(TABLE.commands), refused=dict(stats.refused),
        errors=dict(stats.errors), depth=(stats.depth.counts, stats.depth.sum), protocol_error=s.protocol_error,
        need_dedicated=s.need_dedicated, need_link=s.need_link, multi=s.tx is not None,
        close=s.close_when_done)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(sorted(ROUTE_MODES)), shared=st.booleans(),
       first=st.none() | _first_request, requests=st.lists(_request, min_size=1, max_size=25),
       cuts=st.lists(st.integers(0, 2000), max_size=4), max_bulk=st.sampled_from([512 * 1024 * 1024, 3]))
def test_rewrite_plain_matches_python(monkeypatch, mode, shared, first, requests, cuts, max_bulk):
    data = b"".join(_variant(list(a), how) for a, how in ([first] if first else []) + requests)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])] or [data]
    fast = _run(mode, shared, chunks, True, max_bulk, monkeypatch)
    ref = _run(mode, shared, chunks, False, max_bulk, monkeypatch)
    # upstream bytes may be split differently between chunks only if both agree in total
    assert b"".join(fast.pop("up")) == b"".join(ref.pop("up"))
    assert fast == ref


@pytest.mark.parametrize("bad, want", [
    # a `+simple` element: Redis's words on both paths (the hiredis-era reader took it as a string)
    (b"*2\r\n+GET\r\n+k\r\n", b"expected '$', got '+'"),
    # an inline command right after RESP in one read (the hiredis-era reader refused it)
    (b"GET k\r\n", encode_command([b"GET", b"app:k"])),
])
def test_c_path_and_reader_agree_where_the_old_reader_was_lenient(monkeypatch, bad, want):
    data = encode_command([b"GET", b"a"]) + bad
    got = {}
    for use_c in (False, True):
        r = _run("add", True, [data], use_c, 8, monkeypatch)
        got[use_c] = b"".join(r["up"]) + b"".join(r["client"]) + b"".join(
            e[2] for e in r["pending"] if isinstance(e, tuple) and isinstance(e[2], bytes))
    assert want in got[False]
    assert got[True] == got[False]


def test_rewrite_plain_takes_a_pipeline_in_one_call():
    specs = {b"GET": C.Spec((1,), 2), b"MSET": C.Spec((), 2, 1, -1, 2), b"PING": C.Spec(())}
    data = (encode_command([b"GET", b"k"]) + encode_command([b"MSET", b"a", b"1", b"b", b"2"])
            + encode_command([b"PING"]) + encode_command([b"HGET", b"h", b"f"]))
    out, end, n, keys = C.rewrite_plain(data, specs, 1, b"ns:", 100, 1 << 29)
    assert out == (encode_command([b"GET", b"ns:k"]) + encode_command([b"MSET", b"ns:a", b"1", b"ns:b", b"2"])
                   + encode_command([b"PING"]))
    assert (end, n, keys) == (len(data) - len(encode_command([b"HGET", b"h", b"f"])), 3, 3)
    assert [specs[k].count for k in (b"GET", b"MSET", b"PING")] == [1, 1, 1]
    # strip mode: a key without the prefix stops the run (Python refuses it)
    out, end, n, keys = C.rewrite_plain(encode_command([b"GET", b"ns:k"]) + encode_command([b"GET", b"k"]),
                                        specs, 2, b"ns:", 100, 1 << 29)
    assert (out, n, keys) == (encode_command([b"GET", b"k"]), 1, 1)
    # nothing to rewrite and everything taken: the client's own bytes object
    ping = encode_command([b"PING"]) * 3
    assert C.rewrite_plain(ping, specs, 1, b"ns:", 100, 1 << 29)[0] is ping
    # the limit (a shared connection's owed-replies cap)
    assert C.rewrite_plain(ping, specs, 1, b"ns:", 2, 1 << 29)[1:3] == (2 * len(ping) // 3, 2)


def test_rewrite_plain_takes_a_transaction_block_whole_or_not_at_all():
    """`blocks` (a shared link): MULTI, commands the C path takes, EXEC, all in the read:
    taken as one run; anything else stops the run before MULTI, counts given back."""
    def specs():
        return {b"MULTI": C.Spec((), role=C.MULTI_OPENS), b"EXEC": C.Spec((), role=C.EXEC_CLOSES),
                b"SADD": C.Spec((1,), 3), b"LPUSH": C.Spec((1,), 3), b"GET": C.Spec((1,), 2)}
    e = encode_command
    inner = e([b"SADD", b"queues", b"q"]) + e([b"LPUSH", b"queue:q", b"job"])
    block = e([b"MULTI"]) + inner + e([b"EXEC"])
    sp = specs()
    out, end, n, keys = C.rewrite_plain(block + e([b"GET", b"k"]), sp, 1, b"ns:", 100, 1 << 29, True)
    assert out == (e([b"MULTI"]) + e([b"SADD", b"ns:queues", b"q"]) + e([b"LPUSH", b"ns:queue:q", b"job"])
                   + e([b"EXEC"]) + e([b"GET", b"ns:k"]))
    assert (end, n, keys) == (len(block) + len(e([b"GET", b"k"])), 5, 3)
    assert {k: v.count for k, v in sp.items()} == {b"MULTI": 1, b"EXEC": 1, b"SADD": 1, b"LPUSH": 1, b"GET": 1}
    before = e([b"GET", b"k"])
    declined = {
        "without blocks (a dedicated connection)": (before + block, dict(blocks=False)),
        "EXEC in the next read": (before + block[:-3], {}),
        "a command the C path does not take inside": (before + e([b"MULTI"]) + e([b"HGET", b"h", b"f"]) + e([b"EXEC"]), {}),
        "MULTI with an argument": (before + e([b"MULTI", b"x"]) + inner + e([b"EXEC"]), {}),
        "EXEC with an argument": (before + e([b"MULTI"]) + inner + e([b"EXEC", b"x"]), {}),
        "MULTI inside the block": (before + e([b"MULTI"]) + e([b"MULTI"]) + inner + e([b"EXEC"]), {}),
        "strip: a key without the prefix inside": (e([b"GET", b"ns:k"]) + e([b"MULTI"]) + e([b"GET", b"other"])
                                                   + e([b"EXEC"]), dict(mode=2, lead=len(e([b"GET", b"ns:k"])))),
        "past the owed-replies bound": (before + block, dict(limit=5)),
        "longer than MAX_BLOCK": (before + e([b"MULTI"]) + e([b"GET", b"k"]) * (C.MAX_BLOCK - 1) + e([b"EXEC"]),
                                  dict(limit=1000)),
    }
    for why, (data, kw) in declined.items():
        sp = specs()
        out, end, n, keys = C.rewrite_plain(data, sp, kw.get("mode", 1), b"ns:", kw.get("limit", 100), 1 << 29,
                                            kw.get("blocks", True))
        assert (end, n) == (kw.get("lead", len(before)), 1), why
        assert {k: v.count for k, v in sp.items() if v.count} == {b"GET": 1}, why
    # a bare EXEC (no MULTI before it in this run) is never taken: the session answers it
    assert C.rewrite_plain(e([b"EXEC"]), specs(), 1, b"ns:", 100, 1 << 29, True)[2] == 0
    # the longest block taken: MAX_BLOCK requests with its edges, under the bound
    data = e([b"MULTI"]) + e([b"GET", b"k"]) * (C.MAX_BLOCK - 2) + e([b"EXEC"])
    assert C.rewrite_plain(data, specs(), 1, b"ns:", 1000, 1 << 29, True)[1:3] == (len(data), C.MAX_BLOCK)


PLAIN_TEMPLATES = [t for t in TEMPLATES if t[0].upper() in ("GET", "SET", "MGET", "MSET", "DEL", "LPUSH", "HSET",
                                                            "INCR", "ZADD", "EXISTS", "PING", "ECHO", "EXPIRE")]
_block = st.tuples(st.just("block"), st.lists(st.sampled_from(PLAIN_TEMPLATES + [["HGETALL", "h"], ["MULTI"]]),
                                              max_size=6), st.sampled_from(["EXEC", "EXEC", "DISCARD"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(sorted(ROUTE_MODES)), shared=st.booleans(),
       items=st.lists(_block | _request, min_size=1, max_size=12),
       cuts=st.lists(st.integers(0, 1500), max_size=3))
def test_transaction_blocks_match_python(monkeypatch, mode, shared, items, cuts):
    """Blocks of plain commands (and ones that are not: a command with a reply transform,
    a nested MULTI, DISCARD) among other requests, cut anywhere: the C path and the
    Python path (Session._plain_block, or the transaction state) send the same bytes and
    expect the same replies."""
    parts = []
    for it in items:
        if it[0] == "block":
            parts.append(encode_command([b"MULTI"]) + b"".join(encode_command([a.encode() for a in c]) for c in it[1])
                         + encode_command([it[2].encode()]))
        else:
            parts.append(_variant(list(it[0]), it[1]))
    data = b"".join(parts)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])] or [data]
    fast = _run(mode, shared, chunks, True, 512 * 1024 * 1024, monkeypatch)
    ref = _run(mode, shared, chunks, False, 512 * 1024 * 1024, monkeypatch)
    assert b"".join(fast.pop("up")) == b"".join(ref.pop("up"))
    assert fast == ref


def test_spec_refuses_nonsense():
    for bad in [dict(fixed=(2, 1)), dict(fixed=(0,)), dict(fixed=tuple(range(1, 20))),
                dict(fixed=(1,), first=1, lastkey=-1), dict(fixed=(), first=1, lastkey=2),
                dict(fixed=(), first=1, lastkey=-1, step=0)]:
        with pytest.raises(ValueError):
            C.Spec(**bad)


def test_metrics_count_requests_of_both_paths():
    route = Route("r", ("127.0.0.1", 1), Upstream("h", 1, 0, None, None), DbTarget(0, ROUTE_MODES["add"]), {})
    stats = RouteStats("r")
    s = Session(route, RULES, Limits(), stats, shared=True)
    s.client_data(encode_command([b"GET", b"a"]))           # first GET: Python (makes the plan)
    s.client_data(encode_command([b"GET", b"b"]) * 3)       # then the C path
    assert s.take_upstream() == encode_command([b"GET", b"app:a"]) + encode_command([b"GET", b"app:b"]) * 3
    assert stats.commands(TABLE.commands) == {"get": 4}
    assert stats.keys_rewritten == 4
    assert s.plans[b"GET"].fast.count == 3


# ------------------------------------------------------------------ replies framed across reads


def _feed_in_chunks(raw: bytes, cuts: list[int], trailing: bytes = b"") -> list[bytes]:
    """Feed `raw` + `trailing` to a PartialReply as the session does (a held-back header line
    is handed in again with the next bytes); the slices it consumed, and what is left."""
    data = raw + trailing
    points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    chunks = [data[a:b] for a, b in zip([0] + points, points) if b > a]
    p = resp.PartialReply()
    consumed, held = [], b""
    for i, chunk in enumerate(chunks):
        buf = held + chunk
        end, done = p.feed(buf, 0)
        consumed.append(buf[:end])
        held = buf[end:]
        if done:
            return consumed, held + b"".join(chunks[i + 1:])
    raise AssertionError("never done")


@FAST
@given(_reply, st.lists(st.integers(0, 400), max_size=8))
def test_partial_reply_frames_exactly_one_reply_however_chunked(reply, cuts):
    raw = _enc(reply)
    consumed, rest = _feed_in_chunks(raw, cuts, b"+next\r\n")
    assert b"".join(consumed) == raw
    assert rest == b"+next\r\n"


def test_partial_reply_every_cut_of_nested_replies():
    raw = (b"|1\r\n+a\r\n:1\r\n*3\r\n$5\r\nhello\r\n%1\r\n+k\r\n*2\r\n$3\r\nabc\r\n_\r\n"
           b">2\r\n$0\r\n\r\n=7\r\ntxt:abc\r\n")
    for k in range(len(raw)):
        for j in range(k, len(raw)):
            consumed, rest = _feed_in_chunks(raw, [k, j], b":9\r\n")
            assert b"".join(consumed) == raw and rest == b":9\r\n", (k, j)


def test_partial_reply_costs_the_bytes_of_a_big_bulk():
    # 8 MB in 64 KB reads: each read is consumed in a step or two (no re-scan of what came before)
    body = b"x" * (8 << 20)
    raw = b"$%d\r\n" % len(body) + body + b"\r\n"
    p = resp.PartialReply()
    steps = 0
    for pos in range(0, len(raw), 65536):
        chunk = raw[pos:pos + 65536]
        end, done = p.feed(chunk, 0)
        steps += 1
        assert end == len(chunk)
    assert done and steps == -(-len(raw) // 65536)


def test_partial_reply_refuses_garbage():
    with pytest.raises(ProtocolError):
        resp.PartialReply().feed(b"*2\r\n?x\r\n", 0)
    with pytest.raises(ProtocolError):
        resp.PartialReply().feed(b"$" + b"9" * 70000, 0)


# ------------------------------------------------------------------ latency histograms (issue 16 item 5)

from proxy.stats import SECONDS_BUCKETS, Histogram, PyHistogram  # noqa: E402

_seconds = st.one_of(st.sampled_from(list(SECONDS_BUCKETS) + [0.0, -1.0, 1e9]),
                     st.floats(min_value=-1.0, max_value=100.0, allow_nan=False))


@FAST
@given(st.lists(_seconds, max_size=60))
def test_hist_matches_python(values):
    """The C histogram puts every value in the bucket bisect_left puts it in (a value equal
    to a bound in that bound's bucket), sums as Python does, and reads back the same."""
    c, py = C.Hist(SECONDS_BUCKETS), PyHistogram(SECONDS_BUCKETS)
    for v in values:
        c.observe(v)
        py.observe(v)
    assert c.counts == py.counts
    assert c.count == py.count == len(values)
    assert c.sum == pytest.approx(py.sum)
    assert c.bounds == SECONDS_BUCKETS


def test_hist_since_reads_the_clock_of_perf_counter():
    """since(t0) observes perf_counter() - t0: the C call reads the same clock."""
    from time import perf_counter, sleep
    for h in (Histogram(SECONDS_BUCKETS), PyHistogram(SECONDS_BUCKETS)):
        t0 = perf_counter()
        sleep(0.002)
        h.since(t0)
        elapsed = perf_counter() - t0
        assert h.count == 1
        assert 0.002 <= h.sum <= elapsed
        assert h.counts[0] == 0  # (not below 100 µs: the clocks agree)


def test_hist_buckets_are_cumulative_when_read():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(5.65)


def test_hist_refuses_nonsense():
    for bad in [(), (1.0, 0.5), (1.0, 1.0), tuple(float(i) for i in range(1, 40)), ("x",)]:
        with pytest.raises((ValueError, TypeError)):
            C.Hist(bad)
