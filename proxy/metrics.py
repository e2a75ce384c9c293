"""The admin port: /metrics (Prometheus), /healthz (alive), /readyz (upstreams answer PING),
POST /-/reload (only with a token: `Authorization: Bearer TOKEN`, compared in constant
time; on the separate admin.listen address when one is given).

Served by prometheus-client's exposition code in a thread, away from the event
loop. The collector reads the plain-int RouteStats only when scraped, so the
hot path never calls prometheus-client.
"""

from __future__ import annotations

import hmac
import logging
import platform
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import ThreadingWSGIServer

from proxy import __version__
from proxy.speedups import IMPLEMENTATION
from proxy.resp import encode_command

log = logging.getLogger("keyspace-proxy")
PREFIX = "keyspace_proxy_"


def ping(upstream, timeout: float = 1.0, addr: tuple[str, int] | None = None) -> bool:
    """True if the upstream (or `addr`, its node) answers PING (after AUTH with the URL's credentials)."""
    cmds = upstream.handshake(0) + [[b"PING"]]
    try:
        with upstream.open_socket(timeout, addr) as s:  # TLS for rediss://
            s.settimeout(timeout)
            s.sendall(b"".join(encode_command(c) for c in cmds))
            data = b""
            while data.count(b"\r\n") < len(cmds):
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return data.endswith(b"+PONG\r\n")
    except OSError:
        return False


