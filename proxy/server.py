"""The asyncio shell: accept clients, open one upstream connection each, move bytes.

All protocol decisions are in Session; this module only connects transports to
it, applies backpressure both ways, and stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
from collections import deque
from time import perf_counter

from proxy import fence
from proxy.auth import Gate, Login, no_auth_commands
from proxy.rules import default_rules
from proxy.config import Config, ConfigError, Route, connect_failure, format_addr, handshake_failure
from proxy.resp import PartialReply, ProtocolError, encode_command, frame_end
from proxy.session import STREAM_AFTER, ClientFacts, RouteView, Session, UnexpectedReply
from proxy.speedups import IMPLEMENTATION
from proxy.stats import RouteStats

log = logging.getLogger("keyspace-proxy")

# A client read at least this big yields to the other connections before the next one
# (see ClientConnection._take_turns).
FAIR_READ = 256000  # uvloop reads at most 256,000 bytes at a time: a full read means more is waiting


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
        self.shared = proxy.config.limits.upstream_mode == "shared"
        self.view = proxy.view(route.name)   # the route's clients (CLIENT LIST, MONITOR on tenant routes)
        self.facts: ClientFacts | None = None
        # A listener with users: the gate answers the client until it authenticates;
        # then the session of the user's route takes over (see _authenticated).
        self.gate: Gate | None = None
        if route.users is not None:
            self.session = self.gate = None
        else:
            self.session = Session(route, proxy.rules, proxy.config.limits, self.stats, shared=self.shared,
                                   view=self.view)
        self.link: SharedLink | None = None   # the shared upstream connection, while on one
        self.registered = 0                  # replies registered with the link so far
        self.connecting = False
        self.closed = False
        self.client_paused = False     # the client's socket buffer is full
        self.link_paused = False       # the upstream connection's socket buffer is full
        self.reading_client = True
        self.reading_upstream = True
        self.close_reason = "client"
        self.draining = False
        self.timed = proxy.timed
        self.t_request = 0.0   # when the batch being timed was read (0: none being timed)
        self.t_sent = 0.0      # when it was written upstream

    # -- client side

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        self.proxy.clients.add(self)
        self.peer = transport.get_extra_info("peername")
        self.proxy.next_client_id += 1
        sock = transport.get_extra_info("socket")
        self.facts = ClientFacts(self.proxy.next_client_id, _peer(self.peer),
                                 _peer(transport.get_extra_info("sockname")), sock.fileno() if sock is not None else -1)
        self.stats.clients += 1
        self.stats.accepted += 1
        log.debug("client connected", extra={"event": "client_connected", "route": self.route.name,
                                             "peer": _peer(self.peer)})
        if self.session is None:
            listen, routes = self.route.listen, self.proxy.routes
            # the listener's users as they are at each attempt: a reload applies to the next
            # AUTH, and a listener removed by one has none (no reference to self: no cycle)
            login = Login(self.route.name, lambda: getattr(routes.get(listen), "users", None), self.stats,
                          _peer(self.peer))
            self.session = self.gate = Gate(login, self.proxy.config.limits, self.proxy.no_auth)
        else:
            self._begin()

    def _begin(self) -> None:
        """The session's upstream: a shared link, or a connection of its own."""
        self.session.facts = self.facts
        self.view.conns[self.session] = self  # one of the route's clients from here on
        if self.shared:
            self.link = self.proxy.shared_link(self.route, self.session.target.db, self.session.link_proto)
            self.link.clients.add(self)
        else:
            self._start_connect()

    def _gate_data(self, data: bytes) -> None:
        g = self.gate
        g.client_data(data)
        if g.out_client:
            data = b"".join(g.out_client)
            g.out_client.clear()
            if not self.closed:
                self.transport.write(data)
                self.stats.bytes_out["client"] += len(data)
                if self.client_paused:
                    self._check_output_limit()
        if g.user is not None:
            self._authenticated(g)
        elif g.close_when_done and not self.closed:
            self.close("protocol_error" if g.protocol_error else "client")

    def _authenticated(self, g: Gate) -> None:
        """The client authenticated: from here on it is a client of the user's route
        (its stats, its upstream and credentials, its namespace and db map)."""
        route = g.user.route
        log.debug("client authenticated", extra={"event": "client_authenticated", "route": route.name,
                                                 "peer": _peer(self.peer)})
        self.gate = None
        self.stats.clients -= 1
        self.route = route
        self.stats = self.proxy.stats.setdefault(route.name, RouteStats(route.name))
        self.stats.clients += 1
        self.stats.accepted += 1
        self.view = self.proxy.view(route.name)
        s = self.session = Session(route, self.proxy.rules, self.proxy.config.limits, self.stats,
                                   shared=self.shared, login=g.login, view=self.view)
        self._begin()
        s.start(g.first, g.rest)
        if s.need_link is not None:
            self._maybe_change_link()
        self.flush()

    def _start_connect(self) -> None:
        self.connecting = True
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        up = self.route.upstream
        loop = asyncio.get_running_loop()
        host, port = up.host, up.port
        try:
            if up.sentinel is not None:
                host, port = await self.proxy.sentinel_primary(up)
            _, self.upstream = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), host, port, **up.ssl_args(host)),
                self.proxy.config.limits.connect_timeout)
            self.upstream.addr = (host, port)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            reason = connect_failure(host, port, e, up.tls)
            log.warning("route %s: %s", self.route.name, reason,
                        extra={"event": "upstream_error", "route": self.route.name})
            self.close_reason = "upstream_error"
            self.session.upstream_lost(reason, tell_idle=True)
            self.flush()
            return
        self.stats.upstream_opened += 1
        self.connecting = False
        if self.closed:
            self.upstream.transport.close()
            return
        if up.sentinel is not None and self.proxy.primary_now(up) != (host, port):
            # the primary moved while this connection was being opened to it
            self.close_reason = "upstream_error"
            self.session.upstream_lost(f"the primary of {up.sentinel.master!r} moved from {format_addr(host, port)} "
                                       "(Sentinel failover)", tell_idle=True)
            self.flush()
            return
        self._maybe_leave_link()
        self.flush()

    def _maybe_leave_link(self) -> None:
        """Move to the dedicated connection once it is up and no shared reply is owed."""
        s = self.session
        if s.shared and s.need_dedicated and self.upstream is not None and self.upstream.transport is not None \
                and s.shared_quiet:
            if self.link is not None:
                self.link.clients.discard(self)
                self.link = None
            self.link_paused = False
            s.switch_to_dedicated()
            self.apply_backpressure()

    def _maybe_change_link(self) -> None:
        """HELLO 2/3 on a shared connection: move to the link of that protocol once
        every reply owed on this one is in (so replies stay in order)."""
        s = self.session
        if s.need_link is not None and s.shared and s.shared_quiet and not self.closed:
            if self.link is not None:
                self.link.clients.discard(self)
            self.link = self.proxy.shared_link(self.route, s.target.db, s.need_link)
            self.link.clients.add(self)
            self.link_paused = False
            s.switch_link()
            self.apply_backpressure()

    def after_shared_replies(self) -> None:
        """Called by the link after it handed this connection replies."""
        s = self.session
        if not (self.t_request or s.need_dedicated or s.need_link is not None or s.out_upstream
                or s.owed_sent != self.registered or self.draining or s.close_when_done):
            # the common case: nothing to do but pass the replies on
            out = s.out_client
            if out and not self.closed:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self.transport.write(data)
                self.stats.bytes_out["client"] += len(data)
                if self.client_paused:
                    self._check_output_limit()
            return
        if self.t_request and not s.pending:
            self.stats.request_seconds.observe(perf_counter() - self.t_request)
            self.t_request = 0.0
        if s.need_dedicated:
            self._maybe_leave_link()
        elif s.need_link is not None:
            self._maybe_change_link()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in["client"] += len(data)
        if self.gate is not None:
            return self._gate_data(data)
        if self.timed and not self.t_request:
            self.t_request = perf_counter()
        s = self.session
        s.client_data(data)
        if s.need_link is not None:
            self._maybe_change_link()
        self.flush()
        if not s.pending:
            self.t_request = 0.0  # answered locally (or nothing owed): not a round trip
        if len(data) >= FAIR_READ and self.reading_client and not self.closed:
            self._take_turns()

    def _take_turns(self) -> None:
        """A full read: more is probably waiting, and libuv would go on reading this
        socket (up to 32 reads) before any other connection gets a turn. Pause until the
        next loop iteration so one client's megabytes cost others one read, not all of them."""
        self.transport.pause_reading()
        self.reading_client = False
        asyncio.get_running_loop().call_soon(self._turn_over)

    def _turn_over(self) -> None:
        if not self.closed and not self.reading_client:
            self.apply_backpressure()  # resumes reading, unless backpressure holds it

    def flush(self) -> None:
        """Send what the session has for either side (runs after every event)."""
        s = self.session
        if s.shared:
            up = s.out_upstream
            owed = s.owed_sent - self.registered
            if up or owed:
                self.registered = s.owed_sent
                link = self.link
                if link is None or link.lost or (link.retired is not None and self._quiet_before(owed)):
                    if link is not None:
                        link.clients.discard(self)
                    link = self.link = self.proxy.shared_link(self.route, s.target.db, s.link_proto)
                    link.clients.add(self)
                link.submit(self, up, owed)
            if s.need_dedicated and self.upstream is None and not self.connecting and not self.closed:
                self._start_connect()
        elif self.upstream is not None and self.upstream.transport is not None:
            out = s.take_upstream()
            if out:
                self.upstream.transport.write(out)
                self.stats.bytes_out["upstream"] += len(out)
                if self.t_request and not self.t_sent:
                    self.t_sent = perf_counter()
        elif s.upstream_error is not None:
            s.take_upstream()
        out = s.out_client
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.closed:
                self.transport.write(data)
                self.stats.bytes_out["client"] += len(data)
                if self.client_paused:
                    self._check_output_limit()
        if (self.draining or s.close_when_done) and not self.closed:
            self._maybe_close()

    def _quiet_before(self, owed: int) -> bool:
        """Nothing owed on the link but the `owed` replies just asked for: the
        session may move to another link without reordering its replies."""
        s = self.session
        return len(s.pending) == owed and s.partial is None and s.emu is None

    def _check_output_limit(self) -> None:
        """A client that does not read its replies: past its output limit it is
        disconnected (as Redis's client-output-buffer-limit does), so what the proxy
        holds for it stays bounded and its shared link never waits for it. All such
        clients together are held to `output_total_limit`: past it, the one holding
        the most goes first."""
        limit = self.session.output_limit
        held = self.transport.get_write_buffer_size()
        if limit and held > limit and not self.closed:
            setting = "pubsub_output_limit" if self.session._subscribed() else "output_limit"
            return self.drop_for_output(held, limit, setting)
        total_limit = self.proxy.config.limits.output_total_limit
        if total_limit and len(self.proxy.paused) > 1:
            sizes = [(c.transport.get_write_buffer_size(), c) for c in self.proxy.paused if not c.closed]
            total = sum(n for n, _ in sizes)
            while total > total_limit and sizes:
                n, worst = max(sizes, key=lambda x: x[0])
                sizes.remove((n, worst))
                total -= n
                worst.drop_for_output(n, total_limit, "output_total_limit, all clients together")

    def drop_for_output(self, held: int, limit: int, setting: str) -> None:
        log.warning("route %s: client %s does not read its replies: %d bytes held, over the output "
                    "limit of %d ([limits] %s); disconnecting it", self.route.name, _peer(self.peer), held,
                    limit, setting, extra={"event": "output_limit", "route": self.route.name})
        self.stats.errors["output_limit"] += 1
        self.transport.abort()  # what it holds is dropped now, not written out first
        self.close("output_limit")

    def _maybe_close(self) -> None:
        s = self.session
        if self.draining and s.idle:
            self.close("reload")
        elif s.close_when_done and not s.pending:
            if s.upstream_error is not None:
                self.close_reason = "upstream_error"
            elif s.protocol_error:
                self.close_reason = "protocol_error"
            self.close()

    def drain(self) -> None:
        """Close at the next safe point: the route this connection was made for changed."""
        self.draining = True
        if self.session.idle:
            self.close("reload")

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
        self.view.conns.pop(self.session, None)
        self.view.remove_monitor(self.session)
        if self in self.proxy.paused or self.close_reason == "output_limit":
            self.proxy.paused.discard(self)
            self.proxy.trim_soon()
        if self.link is not None:
            self.link.clients.discard(self)
        self.stats.clients -= 1
        self.stats.closed_reason(self.close_reason)
        log.debug("client closed", extra={"event": "client_closed", "route": self.route.name,
                                          "peer": _peer(self.peer), "reason": self.close_reason})
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.proxy.idle_changed()

    # Backpressure: a client that does not read stops us reading its upstream; on a
    # shared connection (which other clients need) we stop reading its requests instead.
    def pause_writing(self) -> None:
        self.client_paused = True
        self.proxy.paused.add(self)
        self.apply_backpressure()

    def resume_writing(self) -> None:
        self.client_paused = False
        self.proxy.paused.discard(self)
        self.apply_backpressure()

    def apply_backpressure(self) -> None:
        shared = self.session.shared
        read_client = not (self.client_paused and shared) and not self.link_paused and not self.closed
        if read_client != self.reading_client and not self.closed:
            self.reading_client = read_client
            (self.transport.resume_reading if read_client else self.transport.pause_reading)()
        up = self.upstream.transport if self.upstream is not None else None
        read_upstream = not (self.client_paused and not shared)
        if up is not None and read_upstream != self.reading_upstream:
            self.reading_upstream = read_upstream
            (up.resume_reading if read_upstream else up.pause_reading)()


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, client: ClientConnection):
        self.client = client
        self.transport = None
        self.addr: tuple[str, int] | None = None  # the node connected to

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
        self.client.link_paused = True
        self.client.apply_backpressure()

    def resume_writing(self) -> None:
        self.client.link_paused = False
        self.client.apply_backpressure()


