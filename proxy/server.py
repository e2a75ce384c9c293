"""The asyncio shell: accept clients, open one upstream connection each, move bytes.

All protocol decisions are in Session; this module only connects transports to
it, applies backpressure both ways, and stops cleanly."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import signal
import socket
import ssl
from collections import deque
from dataclasses import replace
from time import monotonic, perf_counter

from proxy import fence
from proxy.auth import Gate, Login, no_auth_commands
from proxy.bpool import BlockingPool
from proxy.rules import default_rules
from proxy.config import Config, ConfigError, Route, connect_failure, format_addr, handshake_failure
from proxy.resp import PartialReply, ProtocolError, encode_command, error, frame_end
from proxy.session import STREAM_AFTER, ClientFacts, RouteView, Session, UnexpectedReply
from proxy.speedups import IMPLEMENTATION
from proxy.stats import RouteStats

log = logging.getLogger("keyspace-proxy")

# A client read at least this big yields to the other connections before the next one
# (see ClientConnection._take_turns).
FAIR_READ = 256000  # uvloop reads at most 256,000 bytes at a time: a full read means more is waiting


# Limits (README, "Limits and timeouts").
MAX_CLIENTS = 10000        # Redis's maxclients default
RESERVED_FDS = 64          # left for listeners, shared links, the admin port, logs (Redis keeps 32)
MAX_CLIENTS_ERROR = b"-ERR max number of clients reached\r\n"   # Redis's words
ACCEPT_BATCH = 64          # connections accepted per readiness event, so clients' reads get turns too
ACCEPT_PAUSE = 1.0         # out of descriptors and nothing to free: accept again after this (as asyncio)
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
LIMIT_LOG_WINDOW = 10.0    # at most one "clients turned away" line per listener per this many seconds


def _out_of_fds(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in OUT_OF_FDS


def _nodelay(transport, keepalive: int = 0) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            _keepalive(sock, keepalive)


def _keepalive(sock, idle: int) -> None:
    """TCP keepalive as Redis's anetKeepAlive sets it: first probe after `idle` seconds of
    silence, then every idle/3, dead after 3 unanswered: a peer gone without a FIN or RST
    (a host powered off, a NAT entry dropped) is found in about twice `idle`."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:  # a socket already closed by the peer: nothing to keep alive
        pass


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed (as Redis does at
    start); returns (soft, hard) as they then are."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default fs.nr_open
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def derived_max_clients(nofile: int) -> int:
    """The default of limits.max_clients: Redis's 10000, or fewer when the descriptors do
    not allow it. Each client may hold an upstream connection of its own (dedicated mode,
    or a blocking command, MULTI, SUBSCRIBE in shared mode): two descriptors per client,
    after RESERVED_FDS for everything else."""
    return max(1, min(MAX_CLIENTS, (nofile - RESERVED_FDS) // 2))


def _fd_limit() -> int:
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Rejected(asyncio.Protocol):
    """A client over max_clients: told so as Redis tells it, then closed (on a TLS
    listener after the handshake, so it can read why)."""

    def connection_made(self, transport) -> None:
        transport.write(MAX_CLIENTS_ERROR)
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


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
        self.active = True     # read from since the last tick (Proxy._tick: idle timeout)
        self.quiet_since = 0.0
        self.slot = None       # the listen address it is counted under (max_clients), until released
        self.pooled = None     # a blocking pool connection lent for one blocking command (proxy/bpool.py)
        self.pool_waiting = False
        self.bpool = None      # the route's BlockingPool, once asked for (_maybe_borrow)
        self.spread = None     # a spread route over a cluster: its node connections (proxy/spread_io.py)

    # -- client side

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport, self.proxy.config.limits.tcp_keepalive)
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
        up, proxy = self.route.upstream, self.proxy
        if up.sentinel is not None or up.cluster is not None:  # (MIGRATE's own-server check)
            self.session.node_of = lambda: proxy.primary_now(up)
        if self.session.cluster:  # a -MOVED / -ASK it saw: the route's slot is followed
            up, proxy = self.route.upstream, self.proxy
            self.session.on_redirect = lambda r, st=self.stats: proxy.cluster_redirect(up, r, st)
            if self.session.spread is None:  # pinned: a redirected request is sent again
                self.session.on_resend = self._resend
        if self.session.spread is not None:  # a connection per node, opened as requests need them
            from proxy.spread_io import SpreadIO
            self.shared = False
            self.spread = SpreadIO(self)
        elif self.shared:
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
        self._next_hop()
        self.flush()

    def _start_connect(self) -> None:
        self.connecting = True
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        up = self.route.upstream
        loop = asyncio.get_running_loop()
        down = self.proxy.health(up).down_reason()
        if down is not None:  # failing: no new connection until the reconnect loop gets an answer
            self.close_reason = "upstream_error"
            self.session.upstream_lost(down, tell_idle=True)
            self.flush()
            return
        host, port = up.host, up.port
        try:
            if up.sentinel is not None or up.cluster is not None:
                host, port = await self.proxy.data_node(up)
            _, self.upstream = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), host, port, **up.ssl_args(host)),
                self.proxy.config.limits.connect_timeout)
            self.upstream.addr = (host, port)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            reason = connect_failure(host, port, e, up.tls)
            log.warning("route %s: %s", self.route.name, reason,
                        extra={"event": "upstream_error", "route": self.route.name})
            if not _out_of_fds(e):  # our own shortage says nothing about the upstream
                self.proxy.health(up).failed(reason, self.route.name)
            self.close_reason = "upstream_error"
            self.session.upstream_lost(reason, tell_idle=True)
            self.flush()
            return
        self.stats.upstream_opened += 1
        self.connecting = False
        if self.closed:
            self.upstream.transport.close()
            return
        if (up.sentinel is not None or up.cluster is not None) and self.proxy.primary_now(up) != (host, port):
            # the primary moved while this connection was being opened to it
            self.close_reason = "upstream_error"
            what = f"the primary of {up.sentinel.master!r}" if up.sentinel else f"the owner of hash slot {up.slot}"
            self.session.upstream_lost(f"{what} moved from {format_addr(host, port)} "
                                       f"({'Sentinel failover' if up.sentinel else 'Redis Cluster'})", tell_idle=True)
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
            if s.need_borrow:  # a blocking command held behind the HELLO
                self._maybe_borrow()
            self.apply_backpressure()

    def after_shared_replies(self) -> None:
        """Called by the link after it handed this connection replies."""
        s = self.session
        if not (s.need_dedicated or s.need_link is not None or s.out_upstream
                or s.owed_sent != self.registered or self.draining or s.close_when_done or s.need_borrow):
            # the common case: nothing to do but pass the replies on (and time the batch);
            # write_out() inline, a call less on the hot path
            out = s.out_client
            if out and not self.closed:
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self.transport.write(data)
                self.stats.bytes_out["client"] += len(data)
                if self.client_paused:
                    self._check_output_limit()
            if self.t_request and not s.pending:
                self.stats.request_seconds.since(self.t_request)
                self.t_request = 0.0
            return
        if self.t_request and not s.pending:
            self.stats.request_seconds.since(self.t_request)
            self.t_request = 0.0
        if s.need_dedicated:
            self._maybe_leave_link()
        elif s.need_link is not None:
            self._maybe_change_link()
        elif s.need_borrow:
            self._maybe_borrow()
        self.flush()

    def _resend(self, items: list) -> None:
        """The session holds requests a node answered -MOVED / -ASK (not run), every reply
        owed before and after them is in, and its later requests wait: send them again
        (Proxy.cluster_resend), then hand the replies back in their place."""
        s = self.session
        node = self.link.addr if s.shared and self.link is not None else getattr(self.upstream, "addr", None)
        asyncio.ensure_future(self._resend_task(s, items, node[0] if node else self.route.upstream.host))

    async def _resend_task(self, s: Session, items: list, near: str) -> None:
        try:
            replies = await self.proxy.cluster_resend(self.route.upstream, s.link_proto if s.shared else s.proto,
                                                      items, near, self.stats)
        except Exception as e:  # a bug here costs this client alone
            log.exception("route %s: sending a redirected request again failed", self.route.name)
            replies = [error(f"ERR proxy internal error ({e.__class__.__name__})")] * len(items)
        if self.closed or self.session is not s:
            return
        s.resent(replies)
        self._next_hop()
        self.flush()

    def _next_hop(self) -> None:
        """After the session took input or replies: a HELLO asked for the link of another
        protocol, or a blocking command for a pooled connection (each once nothing is owed)."""
        s = self.session
        if s.need_link is not None:
            self._maybe_change_link()
        elif s.need_borrow:
            self._maybe_borrow()

    # -- the blocking pool (proxy/bpool.py): one blocking command on a borrowed connection

    def _maybe_borrow(self) -> None:
        """Ask the route's pool for a connection once no shared reply is owed (order)."""
        s = self.session
        if s.need_borrow and s.shared_quiet and self.pooled is None and not self.pool_waiting \
                and not self.closed:
            self.pool_waiting = True
            pool = self.bpool
            if pool is None or pool.route is not self.route:  # (a reload gives the client another route)
                pool = self.bpool = self.proxy.blocking_pool(self.route)
            pool.borrow(self, (s.target.db, s.link_proto))

    def lend(self, pc) -> None:
        """The pool lent `pc`: the held blocking command goes there, alone."""
        self.pool_waiting = False
        s = self.session
        if self.closed or not s.need_borrow or not s.held or s.upstream_error is not None:
            return pc.pool.release(pc)  # gone, or answered meanwhile (upstream lost)
        pc.command = s.held[0][0][:32] if s.held and type(s.held[0]) is list else b"?"
        self.pooled = self.upstream = pc
        self.reading_upstream = True
        s.start_borrow()
        pc.owes = s.borrowing
        self.flush()
        if not pc.owes:  # answered without the server (refused, or upstream lost meanwhile)
            self.borrowed_reply()

    def borrowed_reply(self) -> None:
        """After replies from the lent connection: once its one reply is in, give it back
        and continue on the shared link."""
        s = self.session
        pc = self.pooled
        if pc is None or pc.owes:
            return
        self.pooled = self.upstream = None
        if not self.reading_upstream and pc.transport is not None:
            pc.transport.resume_reading()
        self.reading_upstream = True
        self.link_paused = False
        self.registered = s.owed_sent  # the borrowed reply was never the shared link's
        pc.pool.release(pc)
        if not self.closed:
            s.end_borrow()  # replays what was held behind it: a HELLO there asks for another link
            self._next_hop()
            self.flush()
            if not self.reading_client or self.client_paused:  # (else reading stays as it is)
                self.apply_backpressure()

    def _leave_pool(self) -> None:
        """The client is going: a lent connection still blocked is abandoned (unblocked,
        then closed), never lent again; a wait for one is cancelled."""
        if self.pool_waiting:
            self.pool_waiting = False
            # the pool it asked (_maybe_borrow), not the registry's: a reload may have dropped that one
            (self.bpool or self.proxy.blocking_pool(self.route)).cancel(self)
        pc = self.pooled
        if pc is None:
            return
        self.pooled = self.upstream = None
        if not pc.owes:
            return pc.pool.release(pc)
        s = self.session
        pc.pool.abandon(pc, in_flight=s.partial is not None or bool(s._buf))

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in["client"] += len(data)
        self.active = True
        if self.gate is not None:
            return self._gate_data(data)
        if self.timed and not self.t_request:
            self.t_request = perf_counter()
        s = self.session
        s.client_data(data)
        if s.need_link is not None or s.need_borrow:
            self._next_hop()
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

    def write_out(self) -> None:
        """The session's replies for the client, written in one piece (dropped if the
        client is gone). after_shared_replies' fast path does the same inline."""
        out = self.session.out_client
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.closed:
                self.transport.write(data)
                self.stats.bytes_out["client"] += len(data)
                if self.client_paused:
                    self._check_output_limit()

    def flush(self) -> None:
        """Send what the session has for either side (runs after every event)."""
        if self.spread is not None:
            return self.spread.flush()
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
        else:
            up = s.out_upstream
            if up:
                upstream = self.upstream
                if upstream is not None and upstream.transport is not None:
                    out = up[0] if len(up) == 1 else b"".join(up)  # (one request per read at depth 1)
                    up.clear()
                    upstream.transport.write(out)
                    self.stats.bytes_out["upstream"] += len(out)
                    if self.t_request and not self.t_sent:
                        self.t_sent = perf_counter()
                elif s.upstream_error is not None:
                    up.clear()
        if s.out_client:
            self.write_out()
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
        if self.pooled is not None or self.pool_waiting:
            self._leave_pool()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.spread is not None:
            self.spread.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.proxy.clients.discard(self)
        self.view.conns.pop(self.session, None)
        self.view.remove_monitor(self.session)
        self.proxy.release(self)
        if self in self.proxy.paused or self.close_reason == "output_limit":
            self.proxy.paused.discard(self)
            self.proxy.trim_soon()
        if self.link is not None:
            self.link.clients.discard(self)
        self.stats.clients -= 1
        self.stats.closed_reason(self.close_reason)
        log.debug("client closed", extra={"event": "client_closed", "route": self.route.name,
                                          "peer": _peer(self.peer), "reason": self.close_reason})
        if self.pooled is not None or self.pool_waiting:
            self._leave_pool()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.spread is not None:
            self.spread.close()
        self.proxy.idle_changed()

    def check_upstream(self, now: float, limit: float) -> None:
        """limits.reply_timeout on a dedicated connection: a reply owed (not to a blocking
        command) and no byte from the server for `limit` seconds: the connection is dead."""
        if self.spread is not None:
            return self.spread.check(now, limit)
        up = self.upstream
        if up is None or up.transport is None or self.closed:
            return
        if up.progress or not self.session.owes_timed_reply():
            up.progress = False
            up.since = now
            return
        if now - up.since >= limit:
            reason = reply_timeout_reason(self.route.upstream, limit)
            log.warning("route %s: upstream connection: %s; closing it", self.route.name, reason,
                        extra={"event": "upstream_timeout", "route": self.route.name})
            self.stats.upstream_timeouts += 1
            self.proxy.health(self.route.upstream).failed(reason, self.route.name)
            self.close_reason = "upstream_error"
            self.session.upstream_lost(reason)
            self.flush()
            up.transport.abort()

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
        shared = self.session.shared or (self.spread is not None and self.spread.shared)
        read_client = not (self.client_paused and shared) and not self.link_paused and not self.closed
        if read_client != self.reading_client and not self.closed:
            self.reading_client = read_client
            (self.transport.resume_reading if read_client else self.transport.pause_reading)()
        up = self.upstream.transport if self.upstream is not None else None
        read_upstream = not (self.client_paused and not shared)
        if self.spread is not None:
            self.spread.backpressure(read_upstream)
        if up is not None and read_upstream != self.reading_upstream:
            self.reading_upstream = read_upstream
            (up.resume_reading if read_upstream else up.pause_reading)()


