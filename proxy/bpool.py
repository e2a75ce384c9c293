"""A pool of upstream connections for blocking commands (limits.blocking_pool).

In shared upstream mode a client in the plain state that sends a blocking command
(BRPOP, BLMOVE, BZPOPMIN, XREAD BLOCK...) borrows one of its route's pooled connections
for that one request and gives it back with the reply; it stays on its shared link
(see Session.start_borrow / end_borrow and ClientConnection._maybe_borrow).

Correct by construction: a pooled connection carries exactly one request at a time and
is lent again only after its one reply arrived. Connections are set up once for one
backend db and protocol (AUTH, HELLO 3, SELECT, then CLIENT ID), and lent only to a
client of that db and protocol.

Bounded per route: at most `limits.blocking_pool` connections (lent, idle or being
opened). Past the bound a blocking call waits, in order, for a connection to come back
(falling back to a dedicated connection would undo the bound the setting promises);
the wait does not count against the command's own timeout, as time in a client-side
pool does not. Idle connections are closed after limits.blocking_pool_idle seconds (one
sweep per pool, not a timer per loan: a loan is the Sidekiq fetch, the hot path).

A client that disconnects while blocked leaves its connection blocked in the server:
it is never lent again. The pool first sends CLIENT UNBLOCK <its id> from another
connection, so the server answers the blocked call as timed out and can no longer give
it an element; then, once that one reply arrived, closes it. If the server had already
served the call (an element popped for a client that is gone), that reply has nobody to
go to: it is logged and counted as errors_total{kind="orphan_reply"}. Redis itself,
when a blocked client disconnects, frees it before serving it, so the element stays in
the list; an element it already wrote to a client that then vanished is lost there too.
The proxy's window is the same: between the server serving the call and the proxy
learning that the client is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic

from proxy.config import connect_failure
from proxy.resp import encode_command, frame_end, ProtocolError

log = logging.getLogger("proxy")

# the reply of a blocking call that timed out (or was unblocked with CLIENT UNBLOCK)
TIMED_OUT = (b"*-1\r\n", b"$-1\r\n", b"_\r\n")


class PooledConnection(asyncio.Protocol):
    """One upstream connection of a BlockingPool. States: opening (handshake owed),
    idle, busy (lent to `client`), control (carrying a CLIENT UNBLOCK), orphan (its
    borrower left while blocked: it waits for its one reply, then closes)."""

    def __init__(self, pool: "BlockingPool", key: tuple[int, int]):
        self.pool = pool
        self.key = key               # (backend db, protocol)
        self.transport = None
        self.client = None           # the borrower while busy
        self.state = "opening"
        self.id: int | None = None   # CLIENT ID, for CLIENT UNBLOCK
        self.owed = 0                # replies owed to the pool itself
        self.buf = b""
        self.addr = None
        self.progress = False        # (ClientConnection.check_upstream reads these)
        self.since = monotonic()
        self.idle_since = 0.0        # monotonic() when it was last given back (BlockingPool._sweep)
        self.on_reply = None         # control: what to do with the reply
        self.command = b""           # the blocking command lent for (for the orphan log)
        self.owes = False            # lent, its request sent, its whole reply not read yet
        self.pinged = False          # orphan not blocked any more: its reply (if any), then PONG

    def connection_made(self, transport) -> None:
        from proxy.server import _nodelay
        self.transport = transport
        _nodelay(transport, self.pool.proxy.config.limits.tcp_keepalive)
        self.pool.stats.upstream_connections += 1
        db, proto = self.key
        cmds = self.pool.route.upstream.handshake(db, proto) + [[b"CLIENT", b"ID"]]
        self.owed = len(cmds)
        transport.write(b"".join(encode_command(a) for a in cmds))

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c is not None:
            self.progress = True
            c.stats.bytes_in["upstream"] += len(data)
            s = c.session
            s.upstream_data(data)
            if not s.pending and s.partial is None and not s._buf and s.upstream_error is None:
                self.owes = False  # its one reply is in: it may be lent again
                c.borrowed_reply()  # (which flushes)
            else:
                c.flush()
            if c.proxy._idle is not None and c.session.idle:  # (only a graceful stop waits for idle clients)
                c.proxy.idle_changed()
            return
        self.pool.stats.bytes_in["upstream"] += len(data)
        buf = self.buf + data if self.buf else data
        pos = 0
        try:
            while pos < len(buf) and self.transport is not None:
                end = frame_end(buf, pos)
                if end < 0:
                    break
                self._own_reply(buf[pos:end])
                pos = end
        except ProtocolError as e:
            return self.pool.fail(self, f"upstream sent bytes that are not RESP: {e}")
        self.buf = buf[pos:]

    def _own_reply(self, raw: bytes) -> None:
        state = self.state
        if raw[:1] == b">":  # a RESP3 push nobody here asked for: not a reply
            return
        if state == "opening":
            self.owed -= 1
            if raw[:1] in (b"-", b"!"):
                msg = raw[1:-2].decode("utf-8", "replace")
                return self.pool.fail(self, f"upstream refused the proxy's handshake: {msg}")
            if not self.owed:
                self.id = int(raw[1:-2])
                self.pool.opened(self)
        elif state == "control":
            fn, self.on_reply = self.on_reply, None
            fn(raw)
            self.pool.release(self)
        elif state == "orphan":
            if self.pinged and raw == b"+PONG\r\n":  # what it owed is read
                return self.close()
            # (an error served nothing: the -MOVED of a slot moved away while it was blocked)
            if raw not in TIMED_OUT and raw[:1] not in (b"-", b"!"):
                self.pool.orphan_reply(self)
            if not self.pinged:
                self.close()
        else:  # idle: the server sent a reply no request was waiting for
            self.pool.stats.errors["unexpected_reply"] += 1
            self.close()

    def close(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        pool = self.pool
        pool.stats.upstream_connections -= 1
        if self.state == "opening":  # (it would have sent the queued CLIENT UNBLOCKs)
            pool.drop_controls("the connection opened to send it was lost during its handshake")
        self.transport = None
        pool.forget(self)
        pool.refill()
        c = self.client
        if c is not None and not c.closed and not pool.proxy._stopping:
            why = f"connection lost: {exc}" if exc else "connection closed by the server"
            log.warning("route %s: pooled upstream %s", c.route.name, why,
                        extra={"event": "upstream_error", "route": c.route.name})
            c.session.upstream_lost(why)
            c.flush()

    # An upstream that does not read stops us reading its client (as UpstreamConnection).
    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.link_paused = True
            self.client.apply_backpressure()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.link_paused = False
            self.client.apply_backpressure()


class BlockingPool:
    """A route's pooled connections for blocking commands, at most limits.blocking_pool."""

    def __init__(self, proxy, route):
        self.proxy = proxy
        self.route = route
        self.stats = proxy.stats[route.name]
        self.conns: set[PooledConnection] = set()   # every one counted against the bound
        self.idle: dict[tuple, list[PooledConnection]] = {}
        self.waiters: deque = deque()                # [client, key, waited], in order
        self.controls: deque = deque()               # CLIENT UNBLOCK ids to send
        self.retired = False   # a reload changed or removed the route's upstream: lend, never keep
        self.sweeper = None    # the timer of _sweep while a connection is idle

    @property
    def limit(self) -> int:
        return self.proxy.config.limits.blocking_pool

    def counts(self) -> dict[str, int]:
        out = {"idle": 0, "busy": 0, "opening": 0, "control": 0, "orphan": 0}
        # (read by the metrics thread while the event loop changes the set: list() copies
        # it in one step under the GIL; iterating the set itself could raise mid-scrape)
        for pc in list(self.conns):
            out[pc.state] += 1
        return out

    # ---- borrowing

    def borrow(self, client, key: tuple[int, int]) -> None:
        """Lend `client` a connection of `key` now or when one is free (client.lend)."""
        idle = self.idle.get(key)
        while idle:
            pc = idle.pop()
            if self._current(pc):
                return self._lend(pc, client)
            pc.close()
        waiter = [client, key, False]
        self.waiters.append(waiter)
        if not self._make_room(key):
            waiter[2] = True
            self.stats.blocking_waits += 1

    def _make_room(self, key) -> bool:
        """Open a connection for `key` if the bound allows (closing an idle one of another
        db or protocol if that makes room). False: the caller waits."""
        if len(self.conns) >= self.limit:
            for other, lst in self.idle.items():
                if lst:
                    lst.pop().close()
                    break
            else:
                return False
        self._open(key)
        return True

    def cancel(self, client) -> None:
        """A waiting client left."""
        for w in list(self.waiters):
            if w[0] is client:
                self.waiters.remove(w)

    def _lend(self, pc: PooledConnection, client) -> None:
        pc.state = "busy"
        pc.client = client
        self.stats.blocking_borrows += 1
        client.lend(pc)

    def release(self, pc: PooledConnection) -> None:
        """Its one reply is in: lend it again, or keep it idle for a while."""
        pc.client = None
        pc.on_reply = None
        if pc not in self.conns or pc.transport is None:
            return
        pc.state = "idle"
        if not self._current(pc):  # the primary or the slot's owner moved: not lent again
            return pc.close()
        while self.controls:  # an orphan to unblock: only on the same server (not across a failover)
            o = self.controls.popleft()
            if o.state != "orphan" or o.transport is None:
                continue
            if o.addr != pc.addr:
                o.close()
                continue
            return self._control(pc, o.id)
        if self.retired:  # draining clients of the old route only: no connection kept to the old server
            for w in self.waiters:
                if w[1] == pc.key and not w[0].closed:
                    self.waiters.remove(w)
                    return self._lend(pc, w[0])
            return pc.close()
        for w in self.waiters:
            if w[1] == pc.key and not w[0].closed:
                self.waiters.remove(w)
                return self._lend(pc, w[0])
        if self.waiters:  # a waiter of another db or protocol: this slot is theirs
            pc.close()
            self._make_room(self.waiters[0][1])
            return
        idle = self.idle.get(pc.key)
        if idle is None:
            idle = self.idle[pc.key] = []
        idle.append(pc)  # (borrow takes the last one: the others age and are swept)
        pc.idle_since = monotonic()
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(self.proxy.config.limits.blocking_pool_idle,
                                                                 self._sweep)

    def _current(self, pc: PooledConnection) -> bool:
        """Is `pc` connected to the node the route uses now (Sentinel primary, cluster slot owner)?"""
        up = self.route.upstream
        if up.sentinel is None and getattr(up, "cluster", None) is None:
            return True
        return self.proxy.primary_now(up) == pc.addr

    def _sweep(self) -> None:
        """Close the connections idle for blocking_pool_idle; come back while any is idle."""
        self.sweeper = None
        keep = self.proxy.config.limits.blocking_pool_idle
        now = monotonic()
        first = None
        for lst in list(self.idle.values()):
            for pc in list(lst):
                if now - pc.idle_since >= keep:
                    pc.close()
                elif first is None or pc.idle_since < first:
                    first = pc.idle_since
        if first is not None:
            self.sweeper = asyncio.get_running_loop().call_later(max(0.01, first + keep - now), self._sweep)

    # ---- opening

    def _open(self, key) -> None:
        if self.proxy._stopping:  # shutting down: its clients are being closed
            return
        pc = PooledConnection(self, key)
        self.conns.add(pc)
        asyncio.ensure_future(self._connect(pc))

    async def _connect(self, pc: PooledConnection) -> None:
        up = self.route.upstream
        down = self.proxy.health(up).down_reason()
        if down is not None:
            return self.fail(pc, down)
        loop = asyncio.get_running_loop()
        host, port = up.host, up.port
        try:
            # the URL's node, a Sentinel primary, a cluster route's slot owner
            host, port = await self.proxy.data_node(up)
            pc.addr = (host, port)
            await asyncio.wait_for(loop.create_connection(lambda: pc, host, port, **up.ssl_args(host)),
                                   self.proxy.config.limits.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.stats.upstream_failures += 1
            reason = connect_failure(host, port, e, up.tls)
            log.warning("route %s: blocking pool: %s", self.route.name, reason,
                        extra={"event": "upstream_error", "route": self.route.name})
            self.proxy.health(up).failed(reason, self.route.name)
            return self.fail(pc, reason)
        self.stats.upstream_opened += 1

    def opened(self, pc: PooledConnection) -> None:
        self.release(pc)

    def fail(self, pc: PooledConnection, reason: str) -> None:
        """A connection could not be set up (or broke while the pool held it): the
        waiters of its db and protocol get the error, as a shared link's clients do."""
        opening = pc.state == "opening"
        pc.close()
        if not opening:
            return
        self.drop_controls(reason)
        for w in list(self.waiters):
            if w[1] == pc.key:
                self.waiters.remove(w)
                c = w[0]
                if not c.closed:
                    c.session.upstream_lost(reason)
                    c.flush()
        # its slot is free: a waiter of another db or protocol queued behind it gets its own
        # attempt (a failed handshake refills from connection_lost; a failed connect had no transport)
        self.refill()

    def forget(self, pc: PooledConnection) -> None:
        if pc in self.conns:
            self.conns.discard(pc)
            idle = self.idle.get(pc.key)
            if idle and pc in idle:
                idle.remove(pc)

    def refill(self) -> None:
        """A slot came free: open a connection for the oldest waiter, if none is on its way."""
        while self.waiters and self.waiters[0][0].closed:
            self.waiters.popleft()
        if self.waiters and len(self.conns) < self.limit:
            key = self.waiters[0][1]
            wanted = sum(1 for w in self.waiters if w[1] == key)
            coming = sum(1 for c in self.conns if c.state == "opening" and c.key == key)
            if coming < wanted:
                self._open(key)

    # ---- a borrower that left while blocked

    def abandon(self, pc: PooledConnection, in_flight: bool) -> None:
        """The borrower of `pc` is gone with its blocking call unanswered. `in_flight`: part
        of the reply had arrived already (the call was served): nobody can take it."""
        pc.client = None
        pc.command = pc.command or b"?"
        if in_flight or pc.transport is None or self.proxy._stopping:
            if in_flight:
                self.orphan_reply(pc)
            return pc.close()
        pc.state = "orphan"
        # unblock it from another connection to the same server: it then answers as timed out
        idle = next((o for lst in self.idle.values() for o in lst if o.addr == pc.addr), None)
        if idle is not None:
            self.idle[idle.key].remove(idle)
            self._control(idle, pc.id)
        elif pc.id is not None:
            self.controls.append(pc)
            if any(c.state == "opening" for c in self.conns):
                return  # that one, once set up, sends the queued CLIENT UNBLOCKs first
            pc2 = PooledConnection(self, pc.key)  # (then pooled like any other)
            self.conns.add(pc2)  # for a moment one over the bound: an orphan must not wait
            asyncio.ensure_future(self._connect(pc2))

    def drop_controls(self, reason: str) -> None:
        """The connection that was to send the queued CLIENT UNBLOCKs could not be set up:
        close those orphans instead (the server frees a blocked client whose connection
        closes; left alone, one blocked with timeout 0 would stay blocked for good)."""
        while self.controls:
            o = self.controls.popleft()
            if o.state != "orphan" or o.transport is None:
                continue
            self.stats.errors["upstream"] += 1
            log.warning("route %s: blocking pool: could not send CLIENT UNBLOCK %s for a %s whose client "
                        "left (%s); closing its connection instead", self.route.name, o.id,
                        o.command.decode("latin-1", "replace").upper(), reason,
                        extra={"event": "upstream_error", "route": self.route.name})
            o.close()

    def _control(self, pc: PooledConnection, client_id: int) -> None:
        pc.state = "control"

        def done(raw: bytes) -> None:
            if raw[:1] in (b"-", b"!"):
                log.warning("route %s: blocking pool: CLIENT UNBLOCK %d refused (%s); closing that "
                            "connection instead", self.route.name, client_id,
                            raw[1:-2].decode("utf-8", "replace"))
            elif raw != b":0\r\n":
                return  # unblocked: its own (timed-out) reply follows, then it closes
            for o in list(self.conns):
                if o.id != client_id or o.state != "orphan":
                    continue
                if raw[:1] != b":" or o.transport is None:
                    o.close()  # refused: close it
                    continue
                if o.pinged:
                    continue  # not blocked a second time: the PONG behind its reply closes it
                # not blocked: served (its reply is on its way: read and count it), or its
                # call not run yet. A PING behind it closes it once what it owes is read;
                # one more CLIENT UNBLOCK frees the call that had not run yet
                o.pinged = True
                o.transport.write(encode_command([b"PING"]))
                self.controls.append(o)
        pc.on_reply = done
        pc.transport.write(encode_command([b"CLIENT", b"UNBLOCK", str(client_id).encode()]))

    def orphan_reply(self, pc: PooledConnection) -> None:
        self.stats.errors["orphan_reply"] = self.stats.errors.get("orphan_reply", 0) + 1
        log.warning("route %s: a blocking %s was served after its client disconnected; nobody can take "
                    "its reply (an element it popped or moved is lost, as with a client that disconnects "
                    "right after Redis served it)", self.route.name,
                    pc.command.decode("latin-1", "replace").upper(),
                    extra={"event": "orphan_reply", "route": self.route.name})

    def retire(self) -> None:
        """A reload took the route's upstream away: idle connections close now, busy ones
        once their one reply is in (so the old server is left without connections, as the
        runbooks check before migrating)."""
        self.retired = True
        for pc in [pc for lst in self.idle.values() for pc in lst]:  # (close() edits the lists)
            pc.close()
        self.idle.clear()

    def close_all(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for pc in list(self.conns):
            pc.close()
