"""The asyncio side of a spread route over a Redis Cluster (proxy/spread.py decides).

With `upstream_mode = "shared"` (the default) a client's plain requests (exactly one
reply, no connection state) go on the route's shared link to each node (`NodeLink`,
one per route and node, carrying many clients' requests, as server.SharedLink does for
one server). Once a client needs connections of its own (connection state such as
HELLO 3 or CLIENT SETNAME, MULTI, WATCH, a blocking command, a subscription) it moves,
for good and once its shared replies are in, to its own connection to each primary it
uses (`NodeConn`, opened on first use with the route's handshake and the connection
state sent so far); in dedicated mode it starts there. Either way each node's replies
are framed and handed to the client's `Mux`, which gives the Session one reply per
request in request order. A node connection or link that fails ends its clients as a
lost dedicated connection does (every owed reply answered with the error: the proxy
cannot know which requests ran), except a subscribed client owing nothing on it: its
subscriptions are moved to a live node (`SpreadIO.node_lost`, `_move`)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import perf_counter

from proxy.config import connect_failure, format_addr
from proxy.resp import ProtocolError, encode_command, frame_end
from proxy.session import SHARED_MAX_OWED
from proxy.spread import NOTIFY_DROP, NOTIFY_SESSION, Mux

log = logging.getLogger("keyspace-proxy")

# A subscribed connection whose node is lost: its subscriptions are moved to a live node
# (the map read again) trying every MOVE_TRY seconds; not done within MOVE_WAIT, the
# client is closed as before.
MOVE_TRY = 0.5
MOVE_WAIT = 30.0


class SpreadIO:
    """Owned by a ClientConnection whose Session has `spread` set."""

    def __init__(self, conn):
        from proxy.server import cluster_key
        self.conn = conn
        self.session = conn.session
        self.up = conn.route.upstream
        self.topology = conn.proxy.clusters.get(cluster_key(self.up))
        self.mux = Mux(self.owner, self.primaries, self.locate)
        router = self.session.spread
        router.owner, router.home = self.owner, self.mux._home
        self.backlog: list = []    # requests waiting until the other nodes' replies are in (see _submit)
        self.nodes: dict[tuple, NodeConn] = {}
        self.shared = conn.proxy.config.limits.upstream_mode == "shared"   # on the node links, for now
        self.links: set = set()    # the NodeLinks this client has used (backpressure)
        self.proto = 2             # the protocol of the links it uses (HELLO 3: the RESP3 links)
        self.paused = False        # the client does not read: node connections are not read either
        self._flushing = False
        self.moving = None         # the lost node of the subscriptions, until they are on another
        self.dead: set = set()     # nodes lost while subscribed (not used again by the move)
        self.mover = None          # the task moving them

    # -- the map

    def owner(self, slot: int):
        t = self.topology
        return t.owner(slot) if t is not None else None

    def primaries(self) -> list:
        t = self.topology
        if t is None or t.map is None:
            return []
        tls = self.up.tls is not None
        prim = t.map.primaries()
        first = {id(sh.primary): min(r[0] for r in sh.ranges) for sh in t.map.shards if sh.primary is not None
                 and sh.ranges}
        prim.sort(key=lambda n: first.get(id(n), 0))
        return [(n.addr[0], n.port_for(tls)) for n in prim]

    def locate(self, r, addr):
        t = self.topology
        return r.address(addr[0], t.map if t is not None else None)

    # -- moving bytes

    def flush(self) -> None:
        """Send what the session has for the nodes, give it the replies that are complete
        in order, then write to the client (as ClientConnection.flush does)."""
        c, s, mux = self.conn, self.session, self.mux
        if self._flushing:
            return
        self._flushing = True
        try:
            while True:
                if self.moving is not None:
                    # the subscriptions' node is lost: requests wait for the new one
                    self.backlog += s.out_upstream
                    s.out_upstream.clear()
                elif s.out_upstream or self.backlog:
                    if s.upstream_error is None:
                        self._submit(s.out_upstream)
                    else:
                        self.backlog.clear()
                    s.out_upstream.clear()
                for addr, chunks in mux.take_writes().items():
                    if self.shared:
                        self.link(addr).submit(self, chunks)
                    else:
                        self.node(addr).write(b"".join(chunks))
                replies = mux.ready()
                if not replies or s.upstream_error is not None:
                    break
                s.upstream_data(b"".join(replies))
                if c.t_request and not s.pending:
                    c.stats.request_seconds.observe(perf_counter() - c.t_request)
                    c.t_request = 0.0
        finally:
            self._flushing = False
        c.write_out()
        if mux.sticky is not None and not s.pending and not s._subscribed() and not s.sub_waiting \
                and not self.backlog:
            mux.sticky = s.spread.sticky = None  # no subscription left: requests go to every node again
        if (c.draining or s.close_when_done) and not c.closed:
            c._maybe_close()
        if s.idle:
            c.proxy.idle_changed()

    def _submit(self, dests: list) -> None:
        """Into the Mux in order. A subscription moves the connection onto one node: only
        once every reply owed by the other nodes is in (then that node's frames reach the
        Session as they come), so what follows it waits in `backlog` until then."""
        mux = self.mux
        if self.backlog:
            self.backlog += dests
            dests, self.backlog = self.backlog, []
        for i, dest in enumerate(dests):
            # leaving the shared links (for good) or entering a subscription: once nothing is
            # owed any more, so no request runs out of order and no reply arrives on a channel
            # the Mux does not expect
            hello = dest.hello and self.shared and dest.hello != self.proto
            # a deep pipeline gains nothing from sharing and would hold the others' replies
            # up: past SHARED_MAX_OWED owed replies the client moves to its own connections
            own = self.shared and (dest.own or len(mux.queue) >= SHARED_MAX_OWED)
            if own or (dest.sub and mux.sticky is None) or hello:
                if not mux.idle:
                    self.backlog = list(dests[i:])
                    return
                if own:
                    self.leave_links()
                elif hello:
                    self.leave_links(shared=True)
                    self.proto = dest.hello
                if dest.sub:
                    mux.sticky = dest.parts[0][1]
            mux.submit(dest)

    def link(self, addr) -> "NodeLink":
        proxy = self.conn.proxy
        key = (self.conn.route.name, self.up, addr, self.proto)
        link = proxy.spread_links.get(key)
        if link is None or link.lost:
            link = proxy.spread_links[key] = NodeLink(proxy, self.conn.route, addr, key, self.proto)
            asyncio.ensure_future(link.connect())
        if self not in link.clients:
            link.clients.add(self)
            self.links.add(link)
        return link

    def leave_links(self, shared: bool = False) -> None:
        self.shared = shared
        for link in self.links:
            link.clients.discard(self)
        self.links.clear()
        if self.conn.link_paused:
            self.conn.link_paused = False
            self.conn.apply_backpressure()

    def node(self, addr) -> "NodeConn":
        n = self.nodes.get(addr)
        if n is None:
            n = self.nodes[addr] = NodeConn(self, addr)
            asyncio.ensure_future(n.connect())
        return n

    def lost(self, reason: str, tell_idle: bool = False) -> None:
        s = self.session
        if s.upstream_error is None:
            log.warning("route %s: upstream %s", self.conn.route.name, reason,
                        extra={"event": "upstream_error", "route": self.conn.route.name})
        self.conn.close_reason = "upstream_error"
        s.upstream_lost(reason, tell_idle=tell_idle)
        self.flush()
        self.close()

    def node_lost(self, addr) -> bool:
        """A node connection of a subscribed client is lost: True if its subscriptions will
        be moved (`_move`) instead of the client being closed. Only when that node owes
        nothing but subscriptions (a reply owed may or may not have run: closed as before)."""
        s, mux = self.session, self.mux
        if mux.sticky is None or s.upstream_error is not None or self.conn.closed:
            return False
        if addr == mux.sticky or addr == self.moving:
            if s.pending or s.sub_waiting or not mux.idle or self.backlog:
                return False
            self.moving = mux.sticky if self.moving is None else self.moving
        elif addr not in mux.notify_nodes and not mux.confirms.get(addr):
            return False
        n = self.nodes.pop(addr, None)
        if n is not None:
            n.closed = True
        mux.confirms.pop(addr, None)
        mux.notify_nodes.discard(addr)
        self.dead.add(addr)
        if self.mover is None:
            log.info("route %s: node %s of a subscribed client lost; its subscriptions move to a live node",
                     self.conn.route.name, format_addr(*addr),
                     extra={"event": "subscriptions_moving", "route": self.conn.route.name})
            self.mover = asyncio.ensure_future(self._move())
        return True

    async def _move(self) -> None:
        """Until the subscriptions are on live nodes again: the map read again, the
        connection's subscriptions on the new node (shard channels: their slot's owner;
        else a live primary), keyspace subscriptions on every primary that lacks them.
        The client gets no confirmation for these; messages published meanwhile are lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOVE_WAIT
        mux, s = self.mux, self.session
        try:
            while True:
                await asyncio.sleep(MOVE_TRY)
                if self.conn.closed or s.upstream_error is not None:
                    return
                if self.topology is not None:
                    self.topology.refresh_soon("a subscribed client's node lost")
                done = True
                if self.moving is not None:
                    to = self._sub_node()
                    if isinstance(to, str):
                        return self.lost(to)
                    if to is not None and await self._reach(to):
                        if self.conn.closed or s.upstream_error is not None:
                            return
                        mux.resubscribe(self.moving, to, s.subs)
                        s.spread.sticky = to
                        self.moving = None
                    else:
                        done = False
                if self.moving is None:
                    for a in mux.notify_missing(self.dead):
                        if await self._reach(a) and not self.conn.closed:
                            mux.notify_add(a)
                        else:
                            done = False
                    # a lost node still a primary in the map: the promotion is not seen yet
                    prim = set(self.primaries())
                    if any(a in prim for a in self.dead):
                        done = False
                        for a in [a for a in self.dead if a in prim]:
                            if await self._reach(a):   # back (a blip): subscribe it again
                                self.dead.discard(a)
                self.flush()
                if done:
                    return
                if loop.time() > deadline:
                    return self.lost(f"the node of this connection's subscriptions was lost and no live node "
                                     f"took them within {MOVE_WAIT:g}s")
        finally:
            self.mover = None

    def _sub_node(self):
        """Where the subscriptions go now: the owner of the shard channels' slot (all in
        one node, else an error text), else a live primary; None while the map has none."""
        from proxy.cluster import key_slot
        shard = self.session.subs["shard"]
        if shard:
            owners = {self.owner(key_slot(ch)) for ch in shard}
            if len(owners) > 1:
                return ("the node of this connection's shard channel subscriptions was lost and their slots are "
                        "now served by several nodes")
            to = owners.pop()
            return None if to in self.dead else to
        live = [a for a in self.primaries() if a not in self.dead]
        if live:
            self.mux.home = live[0]
        return live[0] if live else None

    async def _reach(self, addr) -> bool:
        """A connection of this client to `addr`, connected (opened if need be)."""
        n = self.nodes.get(addr)
        if n is not None and n.transport is not None and not n.closed:
            return True
        n = self.nodes[addr] = NodeConn(self, addr)
        n.probing = True
        await n.connect()
        n.probing = False
        if n.transport is None or n.closed:
            if self.nodes.get(addr) is n:
                del self.nodes[addr]
            return False
        self.dead.discard(addr)
        return True

    def refused(self) -> None:
        """A node refused the subscriptions the proxy moved: the client would miss
        messages silently, so it is closed, naming the error."""
        (addr, raw), = self.mux.refused[:1]
        self.lost(f"{format_addr(*addr)} refused the subscriptions moved to it: "
                  f"{raw[1:-2].decode('utf-8', 'replace')}")

    def redirected(self) -> None:
        """Requests the Mux sent again after -MOVED / -ASK: the map follows a MOVED at
        once (Topology.redirected), as when a pinned route's client gets -TRYAGAIN."""
        rs, self.mux.redirects = self.mux.redirects, []
        if self.session.on_redirect is not None:
            for r in rs:
                self.session.on_redirect(r)

    def close(self) -> None:
        if self.mover is not None:
            self.mover.cancel()
        for n in list(self.nodes.values()):
            n.close()
        for link in self.links:
            link.clients.discard(self)
        self.links.clear()

    def check(self, now: float, limit: float) -> None:
        """limits.reply_timeout: a node owes this client a reply (none to a blocking command
        is owed) and has sent no byte for `limit` seconds: the connection is dead."""
        if self.conn.closed:
            return
        timed = self.session.owes_timed_reply()
        for n in list(self.nodes.values()):
            if n.progress or not timed or not self.mux.owes(n.addr) or n.transport is None:
                n.progress = False
                n.since = now
            elif now - n.since >= limit:
                from proxy.config import format_addr
                self.conn.stats.upstream_timeouts += 1
                return self.lost(f"no reply from {format_addr(*n.addr)} within {limit:g}s ([limits] reply_timeout); "
                                 "connection declared dead")

    def backpressure(self, read: bool) -> None:
        self.paused = not read
        for n in self.nodes.values():
            n.reading(read)


