"""TLS on both sides (issue 13, items 1 and 2), against Debian's redis-server started with
`--tls-port` and certificates made here with trustme:

- rediss:// upstreams: plain commands, MULTI, pub/sub, in every upstream mode; a wrong CA,
  a name mismatch and a missing client certificate are clear errors to the client and in
  the log; verification off works and is logged; mutual TLS with an AUTH token (the
  ElastiCache shape); the readiness check, the command-table check at start,
  `keyspace-proxy check` and `keyspace-proxy migrate` over TLS;
- TLS listeners: redis-py with ssl=True, with and without client certificates, and new
  certificates taken by new connections on SIGHUP.

Each TLS server keeps a plain port too: start_server's readiness probe is a plain PING,
and the tests look at the data through it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from conftest import CI, ROOT
from integration_helpers import TIMEOUT, uniq, wait_for
from proxy.config import ConfigError, from_dict, parse_url, render_toml
from proxy.embedded import ServerStartError, free_port, start_server

import trustme  # noqa: E402  (the test extra: a missing one is a failure, not a skip)

TOKEN = "tls-auth-t0ken-never-logged"

if not shutil.which("redis-server") and not CI:
    pytest.skip("redis-server (built with TLS) is not on PATH", allow_module_level=True)


class Certs:
    def __init__(self, d):
        self.dir = d
        ca, other = trustme.CA(), trustme.CA()
        self.ca = self._write(ca.cert_pem, "ca.pem")
        self.other_ca = self._write(other.cert_pem, "other-ca.pem")
        server = ca.issue_cert("localhost", "127.0.0.1", "redis.example")
        self.server_cert = self._write_chain(server, "server.crt")
        self.server_key = self._write(server.private_key_pem, "server.key")
        client = ca.issue_cert("app-client")
        self.client_pem = self._write(client.private_key_and_cert_chain_pem, "client.pem")  # key + cert
        stranger = other.issue_cert("stranger")
        self.stranger_pem = self._write(stranger.private_key_and_cert_chain_pem, "stranger.pem")
        proxy = ca.issue_cert("localhost", "127.0.0.1")
        self.proxy_cert = self._write_chain(proxy, "proxy.crt")
        self.proxy_key = self._write(proxy.private_key_pem, "proxy.key")
        proxy2 = other.issue_cert("localhost", "127.0.0.1")   # the rotated certificate, from another CA
        self.proxy2_cert = self._write_chain(proxy2, "proxy2.crt")
        self.proxy2_key = self._write(proxy2.private_key_pem, "proxy2.key")

    def _write(self, blob, name):
        path = os.path.join(self.dir, name)
        blob.write_to_path(path)
        return path

    def _write_chain(self, cert, name):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(str(tmp_path_factory.mktemp("certs")))


class TLSServer:
    def __init__(self, server, tls_port):
        self.server, self.host, self.port, self.tls_port = server, server.host, server.port, tls_port

    def url(self, db=0, auth=""):
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/{db}"

    def direct(self, db=0, **kw):
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=TIMEOUT, **kw)

    def tls_clients(self):
        """Clients connected to the TLS port (CLIENT LIST's laddr)."""
        return [c for c in self.direct(password=self.password).client_list()
                if c.get("laddr", "").endswith(f":{self.tls_port}")]

    password = None


def start_tls_server(certs, auth_clients: str) -> TLSServer:
    tls_port = free_port()
    try:
        s = start_server("redis", extra=["--tls-port", str(tls_port), "--tls-cert-file", certs.server_cert,
                                         "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca,
                                         "--tls-auth-clients", auth_clients])
    except ServerStartError as e:
        pytest.fail(f"cannot start redis-server with TLS: {e}")
    return TLSServer(s, tls_port)


@pytest.fixture(scope="module")
def tls_server(certs):
    """TLS on its tls_port, client certificates not asked for."""
    t = start_tls_server(certs, "no")
    yield t
    t.server.stop()


@pytest.fixture(scope="module")
def mtls_server(certs):
    """TLS requiring a client certificate signed by the CA, and a password (an AUTH token)."""
    t = start_tls_server(certs, "yes")
    redis.Redis(host=t.host, port=t.port).config_set("requirepass", TOKEN)
    t.password = TOKEN
    yield t
    t.server.stop()


_dbs = __import__("itertools").cycle(range(1, 13))  # 13..15: the migrate test's


@pytest.fixture
def tdb(tls_server):
    db = next(_dbs)
    tls_server.direct(db).flushdb()
    return db


def proxy_client(p, **kw) -> redis.Redis:
    kw.setdefault("socket_timeout", TIMEOUT)
    kw.setdefault("socket_connect_timeout", TIMEOUT)
    return redis.Redis(host="127.0.0.1", port=p.port, **kw)


def wait_log(p, needle, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = p.output()
        if needle in out:
            return out
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not logged:\n{p.output()}")


# -- configuration (no servers)

def test_rediss_urls_get_tls_and_redis_urls_stay_plain():
    up = parse_url("rediss://:tok@master.example.cache.amazonaws.com:6380/2")
    assert up.tls is not None and up.tls.verify and up.tls.ca_file is None
    assert up.masked() == "rediss://:***@master.example.cache.amazonaws.com:6380/2"
    assert up.ssl_args()["server_hostname"] == "master.example.cache.amazonaws.com"
    assert parse_url("redis://h:6379/0").tls is None and parse_url("redis://h:6379/0").ssl_args() == {}
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        parse_url("https://h/0")


def test_top_level_settings_apply_to_rediss_upstreams_and_a_listener_overrides_field_by_field(certs):
    cfg = from_dict({"upstream": "rediss://10.0.0.5:6379/0",
                     "upstream_tls": {"ca_file": certs.ca, "server_name": "redis.example"},
                     "listener": [{"listen": "127.0.0.1:7000"},
                                  {"listen": "127.0.0.1:7001", "upstream_tls": {"verify": False}},
                                  {"listen": "127.0.0.1:7002", "upstream": "redis://10.0.0.6/0"}]}, environ={})
    a, b, plain = (r.upstream for r in cfg.routes)
    assert (a.tls.ca_file, a.tls.server_name, a.tls.verify) == (certs.ca, "redis.example", True)
    assert (b.tls.ca_file, b.tls.server_name, b.tls.verify) == (certs.ca, "redis.example", False)
    assert plain.tls is None
    assert b.tls.context().verify_mode == ssl.CERT_NONE and a.tls.context().verify_mode == ssl.CERT_REQUIRED
    again = from_dict(__import__("tomllib").loads(render_toml(cfg)), environ={})  # check's output is a config
    assert [r.upstream.tls for r in again.routes] == [a.tls, b.tls, None]


@pytest.mark.parametrize("data, error", [
    ({"listener": [{"listen": "127.0.0.1:7000", "upstream_tls": {"verify": False}}]},
     "listener[0].upstream_tls: the upstream is redis://127.0.0.1:6379/0, plain TCP; write rediss://"),
    ({"upstream_tls": {"verify": False}, "listener": [{"listen": "127.0.0.1:7000"}]},
     "upstream_tls.verify: no upstream is rediss://"),
    ({"upstream": "rediss://h/0", "upstream_tls": {"ca_file": "/no/such/ca.pem"}, "listener": [{"listen": ":7000"}]},
     "upstream_tls.ca_file: cannot read '/no/such/ca.pem': no such file"),
    ({"upstream": "rediss://h/0", "upstream_tls": {"ca_file": "/etc/hostname"}, "listener": [{"listen": ":7000"}]},
     "upstream_tls.ca_file: '/etc/hostname' is not a PEM file of CA certificates"),
    ({"upstream": "rediss://h/0", "upstream_tls": {"key_file": "/k"}, "listener": [{"listen": ":7000"}]},
     "upstream_tls.key_file: given without cert_file"),
    ({"upstream": "rediss://h/0", "upstream_tls": {"verify": "no"}, "listener": [{"listen": ":7000"}]},
     'upstream_tls.verify: expected true or false, got "no"'),
    ({"upstream": "rediss://h/0", "upstream_tls": {"sni": "x"}, "listener": [{"listen": ":7000"}]},
     "upstream_tls.sni: unknown field (known: ca_dir, ca_file, cert_file, key_file, server_name, verify)"),
    ({"listener": [{"listen": ":7000", "tls": {"key_file": "/k"}}]}, "listener[0].tls.cert_file: required for TLS"),
    ({"listener": [{"listen": ":7000", "tls": "on"}]}, "listener[0].tls: expected a table of settings"),
])
def test_tls_configuration_errors_name_the_setting(data, error, certs):
    if "/etc/hostname" in str(data) and not os.path.exists("/etc/hostname"):
        pytest.skip("no /etc/hostname")
    with pytest.raises(ConfigError) as e:
        from_dict(data, environ={})
    assert error in str(e.value)


def test_a_listener_certificate_without_its_key_is_refused(certs):
    with pytest.raises(ConfigError, match=r"listener\[0\]\.tls\.cert_file: .* is not a PEM certificate with its key"):
        from_dict({"listener": [{"listen": ":7000", "tls": {"cert_file": certs.proxy_cert}}]}, environ={})


# -- the proxy to a TLS upstream

def test_plain_commands_multi_and_pubsub_over_a_tls_upstream(tls_server, tdb, certs, start_proxy):
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca, "--namespace", "ns"])
    r = proxy_client(p)
    assert r.set("k", "v") and r.get("k") == b"v"
    with r.pipeline(transaction=False) as pl:
        for i in range(50):
            pl.incr("n")
        assert pl.execute()[-1] == 50
    with r.pipeline(transaction=True) as tx:  # MULTI/EXEC: a connection of its own in shared mode
        tx.set("a", "1").incr("a").get("a")
        assert tx.execute() == [True, 2, b"2"]
    d = tls_server.direct(tdb)
    assert d.get("ns:k") == b"v" and d.get("ns:n") == b"50" and d.get("ns:a") == b"2"
    ch = uniq("ch")
    sub = proxy_client(p).pubsub()
    sub.subscribe(ch)
    assert wait_for(lambda: sub.get_message(timeout=0.2), what="subscribe")["type"] == "subscribe"
    assert r.publish(ch, "hello") == 1
    msg = wait_for(lambda: sub.get_message(timeout=0.2), what="message")
    assert (msg["type"], msg["data"]) == ("message", b"hello")
    assert tls_server.tls_clients(), "the proxy's upstream connections are on the TLS port"
    sub.close()
    out = p.output()
    assert "could not list its commands" not in out and "rediss://127.0.0.1" in out  # the start-up check, over TLS


