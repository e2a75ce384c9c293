"""Sentinel upstreams: `redis+sentinel://[USER:PASS@]h1:p1,h2:p2/MASTER[/DB]`.

The route's primary is whatever the sentinels say it is, confirmed by the node itself
(ROLE says `master`: a sentinel that has not caught up with a failover yet is not
believed). The plain-object part (replies parsed, the next sentinel to ask, the
current primary) does no IO; `resolve` asks with blocking sockets (`check`, `migrate`,
the readiness probe's thread) and `Watcher` asks and listens with asyncio (the proxy).

The watcher is subscribed to every sentinel of the URL (each reconnecting with backoff)
for the start of a failover, `+switch-master` and an aborted failover (CHANNELS), and
also asks again every RESOLVE_EVERY seconds, so a message missed while no sentinel was
reachable cannot leave the proxy on the old primary. On a change it tells the proxy
(Proxy.primary_changed), which moves the route's connections; from the start of a
failover until the new primary is confirmed, `primary` is None and readiness is false."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import hiredis

from proxy.resp import encode_command

log = logging.getLogger("keyspace-proxy")

RESOLVE_EVERY = 2.0          # seconds between two questions while subscribed
BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds before resubscribing after 1, 2, ... failures in a row


class SentinelError(ConnectionError):
    """No primary could be found; the message says what each sentinel answered.
    A ConnectionError, so callers that report an unreachable upstream report this too."""


@dataclass(frozen=True)
class SentinelSpec:
    """Where to ask and for what. The URL's credentials are the data nodes'; the
    sentinels' own (Redis 6.2+ `requirepass` / ACL on sentinels) come from [sentinel]."""
    master: str
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None

    def handshake(self) -> list[list[bytes]]:
        if not self.password:
            return []
        return [[b"AUTH"] + ([self.username.encode()] if self.username else []) + [self.password.encode()]]

    def nodes_text(self) -> str:
        from proxy.config import format_addr
        return ",".join(format_addr(h, p) for h, p in self.nodes)


# -- plain objects: replies and messages, which sentinel next, the current primary

def master_addr(reply) -> tuple[str, int] | None:
    """SENTINEL GET-MASTER-ADDR-BY-NAME's reply: [host, port], or nil for an unknown name."""
    if reply is None:
        return None
    if isinstance(reply, Exception):
        raise SentinelError(str(reply))
    if not isinstance(reply, list) or len(reply) != 2:
        raise SentinelError(f"unexpected reply to SENTINEL GET-MASTER-ADDR-BY-NAME: {reply!r}")
    host, port = reply
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return host, int(port)
    except ValueError:
        raise SentinelError(f"unexpected port in SENTINEL GET-MASTER-ADDR-BY-NAME's reply: {port!r}") from None


def switch_master(payload: bytes) -> tuple[str, tuple[str, int], tuple[str, int]] | None:
    """A `+switch-master` message, `NAME OLD-IP OLD-PORT NEW-IP NEW-PORT`: (name, old, new)."""
    parts = payload.decode("utf-8", "replace").split()
    if len(parts) != 5 or not parts[2].isdigit() or not parts[4].isdigit():
        return None
    return parts[0], (parts[1], int(parts[2])), (parts[3], int(parts[4]))


def event_master(payload: bytes) -> tuple[str, tuple[str, int]] | None:
    """The master an instance event is about: `master NAME IP PORT` or
    `TYPE NAME IP PORT @ MASTER IP PORT` (Sentinel's event format): (name, addr)."""
    parts = payload.decode("utf-8", "replace").split()
    if "@" in parts:
        parts = parts[parts.index("@") + 1:]
    elif parts and parts[0] == "master":
        parts = parts[1:]
    else:
        return None
    if len(parts) < 3 or not parts[2].isdigit():
        return None
    return parts[0], (parts[1], int(parts[2]))


# What the watcher listens to on every sentinel. The failover's leader announces that it
# is about to promote a replica before it does: from then on nothing more is sent to the
# old primary (what it acknowledged after the promotion would be lost when it is made a
# replica), and new requests wait for the new one. `+switch-master` comes a second or
# so later, from each sentinel, once the leader has seen the promotion.
CHANNELS = (b"+switch-master", b"+failover-state-send-slaveof-noone")
PATTERNS = (b"-failover-abort-*",)
HOLD = 10.0   # seconds the old primary is avoided after a failover began, if nothing follows


def is_primary(role_reply) -> bool:
    """ROLE's reply says `master`."""
    return isinstance(role_reply, list) and bool(role_reply) and role_reply[0] in (b"master", "master")