class NodeConn(asyncio.Protocol):
    """One client's connection to one primary."""

    def __init__(self, io: SpreadIO, addr: tuple):
        self.io = io
        self.addr = addr
        self.transport = None
        self.out: list[bytes] = []
        self.buf = b""
        self.closed = False
        self.is_reading = True
        self.progress = False   # bytes arrived since the last tick (limits.reply_timeout)
        self.since = 0.0
        self.probing = False    # opened by SpreadIO._reach: a failure to connect is its answer
        up = io.up
        # the route's handshake, then the client's connection state so far (HELLO 3,
        # CLIENT SETNAME...): their replies are the connection's own
        cmds = [encode_command(a) for a in up.handshake(0)] + list(io.mux.state)
        self.own = len(cmds)
        self.out = cmds

    async def connect(self) -> None:
        io = self.io
        up = io.up
        host, port = self.addr
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, host, port, **up.ssl_args(host)),
                                   io.conn.proxy.config.limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            io.conn.stats.upstream_failures += 1
            if self.probing:
                self.closed = True
                return
            if not self.closed:
                io.lost(connect_failure(host, port, e, up.tls), tell_idle=True)
            return
        io.conn.stats.upstream_opened += 1

    def connection_made(self, transport) -> None:
        if self.closed or self.io.conn.closed:
            transport.close()
            return
        self.transport = transport
        from proxy.server import _nodelay
        _nodelay(transport, self.io.conn.proxy.config.limits.tcp_keepalive)
        self.io.conn.stats.upstream_connections += 1
        if not self.is_reading:
            transport.pause_reading()
        if self.out:
            self.write(b"")

    def write(self, data: bytes) -> None:
        if self.transport is None:
            if data:
                self.out.append(data)
            return
        if self.out:
            data = b"".join(self.out) + data
            self.out = []
        if data:
            self.transport.write(data)
            self.io.conn.stats.bytes_out["upstream"] += len(data)

    def data_received(self, data: bytes) -> None:
        io = self.io
        self.progress = True
        io.conn.stats.bytes_in["upstream"] += len(data)
        io.conn.active = True
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        mux = io.mux
        try:
            while pos < n:
                end = frame_end(buf, pos)
                if end < 0:
                    break
                raw = buf[pos:end]
                pos = end
                if self.own:
                    self.own -= 1
                    if raw[:1] in (b"-", b"!"):
                        msg = raw[1:-2].decode("utf-8", "replace")
                        return io.lost(f"upstream {format_addr(*self.addr)} refused the proxy's handshake: {msg}")
                    continue
                if mux.confirms or mux.notify_nodes:
                    # keyspace notifications subscribed on this node besides the sticky one
                    got = mux.notify_frame(self.addr, raw)
                    if got == NOTIFY_SESSION:
                        io.session.upstream_data(raw)
                        continue
                    if got == NOTIFY_DROP:
                        if mux.refused:
                            return io.refused()
                        continue
                if raw[:1] == b">" or mux.sticky == self.addr:
                    # a RESP3 push belongs to no request; on the subscriptions' node every
                    # frame goes to the Session as it comes (it tells messages from replies)
                    io.session.upstream_data(raw)
                    continue
                if not mux.owes(self.addr):
                    io.conn.stats.errors["unexpected_reply"] += 1
                    return io.lost(f"{format_addr(*self.addr)} sent a reply no request was waiting for")
                mux.node_reply(self.addr, raw)
                if mux.redirects:
                    io.redirected()
        except ProtocolError as e:
            return io.lost(f"upstream {format_addr(*self.addr)} sent bytes that are not RESP: {e}")
        self.buf = buf[pos:]
        io.flush()

    def connection_lost(self, exc) -> None:
        io = self.io
        if self.transport is not None:
            io.conn.stats.upstream_connections -= 1
        if not self.closed and not io.conn.closed and io.nodes.get(self.addr) is self and io.node_lost(self.addr):
            self.closed = True   # a subscribed client: its subscriptions move (SpreadIO._move)
        if not self.closed and not io.conn.closed:
            why = f"connection to {format_addr(*self.addr)} lost: {exc}" if exc else \
                f"connection closed by {format_addr(*self.addr)}"
            self.closed = True
            io.lost(why)
        self.closed = True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reading(self, on: bool) -> None:
        if on != self.is_reading:
            self.is_reading = on
            if self.transport is not None and not self.closed:
                (self.transport.resume_reading if on else self.transport.pause_reading)()

    def pause_writing(self) -> None:
        self.io.conn.link_paused = True
        self.io.conn.apply_backpressure()

    def resume_writing(self) -> None:
        self.io.conn.link_paused = False
        self.io.conn.apply_backpressure()


