"""The admin port: /metrics (Prometheus), /healthz (alive), /readyz (upstreams answer PING).

Served by prometheus-client's exposition code in a thread, away from the event
loop. The collector reads the plain-int RouteStats only when scraped, so the
hot path never calls prometheus-client.
"""

from __future__ import annotations

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
        errors = family("counter", "errors", "Errors, by kind: upstream, protocol, refused, unexpected_reply, output_limit, internal", ["route", "kind"])
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
            if route.users is None:  # (a listener with users sends nothing upstream itself)
                if st.upstream_up is None:
                    st.upstream_up = 1 if ping(route.upstream) else 0
                up_up.add_metric(r, st.upstream_up)
            fenced.add_metric(r, st.upstream_fenced)
            for fam, h in ((depth, st.depth), (req, st.request_seconds), (rtt, st.roundtrip_seconds)):
                fam.add_metric(r, h.buckets(), h.sum)
        yield from (clients, accepted, closed, commands, errors, refused, keys, received, sent,
                    up_conns, up_opened, up_failed, up_up, fenced, depth, req, rtt, auth_ok, auth_failed)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # access logs would drown the proxy's own
        pass


class AdminServer:
    """The HTTP admin endpoint, in a daemon thread."""

    def __init__(self, proxy, host: str, port: int, ready_timeout: float = 1.0, reload=None):
        self.proxy = proxy
        self.reload = reload  # () -> (ok, message), run on the event loop
        self.ready_timeout = ready_timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))
        self.metrics_app = make_wsgi_app(self.registry)
        self.httpd = admin_httpd(host, port, self.app)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def readiness(self) -> list[tuple[str, bool]]:
        out = []
        for route in self.proxy.config.traffic_routes():
            # a sentinel upstream: the primary the proxy uses, none while a switch is confirmed
            addr = self.proxy.primary_now(route.upstream)
            ok = addr is not None and ping(route.upstream, self.ready_timeout, addr)
            st = self.proxy.stats.get(route.name)
            if st is not None:
                st.upstream_up = 1 if ok else 0
            out.append((route.name, ok))
        return out

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            # the gauge is refreshed by a PING per scrape, so it follows the upstream
            for st in self.proxy.stats.values():
                st.upstream_up = None
            return self.metrics_app(environ, start_response)
        if path == "/-/reload":
            if environ.get("REQUEST_METHOD") != "POST":
                return _text(start_response, "405 Method Not Allowed", "use POST\n")
            if self.reload is None:
                return _text(start_response, "404 Not Found", "reload is not available\n")
            ok, message = self.reload()
            return _text(start_response, "200 OK" if ok else "400 Bad Request", message + "\n")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            results = self.readiness()
            body = "".join(f"{name}: {'ok' if ok else 'upstream unreachable'}\n" for name, ok in results)
            status = "200 OK" if all(ok for _, ok in results) else "503 Service Unavailable"
            return _text(start_response, status, body)
        return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz, POST /-/reload\n")


class _ThreadingWSGIServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def admin_httpd(host: str, port: int, app):
    """The admin port's HTTP server (IPv6 too); an address that cannot be had raises an
    OSError naming it."""
    cls = _ThreadingWSGIServer6 if ":" in host else ThreadingWSGIServer
    try:
        return make_server(host, port, app, cls, handler_class=_QuietHandler)
    except OSError as e:
        raise admin_bind_error(e, host, port) from None


def admin_bind_error(e: OSError, host: str, port: int) -> OSError:
    """The admin port cannot be had: say which address (errno 98 alone does not)."""
    from proxy.config import format_addr
    why = (e.strerror or str(e)).lower()
    return OSError(e.errno, f"cannot listen on metrics port {format_addr(host, port)} "
                            f"(--metrics-listen / [metrics] listen): {why}")


def _text(start_response, status: str, body: str):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]
