"""Configuration by environment (containers): PROXY_* variables back the flags; flags win."""

import pytest

from proxy.cli import apply_env, build_parser, config_from_args
from proxy.config import ConfigError

TOML = 'upstream = "redis://file:1/0"\n[[listener]]\nlisten = "127.0.0.1:7000"\nnamespace = "a"\n'


def cfg(argv, env):
    a = apply_env(build_parser().parse_args(argv), env)
    return a, config_from_args(a)


def test_env_alone_configures_a_route(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://envhost:6400/5")
    a, c = cfg([], {"PROXY_LISTEN": "0.0.0.0:6380", "PROXY_NAMESPACE": "sidekiq", "PROXY_SEPARATOR": "/",
                    "PROXY_METRICS_LISTEN": "0.0.0.0:9121", "PROXY_LOG_LEVEL": "debug",
                    "PROXY_LOG_FORMAT": "json"})
    r = c.routes[0]
    assert r.listen == ("0.0.0.0", 6380) and r.upstream.host == "envhost" and r.default.db == 5
    assert r.default.keyspace.mode == "add" and r.default.keyspace.prefix == b"sidekiq/"
    assert c.metrics_listen == ("0.0.0.0", 9121)
    assert (a.log_level, a.log_format) == ("debug", "json")


def test_strip_namespace_from_env(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    _, c = cfg([], {"PROXY_LISTEN": "127.0.0.1:7000", "PROXY_STRIP_NAMESPACE": "old"})
    assert c.routes[0].default.keyspace.mode == "strip"


def test_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://envhost:6400/5")
    env = {"PROXY_LISTEN": "0.0.0.0:6380", "PROXY_NAMESPACE": "envns", "PROXY_SEPARATOR": "/",
           "PROXY_METRICS_LISTEN": "0.0.0.0:9121", "PROXY_LOG_LEVEL": "debug", "PROXY_LOG_FORMAT": "json"}
    a, c = cfg(["--listen", "127.0.0.1:7001", "--upstream", "redis://flag:1/1", "--strip-namespace", "flagns",
                "--separator", ":", "--metrics-listen", "127.0.0.1:9999", "--log-level", "error",
                "--log-format", "text"], env)
    r = c.routes[0]
    assert r.listen == ("127.0.0.1", 7001) and r.upstream.host == "flag"
    # --strip-namespace given: PROXY_NAMESPACE (the other mode) does not apply
    assert r.default.keyspace.mode == "strip" and r.default.keyspace.prefix == b"flagns:"
    assert c.metrics_listen == ("127.0.0.1", 9999)
    assert (a.log_level, a.log_format) == ("error", "text")
    _, c = cfg(["--namespace", "flagns"], env)
    assert c.routes[0].default.keyspace.prefix == b"flagns/" and c.routes[0].listen == ("0.0.0.0", 6380)


def test_config_file_from_env_and_image_default_listen(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    f = tmp_path / "p.toml"
    f.write_text(TOML + '[log]\nformat = "json"\nlevel = "warning"\n')
    # the image sets PROXY_LISTEN; with a config file the listeners come from the file
    a, c = cfg([], {"PROXY_CONFIG": str(f), "PROXY_LISTEN": "0.0.0.0:6380", "PROXY_METRICS_LISTEN": "0.0.0.0:9121"})
    assert [r.listen for r in c.routes] == [("127.0.0.1", 7000)]
    assert c.routes[0].upstream.host == "file" and c.metrics_listen == ("0.0.0.0", 9121)
    assert (c.log_format, c.log_level) == ("json", "warning")
    # a --listen flag with a config file is still a conflict
    with pytest.raises(ConfigError, match="--listen"):
        cfg(["--listen", "127.0.0.1:1"], {"PROXY_CONFIG": str(f)})
    # --config flag wins over PROXY_CONFIG
    g = tmp_path / "q.toml"
    g.write_text(TOML.replace("7000", "7002"))
    _, c = cfg(["--config", str(g)], {"PROXY_CONFIG": str(f)})
    assert c.routes[0].listen == ("127.0.0.1", 7002)


@pytest.mark.parametrize("env, message", [
    ({"PROXY_LISTEN": "h:1", "PROXY_NAMESPACE": "a", "PROXY_STRIP_NAMESPACE": "b"}, "not both"),
    ({"PROXY_LISTEN": "h:1", "PROXY_LOG_LEVEL": "verbose"}, "PROXY_LOG_LEVEL"),
    ({"PROXY_LISTEN": "h:1", "PROXY_LOG_FORMAT": "xml"}, "PROXY_LOG_FORMAT"),
])
def test_bad_env_is_named(env, message):
    with pytest.raises(ConfigError, match=message):
        cfg([], env)


def test_bad_env_listen_is_named(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="PROXY_LISTEN: expected HOST:PORT"):
        cfg([], {"PROXY_LISTEN": "nope"})
    with pytest.raises(ConfigError, match="PROXY_METRICS_LISTEN: expected HOST:PORT"):
        cfg([], {"PROXY_LISTEN": "h:1", "PROXY_METRICS_LISTEN": "nope"})


def test_empty_env_counts_as_unset(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    _, c = cfg([], {"PROXY_LISTEN": "h:1", "PROXY_NAMESPACE": "", "PROXY_METRICS_LISTEN": ""})
    assert c.routes[0].default.keyspace.mode == "none" and c.metrics_listen is None


@pytest.mark.parametrize("section, message", [
    ('[log]\nformat = "xml"\n', "log.format"), ('[log]\nlevel = "loud"\n', "log.level"),
    ('[log]\ncolour = true\n', "log.colour: unknown field"),
])
def test_log_section_validated(tmp_path, section, message):
    f = tmp_path / "p.toml"
    f.write_text(TOML + section)
    with pytest.raises(ConfigError, match=message):
        cfg(["--config", str(f)], {})
