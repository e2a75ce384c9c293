"""Every configuration mistake of issue 12, through the user's own door (a flag, a variable or
the TOML file): exit 2 and exactly one line that names the field as the user wrote it and
says what is allowed. Rows run `main()` in this process (fast); a sample runs the real
command as a subprocess to show the same line comes out of it."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from proxy.cli import main

BASE = '[[listener]]\nlisten = "127.0.0.1:7000"\n'

# (flags, environment, TOML (None: no file), the one line after "configuration error: ")
ROWS = [
    # -- [limits] values of the wrong type or out of range
    ([], {}, BASE + '[limits]\nmax_bulk = "lots"\n', 'limits.max_bulk: expected an integer >= 1 (bytes), got "lots"'),
    ([], {}, BASE + '[limits]\nmax_bulk = -5\n', "limits.max_bulk: expected an integer >= 1 (bytes), got -5"),
    ([], {}, BASE + '[limits]\nmax_bulk = true\n', "limits.max_bulk: expected an integer >= 1 (bytes), got true"),
    ([], {}, BASE + '[limits]\nmax_bulk = 1.5\n', "limits.max_bulk: expected an integer >= 1 (bytes), got 1.5"),
    ([], {}, BASE + '[limits]\nmax_query = 0\n', "limits.max_query: expected an integer >= 1 (bytes), got 0"),
    ([], {}, BASE + '[limits]\ndrain_timeout = "soon"\n',
     'limits.drain_timeout: expected a number of seconds >= 0, got "soon"'),
    ([], {}, BASE + '[limits]\nconnect_timeout = "soon"\n',
     'limits.connect_timeout: expected a number of seconds > 0, got "soon"'),
    ([], {}, BASE + '[limits]\nconnect_timeout = 0\n', "limits.connect_timeout: expected a number of seconds > 0, got 0"),
    ([], {}, BASE + '[limits]\nreload_grace = -1.0\n', "limits.reload_grace: expected a number of seconds >= 0, got -1.0"),
    ([], {}, BASE + '[limits]\ndrain_timeout = nan\n', "limits.drain_timeout: expected a number of seconds >= 0, got nan"),
    ([], {}, BASE + '[limits]\noutput_limit = -1\n', "limits.output_limit: expected an integer >= 0 (bytes), got -1"),
    ([], {}, BASE + '[limits]\npubsub_output_limit = "32mb"\n',
     'limits.pubsub_output_limit: expected an integer >= 0 (bytes), got "32mb"'),
    ([], {}, BASE + '[limits]\nupstream_mode = "Shared"\n',
     'limits.upstream_mode: expected one of shared, dedicated, got "Shared"'),
    ([], {}, BASE + "[limits]\nbogus = 1\n",
     "limits.bogus: unknown field (known: blocking_pool, blocking_pool_idle, connect_timeout, drain_timeout, idle_timeout, max_bulk, max_clients, "
     "max_query, output_limit, output_total_limit, pubsub_output_limit, reconnect_delay, reconnect_delay_max, "
     "reload_grace, reply_timeout, tcp_keepalive, upstream_mode)"),
    (["--config"], {}, 'limits = 5\n' + BASE, "limits: expected a [limits] table, got 5"),
    # -- unknown fields in every section
    ([], {}, BASE + '[metrics]\nlisten = "127.0.0.1:9121"\nport = 9121\n', "metrics.port: unknown field (known: listen)"),
    ([], {}, BASE + '[log]\ncolour = true\n', "log.colour: unknown field (known: format, level)"),
    ([], {}, BASE + 'colour = true\n', "listener[0].colour: unknown field (known: cluster, databases, listen, "
                                        "max_clients, name, namespace, policy, separator, slot, strip_namespace, tls, "
                                        "upstream, upstream_tls, user)"),
    ([], {}, 'colour = true\n' + BASE, "colour: unknown top-level field (known: admin, cluster, limits, listener, "
                                        "log, metrics, sentinel, separator, upstream, upstream_tls)"),
    ([], {}, BASE + '[listener.databases]\n1 = { db = 2, prefix = "x" }\n',
     "listener[0].databases.1.prefix: unknown field (known: db, namespace, separator, strip_namespace)"),
    # -- a cluster upstream as a seed list ([cluster], [listener.cluster])
    ([], {}, 'upstream = "redis+cluster://h:7000"\n[cluster]\nseeds = ["h:7000"]\n' + BASE,
     "upstream, cluster: give the upstream either as a URL or as a [cluster] seed list, not both"),
    ([], {}, BASE + 'upstream = "redis+cluster://h:7000"\n[listener.cluster]\nseeds = ["h:7000"]\n',
     "listener[0].upstream, listener[0].cluster: give the upstream either as a URL or as a [listener.cluster] seed "
     "list, not both"),
    ([], {}, BASE + 'namespace = "a"\nslot = "pinned"\n[listener.cluster]\ntls = true\n',
     'listener[0].cluster.seeds: required (the nodes asked for the slot map, e.g. seeds = ["10.0.0.1:6379", '
     '"10.0.0.2:6379"])'),
    ([], {}, BASE + '[listener.cluster]\nseeds = "h:7000,h:7001"\n',
     'listener[0].cluster.seeds: expected an array of "HOST:PORT" strings, e.g. ["10.0.0.1:6379", "10.0.0.2:6379"], '
     'got "h:7000,h:7001"'),
    ([], {}, BASE + '[listener.cluster]\nseeds = []\n',
     'listener[0].cluster.seeds: expected an array of "HOST:PORT" strings, e.g. ["10.0.0.1:6379", "10.0.0.2:6379"], '
     "got an empty array"),
    ([], {}, BASE + '[listener.cluster]\nseeds = ["h:7000", 7001]\n',
     'listener[0].cluster.seeds: expected "HOST:PORT" strings, got 7001 in the array'),
    # a password of the wrong type is not shown (digits written without quotes)
    ([], {}, '[cluster]\nseeds = ["h:7000"]\npassword = 84736251\n' + BASE,
     "cluster.password: expected a string (quoted), got a number (not shown: a password)"),
    ([], {}, 'upstream = "redis+sentinel://h:26379/m"\n[sentinel]\npassword = 84736251\n' + BASE,
     "sentinel.password: expected a string (quoted), got a number (not shown: a password)"),
    ([], {}, '[cluster]\nseeds = ["h:70000"]\n' + BASE,
     "cluster.seeds: port must be a number from 1 to 65535 in seed 'h:70000'"),
    ([], {}, '[cluster]\nseeds = ["::1:7000"]\n' + BASE,
     "cluster.seeds: bad seed '::1:7000': expected HOST:PORT (IPv6 as [::1]:7000)"),
    ([], {}, '[cluster]\nseeds = ["h:7000"]\nport = 7000\n' + BASE,
     "cluster.port: unknown field (known: password, seeds, tls, username)"),
    ([], {}, '[cluster]\nseeds = ["h:7000"]\nusername = "app"\n' + BASE,
     "cluster.username: given without cluster.password"),
    # (a spread route on a cluster is accepted since spread routing was built; another db is not)
    ([], {}, '[cluster]\nseeds = ["h:7000"]\n' + BASE + 'namespace = "a"\n[listener.databases.1]\ndb = 1\n'
     'namespace = "b"\n',
     "listener[0].databases.1.db: a Redis Cluster has db 0 only (route 127.0.0.1:7000 is on redis+cluster://h:7000); "
     "map client db 1 to db = 0 with a namespace of its own"),
    ([], {}, BASE + 'namespace = "a"\nslot = "pinned"\n[listener.cluster]\nseeds = ["h:7000"]\n'
     '[listener.upstream_tls]\nverify = false\n',
     "listener[0].upstream_tls: the upstream is redis+cluster://h:7000, plain TCP; set tls = true in its cluster "
     "table to connect with TLS"),
    # -- listeners
    ([], {}, BASE + 'namespace = 5\n', "listener[0].namespace: expected a string, got 5"),
    ([], {}, BASE + 'namespace = "x*"\n', "listener[0].namespace: \"x*\" must not contain '*': it breaks SORT BY/GET "
                                          "patterns, where Redis substitutes the first '*'"),
    ([], {}, BASE + 'name = "a"\n[[listener]]\nlisten = "127.0.0.1:7001"\nname = "a"\n',
     "listener[1].name: 'a' is already listener[0]'s name (names must be unique: logs and metrics tell routes "
     "apart by them)"),
    ([], {}, BASE + '[[listener]]\nlisten = "127.0.0.1:7000"\n',
     "listener[1].listen: 127.0.0.1:7000 is already listener[0]'s address (each listener needs its own)"),
    ([], {}, '[[listener]]\nlisten = "26396"\n',
     "listener[0].listen: expected HOST:PORT, got a port alone (\"26396\"): give the host too, e.g. "
     "127.0.0.1:26396 (this machine only) or 0.0.0.0:26396 (every interface)"),
    ([], {}, '[[listener]]\nlisten = "127.0.0.1:70000"\n',
     "listener[0].listen: port 70000 is out of range (0 to 65535) in \"127.0.0.1:70000\""),
    ([], {}, '[[listener]]\nlisten = 6380\n',
     'listener[0].listen: expected "HOST:PORT" as a string, e.g. "127.0.0.1:6380", got 6380'),
    ([], {}, '[listener]\nlisten = "127.0.0.1:7000"\n',
     "listener: expected [[listener]] tables (two brackets), got [listener]"),
    ([], {}, BASE + '[listener.databases]\n1 = { db = "3" }\n',
     'listener[0].databases.1.db: expected an integer >= 0, got "3"'),
    # -- URLs in the file
    ([], {}, BASE + 'upstream = "redis://127.0.0.1:6379/1?db=3"\n',
     "listener[0].upstream: db given twice, /1 and ?db=3, in 'redis://127.0.0.1:6379/1?db=3': give one"),
    ([], {}, BASE + 'upstream = "redis://127.0.0.1:6379/?db=3&socket_timeout=1"\n',
     "listener[0].upstream: query parameter 'socket_timeout' is not supported in "
     "'redis://127.0.0.1:6379/?db=3&socket_timeout=1' (only ?db=N)"),
    ([], {}, 'upstream = "127.0.0.1:26379"\n' + BASE,
     "upstream: expected a URL, redis://HOST:PORT/DB (e.g. redis://127.0.0.1:26379/0), got '127.0.0.1:26379'"),
    ([], {}, BASE + 'upstream = "redis://:secret@h:99999/0"\n',
     "listener[0].upstream: port must be a number from 1 to 65535 in 'redis://:***@h:99999/0'"),
    # -- flags: named as flags, never as TOML paths
    (["--max-bulk-len", "-1"], {}, None, "--max-bulk-len: expected an integer >= 1 (bytes), got '-1'"),
    (["--max-bulk-len", "lots"], {}, None, "--max-bulk-len: expected an integer >= 1 (bytes), got 'lots'"),
    (["--max-query-len", "1.5"], {}, None, "--max-query-len: expected an integer >= 1 (bytes), got '1.5'"),
    (["--drain-timeout", "-1"], {}, None, "--drain-timeout: expected a number of seconds >= 0, got '-1'"),
    (["--connect-timeout", "0"], {}, None, "--connect-timeout: expected a number of seconds > 0, got '0'"),
    (["--output-limit", "-1"], {}, None, "--output-limit: expected an integer >= 0 (bytes), got '-1'"),
    (["--upstream-mode", "pool"], {}, None, "--upstream-mode: expected one of shared, dedicated, got 'pool'"),
    (["--upstream", "127.0.0.1:26379"], {}, None,
     "--upstream: expected a URL, redis://HOST:PORT/DB (e.g. redis://127.0.0.1:26379/0), got '127.0.0.1:26379'"),
    (["--upstream", "redis://127.0.0.1:6379/1?db=3"], {}, None,
     "--upstream: db given twice, /1 and ?db=3, in 'redis://127.0.0.1:6379/1?db=3': give one"),
    (["--upstream", "redis://u:secret@h:1/0?password=x"], {}, None,
     "--upstream: query parameter 'password' is not supported in 'redis://u:***@h:1/0?password=x' (only ?db=N)"),
    (["--upstream", "http://h:1/0"], {}, None,
     "--upstream: scheme must be redis:// or rediss:// (TLS), or redis+sentinel:// / rediss+sentinel:// "
     "(Sentinel) (got http://)"),
    (["--upstream", "rediss://h:1/0", "--upstream-tls-verify", "maybe"], {}, None,
     "--upstream-tls-verify: expected true or false, got 'maybe'"),
    (["--upstream-tls-server-name", "redis.example"], {}, None,
     "--upstream-tls-server-name: no upstream is rediss:// (TLS settings apply to rediss:// upstreams; "
     "redis:// stays plain TCP)"),
    (["--upstream", "rediss://h:1/0"], {"PROXY_UPSTREAM_TLS_CA_FILE": "/no/such/ca.pem"}, None,
     "PROXY_UPSTREAM_TLS_CA_FILE: cannot read '/no/such/ca.pem': no such file"),
    (["--tls-key-file", "/no/such.key"], {}, None, "--tls-cert-file: required for TLS (the proxy's certificate, PEM)"),
    (["--listen", "26396"], {}, None,
     "--listen: expected HOST:PORT, got a port alone ('26396'): give the host too, e.g. 127.0.0.1:26396 "
     "(this machine only) or 0.0.0.0:26396 (every interface)"),
    (["--listen", "127.0.0.1:70000"], {}, None, "--listen: port 70000 is out of range (0 to 65535) in '127.0.0.1:70000'"),
    (["--listen", "localhost"], {}, None, "--listen: expected HOST:PORT, e.g. 127.0.0.1:6380, got 'localhost'"),
    (["--namespace", "x*"], {}, None, "--namespace: 'x*' must not contain '*': it breaks SORT BY/GET patterns, "
                                      "where Redis substitutes the first '*'"),
    (["--namespace", ""], {}, None, "--namespace: must not be empty (leave it out for no namespace)"),
    (["--separator", "*"], {}, None, "--separator: '*' must not contain '*'"),
    (["--metrics-listen", "9121"], {}, None,
     "--metrics-listen: expected HOST:PORT, got a port alone ('9121'): give the host too, e.g. 127.0.0.1:9121 "
     "(this machine only) or 0.0.0.0:9121 (every interface)"),
    (["--workers", "0"], {}, None, "--workers: expected an integer 1 to 256, got '0'"),
    (["--log-level", "loud"], {}, None, "--log-level: expected one of debug, info, warning, error, got 'loud'"),
    (["--config", "--namespace", "a"], {}, BASE,
     "--namespace: give `namespace` in the config file's listeners, or flags without --config"),
    (["--config", "--listen", "127.0.0.1:1"], {}, BASE,
     "--listen: give `listen` in the config file's listeners, or flags without --config"),
    (["--config", "--upstream", "127.0.0.1:1"], {}, BASE,
     "--upstream: expected a URL, redis://HOST:PORT/DB (e.g. redis://127.0.0.1:1/0), got '127.0.0.1:1'"),
    (["--config", "--max-bulk-len", "-5"], {}, BASE, "--max-bulk-len: expected an integer >= 1 (bytes), got '-5'"),
    # -- environment variables: named as variables
    ([], {"PROXY_UPSTREAM_MODE": "Shared"}, None,
     "PROXY_UPSTREAM_MODE: expected one of shared, dedicated, got 'Shared'"),
    ([], {"PROXY_UPSTREAM_MODE": "pool"}, None, "PROXY_UPSTREAM_MODE: expected one of shared, dedicated, got 'pool'"),
    ([], {"PROXY_MAX_BULK_LEN": "-5"}, None, "PROXY_MAX_BULK_LEN: expected an integer >= 1 (bytes), got '-5'"),
    ([], {"PROXY_DRAIN_TIMEOUT": "soon"}, None, "PROXY_DRAIN_TIMEOUT: expected a number of seconds >= 0, got 'soon'"),
    ([], {"PROXY_CONNECT_TIMEOUT": "0"}, None, "PROXY_CONNECT_TIMEOUT: expected a number of seconds > 0, got '0'"),
    ([], {"REDIS_URL": "127.0.0.1:26379"}, None,
     "REDIS_URL: expected a URL, redis://HOST:PORT/DB (e.g. redis://127.0.0.1:26379/0), got '127.0.0.1:26379'"),
    ([], {"REDIS_URL": "redis://h:1/2?db=3"}, None,
     "REDIS_URL: db given twice, /2 and ?db=3, in 'redis://h:1/2?db=3': give one"),
    (["--config"], {"REDIS_URL": "redis://h:1/x"}, BASE, "REDIS_URL: db must be a number, got 'x' in 'redis://h:1/x'"),
    ([], {"PROXY_LISTEN": "26396"}, None,
     "PROXY_LISTEN: expected HOST:PORT, got a port alone ('26396'): give the host too, e.g. 127.0.0.1:26396 "
     "(this machine only) or 0.0.0.0:26396 (every interface)"),
    ([], {"PROXY_LISTEN": "127.0.0.1:70000"}, None,
     "PROXY_LISTEN: port 70000 is out of range (0 to 65535) in '127.0.0.1:70000'"),
    ([], {"PROXY_NAMESPACE": "x*"}, None,
     "PROXY_NAMESPACE: 'x*' must not contain '*': it breaks SORT BY/GET patterns, where Redis substitutes the first '*'"),
    ([], {"PROXY_NAMESPACE": "a", "PROXY_STRIP_NAMESPACE": "b"}, None,
     "PROXY_NAMESPACE, PROXY_STRIP_NAMESPACE: give one of them, not both"),
    ([], {"PROXY_WORKERS": "two"}, None, "PROXY_WORKERS: expected an integer 1 to 256, got 'two'"),
    ([], {"PROXY_LOG_LEVEL": "verbose"}, None,
     "PROXY_LOG_LEVEL: expected one of debug, info, warning, error, got 'verbose'"),
    ([], {"PROXY_LOG_FORMAT": "xml"}, None, "PROXY_LOG_FORMAT: expected one of text, json, got 'xml'"),
    ([], {"PROXY_METRICS_LISTEN": "nope"}, None,
     "PROXY_METRICS_LISTEN: expected HOST:PORT, e.g. 127.0.0.1:6380, got 'nope'"),
    (["--config"], {"PROXY_METRICS_LISTEN": "127.0.0.1:x"}, BASE,
     "PROXY_METRICS_LISTEN: expected HOST:PORT with a numeric port, got '127.0.0.1:x'"),
]

LINE = re.compile(r"^\S+Z ERROR keyspace-proxy: configuration error: (.*) event=config_error$")


def _argv(flags, toml, env, tmp_path):
    """The flags of a row, with --config FILE for its TOML, or a --listen if it needs one."""
    argv = list(flags)
    if toml is not None:
        path = tmp_path / "proxy.toml"
        path.write_text(toml)
        if "--config" in argv:
            argv[argv.index("--config") + 1:argv.index("--config") + 1] = [str(path)]
        else:
            argv = ["--config", str(path)] + argv
    elif "--listen" not in argv and "PROXY_LISTEN" not in env:
        argv = ["--listen", "127.0.0.1:7000"] + argv
    return argv


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("PROXY_") or k == "REDIS_URL":
            monkeypatch.delenv(k)
    return monkeypatch


@pytest.mark.parametrize("flags, env, toml, message", ROWS, ids=[r[3][:60] for r in ROWS])
def test_mistake_exits_2_with_one_line_naming_the_field(flags, env, toml, message, tmp_path, clean_env, capsys):
    argv = _argv(flags, toml, env, tmp_path)
    for k, v in env.items():
        clean_env.setenv(k, v)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m.group(1) == message
    assert "secret" not in err


def run(argv, env=None, timeout=30):
    e = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k == "REDIS_URL")}
    e.update(PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=ROOT)


@pytest.mark.parametrize("row", [0, 33, 40, 56], ids=lambda i: ROWS[i][3][:40])
def test_the_command_prints_the_same_line(row, tmp_path):
    flags, env, toml, message = ROWS[row]
    p = run(_argv(flags, toml, env, tmp_path), env)
    assert p.returncode == 2
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert LINE.match(p.stderr.strip()).group(1) == message


def test_json_format_gives_one_json_line():
    p = run(["--listen", "127.0.0.1:1", "--log-format", "json", "--max-bulk-len", "-1"])
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
    rec = json.loads(p.stderr)
    assert rec["msg"] == "configuration error: --max-bulk-len: expected an integer >= 1 (bytes), got '-1'"
    assert rec["level"] == "error" and rec["event"] == "config_error"


def test_argparse_mistakes_are_one_line_too():
    p = run(["--listen", "127.0.0.1:1", "--bogus", "redis://u:secret@h/0"])
    assert p.returncode == 2 and p.stderr == (
        "keyspace-proxy: error: unrecognized arguments: --bogus redis://u:***@h/0 (see keyspace-proxy --help)\n")
    p = run(["--namespace", "a", "--strip-namespace", "b"])
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1
    assert "--strip-namespace: not allowed with argument --namespace" in p.stderr


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "supervisor"])
def test_busy_metrics_port_names_the_address(workers):
    s, port = _busy_port()
    with s:
        p = run(["--listen", "127.0.0.1:0" if not workers else f"127.0.0.1:{_free()}",
                 "--metrics-listen", f"127.0.0.1:{port}", *workers])
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert len(lines) == 1, p.stderr
    assert lines[0].endswith(f" ERROR keyspace-proxy: cannot listen on metrics port 127.0.0.1:{port} "
                             "(--metrics-listen / [metrics] listen): address already in use event=start_error")
    assert "Traceback" not in p.stderr


def test_busy_listen_port_names_the_address():
    s, port = _busy_port()
    with s:
        p = run(["--listen", f"127.0.0.1:{port}"])
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert len(lines) == 1, p.stderr
    assert lines[0].endswith(f" ERROR keyspace-proxy: cannot listen on 127.0.0.1:{port}: address already in use "
                             "event=start_error"), p.stderr


def _free():
    from proxy.embedded import free_port
    return free_port()


# -- what is right is taken, from every door

def test_env_and_flags_set_every_limit(clean_env):
    from proxy.cli import apply_env, build_parser, config_from_args
    env = {"PROXY_LISTEN": "127.0.0.1:1", "PROXY_MAX_BULK_LEN": "1000", "PROXY_MAX_QUERY_LEN": "2000",
           "PROXY_CONNECT_TIMEOUT": "0.5", "PROXY_DRAIN_TIMEOUT": "0", "PROXY_RELOAD_GRACE": "7",
           "PROXY_UPSTREAM_MODE": "dedicated", "PROXY_OUTPUT_LIMIT": "0", "PROXY_PUBSUB_OUTPUT_LIMIT": "5"}
    lim = config_from_args(apply_env(build_parser().parse_args([]), env)).limits
    assert (lim.max_bulk, lim.max_query, lim.connect_timeout, lim.drain_timeout, lim.reload_grace,
            lim.upstream_mode, lim.output_limit, lim.pubsub_output_limit) == (1000, 2000, 0.5, 0.0, 7.0,
                                                                                "dedicated", 0, 5)
    lim = config_from_args(apply_env(build_parser().parse_args(["--max-bulk-len", "9", "--upstream-mode",
                                                                "shared"]), env)).limits
    assert (lim.max_bulk, lim.upstream_mode) == (9, "shared")  # the flag wins


def test_flag_over_env_over_file(tmp_path, clean_env):
    from proxy.cli import apply_env, build_parser, config_from_args
    f = tmp_path / "p.toml"
    f.write_text(BASE + '[limits]\ndrain_timeout = 3\nmax_bulk = 100\nupstream_mode = "dedicated"\n')
    a = apply_env(build_parser().parse_args(["--config", str(f), "--max-bulk-len", "300"]),
                  {"PROXY_DRAIN_TIMEOUT": "2", "PROXY_MAX_BULK_LEN": "200", "PROXY_SEPARATOR": "/",
                   "PROXY_NAMESPACE": "ignored"})
    cfg = config_from_args(a)
    assert (cfg.limits.drain_timeout, cfg.limits.max_bulk, cfg.limits.upstream_mode) == (2.0, 300, "dedicated")
    # the route-shaping variables do not apply with a file (README: give them in the file)
    assert cfg.routes[0].default.keyspace.mode == "none"


def test_db_in_query_reaches_the_route(clean_env):
    from proxy.cli import apply_env, build_parser, config_from_args
    a = apply_env(build_parser().parse_args(["--listen", "127.0.0.1:1", "--upstream", "redis://h:1?db=3"]), {})
    assert config_from_args(a).routes[0].default.db == 3
