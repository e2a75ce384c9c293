"""The asyncio shell: accept clients, open one upstream connection each, move bytes.

All protocol decisions are in Session; this module only connects transports to
it, applies backpressure both ways, and stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from time import perf_counter

from proxy.commands import default_table
from proxy.config import Config, Route
from proxy.session import Session
from proxy.stats import RouteStats

log = logging.getLogger("keyspace-proxy")


def _nodelay(transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: "Proxy", route: Route):
        self.proxy = proxy
        self.route = route
        self.stats = proxy.stats[route.name]
        self.transport = None
        self.upstream: UpstreamConnection | None = None
        self.session = Session(route, proxy.table, proxy.config.limits, self.stats)
        self.closed = False
        self.close_reason = "client"
        self.t_request = 0.0   # when the batch being timed was read (0: none being timed)
        self.t_sent = 0.0      # when it was written upstream

    # -- client side

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        self.proxy.clients.add(self)
        self.peer = transport.get_extra_info("peername")
        self.stats.clients += 1
        self.stats.accepted += 1
        log.debug("client connected", extra={"event": "client_connected", "route": self.route.name,
                                             "peer": _peer(self.peer)})
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        up = self.route.upstream
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), up.host, up.port),
                self.proxy.config.limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            reason = f"cannot connect to {up.host}:{up.port}: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}"
            log.warning("route %s: %s", self.route.name, reason,
                        extra={"event": "upstream_error", "route": self.route.name})
            self.close_reason = "upstream_error"
            self.session.upstream_lost(reason, tell_idle=True)
            self.flush()
            return
        self.stats.upstream_opened += 1
        if self.closed:
            self.upstream.transport.close()
            return
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in["client"] += len(data)
        if not self.t_request:
            self.t_request = perf_counter()
        self.session.client_data(data)
        self.flush()
        if not self.session.pending:
            self.t_request = 0.0  # answered locally (or nothing owed): not a round trip

    def flush(self) -> None:
        s = self.session
        if self.upstream is not None and self.upstream.transport is not None:
            out = s.take_upstream()
            if out:
                self.upstream.transport.write(out)
                self.stats.bytes_out["upstream"] += len(out)
                if self.t_request and not self.t_sent:
                    self.t_sent = perf_counter()
        elif s.upstream_error is not None:
            s.take_upstream()
        out = s.take_client()
        if out and not self.closed:
            self.transport.write(out)
            self.stats.bytes_out["client"] += len(out)
        if s.should_close and not self.closed:
            if s.upstream_error is not None:
                self.close_reason = "upstream_error"
            elif s.protocol_error:
                self.close_reason = "protocol_error"
            self.close()

    def close(self, reason: str | None = None) -> None:
        if reason:
            self.close_reason = reason
        if not self.closed:
            self.closed = True
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        self.stats.clients -= 1
        self.stats.closed_reason(self.close_reason)
        log.debug("client closed", extra={"event": "client_closed", "route": self.route.name,
                                          "peer": _peer(self.peer), "reason": self.close_reason})
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.proxy.idle_changed()

    # Backpressure: a client that does not read stops us reading its upstream.
    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, client: ClientConnection):
        self.client = client
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        self.client.stats.upstream_connections += 1

    def data_received(self, data: bytes) -> None:
        c = self.client
        c.stats.bytes_in["upstream"] += len(data)
        if c.t_sent:
            # One sample per batch of requests, not per command: cheap and still the
            # distribution a user feels.
            now = perf_counter()
            c.stats.roundtrip_seconds.observe(now - c.t_sent)
            c.t_sent = 0.0
        c.session.upstream_data(data)
        c.flush()
        if c.t_request and not c.session.pending:
            c.stats.request_seconds.observe(perf_counter() - c.t_request)
            c.t_request = 0.0
        if c.session.idle:
            c.proxy.idle_changed()

    def connection_lost(self, exc) -> None:
        c = self.client
        c.stats.upstream_connections -= 1
        if not c.closed:
            why = f"connection lost: {exc}" if exc else "connection closed by the server"
            log.warning("route %s: upstream %s", c.route.name, why,
                        extra={"event": "upstream_error", "route": c.route.name})
            c.session.upstream_lost(why)
            c.flush()

    # An upstream that does not read stops us reading its client.
    def pause_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.client.closed:
            self.client.transport.resume_reading()


def _peer(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class Proxy:
    def __init__(self, config: Config):
        self.config = config
        self.table = default_table()
        self.stats = {r.name: RouteStats(r.name) for r in config.routes}
        self.clients: set[ClientConnection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._stopping = False
        self._idle = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for route in self.config.routes:
            server = await loop.create_server(lambda r=route: ClientConnection(self, r),
                                              route.listen[0], route.listen[1], reuse_address=True)
            self.servers.append(server)
            log.info("listening on %s", route.describe())

    async def check_commands(self) -> None:
        """Log commands the upstream has that the generated table does not know.

        On namespaced routes they are refused (fail closed); the log says why."""
        seen = set()
        for route in self.config.routes:
            up = route.upstream
            if (up.host, up.port) in seen:
                continue
            seen.add((up.host, up.port))
            try:
                names = await asyncio.wait_for(_command_list(up), self.config.limits.connect_timeout)
            except Exception as e:  # the check is advisory: an unreachable upstream is reported per request
                log.warning("upstream %s: could not list its commands (%s)", up.masked(), e)
                continue
            unknown = sorted(n for n in names if n not in self.table)
            if unknown:
                log.warning("upstream %s has %d commands the proxy's table does not know; they are refused on "
                            "namespaced routes and passed through elsewhere: %s",
                            up.masked(), len(unknown), " ".join(unknown[:50]))

    def idle_changed(self) -> None:
        if self._idle is not None and all(c.session.idle for c in self.clients):
            self._idle.set()

    async def stop(self) -> None:
        """Stop accepting; let connections finish owed replies for a bounded time; close."""
        self._stopping = True
        for s in self.servers:
            s.close()
        self._idle = asyncio.Event()
        self.idle_changed()
        if self.clients:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.limits.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: closing %d connections with replies owed", len(self.clients))
        for c in list(self.clients):
            c.close("shutdown")
        for s in self.servers:
            await s.wait_closed()


async def _command_list(up) -> list[str]:
    import hiredis

    from proxy.resp import encode_command
    reader, writer = await asyncio.open_connection(up.host, up.port)
    try:
        cmds = []
        if up.password:
            cmds.append([b"AUTH"] + ([up.username.encode()] if up.username else []) + [up.password.encode()])
        cmds.append([b"COMMAND", b"LIST"])
        writer.write(b"".join(encode_command(c) for c in cmds))
        parser = hiredis.Reader()
        replies = []
        while len(replies) < len(cmds):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            parser.feed(data)
            while (r := parser.gets()) is not False:
                replies.append(r)
        last = replies[-1]
        if isinstance(last, hiredis.ReplyError):
            raise RuntimeError(str(last))
        return [n.decode().lower() for n in last]
    finally:
        writer.close()


async def serve(config: Config, ready=None) -> None:
    proxy = Proxy(config)
    admin = None
    if config.metrics_listen:  # up before the listeners, so "listening" means everything is
        from proxy.metrics import AdminServer
        admin = AdminServer(proxy, *config.metrics_listen)
        admin.start()
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", config.metrics_listen[0], admin.port)
    await proxy.start()
    asyncio.ensure_future(proxy.check_commands())
    if ready is not None:
        ready(proxy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new connections, draining %d", len(proxy.clients))
    await proxy.stop()
    if admin is not None:
        admin.stop()
    log.info("stopped")


def run(config: Config) -> None:
    try:
        import uvloop
        uvloop.run(serve(config))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(config))