def test_a_wrong_ca_is_a_clear_error_to_the_client_and_in_the_log(tls_server, tdb, certs, start_proxy):
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.other_ca])
    with pytest.raises(redis.ResponseError) as e:
        proxy_client(p).set("k", "v")
    msg = str(e.value)
    assert "upstream unavailable" in msg and f"TLS handshake with 127.0.0.1:{tls_server.tls_port} failed" in msg
    assert "certificate verify failed: " in msg and "upstream_tls.ca_file" in msg
    out = wait_log(p, "could not list its commands")
    assert "certificate verify failed" in out.split("could not list its commands")[1].splitlines()[0]
    assert "WARNING keyspace-proxy: route" in out and "certificate verify failed" in out


def test_a_name_mismatch_fails_with_verification_on(tls_server, tdb, certs, start_proxy):
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca,
                     "--upstream-tls-server-name", "wrong.example"])
    with pytest.raises(redis.ResponseError) as e:
        proxy_client(p).get("k")
    assert "Hostname mismatch, certificate is not valid for 'wrong.example'" in str(e.value)
    assert "upstream_tls.server_name" in str(e.value)
    assert "Hostname mismatch" in p.output()


def test_server_name_is_what_is_verified(tls_server, tdb, certs, start_proxy):
    # the URL names an address the certificate also lists; server_name picks the name checked
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca,
                     "--upstream-tls-server-name", "redis.example"])
    assert proxy_client(p).ping()