_ASKING = encode_command([b"ASKING"])


async def _read_frame(c: list, timeout: float) -> bytes:
    """The next reply on a resend connection ([reader, writer, unread bytes]); pushes skipped."""
    while True:
        buf = c[2]
        end = frame_end(buf, 0) if buf else -1
        if end >= 0:
            raw, c[2] = buf[:end], buf[end:]
            if raw[:1] == b">":
                continue
            return raw
        data = await asyncio.wait_for(c[0].read(65536), timeout or None)
        if not data:
            raise ConnectionError("connection closed by the node")
        c[2] = buf + data


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, client: ClientConnection):
        self.client = client
        self.transport = None
        self.addr: tuple[str, int] | None = None  # the node connected to
        self.progress = False  # bytes arrived since the last tick (limits.reply_timeout)
        self.since = monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport, self.client.proxy.config.limits.tcp_keepalive)
        self.client.stats.upstream_connections += 1

    def data_received(self, data: bytes) -> None:
        c = self.client
        self.progress = True
        c.stats.bytes_in["upstream"] += len(data)
        if c.t_sent:
            # One sample per batch of requests, not per command: cheap and still the
            # distribution a user feels.
            c.stats.roundtrip_seconds.since(c.t_sent)
            c.t_sent = 0.0
        s = c.session
        s.upstream_data(data)
        c.flush()
        if c.t_request and not s.pending:
            c.stats.request_seconds.since(c.t_request)
            c.t_request = 0.0
        if c.proxy._idle is not None and s.idle:  # (only a stopping proxy waits for idle clients)
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
        self.progress = True   # bytes arrived since the last tick (limits.reply_timeout)
        self.since = monotonic()
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
            if up.sentinel is not None or up.cluster is not None:
                host, port = await self.proxy.data_node(up)
            self.addr = (host, port)
            await asyncio.wait_for(loop.create_connection(lambda: self, host, port, **up.ssl_args(host)),
                                   self.proxy.config.limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            reason = connect_failure(host, port, e, up.tls)
            if not _out_of_fds(e):
                self.proxy.health(up).failed(reason, self.route.name)
            self.fail(reason)
            return
        self.stats.upstream_opened += 1

    def check(self, now: float, limit: float) -> None:
        """limits.reply_timeout: replies owed and no byte from the server for `limit`
        seconds (shared links carry no blocking command): the link is dead."""
        if self.lost or self.transport is None:
            return
        if self.progress or not self.owners:
            self.progress = False
            self.since = now
            return
        if now - self.since >= limit:
            reason = reply_timeout_reason(self.route.upstream, limit)
            self.stats.upstream_timeouts += 1
            self.proxy.health(self.route.upstream).failed(reason, self.route.name)
            self.fail(reason)
            self.transport.abort()

    def connection_made(self, transport) -> None:
        if self.lost:
            transport.close()
            return
        self.transport = transport
        _nodelay(transport, self.proxy.config.limits.tcp_keepalive)
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
        self.progress = True
        if self.t_sent:
            self.stats.roundtrip_seconds.since(self.t_sent)
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


def reply_timeout_reason(up, limit: float) -> str:
    return (f"no reply from {format_addr(up.host, up.port)} within {limit:g}s ([limits] reply_timeout); "
            "connection declared dead")


class UpstreamHealth:
    """What the proxy knows of one upstream (address, credentials, TLS). A connection that
    cannot be opened, or one that owes a reply past limits.reply_timeout, marks it down:
    from then on no client connection is opened to it and requests fail at once with the
    reason, and readiness is false, until the reconnect loop (exponential backoff with
    jitter, capped at limits.reconnect_delay_max) opens a new connection that answers
    PING. So a dead upstream costs one attempt per delay, not one per client request."""

    def __init__(self, proxy: "Proxy", upstream):
        self.proxy = proxy
        self.upstream = upstream
        self.down: str | None = None
        self.failures = 0            # attempts of the current outage that failed
        self.reconnect_failures = 0  # all of them, for the metric
        self.task = None

    def down_reason(self) -> str | None:
        return None if self.down is None else f"{self.down}; reconnecting"

    def failed(self, reason: str, route_name: str) -> None:
        if self.down is None:
            log.warning("upstream %s is down (%s); requests fail at once until a new connection answers",
                        self.upstream.masked(), reason, extra={"event": "upstream_down", "route": route_name})
        self.down = reason
        if self.task is None and not self.proxy._stopping:
            self.task = asyncio.ensure_future(self._reconnect(route_name))

    async def _reconnect(self, route_name: str) -> None:
        up = self.upstream
        try:
            while not self.proxy._stopping:
                lim = self.proxy.config.limits
                delay = min(lim.reconnect_delay_max, lim.reconnect_delay * 2 ** min(self.failures, 30))
                delay = delay / 2 + random.random() * delay / 2  # jitter: proxies started together spread out
                await asyncio.sleep(delay)
                addr = self.proxy.primary_now(up)  # a sentinel / cluster upstream: the node it follows
                why = self.proxy.no_node_reason(up) if addr is None \
                    else await probe(up, lim, addr)
                if why is None:
                    log.info("upstream %s answers again after %d failed attempt(s)", up.masked(), self.failures,
                             extra={"event": "upstream_up", "route": route_name})
                    self.down, self.failures = None, 0
                    return
                self.failures += 1
                self.reconnect_failures += 1
                self.down = why
                log.debug("upstream %s: reconnect attempt %d failed: %s", up.masked(), self.failures, why)
        finally:
            self.task = None


async def probe(up, limits, addr: tuple[str, int] | None = None) -> str | None:
    """Open a connection (to `addr`, a sentinel upstream's primary; else the URL's host),
    run the handshake and PING: None if it answered, else why not."""
    loop = asyncio.get_running_loop()
    wait = limits.reply_timeout or limits.connect_timeout
    host, port = addr or (up.host, up.port)

    async def attempt() -> str | None:
        import hiredis
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, **up.ssl_args(host)),
                                                    limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            return connect_failure(host, port, e, up.tls)
        try:
            cmds = up.handshake() + [[b"PING"]]
            writer.write(b"".join(encode_command(c) for c in cmds))
            parser, replies = hiredis.Reader(), []
            deadline = loop.time() + wait
            while len(replies) < len(cmds):
                left = deadline - loop.time()
                if left <= 0:
                    return reply_timeout_reason(up, wait)
                try:
                    data = await asyncio.wait_for(reader.read(65536), left)
                except asyncio.TimeoutError:
                    return reply_timeout_reason(up, wait)
                if not data:
                    return "connection closed by the server"
                parser.feed(data)
                while (r := parser.gets()) is not False:
                    replies.append(r)
            for cmd, reply in zip(cmds, replies):
                if isinstance(reply, hiredis.ReplyError):
                    return handshake_failure(cmd, str(reply)) or str(reply)
            return None
        except (OSError, hiredis.ProtocolError) as e:
            return f"connection lost: {e}"
        finally:
            writer.close()
    return await attempt()