class ProxyCollector:
    def __init__(self, proxy):
        self.proxy = proxy

    def collect(self):
        proxy = self.proxy
        known = proxy.table.commands.keys()
        info = GaugeMetricFamily(PREFIX + "build_info", "Build information", labels=["version", "python", "hot_path"])
        info.add_metric([__version__, platform.python_version(), IMPLEMENTATION], 1)
        yield info
        gen = GaugeMetricFamily(PREFIX + "config_generation", "Configuration generation (1 at start, +1 per reload)")
        gen.add_metric([], getattr(proxy, "generation", 1))
        yield gen

        def family(kind, name, doc, labels):
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            return cls(PREFIX + name, doc, labels=labels)

        clients = family("gauge", "client_connections", "Open client connections", ["route"])
        accepted = family("counter", "client_connections_accepted", "Client connections accepted", ["route"])
        closed = family("counter", "client_connections_closed", "Client connections closed, by reason",
                        ["route", "reason"])
        commands = family("counter", "commands", "Commands received, by command (unknown names: other)",
                          ["route", "command"])
        errors = family("counter", "errors", "Errors, by kind: upstream, protocol, refused, unexpected_reply, output_limit, internal, cluster_redirect, orphan_reply, tls_handshake", ["route", "kind"])
        refused = family("counter", "refused_commands", "Commands refused by the route's policy",
                         ["route", "command"])
        keys = family("counter", "keys_rewritten", "Key arguments rewritten on the generic path", ["route"])
        received = family("counter", "received_bytes", "Bytes received, by side", ["route", "side"])
        sent = family("counter", "sent_bytes", "Bytes sent, by side", ["route", "side"])
        up_conns = family("gauge", "upstream_connections", "Open upstream connections", ["route"])
        up_opened = family("counter", "upstream_connections_opened", "Upstream connections opened", ["route"])
        up_failed = family("counter", "upstream_connect_failures", "Upstream connections that failed to open",
                           ["route"])
        up_up = family("gauge", "upstream_up", "1 if the route's upstream answered PING at the last check",
                       ["route"])
        fenced = family("gauge", "route_upstream_fenced",
                        "1 if the route's upstream user is fenced to its namespace by a Redis ACL (checked at "
                        "start and reload; tenant routes pass scripts only then)", ["route"])
        rejected = family("counter", "client_connections_rejected",
                          "Clients turned away with -ERR max number of clients reached, by limit: max_clients, "
                          "listener_max_clients, fd_limit", ["route", "reason"])
        timeouts = family("counter", "upstream_reply_timeouts",
                          "Upstream connections declared dead for owing a reply past limits.reply_timeout", ["route"])
        reconnects = family("counter", "upstream_reconnect_failures",
                            "Reconnect attempts (with backoff) to a down upstream that failed", ["route"])
        down = family("gauge", "upstream_down",
                      "1 while the route's upstream is marked down (requests fail at once, reconnecting)", ["route"])
        pool_conns = family("gauge", "blocking_pool_connections",
                            "Upstream connections of the route's blocking pool (limits.blocking_pool), by state: idle, "
                            "busy (lent for a blocking command), opening, control (sending CLIENT UNBLOCK), orphan "
                            "(its client left while blocked)", ["route", "state"])
        pool_borrows = family("counter", "blocking_pool_borrows",
                              "Blocking commands served on a borrowed pooled connection", ["route"])
        pool_waits = family("counter", "blocking_pool_borrow_waits",
                            "Blocking commands that waited for a pooled connection (the route's pool was full)",
                            ["route"])
        pools: dict[str, dict[str, int]] = {}
        for (name, _), pool in dict(getattr(proxy, "bpools", {})).items():
            mine = pools.setdefault(name, dict.fromkeys(("idle", "busy", "opening", "control", "orphan"), 0))
            for state, n in pool.counts().items():
                mine[state] += n
        redirects = family("counter", "cluster_redirects",
                           "-MOVED / -ASK answers of cluster nodes to the route's requests, by kind (moved, ask): "
                           "followed by the proxy, or answered -TRYAGAIN (errors_total{kind=\"cluster_redirect\"})",
                           ["route", "kind"])
        depth = HistogramMetricFamily(PREFIX + "pipeline_depth", "Requests per client read", labels=["route"])
        req = HistogramMetricFamily(PREFIX + "request_duration_seconds",
                                    "Time from reading a batch of requests to writing its last reply",
                                    labels=["route"])
        rtt = HistogramMetricFamily(PREFIX + "upstream_roundtrip_seconds",
                                    "Time from writing a batch upstream to the first reply bytes", labels=["route"])
        auth_ok = family("counter", "auth_successes", "AUTH / HELLO AUTH with a right password at a listener with users", ["listener"])
        auth_failed = family("counter", "auth_failures",
                             "Failed AUTH / HELLO AUTH attempts at a listener with users (wrong password, no such "
                             "user)", ["listener"])
        for route in proxy.config.routes:
            st = proxy.stats.get(route.name)
            if route.users is not None and st is not None:
                auth_ok.add_metric([route.name], st.auth_successes)
                auth_failed.add_metric([route.name], st.auth_failures)
        for route in proxy.config.all_routes():
            st = proxy.stats.get(route.name)
            if st is None:
                continue
            r = [route.name]
            clients.add_metric(r, st.clients)
            accepted.add_metric(r, st.accepted)
            for reason, n in dict(st.closed).items():
                closed.add_metric(r + [reason], n)
            for name, n in st.commands(known).items():
                commands.add_metric(r + [name], n)
            for kind, n in dict(st.errors).items():
                errors.add_metric(r + [kind], n)
            bounded: dict[str, int] = {}
            for name, n in dict(st.refused).items():
                label = name if name in known else "other"
                bounded[label] = bounded.get(label, 0) + n
            for name, n in bounded.items():
                refused.add_metric(r + [name], n)
            keys.add_metric(r, st.keys_rewritten)
            for side, n in dict(st.bytes_in).items():
                received.add_metric(r + [side], n)
            for side, n in dict(st.bytes_out).items():
                sent.add_metric(r + [side], n)
            up_conns.add_metric(r, st.upstream_connections)
            up_opened.add_metric(r, st.upstream_opened)
            up_failed.add_metric(r, st.upstream_failures)
            for reason, n in dict(st.rejected).items():
                rejected.add_metric(r + [reason], n)
            if route.users is None:  # (a listener with users sends nothing upstream itself)
                timeouts.add_metric(r, st.upstream_timeouts)
                h = getattr(proxy, "upstreams", {}).get(route.upstream)
                reconnects.add_metric(r, h.reconnect_failures if h is not None else 0)
                is_down = h is not None and h.down is not None
                down.add_metric(r, 1 if is_down else 0)
                if st.upstream_up is None:
                    st.upstream_up = 1 if ping(route.upstream) and not is_down else 0
                up_up.add_metric(r, st.upstream_up)
            fenced.add_metric(r, st.upstream_fenced)
            if route.users is None:
                for state, n in pools.get(route.name, dict.fromkeys(("idle", "busy"), 0)).items():
                    pool_conns.add_metric(r + [state], n)
                pool_borrows.add_metric(r, st.blocking_borrows)
                pool_waits.add_metric(r, st.blocking_waits)
            if route.users is None:  # (0 but on a cluster: a redirect is a cluster node's answer)
                for kind, n in dict(st.cluster_redirects).items():
                    redirects.add_metric(r + [kind.lower()], n)
            for fam, h in ((depth, st.depth), (req, st.request_seconds), (rtt, st.roundtrip_seconds)):
                fam.add_metric(r, h.buckets(), h.sum)
        yield from (clients, accepted, closed, rejected, commands, errors, refused, keys, received, sent,
                    up_conns, up_opened, up_failed, up_up, fenced, timeouts, reconnects, down, pool_conns,
                    pool_borrows, pool_waits, redirects, depth, req, rtt,
                    auth_ok, auth_failed)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # access logs would drown the proxy's own
        pass


RELOAD_OFF = ("reload over HTTP is off: it needs a token, from [admin] token_file (--admin-token-file, "
              "PROXY_ADMIN_TOKEN_FILE) or PROXY_ADMIN_TOKEN; SIGHUP reloads without one\n")