def test_verification_off_works_and_is_logged_at_warning(tls_server, tdb, start_proxy):
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-verify", "false"])  # no CA at all
    r = proxy_client(p)
    assert r.set("k", "1") and r.get("k") == b"1"
    out = p.output()
    line = next(ln for ln in out.splitlines() if "verification is off" in ln)
    assert " WARNING " in line and "upstream_tls.verify = false" in line


def test_plain_redis_url_to_a_tls_port_fails_without_hanging(tls_server, tdb, certs, start_proxy):
    p = start_proxy(["--upstream", f"redis://127.0.0.1:{tls_server.tls_port}/{tdb}", "--connect-timeout", "2"])
    with pytest.raises((redis.ResponseError, redis.ConnectionError)) as e:
        proxy_client(p, socket_timeout=5).get("k")  # Redis drops the plain bytes; nothing hangs
    print(e.value)


def test_rediss_url_to_a_plain_port_says_so(tls_server, tdb, start_proxy):
    p = start_proxy(["--upstream", f"rediss://127.0.0.1:{tls_server.port}/{tdb}", "--connect-timeout", "1"])
    with pytest.raises(redis.ResponseError) as e:
        proxy_client(p).get("k")
    assert "no TLS handshake with 127.0.0.1:" in str(e.value) and "not speaking TLS on that port?" in str(e.value)