class Listener:
    """A listening address with the proxy's own accept loop. uvloop closes a server for
    good when accept() fails (libuv reports EMFILE to the listen callback, and uvloop
    treats any error there as fatal: the listener is gone, silently). Here a client that
    cannot be taken is told so and closed, and accepting carries on:

    - over limits.max_clients or the listener's max_clients: the client is served by
      Rejected (`-ERR max number of clients reached`, then closed);
    - accept() fails for want of descriptors: a descriptor held in reserve is given up
      to accept the client, tell it the same, close it and take the reserve back; with
      no reserve to give, accepting pauses ACCEPT_PAUSE seconds (as asyncio's own loop
      does) instead of spinning on a socket that stays readable."""

    def __init__(self, proxy: "Proxy", listen: tuple, socks: list, ssl_ctx):
        self.proxy = proxy
        self.listen = listen
        self.sockets = socks
        self.ssl = ssl_ctx
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.paused = False
        self.logged = float("-inf")
        self.quiet = 0
        self.tls_logged = float("-inf")
        self.tls_quiet = 0

    @classmethod
    def bind(cls, host: str, port: int, reuse_port: bool) -> list:
        """The listening sockets for HOST:PORT (every address a name resolves to), as
        loop.create_server makes them; errors name the address as asyncio's do."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        socks = []
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as e:
                    raise OSError(e.errno, f"error while attempting to bind on address {addr!r}: "
                                           f"{(e.strerror or str(e)).lower()}") from None
                sock.listen(511)  # Redis's tcp-backlog
                sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def start(self) -> None:
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for sock in self.sockets:
                if not self.paused:
                    self.loop.remove_reader(sock.fileno())
                sock.close()

    def _accept(self, sock) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in OUT_OF_FDS:
                    return self._out_of_fds(sock, e)
                log.warning("listener %s: accept failed: %s", format_addr(*self.listen), e)
                return
            self._take(conn)

    def _take(self, conn) -> None:
        proxy = self.proxy
        route = proxy.routes.get(self.listen)
        if route is None:  # removed by a reload a moment ago
            conn.close()
            return
        conn.setblocking(False)
        reason = proxy.admit(route)
        if reason is not None:
            self._turned_away(route, reason)
            factory = Rejected
        else:
            def factory():
                c = ClientConnection(proxy, route)
                c.slot = route.listen  # the listener's: after AUTH its route is the user's
                return c
        asyncio.ensure_future(self._serve(conn, factory, reason is None, route))

    async def _serve(self, conn, factory, counted: bool, route: Route) -> None:
        try:
            await self.loop.connect_accepted_socket(factory, conn, ssl=self.ssl)
        except Exception as e:  # a TLS handshake that failed, a client gone at once
            if counted:
                self.proxy.unadmit(route.listen)
            conn.close()
            if self.ssl is not None and isinstance(e, ssl.SSLError):
                self._tls_failed(route, e)
            else:
                log.debug("listener %s: connection not set up: %s", route.name, e)

    def _tls_failed(self, route: Route, e: ssl.SSLError) -> None:
        """A client's TLS handshake failed (plain TCP to a TLS port, a CA it does not trust, no or
        a wrong client certificate): counted as errors_total{kind="tls_handshake"}, logged at
        most once per LIMIT_LOG_WINDOW per listener (a scanner must not flood the log)."""
        st = self.proxy.stats.get(route.name)
        if st is not None:
            st.errors["tls_handshake"] += 1
        now = monotonic()
        if now - self.tls_logged < LIMIT_LOG_WINDOW:
            self.tls_quiet += 1
            return
        self.tls_logged, quiet, self.tls_quiet = now, self.tls_quiet, 0
        log.warning("listener %s: a client's TLS handshake failed: %s%s", route.name,
                    getattr(e, "reason", None) or e, f"; {quiet} more since the last such line" if quiet else "",
                    extra={"event": "tls_handshake"})

    def _turned_away(self, route: Route, reason: str) -> None:
        st = self.proxy.stats[route.name]
        st.rejected[reason] = st.rejected.get(reason, 0) + 1
        now = monotonic()
        if now - self.logged < LIMIT_LOG_WINDOW:
            self.quiet += 1
            return
        self.logged, quiet, self.quiet = now, self.quiet, 0
        setting = {"max_clients": f"[limits] max_clients = {self.proxy.max_clients}",
                   "listener_max_clients": f"listener max_clients = {route.max_clients}",
                   "fd_limit": "out of file descriptors (RLIMIT_NOFILE); lower [limits] max_clients or raise it"
                   }[reason]
        log.warning("listener %s: client turned away with -ERR max number of clients reached (%s)%s",
                    route.name, setting, f"; {quiet} more since the last such line" if quiet else "",
                    extra={"event": "max_clients", "route": route.name})

    def _out_of_fds(self, sock, e: OSError) -> None:
        proxy = self.proxy
        route = proxy.routes.get(self.listen)
        conn = None
        if proxy.reserve_fd is not None:
            os.close(proxy.reserve_fd)
            proxy.reserve_fd = None
            try:
                conn, _ = sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                if self.ssl is None:  # a TLS client could not read it before a handshake (nor can Redis's)
                    try:
                        conn.setblocking(False)
                        conn.send(MAX_CLIENTS_ERROR)
                    except OSError:
                        pass
                conn.close()
                if route is not None:
                    self._turned_away(route, "fd_limit")
            proxy.take_reserve()
        if conn is None or proxy.reserve_fd is None:
            log.warning("listener %s: accept failed (%s); accepting again in %gs", format_addr(*self.listen),
                        os.strerror(e.errno), ACCEPT_PAUSE, extra={"event": "max_clients"})
            self._pause()

    def _pause(self) -> None:
        if self.paused or self.closed:
            return
        self.paused = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
        self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.proxy.take_reserve()
            self.start()


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


def _stale_client(c, stale_routes: list, gone_users: list) -> bool:
    """Does a reload drain `c`? A connection logged in at a listener with users goes with
    the user it is logged in as now (AUTH again as a user of the same routing keeps its
    route: Redis, too, drops the clients of a deleted user by who they are now), any other
    with its route."""
    user = getattr(getattr(c.session, "login", None), "user", None)
    if user is not None:
        return user in gone_users  # (equal: a connection may hold an earlier reload's equal User)
    # (equal, not the same object: a reload that leaves a route unchanged installs an equal
    # new one, and connections accepted before it hold the earlier one)
    return c.route in stale_routes


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
        self.spread_links: dict = {}   # (route name, upstream, node): spread_io.NodeLink (spread routes)
        self.bpools: dict[tuple, BlockingPool] = {}   # (route name, upstream): limits.blocking_pool
        # Latency histograms cost a clock read or two per batch; without an admin port
        # nobody can read them, so they are not kept. Counters are kept either way.
        self.timed = config.metrics_listen is not None
        self.routes: dict[tuple, Route] = {}               # listen address -> its current route
        self.listeners: dict[tuple, Listener] = {}
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
        self.clusters: dict = {}    # cluster Upstream (slot None) -> cluster_route.Topology
        # Limits: clients per process and per listen address (admitted, not yet gone).
        self.fd_limit = _fd_limit()
        self.max_clients = config.limits.max_clients or derived_max_clients(self.fd_limit)
        self.admitted = 0
        self.per_listen: dict[tuple, int] = {}
        self.reserve_fd: int | None = None   # given up to tell a client "max clients" when out of fds
        self.take_reserve()
        self.upstreams: dict = {}            # Upstream -> UpstreamHealth
        self._ticking = None
        self._reloading = asyncio.Lock()

    def view(self, route_name: str) -> ClientRegistry:
        v = self.views.get(route_name)
        if v is None:
            v = self.views[route_name] = ClientRegistry()
        return v

    def take_reserve(self) -> None:
        if self.reserve_fd is None:
            try:
                self.reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass

    def admit(self, route: Route) -> str | None:
        """Count a new client against the limits: None if it may stay, else which limit."""
        if self.admitted >= self.max_clients:
            return "max_clients"
        n = self.per_listen.get(route.listen, 0)
        if route.max_clients is not None and n >= route.max_clients:
            return "listener_max_clients"
        self.admitted += 1
        self.per_listen[route.listen] = n + 1
        return None

    def unadmit(self, listen: tuple) -> None:
        self.admitted -= 1
        self.per_listen[listen] -= 1

    def release(self, conn: "ClientConnection") -> None:
        if conn.slot is not None:
            listen, conn.slot = conn.slot, None
            self.unadmit(listen)

    def health(self, upstream) -> UpstreamHealth:
        h = self.upstreams.get(upstream)
        if h is None:
            h = self.upstreams[upstream] = UpstreamHealth(self, upstream)
        return h

    def _start_ticking(self) -> None:
        lim = self.config.limits
        timeouts = [t for t in (lim.idle_timeout, lim.reply_timeout) if t]
        if timeouts and self._ticking is None and not self._stopping:
            # a check at least 4 times per timeout (Redis checks idle clients every second)
            self._ticking = asyncio.get_running_loop().call_later(min(1.0, min(timeouts) / 4), self._tick)

    def _tick(self) -> None:
        """The timers, once per tick for every connection (as Redis's clientsCron): clients
        idle past limits.idle_timeout, upstream connections owing a reply past
        limits.reply_timeout. Activity is a flag set on each read, so the hot path reads
        no clock."""
        self._ticking = None
        now = monotonic()
        lim = self.config.limits
        idle, reply = lim.idle_timeout, lim.reply_timeout
        if reply:
            for link in list(self.links.values()) + list(self.spread_links.values()):
                link.check(now, reply)
        for c in list(self.clients):
            if c.closed:
                continue
            if reply and (c.upstream is not None or c.spread is not None):
                c.check_upstream(now, reply)
            if idle:
                # a client still at the gate (not authenticated) owes nothing: it may be closed
                if c.active or (c.gate is None and not c.session.may_idle_close):
                    c.active = False
                    c.quiet_since = now
                elif now - c.quiet_since >= idle and not c.closed:
                    log.debug("client %s idle for %gs ([limits] idle_timeout): closing it", _peer(c.peer), idle,
                              extra={"event": "idle_timeout", "route": c.route.name})
                    c.close("idle_timeout")
        self._start_ticking()

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.watch_sentinels(self.config)),
                             *(t.start() for t in self.watch_clusters(self.config)))
        self._apply_fences(await self.check_fences(self.config.routes))
        for route in self.config.routes:
            await self._listen(route)
        self._start_ticking()

    async def check_fences(self, routes: list) -> dict[str, tuple]:
        """Is each tenant route's upstream user fenced by a Redis ACL? (proxy/fence.py) One
        log line per route (each user's route for a listener with users, which sends
        nothing upstream itself). Returns {route name: (1 or 0, fence.key)}, for _apply_fences
        once the routes are in use (a reload refused meanwhile leaves the running routes' flags
        alone)."""
        routes = [r for listener in routes for r in
                  ([u.route for u in listener.users.values()] if listener.users is not None else [listener])]
        found = await asyncio.gather(*(self._check_fence(r) for r in routes))
        return {r.name: (fenced, fence.key(r)) for r, fenced in zip(routes, found)}

    def _apply_fences(self, found: dict[str, tuple]) -> None:
        """The route's keyspace_proxy_route_upstream_fenced, which lets its scripts pass (Ctx.fenced)."""
        for name, (fenced, key) in found.items():
            st = self.stats.setdefault(name, RouteStats(name))
            st.upstream_fenced, st.fenced_for = fenced, key

    async def _check_fence(self, route: Route) -> int:
        if not route.namespaced:
            log.info("route %s: policy %s, no namespace: the policy changes nothing here", route.name,
                     route.policy, extra={"event": "fence", "route": route.name})
            return 0
        if route.policy != "tenant":
            log.info("route %s: policy app: scripts and read-only server commands pass (the application is "
                     "trusted); upstream ACL fence not checked", route.name,
                     extra={"event": "fence", "route": route.name})
            return 0
        up = route.upstream
        addr = (up.host, up.port)
        try:
            if not fence.prefixes(route):  # strip mode only: nothing for an ACL key pattern to hold
                fenced, detail = False, "no db of the route adds a namespace an ACL key pattern could fence"
            else:
                addr = await self.data_node(up)
                fenced, detail = await asyncio.wait_for(_probe_fence(route, addr), self.config.limits.connect_timeout)
        except Exception as e:  # unreachable now: fail closed (scripts refused) until a reload checks again
            if isinstance(e, HandshakeError):  # AUTH or SELECT refused: logged as an error for the route
                e = "the upstream refused the proxy's handshake"
            elif isinstance(e, OSError):  # (the data node's address: a sentinel's primary, a slot's owner)
                e = connect_failure(*addr, e, up.tls)
            fenced, detail = False, f"could not check ({e or type(e).__name__})"
        if fenced:
            log.info("route %s: policy tenant, upstream user fenced by a Redis ACL (%s): scripts and functions "
                     "pass", route.name, detail, extra={"event": "fence", "route": route.name})
        else:
            log.info("route %s: policy tenant, upstream user not fenced by a Redis ACL (%s): scripts and "
                     "functions are refused", route.name, detail, extra={"event": "fence", "route": route.name})
        return 1 if fenced else 0

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
        """The data node now: None while a sentinel upstream's primary is unknown, or
        a cluster route's slot has no known owner."""
        if up.cluster is not None:
            t = self.clusters.get(cluster_key(up))
            return t.owner(up.slot) if t is not None else None
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
        for pool in self.bpools.values():  # idle pooled connections to the old primary
            if pool.route.upstream.sentinel == spec:
                for pc in [pc for lst in pool.idle.values() for pc in lst if pc.addr == old]:
                    pc.close()
        for c in list(self.clients):
            up = c.upstream
            if c.route.upstream.sentinel == spec and up is not None and up.addr == old and not c.closed:
                c.session.upstream_lost(reason)
                c.flush()

    # -- pinned routes on a Redis Cluster (proxy/cluster_route.py): the node is the owner
    # of the route's slot, followed like a Sentinel primary, plus MOVED / ASK

    async def data_node(self, up) -> tuple[str, int]:
        """Where a connection for `up` goes now: the URL's node, a sentinel upstream's
        confirmed primary, a cluster route's slot owner (each waiting up to connect_timeout
        while unknown). Raises SentinelError / ClusterRouteError (ConnectionErrors)."""
        if up.cluster is not None:
            t = self.clusters.get(cluster_key(up))
            if t is None:  # its route was removed by a reload
                from proxy.cluster_route import ClusterRouteError
                raise ClusterRouteError(f"{up.masked()} is no longer configured")
            return await t.wait_owner(up.slot, self.config.limits.connect_timeout)
        if up.sentinel is not None:
            return await self.sentinel_primary(up)
        return up.host, up.port

    def no_node_reason(self, up) -> str:
        """Why primary_now(up) is None (readiness, the reconnect loop)."""
        if up.cluster is not None:
            t = self.clusters.get(cluster_key(up))
            why = t.down_reason(up.slot) if t is not None else None
            if up.slot is None:
                return f"the cluster's map does not cover every slot ({why or 'not configured'})"
            return f"no owner for hash slot {up.slot} on the cluster ({why or 'not configured'})"
        return "no confirmed primary (a Sentinel failover is being followed)"

    def watch_clusters(self, config: Config) -> list:
        """A Topology per cluster upstream not followed yet, registered at once; the caller
        starts them."""
        from proxy.cluster_route import Topology
        new = []
        for route in config.all_routes():
            up = route.upstream
            key = cluster_key(up) if up.cluster is not None else None
            if key is not None and key not in self.clusters:
                t = self.clusters[key] = Topology(
                    key, config.limits.connect_timeout, lambda old, m, key=key: self.cluster_changed(key, old, m))
                new.append(t)
        return new

    def cluster_redirect(self, up, redirect, stats=None) -> None:
        """A node answered a request of a route on `up` with -MOVED / -ASK (followed, or the
        client got -TRYAGAIN instead: Session) or -CLUSTERDOWN (None, passed on): counted on
        the route's `stats`, and the map updated."""
        if redirect is not None and stats is not None:
            stats.cluster_redirects[redirect.kind] += 1
        t = self.clusters.get(cluster_key(up))
        if t is not None:
            if redirect is not None:
                log.info("cluster upstream %s: %s %d %s:%d", up.masked(), redirect.kind, redirect.slot,
                         redirect.host, redirect.port, extra={"event": "cluster"})
            # not now: this runs inside a connection's reply loop, and the move it causes
            # closes connections (perhaps that one)
            asyncio.get_running_loop().call_soon(t.redirected, redirect)

    async def cluster_resend(self, up, proto: int, items: list, near: str, stats=None) -> list[bytes]:
        """Send again, in order and one at a time, requests of a pinned route that a node
        answered -MOVED / -ASK ([(bytes, Redirect)]): each to the address its redirect names
        (ASKING first for an ASK), on a connection of its own set up as the route's are;
        followed again up to MAX_REDIRECTS times (a MOVED also goes to the map). Their
        replies, in order: a connection that fails answers it and those after it `upstream
        unavailable` (sent, perhaps run). `near`: the host of a redirect that names none."""
        from proxy.cluster_route import redirect_error
        from proxy.spread import MAX_REDIRECTS
        conns: dict = {}
        out: list[bytes] = []
        addr = None
        try:
            for data, r in items:
                tries = 1
                while True:
                    addr = (r.host or near, r.port)
                    reply = await self._resend_one(up, proto, addr, data, r.kind == "ASK", conns)
                    got = redirect_error(reply) if reply[:1] == b"-" else None
                    if got is None or got[1] is None or tries >= MAX_REDIRECTS:
                        break
                    self.cluster_redirect(up, got[1], stats)
                    r = got[1]
                    tries += 1
                out.append(reply)
        except (OSError, asyncio.TimeoutError, ProtocolError) as e:
            why = f"{e.__class__.__name__} {e}".strip() if not str(e) else str(e)
            msg = error(f"ERR upstream unavailable (a request redirected by the cluster, sent again to "
                        f"{format_addr(*addr)}: {why})")
            out.extend([msg] * (len(items) - len(out)))
        finally:
            for c in conns.values():
                c[1].close()
        return out

    async def _resend_one(self, up, proto: int, addr: tuple[str, int], data: bytes, asking: bool,
                          conns: dict) -> bytes:
        limits = self.config.limits
        c = conns.get(addr)
        if c is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(addr[0], addr[1], **up.ssl_args(addr[0])), limits.connect_timeout)
            c = conns[addr] = [reader, writer, b""]
            hs = up.handshake(0, proto)
            writer.write(b"".join(encode_command(a) for a in hs))
            for cmd in hs:
                raw = await _read_frame(c, limits.reply_timeout)
                if raw[:1] in (b"-", b"!"):
                    text = raw[1:].split(b"\r\n", 1)[0].decode("utf-8", "replace")
                    raise ConnectionError(handshake_failure(cmd, text) or text)
        c[1].write((_ASKING if asking else b"") + data)
        if asking:
            await _read_frame(c, limits.reply_timeout)  # ASKING's +OK: the proxy's
        return await _read_frame(c, limits.reply_timeout)

    def cluster_changed(self, key, old, new) -> None:
        """A cluster's map changed: every shared link and dedicated connection of a route
        on it whose node no longer owns the route's slot is moved, as after a Sentinel
        switch (primary_changed): links retire after their owed replies, dedicated
        connections are closed with an error for each owed reply."""
        if old is None:
            return
        t = self.clusters.get(key)
        if t is None:
            return
        for link in list(self.links.values()):
            up = link.route.upstream
            if up.cluster is not None and cluster_key(up) == key and link.addr is not None:
                owner = t.owner(up.slot)
                if owner != link.addr:
                    link.retire(_slot_moved(up, link.addr, owner))
        self._cluster_pools_moved(key, t)
        for c in list(self.clients):
            u, up = c.upstream, c.route.upstream
            if up.cluster is not None and cluster_key(up) == key and u is not None and u.addr is not None \
                    and not c.closed:
                owner = t.owner(up.slot)
                if owner != u.addr:
                    c.session.upstream_lost(_slot_moved(up, u.addr, owner))
                    c.flush()

    def _cluster_pools_moved(self, key, t) -> None:
        """Idle blocking-pool connections of routes on the cluster `key` whose node no longer
        owns the route's slot close now (busy ones: their client is moved with the dedicated
        connections in cluster_changed, and BlockingPool.release keeps none off the owner)."""
        for pool in self.bpools.values():
            up = pool.route.upstream
            if up.cluster is None or cluster_key(up) != key:
                continue
            owner = t.owner(up.slot)
            for pc in [pc for lst in pool.idle.values() for pc in lst if pc.addr != owner]:
                pc.close()

    async def _listen(self, route: Route) -> None:
        listen = route.listen
        socks = Listener.bind(listen[0], listen[1], self.reuse_port)
        self.routes[listen] = route
        # Listener reads the current route, so a reload changes it for new connections
        listener = self.listeners[listen] = Listener(self, listen, socks, self._listener_ssl(route))
        listener.start()
        log.info("listening on %s", route.describe(socks[0].getsockname() if socks else None))
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
        the rest are closed too. One reload at a time (SIGHUP and POST /-/reload may
        come together): each compares its file with what the previous one applied."""
        async with self._reloading:  # (the fence checks await: another reload could run meanwhile)
            return await self._reload(new)

    async def _reload(self, new: Config) -> str:
        old = dict(self.routes)
        new_routes = {r.listen: r for r in new.routes}
        self._reload_tls(new_routes)
        watchers = self.watch_sentinels(new) + self.watch_clusters(new)
        for w in watchers:
            asyncio.ensure_future(w.start())
        added = [r for k, r in new_routes.items() if k not in old]
        removed = [r for k, r in old.items() if k not in new_routes]
        changed = [r for k, r in new_routes.items() if k in old and old[k] != r]
        try:
            # new and changed routes: is their upstream user fenced? (checked before they take clients)
            fences = await self.check_fences([r for r in new_routes.values()
                                              if r.listen not in old or old[r.listen] != r])
            for route in added:  # bind first: a port that cannot be had fails the reload, nothing changed
                await self._listen(route)
        except BaseException:
            self._unwatch(watchers)
            raise
        self._apply_fences(fences)  # (no await since the binds: no client was taken meanwhile)
        for route in removed:
            self.listeners.pop(route.listen).close()
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
        if new.admin_listen != self.config.admin_listen:
            log.warning("reload: [admin] listen changed; the admin port moves only on restart")
            new.admin_listen = self.config.admin_listen
        self.max_clients = new.limits.max_clients or derived_max_clients(self.fd_limit)
        self.config = new
        self._start_ticking()
        self.generation += 1
        # (a listener with users before and after: its connections on the listener's own
        # route are those not authenticated yet; they stay, and AUTH with the new users)
        stale = list(removed) + [old[r.listen] for r in changed
                                 if old[r.listen].users is None or r.users is None]
        # A user's connections are drained when its listener is gone, or when the user
        # is removed or changed (route or password: a rotated password logs them out).
        gone_users = []
        for r in removed + changed:
            was = old[r.listen]
            now = new_routes.get(r.listen)
            for name, user in (was.users or {}).items():
                kept = (now.users or {}).get(name) if now is not None else None
                if kept != user:
                    stale.append(user.route)
                    gone_users.append(user)
        # blocking pools whose route and upstream are gone: no idle connection kept to the old server
        current = {(r.name, r.upstream) for route in new_routes.values() for r in route.with_users()}
        for key, pool in list(self.bpools.items()):
            if key not in current:
                if pool.retired and not pool.conns:
                    del self.bpools[key]
                else:
                    pool.retire()
        draining = [c for c in self.clients if _stale_client(c, stale, gone_users)]
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

    def _unwatch(self, watchers: list) -> None:
        """A refused reload: stop the Sentinel watchers and cluster topologies it started
        (no route of the running configuration follows them)."""
        for reg in (self.sentinels, self.clusters):
            for k in [k for k, w in reg.items() if any(w is x for x in watchers)]:
                reg.pop(k).stop()

    def _end_grace(self, draining: list) -> None:
        left = [c for c in draining if not c.closed]
        if left:
            log.warning("reload: grace period over, closing %d connection(s) still busy", len(left))
        for c in left:
            c.close("reload")
        current = {(rr.name, rr.upstream) for r in self.routes.values() for rr in r.with_users()}
        used = {up for _, up in current}
        for up in [u for u in self.upstreams if u not in used]:  # no route needs it: no more probing
            h = self.upstreams.pop(up)
            if h.task is not None:
                h.task.cancel()
        used = {up.sentinel for _, up in current}
        for spec in [s for s in self.sentinels if s not in used]:  # no route follows it any more
            self.sentinels.pop(spec).stop()
        used = {cluster_key(up) for _, up in current if up.cluster is not None}
        for key in [k for k in self.clusters if k not in used]:
            self.clusters.pop(key).stop()
        for key, link in list(self.links.items()):
            if (key[0], key[2]) not in current:
                # its route is gone: closed now, or once the replies still owed on it are in
                link.retire("its route was changed or removed by a reload")
        for key, link in list(self.spread_links.items()):
            if (key[0], key[1]) not in current:
                link.retire("its route was changed or removed by a reload")

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
                addr = await self.data_node(up)
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
            down = self.health(route.upstream).down_reason()
            if down is not None:  # not joined, not connected: its requests fail at once
                link = SharedLink(self, route, db, proto)
                link.lost = down
                return link
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

    def blocking_pool(self, route: Route) -> BlockingPool:
        key = (route.name, route.upstream)
        pool = self.bpools.get(key)
        if pool is None:
            pool = self.bpools[key] = BlockingPool(self, route)
        return pool

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
        for listener in self.listeners.values():
            listener.close()
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
        self._idle = asyncio.Event()
        self.idle_changed()
        if self.clients:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.limits.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: closing %d connections with replies owed", len(self.clients))
        for c in list(self.clients):
            c.close("shutdown")
        for link in list(self.links.values()) + list(self.spread_links.values()):
            link.close()
        for pool in self.bpools.values():
            pool.close_all()
        for w in self.sentinels.values():
            w.stop()
        for t in self.clusters.values():
            t.stop()
        for h in self.upstreams.values():
            if h.task is not None:
                h.task.cancel()


def cluster_key(up):
    """The cluster a route's upstream is on (routes of several slots share its Topology)."""
    return replace(up, slot=None)