class Order:
    """Which sentinel to ask next: the one that last answered first (as redis-py does),
    then the others in the configured order."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def good(self, node) -> None:
        if node in self.nodes and self.nodes[0] != node:
            self.nodes.remove(node)
            self.nodes.insert(0, node)

    def __iter__(self):
        return iter(list(self.nodes))


class State:
    """The primary as last confirmed, or None while unknown or being confirmed; and the
    old primary not to go back to while a failover is under way (until `avoid_until`)."""

    def __init__(self):
        self.primary: tuple[str, int] | None = None
        self.last_error = "not asked yet"
        self.avoid: tuple[str, int] | None = None
        self.avoid_until = 0.0

    def avoided(self, addr, now: float) -> bool:
        return addr == self.avoid and now < self.avoid_until

    def switching(self, why: str) -> None:
        self.primary = None
        self.last_error = why

    def confirmed(self, addr: tuple[str, int]) -> tuple[str, int] | None:
        """The new primary is confirmed; returns the previous one if it was another."""
        old, self.primary = self.primary, addr
        return old if old != addr else None


def _ask_commands(spec: SentinelSpec) -> list[list[bytes]]:
    return spec.handshake() + [[b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", spec.master.encode()]]


def _role_commands(up) -> list[list[bytes]]:
    return up.handshake(0) + [[b"ROLE"]]


def _failed(cmds, replies, sentinel: bool = False) -> str | None:
    for cmd, reply in zip(cmds, replies):
        if isinstance(reply, hiredis.ReplyError):
            why = f"{cmd[0].decode()} {cmd[1].decode() if len(cmd) > 1 and cmd[0] != b'AUTH' else ''}".rstrip() + \
                f" failed: {reply}"
            if sentinel and (cmd[0] == b"AUTH" or str(reply).startswith("NOAUTH")):
                why += " (the sentinels' credentials: [sentinel] password / PROXY_SENTINEL_PASSWORD)"
            elif not sentinel and (cmd[0] == b"AUTH" or str(reply).startswith("NOAUTH")):
                why += " (the data nodes' credentials: the URL's USER:PASSWORD)"
            return why
    return None


def _summary(spec: SentinelSpec, errors: list[str]) -> str:
    return f"no primary for master {spec.master!r} from the sentinels {spec.nodes_text()}: " + "; ".join(errors)


# -- blocking: check, migrate, the readiness probe

def _exchange_sync(addr, cmds, timeout: float, up) -> list:
    with up.open_socket(timeout, addr) as s:  # (TLS for rediss+...://)
        s.settimeout(timeout)
        s.sendall(b"".join(encode_command(c) for c in cmds))
        reader = hiredis.Reader()
        replies: list = []
        while len(replies) < len(cmds):
            data = s.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            reader.feed(data)
            while (r := reader.gets()) is not False:
                replies.append(r)
        return replies


def _asking(up, nodes, avoided=lambda addr: False):
    """The asking loop, without IO (for `resolve` and Watcher.ask alike): ask the sentinels
    in order, then confirm with ROLE on the node named. Yields (addr, commands) and is sent
    their replies, or has the exchange's OSError, TimeoutError or hiredis.ProtocolError
    thrown in. Returns (the sentinel that answered, the primary); raises SentinelError
    naming what each sentinel answered."""
    from proxy.config import format_addr
    spec, errors = up.sentinel, []
    for node in nodes:
        where = f"sentinel {format_addr(*node)}"
        try:
            cmds = _ask_commands(spec)
            replies = yield node, cmds
            if (why := _failed(cmds, replies, sentinel=True)) is not None:
                errors.append(f"{where}: {why}")
                continue
            addr = master_addr(replies[-1])
        except (OSError, asyncio.TimeoutError, hiredis.ProtocolError) as e:  # (SentinelError too)
            errors.append(f"{where}: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}")
            continue
        if addr is None:
            errors.append(f"{where}: does not know master {spec.master!r}")
            continue
        if avoided(addr):
            errors.append(f"{where} still names {format_addr(*addr)}, the primary being failed over")
            continue
        try:
            cmds = _role_commands(up)
            replies = yield addr, cmds
        except (OSError, asyncio.TimeoutError, hiredis.ProtocolError) as e:
            errors.append(f"{where} names {format_addr(*addr)}, unreachable: {e.__class__.__name__} {e}".rstrip())
            continue
        if (why := _failed(cmds, replies)) is not None:
            errors.append(f"{where} names {format_addr(*addr)}: {why}")
        elif not is_primary(replies[-1]):
            errors.append(f"{where} names {format_addr(*addr)}, which is not a primary (a failover under way?)")
        else:
            return node, addr
    raise SentinelError(_summary(spec, errors))


def resolve(up, timeout: float) -> tuple[str, int]:
    """The primary of a sentinel upstream, asked now with blocking sockets. Raises SentinelError."""
    gen = _asking(up, up.sentinel.nodes)
    step, reply = gen.send, None
    while True:
        try:
            addr, cmds = step(reply)
        except StopIteration as stop:
            return stop.value[1]
        try:  # (TLS to the sentinels too for rediss+sentinel://: open_socket)
            step, reply = gen.send, _exchange_sync(addr, cmds, timeout, up)
        except (OSError, hiredis.ProtocolError) as e:
            step, reply = gen.throw, e


# -- asyncio: the proxy's watcher

async def exchange(addr, cmds, ssl_args: dict) -> list:
    """Open a connection to `addr`, send `cmds`, return their replies as hiredis reads them
    (errors as hiredis.ReplyError values), close. For the short exchanges of the asyncio side:
    asking sentinels, the command table check at start."""
    reader, writer = await asyncio.open_connection(addr[0], addr[1], **ssl_args)
    try:
        writer.write(b"".join(encode_command(c) for c in cmds))
        parser = hiredis.Reader()
        replies: list = []
        while len(replies) < len(cmds):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("connection closed")
            parser.feed(data)
            while (r := parser.gets()) is not False:
                replies.append(r)
        return replies
    finally:
        writer.close()


async def _exchange(addr, cmds, timeout: float, ssl_args: dict) -> list:
    return await asyncio.wait_for(exchange(addr, cmds, ssl_args), timeout)


class Watcher:
    """Follows one sentinel upstream's primary for the proxy. `on_change(old, new)` is
    called on the event loop when the confirmed primary moves (old None: the first)."""

    def __init__(self, up, timeout: float, on_change):
        self.up = up
        self.spec: SentinelSpec = up.sentinel
        self.timeout = timeout
        self.on_change = on_change
        self.order = Order(self.spec.nodes)
        self.state = State()
        self.known = asyncio.Event()   # set while a confirmed primary is known
        self.tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._stopped = False

    def _ssl(self, addr) -> dict:
        return self.up.ssl_args(addr[0])

    async def start(self) -> None:
        """First resolution (its failure is logged, not fatal: retried), then watch."""
        await self.refresh("start")
        self.tasks = [asyncio.ensure_future(self._subscribe_loop(node)) for node in self.spec.nodes]
        self.tasks.append(asyncio.ensure_future(self._poll_loop()))

    def stop(self) -> None:
        self._stopped = True
        for t in self.tasks:
            t.cancel()

    async def wait(self, timeout: float) -> tuple[str, int]:
        """The confirmed primary, waiting up to `timeout` while a switch is confirmed."""
        if self.state.primary is None:
            try:
                await asyncio.wait_for(self.known.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if self.state.primary is None:
            raise SentinelError(self.state.last_error)
        return self.state.primary

    async def ask(self) -> tuple[str, int]:
        """Ask the sentinels in order; confirm with ROLE (_asking). Raises SentinelError."""
        now = asyncio.get_running_loop().time()
        gen = _asking(self.up, self.order, lambda addr: self.state.avoided(addr, now))
        step, reply = gen.send, None
        while True:
            try:
                addr, cmds = step(reply)
            except StopIteration as stop:
                node, primary = stop.value
                self.order.good(node)
                return primary
            try:
                step, reply = gen.send, await _exchange(addr, cmds, self.timeout, self._ssl(addr))
            except (OSError, asyncio.TimeoutError, hiredis.ProtocolError) as e:
                step, reply = gen.throw, e

    async def _is_primary(self, addr, errors: list, where: str) -> bool:
        from proxy.config import format_addr
        try:
            cmds = _role_commands(self.up)
            replies = await _exchange(addr, cmds, self.timeout, self._ssl(addr))
        except (OSError, asyncio.TimeoutError, hiredis.ProtocolError) as e:
            errors.append(f"{where} names {format_addr(*addr)}, unreachable: {e.__class__.__name__} {e}".rstrip())
            return False
        if (why := _failed(cmds, replies)) is not None:
            errors.append(f"{where} names {format_addr(*addr)}: {why}")
            return False
        if not is_primary(replies[-1]):
            errors.append(f"{where} names {format_addr(*addr)}, which is not a primary yet")
            return False
        return True

    def failover_begins(self, why: str, old: tuple[str, int]) -> None:
        """The old primary is about to stop being one: leave it now (readiness false,
        new connections wait) and do not go back to it for HOLD seconds unless the
        failover is called off."""
        st = self.state
        st.avoid, st.avoid_until = old, asyncio.get_running_loop().time() + HOLD
        if st.primary == old:
            st.switching(f"failover of {self.spec.master!r} under way ({why})")
            self.known.clear()
            self.on_change(old, None)

    def failover_aborted(self) -> None:
        self.state.avoid = None
        asyncio.ensure_future(self.refresh("failover aborted"))

    async def refresh(self, why: str, hint: tuple[str, int] | None = None) -> None:
        """Ask again; a different primary (or none) changes the state and tells the proxy."""
        async with self._lock:
            if hint is not None and hint == self.state.primary:
                return
            try:
                addr = await self.ask()
            except SentinelError as e:
                if self.state.primary is not None or hint is not None or why == "start":
                    log.warning("sentinel upstream %s: %s", self.up.masked(), e, extra={"event": "sentinel"})
                if self.state.primary is not None:
                    # the primary we know may be fine (sentinels unreachable): keep it
                    # only if it still says it is one
                    if not await self._is_primary(self.state.primary, [], "check"):
                        old = self.state.primary
                        self.state.switching(str(e))
                        self.known.clear()
                        self.on_change(old, None)
                else:
                    self.state.last_error = str(e)
                return
            old = self.state.primary
            self.state.confirmed(addr)
            if addr != self.state.avoid:
                self.state.avoid = None
            self.known.set()
            if old != addr:
                self.on_change(old, addr)

    async def _poll_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(RESOLVE_EVERY if self.state.primary is not None else BACKOFF[1])
            try:
                await self.refresh("periodic check")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the watcher die
                log.warning("sentinel upstream %s: %s", self.up.masked(), e, extra={"event": "sentinel"})

    async def _subscribe_loop(self, node) -> None:
        """Subscribed to one sentinel (each sentinel has its own: the failover's leader,
        which alone announces its start, may be any of them); reconnects with backoff."""
        from proxy.config import format_addr
        failures = 0
        while not self._stopped:
            subscribed: list = []
            try:
                await self._listen(node, subscribed)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, hiredis.ProtocolError, SentinelError) as e:
                if subscribed:  # it worked until now: retry at once, and say so again next time
                    failures = 0
                if failures == 0:
                    log.info("sentinel %s: not subscribed (%s); retrying", format_addr(*node),
                             e or e.__class__.__name__, extra={"event": "sentinel"})
            failures += 1
            await asyncio.sleep(BACKOFF[min(failures, len(BACKOFF) - 1)] * (0.5 + random.random()))

    async def _listen(self, node, subscribed: list) -> None:
        """Subscribed until the connection ends (an exception); `subscribed` gets an
        item once the sentinel confirmed every channel."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(node[0], node[1], **(self._ssl(node) if self.up.tls else {})), self.timeout)
        try:
            auth = self.spec.handshake()
            cmds = auth + [[b"SUBSCRIBE", *CHANNELS], [b"PSUBSCRIBE", *PATTERNS]]
            writer.write(b"".join(encode_command(c) for c in cmds))
            parser = hiredis.Reader()
            acks, want = 0, len(auth) + len(CHANNELS) + len(PATTERNS)  # a reply per channel
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed")
                parser.feed(data)
                while (r := parser.gets()) is not False:
                    if acks < want:
                        if isinstance(r, hiredis.ReplyError):
                            raise SentinelError(f"{'AUTH' if acks < len(auth) else 'SUBSCRIBE'} failed: {r}")
                        acks += 1
                        if acks == want:
                            subscribed.append(True)
                            # anything missed while not subscribed
                            asyncio.ensure_future(self.refresh("subscribed"))
                        continue
                    if isinstance(r, list) and len(r) in (3, 4) and r[0] in (b"message", b"pmessage"):
                        self.event(node, r[-2], r[-1])
        finally:
            writer.close()

    def event(self, node, channel: bytes, payload: bytes) -> None:
        """A message from a sentinel's Pub/Sub (see CHANNELS)."""
        from proxy.config import format_addr
        if channel == b"+switch-master":
            msg = switch_master(payload)
            if msg is None or msg[0] != self.spec.master:
                return
            log.info("sentinel %s: +switch-master %s", format_addr(*node), payload.decode("utf-8", "replace"),
                     extra={"event": "sentinel"})
            self.failover_begins("+switch-master", msg[1])
            asyncio.ensure_future(self.refresh("+switch-master", hint=msg[2]))
            return
        about = event_master(payload)
        if about is None or about[0] != self.spec.master:
            return
        log.info("sentinel %s: %s %s", format_addr(*node), channel.decode("utf-8", "replace"),
                 payload.decode("utf-8", "replace"), extra={"event": "sentinel"})
        if channel == b"+failover-state-send-slaveof-noone":
            self.failover_begins(channel.decode(), about[1])
        elif channel.startswith(b"-failover-abort"):
            self.failover_aborted()
