"""The admin port: /metrics names and values, /healthz, /readyz following the upstream."""

import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conftest import hot_path
from proxy.embedded import free_port, start_server


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happens(server, fresh_db, start_proxy, upstream_mode):
    mport = free_port()
    p = start_proxy(["--upstream", f"redis://{server.host}:{server.port}/{fresh_db}", "--namespace", "ns",
                     "--metrics-listen", f"127.0.0.1:{mport}"])
    route = f"127.0.0.1:{p.port}"
    r = redis.Redis(port=p.port, protocol=2)
    r.set("a", "1")
    r.mset({"b": "2", "c": "3"})
    with r.pipeline(transaction=False) as pl:
        for _ in range(10):
            pl.get("a")
        pl.execute()
    with pytest.raises(redis.ResponseError):
        r.flushall()
    with pytest.raises(redis.ResponseError):
        r.execute_command("NOSUCHCOMMAND", "x")
    m = scrape(mport)
    assert value(m, "keyspace_proxy_build_info", version="0.1.0", python=__import__("platform").python_version(),
                 hot_path=hot_path(upstream_mode)) == 1
    assert value(m, "keyspace_proxy_client_connections", route=route) == 1
    closed = sum(v for (n, labels), v in m.items() if n == "keyspace_proxy_client_connections_closed_total")
    # the fixture's readiness probe was a connection too: accepted = open + closed
    assert value(m, "keyspace_proxy_client_connections_accepted_total", route=route) == 1 + closed
    assert value(m, "keyspace_proxy_commands_total", route=route, command="get") == 10
    assert value(m, "keyspace_proxy_commands_total", route=route, command="set") == 1
    assert value(m, "keyspace_proxy_commands_total", route=route, command="mset") == 1
    assert value(m, "keyspace_proxy_commands_total", route=route, command="other") >= 1  # bounded labels
    assert value(m, "keyspace_proxy_refused_commands_total", route=route, command="flushall") == 1
    assert value(m, "keyspace_proxy_refused_commands_total", route=route, command="other") == 1
    assert value(m, "keyspace_proxy_errors_total", route=route, kind="refused") >= 2
    assert value(m, "keyspace_proxy_keys_rewritten_total", route=route) == 1 + 2 + 10
    assert value(m, "keyspace_proxy_received_bytes_total", route=route, side="client") > 0
    assert value(m, "keyspace_proxy_sent_bytes_total", route=route, side="upstream") > 0
    assert value(m, "keyspace_proxy_upstream_up", route=route) == 1
    assert value(m, "keyspace_proxy_upstream_connections", route=route) == 1
    assert value(m, "keyspace_proxy_pipeline_depth_count", route=route) >= 3
    assert value(m, "keyspace_proxy_pipeline_depth_bucket", route=route, le="16.0") >= 3
    assert value(m, "keyspace_proxy_request_duration_seconds_count", route=route) >= 3
    assert value(m, "keyspace_proxy_upstream_roundtrip_seconds_count", route=route) >= 3
    # limits and timeouts (issue 13): present, and nothing to count in a healthy run
    for name in ("keyspace_proxy_upstream_reply_timeouts_total", "keyspace_proxy_upstream_reconnect_failures_total",
                 "keyspace_proxy_upstream_down"):
        assert m[(name, (("route", route),))] == 0, name
    assert not [k for k in m if k[0] == "keyspace_proxy_client_connections_rejected_total"]
    r.close()


def test_health_and_readiness_follow_the_upstream(start_proxy):
    own = start_server("valkey")
    mport = free_port()
    try:
        p = start_proxy(["--upstream", f"redis://127.0.0.1:{own.port}/0", "--namespace", "ns",
                         "--metrics-listen", f"127.0.0.1:{mport}"])
        base = f"http://127.0.0.1:{mport}"
        assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200
        assert urllib.request.urlopen(base + "/readyz", timeout=10).status == 200
    finally:
        own.stop()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/readyz", timeout=10)
    assert e.value.code == 503 and b"upstream unreachable" in e.value.read()
    assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200  # alive all the same
    assert value(scrape(mport), "keyspace_proxy_upstream_up", route=f"127.0.0.1:{p.port}") == 0
    # a client's request finds it down: the proxy marks it so, and says why in /readyz
    c = redis.Redis(port=p.port, socket_timeout=10)
    with pytest.raises((redis.ResponseError, redis.ConnectionError), match="upstream unavailable"):
        c.ping()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/readyz", timeout=10)
    body = e.value.read().decode()
    assert e.value.code == 503 and "upstream down (cannot connect to 127.0.0.1:" in body and "reconnecting" in body
    assert value(scrape(mport), "keyspace_proxy_upstream_down", route=f"127.0.0.1:{p.port}") == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert e.value.code == 404