def _slot_moved(up, old, new) -> str:
    log.warning("cluster upstream %s: hash slot %d moved from %s to %s", up.masked(), up.slot, format_addr(*old),
                format_addr(*new) if new else "no owner", extra={"event": "cluster"})
    return (f"hash slot {up.slot} of this route moved from {format_addr(*old)}"
            + (f" to {format_addr(*new)}" if new else "") + " (Redis Cluster resharding or failover)")


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
    reader, writer = await asyncio.open_connection(addr[0], addr[1], **up.ssl_args(addr[0]))  # its own name
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

    from proxy.sentinel import exchange
    cmds = up.handshake() + [[b"COMMAND", b"LIST"]]
    replies = await exchange(addr, cmds, up.ssl_args(addr[0]))
    for cmd, reply in zip(cmds, replies):
        if isinstance(reply, hiredis.ReplyError):
            raise HandshakeError.of(cmd, str(reply))
    return [n.decode().lower() for n in replies[-1]]


async def serve(config: Config, ready=None, load_config=None, worker: bool = False) -> None:
    """Run until SIGTERM/SIGINT. `load_config()` re-reads the configuration for SIGHUP
    and POST /-/reload (it raises ConfigError for an invalid one, which is refused).
    `worker`: one of several processes under a supervisor (proxy/workers.py)."""
    soft, hard = raise_nofile()
    if worker:  # the supervisor serves [admin] listen and forwards reloads to this worker's metrics port
        config.admin_listen = None
    proxy = Proxy(config, reuse_port=worker)
    loop = asyncio.get_running_loop()
    _log_limits(proxy, soft, hard)

    async def reload() -> tuple[bool, str]:
        if load_config is None:
            return False, "no configuration to re-read"
        try:
            new = load_config()
            if worker:
                new.admin_listen = None
            return True, await proxy.reload(new)
        except (ConfigError, OSError) as e:
            log.error("reload refused, the running configuration stays: %s", e, extra={"event": "reload"})
            return False, f"reload refused: {e}"

    admin = reload_port = None
    def http_reload():
        return asyncio.run_coroutine_threadsafe(reload(), loop).result(30)
    if config.metrics_listen:  # up before the listeners, so "listening" means everything is
        from proxy.metrics import AdminServer
        admin = AdminServer(proxy, *config.metrics_listen, reload=http_reload)
        admin.start()
        log.info("metrics on http://%s/metrics (also /healthz, /readyz%s)",
                 format_addr(config.metrics_listen[0], admin.port),
                 "" if config.admin_listen else
                 ", POST /-/reload with the admin token" if config.admin_token else
                 "; POST /-/reload is off: no admin token")
    if config.admin_listen:
        from proxy.metrics import AdminServer
        reload_port = AdminServer(proxy, *config.admin_listen, reload=http_reload, role="admin")
        reload_port.start()
        log.info("admin on http://%s: POST /-/reload%s", format_addr(config.admin_listen[0], reload_port.port),
                 " with the admin token" if config.admin_token else " is off (no admin token)")
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
    if reload_port is not None:
        reload_port.stop()
    log.info("stopped")


def _log_limits(proxy: Proxy, soft: int, hard: int) -> None:
    import resource
    lim = proxy.config.limits
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    if lim.max_clients is None:
        how = f"(the default: {MAX_CLIENTS}, or (RLIMIT_NOFILE - {RESERVED_FDS}) / 2 if lower)"
    else:
        how = "([limits] max_clients)"
    log.info("file descriptors: %d (hard limit %s); max clients %d %s", soft, hard_text, proxy.max_clients, how,
             extra={"event": "limits"})
    if lim.max_clients is not None and lim.max_clients > derived_max_clients(proxy.fd_limit):
        log.warning("[limits] max_clients = %d may need more file descriptors than the %d allowed (2 per client "
                    "holding an upstream connection, plus %d): past them new clients are turned away with "
                    "-ERR max number of clients reached", lim.max_clients, proxy.fd_limit, RESERVED_FDS,
                    extra={"event": "limits"})


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