class SharedLink(asyncio.Protocol):
    """One upstream connection carrying the requests of many clients in the plain
    request/reply state (same route and db, RESP2, no connection state of their own).

    Requests of all clients read in one loop iteration go out in one write, and the
    replies come back in one read: fewer system calls here and in Redis, and fewer
    server connections. Replies are handed back in order: `owners` holds runs of
    [client, replies owed], in the order the requests were written."""

    def __init__(self, proxy: "Proxy", route: Route, db: int, proto: int = 2):
        self.proxy = proxy
        self.route = route
        self.db = db
        self.proto = proto  # RESP2 and RESP3 clients share separate links
        self.stats = proxy.stats[route.name]
        self.transport = None
        self.owners: deque = deque()
        self.clients: set[ClientConnection] = set()
        self.out: list[bytes] = []
        self.scheduled = False
        self.buf = b""
        self.lost: str | None = None
        self.retired: str | None = None   # why no new client comes here (see retire)
        self.addr: tuple[str, int] | None = None  # the node connected to
        self.t_sent = 0.0
        # get_running_loop() costs a getpid() system call (its fork check): once per
        # link, not once per batch
        self.loop = asyncio.get_running_loop()
        self.partial: PartialReply | None = None  # a reply arriving over several reads
        self.p_conn = None                         # ... for this client
        self.p_mode = ""                           # "stream", "collect" or "discard"
        self.p_chunks: list[bytes] = []
        for args in route.upstream.handshake(db, proto):
            self._own(args)

    def _own(self, args: list[bytes]) -> None:
        self.out.append(encode_command(args))
        self.owners.append([None, 1])

    async def connect(self) -> None:
        up = self.route.upstream
        loop = asyncio.get_running_loop()
        host, port = up.host, up.port
        try:
            if up.sentinel is not None:
                host, port = await self.proxy.sentinel_primary(up)
            self.addr = (host, port)
            await asyncio.wait_for(loop.create_connection(lambda: self, host, port, **up.ssl_args(host)),
                                   self.proxy.config.limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            self.fail(connect_failure(host, port, e, up.tls))
            return
        self.stats.upstream_opened += 1

    def connection_made(self, transport) -> None:
        if self.lost:
            transport.close()
            return
        self.transport = transport
        _nodelay(transport)
        self.stats.upstream_connections += 1
        self.flush()

    def submit(self, conn: ClientConnection, chunks: list[bytes], owed: int) -> None:
        """Queue a client's request bytes (the list is emptied) and the replies they owe."""
        if self.lost:
            conn.session.upstream_lost(self.lost)
            return conn.flush()
        if chunks:
            self.out += chunks
            chunks.clear()
        if owed:
            last = self.owners[-1] if self.owners else None
            if last is not None and last[0] is conn:
                last[1] += owed
            else:
                self.owners.append([conn, owed])
        if not self.scheduled and self.transport is not None:
            if len(self.clients) == 1:
                # no other client could add to this batch: no reason to wait for the
                # end of the loop iteration (a lone client's latency)
                return self.flush()
            # Write once at the end of this loop iteration, for every client together.
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.out and self.transport is not None and not self.lost:
            data = b"".join(self.out)
            self.out.clear()
            self.transport.write(data)
            self.stats.bytes_out["upstream"] += len(data)
            if not self.t_sent and self.proxy.timed:
                self.t_sent = perf_counter()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in["upstream"] += len(data)
        if self.t_sent:
            self.stats.roundtrip_seconds.observe(perf_counter() - self.t_sent)
            self.t_sent = 0.0
        buf = self.buf + data if self.buf else data  # self.buf: at most a header line
        self.buf = b""
        pos, n = 0, len(buf)
        owners = self.owners
        touched = []
        try:
            if self.partial is not None:
                pos = self._feed_partial(buf, 0, touched)
            while pos < n and self.partial is None:
                if owners:
                    run = owners[0]
                    conn = run[0]
                    if conn is not None and not conn.closed:
                        # Replies that need nothing go to their client as one slice.
                        pos2, m = conn.session.shared_run(buf, pos, run[1])
                        if m:
                            run[1] -= m
                            if not run[1]:
                                owners.popleft()
                            pos = pos2
                            if not touched or touched[-1] is not conn:
                                touched.append(conn)
                            continue
                end = frame_end(buf, pos)
                if end < 0:
                    pos = self._start_partial(buf, pos, touched)
                    break
                self._deliver(buf[pos:end], touched)
                pos = end
        except (ProtocolError, UnexpectedReply) as e:
            self.buf = b""
            if isinstance(e, UnexpectedReply) or str(e) == "a reply nobody asked for":
                self.stats.errors["unexpected_reply"] += 1
                e = "the server sent a reply no request was waiting for"
            self.fail(str(e))
            return
        if self.partial is None and pos < n:
            self.buf = buf[pos:]
        for conn in dict.fromkeys(touched):
            conn.after_shared_replies()
        if self.retired is not None and not owners:
            self.close()

    def _pop_owner(self):
        """The client owed the reply at the head of the wire (None: the link's own request).
        Exactly one reply per request on a shared link (only shareable commands are sent
        here), so a reply with no owner is a fault, never handed to anyone."""
        owners = self.owners
        if not owners:
            raise UnexpectedReply()
        run = owners[0]
        run[1] -= 1
        if not run[1]:
            owners.popleft()
        return run[0]

    def _deliver(self, raw: bytes, touched: list) -> None:
        """One whole frame from the wire."""
        if raw[0] == 0x3E:  # '>' a RESP3 push: no client here asked for one (no
            return          # subscriptions or tracking on a shared link); not a reply
        conn = self._pop_owner()
        if conn is None:
            if raw[0] in (0x2D, 0x21):  # '-' or '!': the link's own AUTH/SELECT/HELLO failed
                msg = raw[1:-2].decode("utf-8", "replace")
                raise ProtocolError(f"upstream refused the proxy's handshake: {msg}")
        elif not conn.closed:
            conn.session.shared_reply(raw, raw[0])
            if not touched or touched[-1] is not conn:
                touched.append(conn)

    def _start_partial(self, buf: bytes, pos: int, touched: list) -> int:
        """The frame at `pos` is not whole: a reply that needs nothing is collected up to
        session.STREAM_AFTER bytes, then forwarded to its client as its bytes arrive; one
        that must be rewritten (or the link's own) is collected whole; a push or a reply
        for a client that left is skipped."""
        self.partial = PartialReply()
        self.p_chunks = []
        self.p_size = 0
        self.p_conn = None
        self.p_pass = False
        if buf[pos] == 0x3E:
            self.p_mode = "discard"
        else:
            if not self.owners:
                raise UnexpectedReply()
            conn = self.owners[0][0]
            self.p_conn = conn
            if conn is not None and conn.closed:
                self.p_mode = "discard"
            else:
                self.p_mode = "collect"
                self.p_pass = conn is not None and conn.session.shared_streams()
        return self._feed_partial(buf, pos, touched)

    def _feed_partial(self, buf: bytes, pos: int, touched: list) -> int:
        end, done = self.partial.feed(buf, pos)
        conn = self.p_conn
        if self.p_mode != "discard" and conn is not None and conn.closed:
            self.p_mode = "discard"
        mode = self.p_mode
        if mode == "stream":
            if end > pos:
                conn.session.out_client.append(buf[pos:end])
                if not touched or touched[-1] is not conn:
                    touched.append(conn)
        elif mode == "collect":
            self.p_chunks.append(buf[pos:end])
            self.p_size += end - pos
            if self.p_pass and self.p_size >= STREAM_AFTER:  # large: stream it from here on
                conn.session.out_client.extend(self.p_chunks)
                self.p_chunks = []
                self.p_mode = mode = "stream"
                if not touched or touched[-1] is not conn:
                    touched.append(conn)
        if not done:
            self.buf = buf[end:]  # at most an unfinished header line
            return len(buf)
        self.partial = None
        if mode == "discard":
            if conn is not None:  # a reply for a client that left (None: a push)
                self._pop_owner()
        elif mode == "stream":
            self._pop_owner()
            conn.session.shared_stream_done()
        else:
            raw = b"".join(self.p_chunks)
            self._deliver(raw, touched)
        self.p_chunks = []
        self.p_conn = None
        return end

    def connection_lost(self, exc) -> None:
        if self.transport is not None:
            self.stats.upstream_connections -= 1
        self.fail(f"connection lost: {exc}" if exc else "connection closed by the server")

    def close(self) -> None:
        """Closed by the proxy (stop, or its route gone): not an upstream failure."""
        if not self.lost:
            self.lost = "closed by the proxy"
            self.proxy.forget_link(self)
        if self.transport is not None:
            self.transport.close()

    def retire(self, reason: str) -> None:
        """The route's primary moved (Sentinel): no new client comes to this link;
        its clients move to a new one as soon as they owe nothing here, and it closes
        once every owed reply is in. Replies still owed after connect_timeout are
        answered with an error naming `reason` (the old primary may be gone)."""
        if self.lost or self.retired is not None:
            return
        self.retired = reason
        self.proxy.forget_link(self)
        if self.transport is None:  # not connected yet: what waits for it goes nowhere
            return self.fail(reason)
        if not self.owners:
            return self.close()
        self.loop.call_later(self.proxy.config.limits.connect_timeout, self._retire_over)

    def _retire_over(self) -> None:
        if not self.lost:
            self.fail(f"{self.retired}; no reply from the old primary in time")

    def fail(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = reason
        self.proxy.forget_link(self)
        log.warning("route %s: shared upstream connection: %s", self.route.name, reason,
                    extra={"event": "upstream_error", "route": self.route.name})
        if self.transport is not None:
            self.transport.close()
        owed = [run[0] for run in self.owners if run[0] is not None]
        self.owners.clear()
        for conn in dict.fromkeys(owed):
            if not conn.closed:
                conn.session.upstream_lost(reason)
                conn.flush()

    # Redis not reading: stop reading the requests of every client on this link.
    def pause_writing(self) -> None:
        for c in list(self.clients):
            c.link_paused = True
            c.apply_backpressure()

    def resume_writing(self) -> None:
        for c in list(self.clients):
            c.link_paused = False
            c.apply_backpressure()


def _warn_unverified(route: Route) -> None:
    up = route.upstream
    if up.tls is not None and not up.tls.verify:
        log.warning("route %s: upstream %s: TLS certificate verification is off (upstream_tls.verify = false): "
                    "the connection is encrypted but the server is not authenticated", route.name, up.masked(),
                    extra={"event": "tls_unverified", "route": route.name})


def _peer(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_addr(str(peer[0]), peer[1])  # [::1]:PORT for IPv6
    return str(peer)


class ClientRegistry(RouteView):
    """The clients of one route (by name), for CLIENT LIST and MONITOR on tenant routes."""

    def __init__(self):
        super().__init__()
        self.conns: dict[Session, ClientConnection] = {}

    def sessions(self) -> list:
        return list(self.conns)

    def feed(self, line: bytes) -> None:
        for m in list(self.monitors):
            c = self.conns.get(m)
            if c is not None and not c.closed:
                c.transport.write(line)
                c.stats.bytes_out["client"] += len(line)


class Proxy:
    def __init__(self, config: Config, reuse_port: bool = False):
        self.config = config
        self.reuse_port = reuse_port  # a worker of several (proxy/workers.py) shares its listeners
        self.rules = default_rules()
        self.table = self.rules.table
        self.no_auth = no_auth_commands(self.table)
        self.stats = {r.name: RouteStats(r.name) for r in config.all_routes()}
        self.clients: set[ClientConnection] = set()
        self.paused: set[ClientConnection] = set()   # clients whose socket buffer is full
        self._trim_scheduled = False
        self.links: dict[tuple, SharedLink] = {}
        # Latency histograms cost a clock read or two per batch; without an admin port
        # nobody can read them, so they are not kept. Counters are kept either way.
        self.timed = config.metrics_listen is not None
        self.servers: list[asyncio.AbstractServer] = []
        self.routes: dict[tuple, Route] = {}               # listen address -> its current route
        self.listeners: dict[tuple, asyncio.AbstractServer] = {}
        # TLS listeners: listen address -> [the SSLContext new connections switch to,
        # the context the listening socket was made with]. A reload puts freshly read
        # certificates in the first slot (see _listener_ssl).
        self.tls: dict[tuple, list] = {}
        self.generation = 1
        self._stopping = False
        self._idle = None
        self.views: dict[str, ClientRegistry] = {}
        self.next_client_id = 0
        self.sentinels: dict = {}   # SentinelSpec -> sentinel.Watcher

    def view(self, route_name: str) -> ClientRegistry:
        v = self.views.get(route_name)
        if v is None:
            v = self.views[route_name] = ClientRegistry()
        return v

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.watch_sentinels(self.config)))
        await self.check_fences(self.config.routes)
        for route in self.config.routes:
            await self._listen(route)

    async def check_fences(self, routes: list) -> None:
        """Is each tenant route's upstream user fenced by a Redis ACL? (proxy/fence.py) One
        log line per route (each user's route for a listener with users, which sends
        nothing upstream itself); the result is the route's keyspace_proxy_route_upstream_fenced."""
        routes = [r for listener in routes for r in
                  ([u.route for u in listener.users.values()] if listener.users is not None else [listener])]
        await asyncio.gather(*(self._check_fence(r) for r in routes))

    async def _check_fence(self, route: Route) -> None:
        st = self.stats.setdefault(route.name, RouteStats(route.name))
        st.upstream_fenced = 0
        if not route.namespaced:
            log.info("route %s: policy %s, no namespace: the policy changes nothing here", route.name,
                     route.policy, extra={"event": "fence", "route": route.name})
            return
        if route.policy != "tenant":
            log.info("route %s: policy app: scripts and read-only server commands pass (the application is "
                     "trusted); upstream ACL fence not checked", route.name,
                     extra={"event": "fence", "route": route.name})
            return
        try:
            if not fence.prefixes(route):  # strip mode only: nothing for an ACL key pattern to hold
                fenced, detail = False, "no db of the route adds a namespace an ACL key pattern could fence"
            else:
                up = route.upstream
                addr = await self.sentinel_primary(up) if up.sentinel is not None else (up.host, up.port)
                fenced, detail = await asyncio.wait_for(_probe_fence(route, addr), self.config.limits.connect_timeout)
        except Exception as e:  # unreachable now: fail closed (scripts refused) until a reload checks again
            if isinstance(e, HandshakeError):  # AUTH or SELECT refused: logged as an error for the route
                e = "the upstream refused the proxy's handshake"
            elif isinstance(e, OSError):
                e = connect_failure(route.upstream.host, route.upstream.port, e, route.upstream.tls)
            fenced, detail = False, f"could not check ({e or type(e).__name__})"
        st.upstream_fenced = 1 if fenced else 0
        if fenced:
            log.info("route %s: policy tenant, upstream user fenced by a Redis ACL (%s): scripts and functions "
                     "pass", route.name, detail, extra={"event": "fence", "route": route.name})
        else:
            log.info("route %s: policy tenant, upstream user not fenced by a Redis ACL (%s): scripts and "
                     "functions are refused", route.name, detail, extra={"event": "fence", "route": route.name})

    # -- Sentinel upstreams (proxy/sentinel.py): where the primary is, and a switch

    def watch_sentinels(self, config: Config) -> list:
        """A watcher per sentinel upstream not watched yet, registered at once (so a
        connection never finds none); the caller starts them."""
        from proxy.sentinel import Watcher
        new = []
        for route in config.all_routes():  # users' routes may have upstreams of their own
            up = route.upstream
            if up.sentinel is not None and up.sentinel not in self.sentinels:
                w = self.sentinels[up.sentinel] = Watcher(
                    up, config.limits.connect_timeout,
                    lambda old, addr, spec=up.sentinel: self.primary_changed(spec, old, addr))
                new.append(w)
        return new

    async def sentinel_primary(self, up) -> tuple[str, int]:
        """The confirmed primary of a sentinel upstream, waiting (up to connect_timeout)
        while a switch is being confirmed. Raises SentinelError."""
        w = self.sentinels.get(up.sentinel)
        if w is None:  # its route was removed by a reload
            from proxy.sentinel import SentinelError
            raise SentinelError(f"{up.masked()} is no longer configured")
        return await w.wait(self.config.limits.connect_timeout)

    def primary_now(self, up) -> tuple[str, int] | None:
        """The data node now: None while a sentinel upstream's primary is unknown."""
        if up.sentinel is None:
            return up.host, up.port
        w = self.sentinels.get(up.sentinel)
        return w.state.primary if w is not None else None

    def primary_changed(self, spec, old, new) -> None:
        """A sentinel upstream's primary moved from `old` (None: first found) to `new`
        (None: being confirmed). Shared links to the old one finish what they owe and
        close (SharedLink.retire); dedicated connections to it are closed with an error
        for each owed reply, so their clients reconnect (and reach the new primary:
        their connection state, MULTI or SUBSCRIBE, belonged to the old one); new
        connections wait for the new primary."""
        if old is None:
            log.info("sentinel upstream %s: primary is %s", spec.master, format_addr(*new),
                     extra={"event": "sentinel"})
            return
        reason = (f"the primary of {spec.master!r} moved from {format_addr(*old)}"
                  + (f" to {format_addr(*new)}" if new else "") + " (Sentinel failover)")
        log.warning("sentinel upstream: %s", reason, extra={"event": "sentinel"})
        for link in list(self.links.values()):
            if link.route.upstream.sentinel == spec and link.addr == old:
                link.retire(reason)
        for c in list(self.clients):
            up = c.upstream
            if c.route.upstream.sentinel == spec and up is not None and up.addr == old and not c.closed:
                c.session.upstream_lost(reason)
                c.flush()

    async def _listen(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        listen = route.listen
        self.routes[listen] = route
        # the factory reads the current route, so a reload changes it for new connections
        server = await loop.create_server(lambda: ClientConnection(self, self.routes[listen]),
                                          listen[0], listen[1], reuse_address=True,
                                          reuse_port=self.reuse_port or None, ssl=self._listener_ssl(route))
        self.servers.append(server)
        self.listeners[listen] = server
        sockets = server.sockets or ()  # the bound address: port 0 becomes the port the system chose
        log.info("listening on %s", route.describe(sockets[0].getsockname() if sockets else None))
        for user in (route.users or {}).values():
            log.info("  user %s: route %s -> %s", user.name, user.route.name, user.route.describe().split(" -> ", 1)[1])
        for r in route.with_users():
            _warn_unverified(r)

    def _listener_ssl(self, route: Route) -> ssl.SSLContext | None:
        """The SSLContext a TLS listener is created with. asyncio fixes it for the life of
        the listening socket, so it only dispatches: its SNI callback (run for every
        handshake, with or without SNI) moves the connection to the current context,
        which a reload replaces with one built from the files as they are then."""
        if route.tls is None:
            return None
        current = route.tls.context()
        outer = route.tls.build()
        outer.verify_mode = current.verify_mode
        holder = self.tls[route.listen] = [current, outer]

        def switch(conn, server_name, ctx) -> None:
            if holder[0] is not ctx:
                conn.context = holder[0]
        outer.sni_callback = switch
        return outer

    def _reload_tls(self, new_routes: dict) -> None:
        """Before a reload changes anything: a listener cannot go from plain to TLS or
        back (its socket is one or the other); refused, nothing changed."""
        for listen, r in new_routes.items():
            old = self.routes.get(listen)
            if old is not None and (old.tls is None) != (r.tls is None):
                raise ConfigError(f"listener {r.name}: TLS turned {'on' if r.tls else 'off'}; a listener is plain or "
                                  "TLS for the life of its socket: restart the proxy (or use a new address)")

    def _take_tls(self, new_routes: dict) -> int:
        """New connections of each TLS listener use the certificates read by this reload."""
        n = 0
        for listen, r in new_routes.items():
            holder = self.tls.get(listen)
            if holder is not None and r.tls is not None:
                current = r.tls.context()
                holder[0] = current
                holder[1].verify_mode = current.verify_mode  # the mode is taken from the first context
                n += 1
        return n

    async def reload(self, new: Config) -> str:
        """Apply a new configuration: listeners added and removed, routes changed.

        New connections get the new routes at once; existing connections of a changed
        or removed route are closed at their next safe point (no reply owed, not in
        MULTI), so their clients reconnect onto the new route; after the grace period
        the rest are closed too."""
        old = dict(self.routes)
        new_routes = {r.listen: r for r in new.routes}
        self._reload_tls(new_routes)
        for w in self.watch_sentinels(new):
            asyncio.ensure_future(w.start())
        added = [r for k, r in new_routes.items() if k not in old]
        removed = [r for k, r in old.items() if k not in new_routes]
        changed = [r for k, r in new_routes.items() if k in old and old[k] != r]
        # new and changed routes: is their upstream user fenced? (checked before they take clients)
        await self.check_fences([r for r in new_routes.values() if r.listen not in old or old[r.listen] != r])
        for route in added:  # bind first: a port that cannot be had fails the reload, nothing changed
            await self._listen(route)
        for route in removed:
            server = self.listeners.pop(route.listen)
            server.close()
            self.servers.remove(server)
            del self.routes[route.listen]
            self.tls.pop(route.listen, None)
        for route in changed:
            self.routes[route.listen] = route
            for r in route.with_users():
                _warn_unverified(r)
        for listen, route in new_routes.items():
            # unchanged routes too: their equal settings carry the TLS contexts this
            # reload built from the files as they are now (for new connections)
            self.routes[listen] = route
        tls_listeners = self._take_tls(new_routes)
        for route in new.all_routes():
            self.stats.setdefault(route.name, RouteStats(route.name))
        if new.metrics_listen != self.config.metrics_listen:
            log.warning("reload: [metrics] listen changed; the admin port moves only on restart")
            new.metrics_listen = self.config.metrics_listen
        self.config = new
        self.generation += 1
        # (a listener with users before and after: its connections on the listener's own
        # route are those not authenticated yet; they stay, and AUTH with the new users)
        stale = {id(r) for r in removed} | {id(old[r.listen]) for r in changed
                                            if old[r.listen].users is None or r.users is None}
        # A user's connections are drained when its listener is gone, or when the user
        # is removed or changed (route or password: a rotated password logs them out).
        for r in removed + changed:
            was = old[r.listen]
            now = new_routes.get(r.listen)
            for name, user in (was.users or {}).items():
                kept = (now.users or {}).get(name) if now is not None else None
                if kept != user:
                    stale.add(id(user.route))
        draining = [c for c in self.clients if id(c.route) in stale]
        for c in draining:
            c.drain()
        grace = new.limits.reload_grace
        asyncio.get_running_loop().call_later(grace, self._end_grace, draining)
        summary = (f"generation {self.generation}: {len(added)} listener(s) added, {len(removed)} removed, "
                   f"{len(changed)} route(s) changed; draining {len(draining)} connection(s) "
                   f"(grace {grace:g}s)" + (f"; TLS certificates re-read for {tls_listeners} listener(s)"
                                            if tls_listeners else ""))
        log.info("reload: %s", summary, extra={"event": "reload"})
        return summary

    def _end_grace(self, draining: list) -> None:
        left = [c for c in draining if not c.closed]
        if left:
            log.warning("reload: grace period over, closing %d connection(s) still busy", len(left))
        for c in left:
            c.close("reload")
        current = {(rr.name, rr.upstream) for r in self.routes.values() for rr in r.with_users()}
        used = {up.sentinel for _, up in current}
        for spec in [s for s in self.sentinels if s not in used]:  # no route follows it any more
            self.sentinels.pop(spec).stop()
        for key, link in list(self.links.items()):
            if (key[0], key[2]) not in current and not link.owners:
                del self.links[key]
                link.close()

    async def check_commands(self) -> None:
        """Log commands the upstream has that the generated table does not know.

        On namespaced routes they are refused (fail closed); the log says why."""
        seen = set()
        for route in self.config.traffic_routes():
            up = route.upstream
            if up in seen:
                continue
            seen.add(up)
            try:
                addr = await self.sentinel_primary(up) if up.sentinel is not None else (up.host, up.port)
                names = await asyncio.wait_for(_command_list(up, addr), self.config.limits.connect_timeout)
            except HandshakeError as e:  # AUTH or SELECT refused: so will every client of the route be
                log.error("route %s: upstream %s: %s", route.name, up.masked(), e, extra={"event": "upstream_error"})
                continue
            except Exception as e:  # the check is advisory: an unreachable upstream is reported per request
                if isinstance(e, OSError):
                    e = connect_failure(*(self.primary_now(up) or (up.host, up.port)), e, up.tls)
                log.warning("route %s: upstream %s: could not list its commands (%s)", route.name, up.masked(),
                            e or type(e).__name__)
                continue
            unknown = sorted(n for n in names if n not in self.table)
            if unknown:
                log.warning("upstream %s has %d commands the proxy's table does not know; they are refused on "
                            "namespaced routes and passed through elsewhere: %s",
                            up.masked(), len(unknown), " ".join(unknown[:50]))

    def shared_link(self, route: Route, db: int, proto: int = 2) -> SharedLink:
        key = (route.name, db, route.upstream, proto)
        link = self.links.get(key)
        if link is None or link.lost:
            link = self.links[key] = SharedLink(self, route, db, proto)
            asyncio.ensure_future(link.connect())
        return link

    def trim_soon(self) -> None:
        """A client that held a lot of memory (it did not read its replies) is gone: give the
        heap's free memory back to the system a moment later (once for a burst of them).
        glibc keeps freed buffers otherwise: 1.15 GB two seconds after twenty slow readers
        left (bench/big_replies.py). Not done on every free: glibc's own reuse of the heap
        is what keeps large values cheap (a fixed mmap threshold cost 100 KB values 1.3x)."""
        if not self._trim_scheduled and MALLOC_TRIM is not None:
            self._trim_scheduled = True
            asyncio.get_running_loop().call_later(1.0, self._trim)

    def _trim(self) -> None:
        self._trim_scheduled = False
        MALLOC_TRIM(0)

    def forget_link(self, link: SharedLink) -> None:
        key = (link.route.name, link.db, link.route.upstream, link.proto)
        if self.links.get(key) is link:
            del self.links[key]

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
        for link in list(self.links.values()):
            link.close()
        for w in self.sentinels.values():
            w.stop()
        for s in self.servers:
            await s.wait_closed()


class HandshakeError(RuntimeError):
    """The upstream refused a command of the handshake (AUTH, SELECT) or the check."""

    @classmethod
    def of(cls, cmd: list, error: str) -> Exception:
        why = handshake_failure(cmd, error)
        return cls(why) if why else RuntimeError(error)


async def _probe_fence(route: Route, addr: tuple[str, int]) -> tuple[bool, str]:
    """Run proxy/fence.py's probe on a connection of its own to `addr` (the data node),
    one command at a time."""
    import hiredis
    up = route.upstream
    reader, writer = await asyncio.open_connection(addr[0], addr[1], **up.ssl_args())
    parser = hiredis.Reader()

    async def call(cmd: list[bytes]):
        writer.write(encode_command(cmd))
        while (r := parser.gets()) is False:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            parser.feed(data)
        return r
    try:
        for cmd in up.handshake(route.default.db):
            r = await call(cmd)
            if isinstance(r, hiredis.ReplyError):
                raise HandshakeError.of(cmd, str(r))
        gen = fence.probe(route)
        reply = None
        while True:
            try:
                cmd = gen.send(reply)
            except StopIteration as stop:
                return stop.value
            reply = await call(cmd)
    finally:
        writer.close()


async def _command_list(up, addr: tuple[str, int]) -> list[str]:
    import hiredis

    from proxy.resp import encode_command
    reader, writer = await asyncio.open_connection(addr[0], addr[1], **up.ssl_args(addr[0]))
    try:
        cmds = up.handshake() + [[b"COMMAND", b"LIST"]]
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
        for cmd, reply in zip(cmds, replies):
            if isinstance(reply, hiredis.ReplyError):
                raise HandshakeError.of(cmd, str(reply))
        return [n.decode().lower() for n in replies[-1]]
    finally:
        writer.close()


async def serve(config: Config, ready=None, load_config=None, worker: bool = False) -> None:
    """Run until SIGTERM/SIGINT. `load_config()` re-reads the configuration for SIGHUP
    and POST /-/reload (it raises ConfigError for an invalid one, which is refused).
    `worker`: one of several processes under a supervisor (proxy/workers.py)."""
    proxy = Proxy(config, reuse_port=worker)
    loop = asyncio.get_running_loop()

    async def reload() -> tuple[bool, str]:
        if load_config is None:
            return False, "no configuration to re-read"
        try:
            new = load_config()
            return True, await proxy.reload(new)
        except (ConfigError, OSError) as e:
            log.error("reload refused, the running configuration stays: %s", e, extra={"event": "reload"})
            return False, f"reload refused: {e}"

    admin = None
    if config.metrics_listen:  # up before the listeners, so "listening" means everything is
        from proxy.metrics import AdminServer
        admin = AdminServer(proxy, *config.metrics_listen,
                            reload=lambda: asyncio.run_coroutine_threadsafe(reload(), loop).result(30))
        admin.start()
        log.info("metrics on http://%s/metrics (also /healthz, /readyz)", format_addr(config.metrics_listen[0], admin.port))
    if IMPLEMENTATION == "c":
        log.info("hot path: C (proxy._speedups)")
    else:
        log.info("hot path: pure Python (%s)", "KEYSPACE_PROXY_PURE_PYTHON is set" if os.environ.get(
            "KEYSPACE_PROXY_PURE_PYTHON", "") not in ("", "0") else "proxy._speedups is not compiled")
    await proxy.start()
    asyncio.ensure_future(proxy.check_commands())
    if ready is not None:
        ready(proxy)
    stop = asyncio.Event()
    if worker:
        from proxy.workers import report_ready
        report_ready(admin.port if admin is not None else None)
        parent = os.getppid()

        def watch_parent() -> None:  # a worker whose supervisor is gone stops, drained
            if os.getppid() != parent:
                log.warning("supervisor gone: stopping", extra={"event": "stop"})
                stop.set()
            else:
                loop.call_later(1.0, watch_parent)
        loop.call_later(1.0, watch_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    await stop.wait()
    log.info("stopping: no new connections, draining %d", len(proxy.clients))
    await proxy.stop()
    if admin is not None:
        admin.stop()
    log.info("stopped")


def _malloc_trim():
    """glibc's malloc_trim, or None: gives the free parts of the heap back to the system."""
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def run(config: Config, load_config=None, worker: bool = False) -> None:
    try:
        import uvloop
        uvloop.run(serve(config, load_config=load_config, worker=worker))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(serve(config, load_config=load_config, worker=worker))