def test_mutual_tls_and_an_auth_token_to_the_upstream(mtls_server, certs, start_proxy):
    mtls_server.direct(3, password=TOKEN).flushdb()
    url = mtls_server.url(3, auth=f":{TOKEN}@")
    p = start_proxy(["--upstream", url, "--upstream-tls-ca-file", certs.ca, "--upstream-tls-cert-file",
                     certs.client_pem, "--namespace", "m"])
    r = proxy_client(p)
    assert r.set("k", "v") and r.get("k") == b"v"
    with r.pipeline(transaction=True) as tx:
        tx.incr("c").incr("c")
        assert tx.execute() == [1, 2]
    assert mtls_server.direct(3, password=TOKEN).get("m:k") == b"v"
    assert TOKEN not in p.output()


def test_mutual_tls_without_a_client_certificate_fails_clearly(mtls_server, certs, start_proxy):
    p = start_proxy(["--upstream", mtls_server.url(3, auth=f":{TOKEN}@"), "--upstream-tls-ca-file", certs.ca])
    with pytest.raises((redis.ResponseError, redis.ConnectionError)) as e:
        proxy_client(p).get("k")
    assert "certificate required" in str(e.value) or "upstream unavailable" in str(e.value)
    assert "certificate required" in wait_log(p, "certificate required")
    assert TOKEN not in p.output()


def test_readiness_follows_a_tls_upstream(tls_server, tdb, certs, start_proxy):
    mport = free_port()
    good = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca,
                        "--metrics-listen", f"127.0.0.1:{mport}"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=10).read().decode()
    assert body == f"127.0.0.1:{good.port}: ok\n"
    mport2 = free_port()
    start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.other_ca,
                 "--metrics-listen", f"127.0.0.1:{mport2}"])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{mport2}/readyz", timeout=10)
    assert e.value.code == 503


# -- TLS listeners

def tls_proxy_client(p, ca, **kw) -> redis.Redis:
    # retry=None: a refused handshake is reported at once, not retried with back-off
    return proxy_client(p, ssl=True, ssl_ca_certs=ca, ssl_cert_reqs="required", ssl_check_hostname=True,
                        retry=None, **kw)


