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