class NodeLink(asyncio.Protocol):
    """One connection to one primary carrying the plain requests of many clients of a
    spread route (one protocol, no connection state): the node's replies come back in the order
    the requests were written, so `owners` ([SpreadIO, replies owed] runs) says whose each
    is; each goes to that client's Mux."""

    def __init__(self, proxy, route, addr: tuple, key, proto: int = 2):
        self.proxy = proxy
        self.route = route
        self.addr = addr
        self.key = key
        self.stats = proxy.stats[route.name]
        self.transport = None
        self.owners: deque = deque()
        self.clients: set = set()
        self.buf = b""
        self.lost: str | None = None
        self.progress = False
        self.since = 0.0
        cmds = [encode_command(a) for a in route.upstream.handshake(0, proto)]
        self.out: list[bytes] = cmds
        self.own = len(cmds)   # the handshake's replies are the link's own
        self.scheduled = False
        self.retired: str | None = None

    async def connect(self) -> None:
        up = self.route.upstream
        host, port = self.addr
        loop = asyncio.get_running_loop()
        try:
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
        from proxy.server import _nodelay
        _nodelay(transport, self.proxy.config.limits.tcp_keepalive)
        self.stats.upstream_connections += 1
        self.flush()

    def submit(self, io: SpreadIO, chunks: list[bytes]) -> None:
        """A client's requests (one reply each), written at the end of this loop iteration
        together with the other clients'."""
        if self.lost:
            return io.lost(self.lost)
        self.out += chunks
        last = self.owners[-1] if self.owners else None
        if last is not None and last[0] is io:
            last[1] += len(chunks)
        else:
            self.owners.append([io, len(chunks)])
        if not self.scheduled and self.transport is not None:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.out and self.transport is not None and not self.lost:
            data = b"".join(self.out)
            self.out.clear()
            self.transport.write(data)
            self.stats.bytes_out["upstream"] += len(data)

    def data_received(self, data: bytes) -> None:
        self.progress = True
        self.stats.bytes_in["upstream"] += len(data)
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        touched: dict = {}
        owners = self.owners
        try:
            while pos < n:
                end = frame_end(buf, pos)
                if end < 0:
                    break
                raw = buf[pos:end]
                pos = end
                if self.own:
                    self.own -= 1
                    if raw[:1] in (b"-", b"!"):
                        msg = raw[1:-2].decode("utf-8", "replace")
                        raise ProtocolError(f"upstream {format_addr(*self.addr)} refused the proxy's handshake: {msg}")
                    continue
                if raw[:1] == b">":  # no client here asked for a push
                    continue
                if not owners:
                    raise ProtocolError("the server sent a reply no request was waiting for")
                run = owners[0]
                io = run[0]
                run[1] -= 1
                if not run[1]:
                    owners.popleft()
                if io.conn.closed or io.session.upstream_error is not None:
                    continue  # a reply for a client that left
                if not io.mux.owes(self.addr):
                    raise ProtocolError("a reply for a client that owed none")
                io.mux.node_reply(self.addr, raw)
                if io.mux.redirects:
                    io.redirected()
                touched[io] = True
        except ProtocolError as e:
            self.buf = b""
            self.fail(str(e))
            return
        self.buf = buf[pos:]
        for io in touched:
            io.flush()
        if self.retired is not None and not self.owners:
            self.close()

    def check(self, now: float, limit: float) -> None:
        """limits.reply_timeout: replies owed (a shared link carries no blocking command)
        and no byte from the node for `limit` seconds: the link is dead."""
        if self.lost or self.transport is None:
            return
        if self.progress or not self.owners:
            self.progress = False
            self.since = now
        elif now - self.since >= limit:
            self.stats.upstream_timeouts += 1
            self.fail(f"no reply from {format_addr(*self.addr)} within {limit:g}s ([limits] reply_timeout); "
                      "connection declared dead")
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        if self.transport is not None:
            self.stats.upstream_connections -= 1
        self.fail(f"connection to {format_addr(*self.addr)} lost: {exc}" if exc else
                  f"connection closed by {format_addr(*self.addr)}")

    def fail(self, reason: str) -> None:
        if self.lost:
            return
        self.lost = reason
        if self.proxy.spread_links.get(self.key) is self:
            del self.proxy.spread_links[self.key]
        if self.transport is not None:
            self.transport.close()
        owed = [run[0] for run in self.owners]
        self.owners.clear()
        for io in dict.fromkeys(owed):
            if not io.conn.closed:
                io.lost(reason)

    def retire(self, reason: str) -> None:
        """Its route was changed or removed by a reload (the grace period is over): no new
        request comes to it, and it closes once the replies still owed are in; those still
        owed after connect_timeout are answered with an error naming `reason`."""
        if self.lost or self.retired is not None:
            return
        self.retired = reason
        if self.proxy.spread_links.get(self.key) is self:
            del self.proxy.spread_links[self.key]
        if self.transport is None:  # not connected yet: what waits for it goes nowhere
            return self.fail(reason)
        if not self.owners:
            return self.close()
        asyncio.get_running_loop().call_later(self.proxy.config.limits.connect_timeout, self._retire_over)

    def _retire_over(self) -> None:
        if not self.lost:
            self.fail(f"{self.retired}; no reply from {format_addr(*self.addr)} in time")

    def close(self) -> None:
        """Closed by the proxy (stop, its route gone): not an upstream failure."""
        if not self.lost:
            self.lost = "closed by the proxy"
            if self.proxy.spread_links.get(self.key) is self:
                del self.proxy.spread_links[self.key]
        if self.transport is not None:
            self.transport.close()

    # the node not reading: stop reading the requests of every client on this link
    def pause_writing(self) -> None:
        for io in list(self.clients):
            io.conn.link_paused = True
            io.conn.apply_backpressure()

    def resume_writing(self) -> None:
        for io in list(self.clients):
            io.conn.link_paused = False
            io.conn.apply_backpressure()
