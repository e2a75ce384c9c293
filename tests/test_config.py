"""Configuration: URLs, TOML routes, db maps, validation errors that name the field, CLI exit codes."""

import subprocess
import sys

import pytest

from proxy.cli import build_parser, config_from_args
from proxy.config import ConfigError, from_dict, parse_url


def test_parse_url_with_credentials_and_db():
    u = parse_url("redis://user:p%40ss@10.0.0.5:6390/3")
    assert (u.host, u.port, u.db, u.username, u.password) == ("10.0.0.5", 6390, 3, "user", "p@ss")
    assert "p@ss" not in u.masked() and "***" in u.masked()


def test_parse_url_password_only_and_defaults():
    u = parse_url("redis://:secret@localhost")
    assert (u.port, u.db, u.username, u.password) == (6379, 0, None, "secret")


@pytest.mark.parametrize("url, field", [
    ("http://x:1/0", "scheme"), ("unix:///tmp/r.sock", "rediss://"), ("redis://x:1/abc", "db must be a number"),
    ("redis://:1/0", "missing host"),
])
def test_bad_urls_are_named(url, field):
    with pytest.raises(ConfigError, match=field):
        parse_url(url, "listener[0].upstream")


def test_toml_routes_and_db_map():
    cfg = from_dict({
        "upstream": "redis://127.0.0.1:6379/0",
        "listener": [
            {"listen": "127.0.0.1:7000", "namespace": "sidekiq", "name": "app",
             "databases": {"1": {"db": 3, "namespace": "reports"}, "2": {"db": 4}, "5": {"db": 6, "namespace": ""}}},
            {"listen": "127.0.0.1:7001", "strip_namespace": "sidekiq", "upstream": "redis://h:1/2"},
        ],
        "metrics": {"listen": "127.0.0.1:9121"},
    })
    a, b = cfg.routes
    assert a.name == "app" and a.default.db == 0 and a.default.keyspace.mode == "add"
    assert a.target(1).db == 3 and a.target(1).keyspace.namespace == b"reports"
    assert a.target(2).keyspace == a.default.keyspace  # inherits the listener's fence
    assert a.target(5).keyspace.mode == "none"
    assert a.target(9) is None
    assert [c for c, _ in a.reverse(3)] == [1]
    assert b.default.db == 2 and b.default.keyspace.mode == "strip" and b.upstream.host == "h"
    assert cfg.metrics_listen == ("127.0.0.1", 9121)


@pytest.mark.parametrize("data, message", [
    ({"listener": [{"listen": "1.2.3.4:1", "namespace": "a*b"}]},
     r"listener\[0\].namespace: \"a\*b\" must not contain '\*': it breaks SORT BY/GET patterns"),
    ({"listener": [{"listen": "nope"}]}, r"listener\[0\].listen: expected HOST:PORT"),
    ({"listener": [{"listen": "h:1", "namespace": "a", "strip_namespace": "b"}]}, "either namespace or strip_namespace"),
    ({"listener": [{"listen": "h:1", "bogus": 1}]}, r"listener\[0\].bogus: unknown field"),
    ({"listener": [{"listen": "h:1", "databases": {"x": {"db": 1}}}]}, r"databases.x: client db must be a number"),
    ({"listener": [{"listen": "h:1", "databases": {"1": {"db": -1}}}]}, r"databases.1.db: expected an integer >= 0"),
    ({"listener": [{"listen": "h:1"}, {"listen": "h:1"}]}, r"listener\[1\].listen: h:1 is already listener\[0\]'s"),
    ({"listener": []}, "at least one"),
    ({"lisener": []}, "lisener: unknown top-level field"),
])
def test_validation_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_flags_and_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://envhost:6400/5")
    cfg = config_from_args(build_parser().parse_args(["--listen", "127.0.0.1:7000", "--namespace", "ns"]))
    r = cfg.routes[0]
    assert (r.upstream.host, r.upstream.port, r.default.db) == ("envhost", 6400, 5)
    cfg = config_from_args(build_parser().parse_args(
        ["--listen", "127.0.0.1:7000", "--upstream", "redis://flag:1/1", "--strip-namespace", "ns", "--separator", "/"]))
    r = cfg.routes[0]
    assert r.upstream.host == "flag" and r.default.keyspace.prefix == b"ns/"