def test_clients_over_tls_to_the_proxy(tls_server, tdb, certs, start_proxy):
    mport = free_port()
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca, "--namespace", "c",
                     "--tls-cert-file", certs.proxy_cert, "--tls-key-file", certs.proxy_key,
                     "--metrics-listen", f"127.0.0.1:{mport}"])
    r = tls_proxy_client(p, certs.ca)
    assert r.set("k", "v") and r.get("k") == b"v"
    with r.pipeline(transaction=True) as tx:
        tx.incr("x").incr("x")
        assert tx.execute() == [1, 2]
    assert tls_server.direct(tdb).get("c:k") == b"v"
    with pytest.raises(redis.ConnectionError):
        proxy_client(p, retry=None).ping()  # plain TCP to a TLS listener
    with pytest.raises(redis.ConnectionError):
        tls_proxy_client(p, certs.other_ca).ping()  # a client that does not trust the proxy's CA
    assert r.ping()  # the failed handshakes hurt no one
    assert f"127.0.0.1:{p.port}, TLS -> rediss://" in p.output()
    # counted and logged (one line for the burst, then quiet for LIMIT_LOG_WINDOW)
    out = wait_log(p, "a client's TLS handshake failed")
    line = next(x for x in out.splitlines() if "a client's TLS handshake failed" in x)
    assert f"127.0.0.1:{p.port}" in line, line
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    failed = re.search(r'keyspace_proxy_errors_total\{kind="tls_handshake",route="[^"]*"\} (\S+)', text)
    assert failed and float(failed.group(1)) >= 1, text


def test_clients_must_present_a_certificate_when_the_listener_has_a_ca(tls_server, tdb, certs, start_proxy):
    p = start_proxy(["--upstream", tls_server.url(tdb), "--upstream-tls-ca-file", certs.ca,
                     "--tls-cert-file", certs.proxy_cert, "--tls-key-file", certs.proxy_key, "--tls-ca-file", certs.ca])
    assert tls_proxy_client(p, certs.ca, ssl_certfile=certs.client_pem).ping()
    with pytest.raises(redis.ConnectionError):
        tls_proxy_client(p, certs.ca).ping()                                 # no certificate
    with pytest.raises(redis.ConnectionError):
        tls_proxy_client(p, certs.ca, ssl_certfile=certs.stranger_pem).ping()  # signed by another CA
    assert "TLS with client certificates" in p.output()


def test_a_tls_listener_with_users(tls_server, tdb, certs, start_proxy):
    """Authentication at the proxy over TLS: the password travels encrypted, each user
    has its route (here: its namespace) over the rediss:// upstream."""
    import hashlib
    port = free_port()
    digest = hashlib.sha256(b"tls-secret").hexdigest()
    p = start_proxy(config_text=(
        f'upstream = "{tls_server.url(tdb)}"\n[upstream_tls]\nca_file = "{certs.ca}"\n'
        f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\n'
        f'[listener.tls]\ncert_file = "{certs.proxy_cert}"\nkey_file = "{certs.proxy_key}"\n'
        f'[[listener.user]]\nname = "tenant"\npassword_sha256 = "{digest}"\nnamespace = "tu"\n'), port=port)
    r = tls_proxy_client(p, certs.ca, username="tenant", password="tls-secret")
    assert r.set("k", "v") and r.get("k") == b"v"
    assert tls_server.direct(tdb).get("tu:k") == b"v"
    with pytest.raises(redis.AuthenticationError):
        tls_proxy_client(p, certs.ca, username="tenant", password="wrong").ping()
    with pytest.raises(redis.AuthenticationError, match="authenticated"):  # its HELLO, as from Redis
        tls_proxy_client(p, certs.ca).get("k")
    assert "1 user(s): clients must authenticate" in p.output()


def _listener_toml(tls_server, db, port, cert, key, certs):
    return (f'upstream = "{tls_server.url(db)}"\n[upstream_tls]\nca_file = "{certs.ca}"\n'
            f'[[listener]]\nname = "app"\nlisten = "127.0.0.1:{port}"\nnamespace = "r"\n'
            f'[listener.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')