def reload_gate(environ, token: str | None, start_response, elsewhere: str | None = None):
    """POST /-/reload's checks, in order: served here, POST, a token configured, the
    request's `Authorization: Bearer TOKEN` equal to it (constant-time). None if the
    reload may go ahead, else the response already started."""
    if elsewhere is not None:
        return _text(start_response, "404 Not Found", f"reload is served on the admin port {elsewhere} "
                                                      "([admin] listen), not here\n")
    if environ.get("REQUEST_METHOD") != "POST":
        return _text(start_response, "405 Method Not Allowed", "use POST\n")
    if not token:
        return _text(start_response, "403 Forbidden", RELOAD_OFF)
    given = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        log.warning("POST /-/reload refused: %s token from %s", "wrong" if given else "no",
                    environ.get("REMOTE_ADDR", "?"), extra={"event": "reload"})
        return _text(start_response, "401 Unauthorized",
                     "reload needs the admin token: send Authorization: Bearer TOKEN\n",
                     [("WWW-Authenticate", 'Bearer realm="keyspace-proxy"')])
    return None


class AdminServer:
    """The HTTP admin endpoint, in a daemon thread. `role`: "metrics" serves /metrics,
    /healthz, /readyz, and the reload too unless an admin address is configured; "admin"
    (admin.listen) serves POST /-/reload and /healthz only."""

    def __init__(self, proxy, host: str, port: int, ready_timeout: float = 1.0, reload=None, role: str = "metrics"):
        self.proxy = proxy
        self.reload = reload  # () -> (ok, message), run on the event loop
        self.role = role
        self.ready_timeout = ready_timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))
        self.metrics_app = make_wsgi_app(self.registry)
        self.httpd = admin_httpd(host, port, self.app, role)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def readiness(self) -> list[tuple[str, str | None]]:
        """(route, None if ready else why not). Not ready: the upstream does not answer
        PING, or the proxy marked it down (a connection timed out or could not be opened)
        and no new connection has answered since."""
        out = []
        upstreams = getattr(self.proxy, "upstreams", {})
        for route in self.proxy.config.traffic_routes():
            h = upstreams.get(route.upstream)
            why = None
            # a sentinel upstream: the primary the proxy uses, none while a switch is confirmed
            addr = self.proxy.primary_now(route.upstream)
            if h is not None and h.down is not None:
                why = f"upstream down ({h.down}); reconnecting"
            elif addr is None:
                why = self.proxy.no_node_reason(route.upstream)
            elif not ping(route.upstream, self.ready_timeout, addr):
                why = "upstream unreachable"
            st = self.proxy.stats.get(route.name)
            if st is not None:
                st.upstream_up = 0 if why else 1
            out.append((route.name, why))
        return out

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        config = self.proxy.config
        if self.role == "admin":
            if path == "/-/reload":
                return self._reload(environ, start_response, None)
            if path == "/healthz":
                return _text(start_response, "200 OK", "ok\n")
            return _text(start_response, "404 Not Found", "not found: this admin port serves POST /-/reload and "
                                                          "/healthz; /metrics and /readyz are on [metrics] listen\n")
        if path == "/metrics":
            # the gauge is refreshed by a PING per scrape, so it follows the upstream
            for st in list(self.proxy.stats.values()):  # (a reload on the loop adds routes' stats)
                st.upstream_up = None
            return self.metrics_app(environ, start_response)
        if path == "/-/reload":
            elsewhere = None
            if config.admin_listen is not None:
                from proxy.config import format_addr
                elsewhere = format_addr(*config.admin_listen)
            return self._reload(environ, start_response, elsewhere)
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            results = self.readiness()
            body = "".join(f"{name}: {why or 'ok'}\n" for name, why in results)
            status = "503 Service Unavailable" if any(why for _, why in results) else "200 OK"
            return _text(start_response, status, body)
        return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz, POST /-/reload\n")

    def _reload(self, environ, start_response, elsewhere):
        refused = reload_gate(environ, self.proxy.config.admin_token, start_response, elsewhere)
        if refused is not None:
            return refused
        if self.reload is None:
            return _text(start_response, "404 Not Found", "reload is not available\n")
        ok, message = self.reload()
        return _text(start_response, "200 OK" if ok else "400 Bad Request", message + "\n")


class _ThreadingWSGIServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def admin_httpd(host: str, port: int, app, role: str = "metrics"):
    """The admin port's HTTP server (IPv6 too); an address that cannot be had raises an
    OSError naming it."""
    cls = _ThreadingWSGIServer6 if ":" in host else ThreadingWSGIServer
    try:
        return make_server(host, port, app, cls, handler_class=_QuietHandler)
    except OSError as e:
        raise admin_bind_error(e, host, port, role) from None


def admin_bind_error(e: OSError, host: str, port: int, role: str = "metrics") -> OSError:
    """The admin port cannot be had: say which address (errno 98 alone does not)."""
    from proxy.config import format_addr
    why = (e.strerror or str(e)).lower()
    return OSError(e.errno, f"cannot listen on {role} port {format_addr(host, port)} "
                            f"(--{role}-listen / [{role}] listen): {why}")


def _text(start_response, status: str, body: str, headers: list | None = None):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
                   + (headers or []))
    return [data]
