"""The sans-IO part of a resend after -MOVED / -ASK on a pinned cluster route (docs/cluster.md,
"Redirects"): splitting the bytes written upstream into requests, and the ordering rule
deciding which redirected requests may be sent again. On a real cluster:
tests/test_cluster_routing.py."""

import pytest

from proxy.cluster_route import resend_plan, split_requests
from proxy.resp import encode_command


def test_split_requests_gives_each_request_whole():
    reqs = [[b"SET", b"{ns}:a", b"1"], [b"RPUSH", b"{ns}:q", b"x\r\ny"], [b"GET", b""], [b"ECHO", b"*2\r\n"]]
    blob = b"".join(encode_command(a) for a in reqs)
    assert split_requests(blob) == [encode_command(a) for a in reqs]
    assert split_requests(b"") == []


def test_split_requests_refuses_bytes_ending_inside_a_request():
    blob = encode_command([b"SET", b"k", b"v"])
    with pytest.raises(ValueError):
        split_requests(blob[:-1])


@pytest.mark.parametrize("redirected, plan", [
    ([], []),
    ([True], [True]),                              # the only one outstanding: sent again
    ([True, True, True], [True, True, True]),      # all redirected: all sent again, in order
    ([True, False], [False, False]),               # a later one ran: the first gets TRYAGAIN
    ([True, False, True], [False, False, True]),   # after the last that ran: sent again
    ([False, True, True], [False, True, True]),
    ([True, True, False], [False, False, False]),
])
def test_resend_plan_never_lets_a_resend_run_after_a_later_request(redirected, plan):
    assert resend_plan(redirected) == plan


# -- the Session's part, driven with bytes (no server): dedicated upstream, C path pipelines

def _pinned_session(sent: list):
    from proxy.config import ClusterUpstream, DbTarget, Route, Upstream, check_cluster_route, pin_route
    from proxy.keyspace import Keyspace
    from proxy.session import Session
    up = Upstream("h", 1, 0, cluster=ClusterUpstream((("h", 1),)))
    route = Route("r", ("127.0.0.1", 1), up, DbTarget(0, Keyspace("add", b"app", b":", "r")), {})
    route = check_cluster_route(pin_route(route, "pinned", "r"), "r", "")
    s = Session(route)
    s.on_resend = sent.append
    assert s.take_upstream() == b"" and not s.pending  # no handshake: no password, db 0
    return s


def c(*args) -> bytes:
    return encode_command([a.encode() for a in args])


ASK = b"-ASK 1 10.0.0.2:7000\r\n"


def test_session_holds_the_trailing_redirects_and_sends_them_again_in_order():
    sent = []
    s = _pinned_session(sent)
    s.client_data(c("RPUSH", "q", "a") + c("RPUSH", "q", "b") + c("RPUSH", "q", "c"))
    wire = s.take_upstream()
    assert split_requests(wire) == [c("RPUSH", "{app}:q", x) for x in "abc"]
    s.upstream_data(ASK + b":1\r\n" + ASK)   # a ran after the first: only the last is sent again
    out = s.take_client()
    assert out.startswith(b"-TRYAGAIN proxy: hash slot 1 ") and out.endswith(b":1\r\n")
    assert len(sent) == 1 and [d for d, _ in sent[0]] == [c("RPUSH", "{app}:q", "c")]
    assert sent[0][0][1].kind == "ASK" and sent[0][0][1].port == 7000
    s.client_data(c("GET", "k"))              # waits for the resend
    assert s.take_upstream() == b"" and s.take_client() == b""
    s.resent([b":2\r\n"])
    assert s.take_client() == b":2\r\n" and s.take_upstream() == c("GET", "{app}:k")
    s.upstream_data(b"$1\r\nv\r\n")
    assert s.take_client() == b"$1\r\nv\r\n" and not s.pending and s.redirects is None


def test_session_sends_every_redirected_request_again_when_none_ran():
    sent = []
    s = _pinned_session(sent)
    s.client_data(c("SET", "a", "1") + c("SET", "b", "2"))
    s.take_upstream()
    s.upstream_data(ASK)
    assert s.take_client() == b"" and not sent      # the second reply is not in yet
    s.upstream_data(b"-MOVED 1 10.0.0.3:7001\r\n")
    assert [d for d, _ in sent[0]] == [c("SET", "{app}:a", "1"), c("SET", "{app}:b", "2")]
    s.resent([b"+OK\r\n", b"-MOVED 1 10.0.0.4:7002\r\n"])   # still redirected after the retries
    out = s.take_client()
    assert out.startswith(b"+OK\r\n-TRYAGAIN proxy: hash slot 1 of this namespace moved to 10.0.0.4:7002 ")


def test_session_never_holds_inside_multi():
    sent = []
    s = _pinned_session(sent)
    s.client_data(c("MULTI") + c("SET", "a", "1") + c("EXEC"))
    s.take_upstream()
    s.upstream_data(b"+OK\r\n" + ASK + b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    out = s.take_client()
    assert not sent and b"-TRYAGAIN proxy: hash slot 1 " in out and out.endswith(b"previous errors.\r\n")