def test_flags_override_file(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    f = tmp_path / "p.toml"
    f.write_text('upstream = "redis://file:1/0"\n[[listener]]\nlisten = "127.0.0.1:7000"\nnamespace = "a"\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(f), "--upstream", "redis://flag:2/0"]))
    assert cfg.routes[0].upstream.host == "flag"
    monkeypatch.setenv("REDIS_URL", "redis://env:3/0")
    cfg = config_from_args(build_parser().parse_args(["--config", str(f)]))
    assert cfg.routes[0].upstream.host == "env"


def test_cli_exits_2_with_named_field(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[[listener]]\nlisten = "127.0.0.1:7000"\nnamespace = "x*"\n')
    p = subprocess.run([sys.executable, "-m", "proxy", "--config", str(f)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "listener[0].namespace: \"x*\" must not contain '*': it breaks" in p.stderr
    p = subprocess.run([sys.executable, "-m", "proxy"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--listen: required" in p.stderr


def test_url_db_from_path_or_query():
    assert parse_url("redis://h:1/3").db == 3
    assert parse_url("redis://h:1?db=3").db == 3           # as redis-py reads it
    assert parse_url("redis://h:1/?db=3").db == 3
    assert parse_url("redis://h:1/3?db=3").db == 3         # both, agreeing
    assert parse_url("redis://h").port == 6379 and parse_url("redis://h/").db == 0
    u = parse_url("redis://u:p%23w@[::1]:6390/2")
    assert (u.host, u.port, u.db, u.password) == ("::1", 6390, 2, "p#w")
    assert u.masked() == "redis://u:***@[::1]:6390/2"


def test_ipv6_and_old_address_forms():
    from proxy.config import parse_listen
    assert parse_listen("[::1]:6380") == ("::1", 6380)
    assert parse_listen("::1:6380") == ("::1", 6380)            # accepted before brackets were documented
    assert parse_listen(":6380") == ("0.0.0.0", 6380)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    cfg = from_dict({"listener": [{"listen": "[::1]:7000", "upstream": "redis://[::1]:6379/1"}]})
    r = cfg.routes[0]
    assert r.name == "[::1]:7000"
    assert r.describe() == "[::1]:7000 -> redis://[::1]:6379/1 (no namespace)"
    assert r.describe(("::1", 41234, 0, 0)) == "[::1]:41234 -> redis://[::1]:6379/1 (no namespace)"


def test_old_syntax_still_works():
    cfg = from_dict({"upstream": "redis://127.0.0.1:6379/0", "separator": "/",
                     "listener": [{"listen": "127.0.0.1:7000", "namespace": "a", "name": "x",
                                   "databases": {"1": 4, "2": {"db": 5, "strip_namespace": "b", "separator": ":"}}}],
                     "limits": {"reload_grace": 10, "drain_timeout": 0, "connect_timeout": 1,
                                "max_bulk": 1000, "output_limit": 0, "upstream_mode": "dedicated"},
                     "log": {"level": "debug", "format": "json"}, "metrics": {}})
    r = cfg.routes[0]
    assert r.target(1).db == 4 and r.target(1).keyspace.prefix == b"a/"
    assert r.target(2).keyspace.mode == "strip" and r.target(2).keyspace.prefix == b"b:"
    assert cfg.limits.reload_grace == 10.0 and isinstance(cfg.limits.reload_grace, float)
    assert (cfg.limits.drain_timeout, cfg.limits.max_bulk, cfg.limits.output_limit) == (0.0, 1000, 0)
    assert cfg.metrics_listen is None and (cfg.log_level, cfg.log_format) == ("debug", "json")


def test_limits_defaults_are_the_schema_and_the_parser():
    from proxy.config import Limits
    from proxy.resp import DEFAULT_MAX_BULK, DEFAULT_MAX_QUERY
    from proxy.schema import BY_KEY
    lim = Limits()
    assert (lim.max_bulk, lim.max_query) == (DEFAULT_MAX_BULK, DEFAULT_MAX_QUERY)
    for name in vars(lim):
        assert getattr(lim, name) == BY_KEY[f"limits.{name}"].default


def test_effective_configuration_round_trips():
    import tomllib

    from proxy.config import render_toml
    cfg = from_dict({"listener": [
        {"listen": "127.0.0.1:7000", "namespace": "a", "upstream": "redis://u:secret@h:1/2",
         "databases": {"1": {"db": 3, "namespace": ""}, "2": 4}},
        {"listen": "[::1]:7001", "strip_namespace": "s", "separator": "/"}],
        "metrics": {"listen": "127.0.0.1:9121"}, "limits": {"max_bulk": 1000}})
    text = render_toml(cfg)
    assert "secret" not in text and "u:***@h:1/2" in text
    again = from_dict(tomllib.loads(text))
    assert [(r.name, r.listen, r.default, r.databases) for r in again.routes] == \
        [(r.name, r.listen, r.default, r.databases) for r in cfg.routes]
    assert again.limits == cfg.limits and again.metrics_listen == cfg.metrics_listen


def test_a_cluster_seed_list_is_the_cluster_url():
    """[cluster] / [listener.cluster] (seeds, tls, username, password) give the same upstream
    as the redis+cluster:// URL of those seeds: one Topology, one upstream in logs and check."""
    import tomllib

    from proxy.cluster import key_slot
    from proxy.config import render_toml
    pinned = {"namespace": "app", "slot": "pinned"}
    url = from_dict({"upstream": "rediss+cluster://u:pw@h1:7000,[::1]:7001,h3",
                     "listener": [{"listen": "127.0.0.1:7000", **pinned}]}, environ={})
    seeds = {"seeds": ["h1:7000", "[::1]:7001", "h3"], "tls": True, "username": "u", "password": "pw"}
    top = from_dict({"cluster": seeds, "listener": [{"listen": "127.0.0.1:7000", **pinned}]}, environ={})
    own = from_dict({"listener": [{"listen": "127.0.0.1:7000", **pinned, "cluster": seeds}]}, environ={})
    up = url.routes[0].upstream
    assert top.routes[0].upstream == own.routes[0].upstream == up
    assert up.cluster.seeds == (("h1", 7000), ("::1", 7001), ("h3", 6379)) and up.slot == key_slot(b"app")
    assert up.tls is not None and up.masked() == "rediss+cluster://u:***@h1:7000,[::1]:7001,h3:6379"
    # [upstream_tls] applies to it as to a rediss+cluster:// URL; plain without tls = true
    tls = from_dict({"cluster": seeds, "upstream_tls": {"verify": False},
                     "listener": [{"listen": "127.0.0.1:7000", **pinned}]}, environ={})
    assert tls.routes[0].upstream.tls.verify is False
    plain = from_dict({"listener": [{"listen": "127.0.0.1:7000", **pinned, "cluster": {"seeds": ["h1:7000"]}}]},
                      environ={})
    assert plain.routes[0].upstream.tls is None and plain.routes[0].upstream.masked() == "redis+cluster://h1:7000"
    # a listener's own upstream wins over the top-level [cluster]; a user may choose its own
    mixed = from_dict({"cluster": seeds, "listener": [
        {"listen": "127.0.0.1:7000", **pinned},
        {"listen": "127.0.0.1:7001", "upstream": "redis://h9:6379/2"},
        {"listen": "127.0.0.1:7002", **pinned, "user": [
            {"name": "b", "password_sha256": "0" * 64, "namespace": "b", "cluster": {"seeds": ["h8:7000"]}},
            {"name": "c", "password_sha256": "1" * 64, "upstream": "redis://h7:6379/0", "slot": "spread"}]}]},
        environ={})
    assert mixed.routes[1].upstream.host == "h9" and mixed.routes[0].upstream == up
    users = mixed.routes[2].users
    assert users["b"].route.upstream.cluster.seeds == (("h8", 7000),) and users["b"].route.upstream.slot == key_slot(b"b")
    assert users["c"].route.upstream.host == "h7" and users["c"].route.upstream.cluster is None
    # --upstream / REDIS_URL win over the file's [cluster] as over its upstream
    over = from_dict({"cluster": seeds, "listener": [{"listen": "127.0.0.1:7000"}]}, "redis://h5:6379/0", environ={})
    assert over.routes[0].upstream.host == "h5"
    # check's output (the URL form) is a configuration that gives it again
    again = from_dict(tomllib.loads(render_toml(own).replace("u:***@", "u:pw@")), environ={})
    assert again.routes[0].upstream == up