def test_sighup_rereads_the_certificate_for_new_connections(tls_server, tdb, certs, start_proxy, tmp_path):
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(certs.proxy_cert, cert)
    shutil.copy(certs.proxy_key, key)
    port = free_port()
    p = start_proxy(config_text=_listener_toml(tls_server, tdb, port, cert, key, certs), port=port)
    old = tls_proxy_client(p, certs.ca)
    assert old.set("k", "1")
    shutil.copy(certs.proxy2_cert, cert)  # rotated in place, as cert-manager or a mounted Secret does
    shutil.copy(certs.proxy2_key, key)
    p.process.send_signal(signal.SIGHUP)
    wait_log(p, "TLS certificates re-read for 1 listener(s)")
    assert tls_proxy_client(p, certs.other_ca).get("k") == b"1"   # new connections: the new certificate
    with pytest.raises(redis.ConnectionError):
        tls_proxy_client(p, certs.ca).ping()                      # ... and no longer the old one
    assert old.get("k") == b"1"                                   # the open connection was not dropped
    assert "0 route(s) changed; draining 0 connection(s)" in p.output()


def test_reload_with_an_unreadable_certificate_is_refused(tls_server, tdb, certs, start_proxy, tmp_path):
    port, mport = free_port(), free_port()
    text = _listener_toml(tls_server, tdb, port, certs.proxy_cert, certs.proxy_key, certs)
    token = tmp_path / "admin-token"
    token.write_text("t0ken\n")
    admin = f'[metrics]\nlisten = "127.0.0.1:{mport}"\n[admin]\ntoken_file = "{token}"\n'
    p = start_proxy(config_text=text + admin, port=port)
    path = os.path.join(p.tmp, "proxy.toml")
    with open(path, "w") as f:
        f.write(text.replace(certs.proxy_key, "/no/such.key") + admin)
    req = urllib.request.Request(f"http://127.0.0.1:{mport}/-/reload", method="POST",
                                 headers={"Authorization": "Bearer t0ken"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "listener[0].tls.cert_file, listener[0].tls.key_file" in e.value.read().decode()
    assert tls_proxy_client(p, certs.ca).ping()  # the running certificate stays
    with open(path, "w") as f:  # plain <-> TLS needs a new socket: refused, not half-applied
        f.write(text.split("[listener.tls]")[0] + admin)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert "TLS turned off" in e.value.read().decode()
    assert tls_proxy_client(p, certs.ca).ping()


# -- check and migrate

def run_cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not (k.startswith("PROXY_") or k in ("REDIS_URL", "SSL_CERT_FILE"))}
    e.update(PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120,
                          env=e, cwd=ROOT)


def test_check_connects_with_tls(tls_server, mtls_server, certs):
    listen = f"127.0.0.1:{free_port()}"
    ok = run_cli("check", "--listen", listen, "--upstream", tls_server.url(0), "--upstream-tls-ca-file", certs.ca)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[listener.upstream_tls]" in ok.stdout and f'ca_file = "{certs.ca}"' in ok.stdout
    assert "client db 0 -> db 0: ok" in ok.stdout
    bad = run_cli("check", "--listen", listen, "--upstream", tls_server.url(0), env={
        "PROXY_UPSTREAM_TLS_CA_FILE": certs.other_ca})
    assert bad.returncode == 2
    assert "certificate verify failed: " in bad.stdout and "upstream_tls.ca_file" in bad.stdout
    mtls = run_cli("check", "--listen", listen, "--upstream", mtls_server.url(1, auth=f":{TOKEN}@"),
                   "--upstream-tls-ca-file", certs.ca, "--upstream-tls-cert-file", certs.client_pem)
    assert mtls.returncode == 0, mtls.stdout + mtls.stderr
    assert TOKEN not in mtls.stdout + mtls.stderr


@pytest.fixture(scope="module")
def plain_redis():
    s = start_server("redis")  # DUMP payloads go between servers of one kind
    yield s
    s.stop()


def test_migrate_between_a_tls_server_and_a_plain_one(tls_server, plain_redis, certs):
    server = plain_redis
    src, dst = tls_server.direct(14), redis.Redis(host=server.host, port=server.port, db=13)
    src.flushdb()
    dst.flushdb()
    src.set("old:a", "1")
    src.zadd("old:z", {"m": 2})
    args = ["migrate", "--from", tls_server.url(14), "--from-namespace", "old",
            "--to", f"redis://{server.host}:{server.port}/13", "--to-namespace", "new", "--verify"]
    refused = run_cli(*args)  # the system's CAs do not know the test CA
    assert refused.returncode == 1 and "certificate verify failed" in refused.stderr
    done = run_cli(*args, env={"SSL_CERT_FILE": certs.ca})  # OpenSSL's own variable names the CA bundle
    assert done.returncode == 0, done.stdout + done.stderr
    assert dst.get("new:a") == b"1" and dst.zscore("new:z", "m") == 2
    back = run_cli("migrate", "--from", f"redis://{server.host}:{server.port}/13", "--from-namespace", "new",
                   "--to", tls_server.url(14), "--to-namespace", "back", env={"SSL_CERT_FILE": certs.ca})
    assert back.returncode == 0, back.stdout + back.stderr
    assert src.get("back:a") == b"1"
    src.flushdb()
    dst.flushdb()


def test_max_clients_on_a_tls_listener_is_said_after_the_handshake(tls_server, tdb, certs, start_proxy):
    """Redis drops a TLS client over maxclients without a word (nothing can be written
    before the handshake); the proxy tells it after the handshake (issue 13, item 7)."""
    import socket
    port = free_port()
    text = _listener_toml(tls_server, tdb, port, certs.proxy_cert, certs.proxy_key, certs)
    p = start_proxy(config_text=text.replace('namespace = "r"\n', 'namespace = "r"\nmax_clients = 1\n'), port=port)
    ctx = ssl.create_default_context(cafile=certs.ca)

    def tls_ping() -> tuple[object, bytes]:
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", p.port), timeout=10), server_hostname="localhost")
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return s, data

    deadline = time.monotonic() + 10
    while True:  # the start-up check's connection holds the one slot until the proxy sees it go
        first, reply = tls_ping()
        if reply == b"+PONG\r\n" or time.monotonic() > deadline:
            break
        first.close()
        time.sleep(0.05)
    assert reply == b"+PONG\r\n"
    second, reply = tls_ping()
    assert reply == b"-ERR max number of clients reached\r\n"
    second.close()
    first.close()


def test_migrate_tls_flags_per_side(mtls_server, plain_redis, certs):
    """--from-tls-* / --to-tls-*: the proxy's [upstream_tls] settings for each side of
    migrate (here mutual TLS and an AUTH token on the source, a plain target)."""
    src = mtls_server.direct(12, password=TOKEN)
    dst = redis.Redis(host=plain_redis.host, port=plain_redis.port, db=12)
    src.flushdb()
    dst.flushdb()
    src.rpush("sk:queue:default", "j1", "j2")
    url = mtls_server.url(12, auth=f":{TOKEN}@")
    target = f"redis://{plain_redis.host}:{plain_redis.port}/12"
    no_cert = run_cli("migrate", "--from", url, "--from-namespace", "sk", "--to", target,
                      "--from-tls-ca-file", certs.ca)
    assert no_cert.returncode == 1 and "source" in no_cert.stderr, no_cert.stderr
    assert dst.exists("queue:default") == 0
    done = run_cli("migrate", "--from", url, "--from-namespace", "sk", "--to", target, "--move", "--verify",
                   "--from-tls-ca-file", certs.ca, "--from-tls-cert-file", certs.client_pem)
    assert done.returncode == 0, done.stdout + done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert dst.lrange("queue:default", 0, -1) == [b"j1", b"j2"] and not src.exists("sk:queue:default")
    # settings for a plain side, and unreadable files, are refused before anything moves
    plain = run_cli("migrate", "--from", url, "--to", target, "--to-tls-ca-file", certs.ca)
    assert plain.returncode == 2 and "--to-tls-ca-file: the target is redis://" in plain.stderr, plain.stderr
    missing = run_cli("migrate", "--from", url, "--to", target, "--from-tls-ca-file", "/nonexistent/ca.pem")
    assert missing.returncode == 2 and "--from-tls-ca-file" in missing.stderr and "no such file" in missing.stderr
    src.flushdb()
    dst.flushdb()
