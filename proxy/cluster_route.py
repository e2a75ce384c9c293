"""Pinned routes over a Redis Cluster: where a route's node is, and what to do with a redirect.

A route on a `redis+cluster://` upstream is pinned (config.check_cluster_route): every key
it writes is `{NS}:key`, in the one slot `key_slot(NS)`. Its node is the primary owning
that slot, so to the proxy a pinned route on a cluster is "one upstream whose address can
change", like a Sentinel upstream: `Topology` (one per cluster URL, in the Proxy) holds the
slot map, read at start from the seeds (CLUSTER SHARDS, else CLUSTER SLOTS), asked again
every REFRESH_EVERY seconds and at once after a redirect; on a change the proxy moves the
route's connections (Proxy.cluster_changed), as it does after a Sentinel switch.

Redirects never reach a client (it speaks to one ordinary Redis): the Session sends a
redirected request again when `resend_plan` allows it (the shell: Proxy.cluster_resend),
else `redirect_error` turns the `-MOVED` / `-ASK` reply into `-TRYAGAIN` naming what happened
(the request was not run, so the client's retry is no duplicate); either way the redirect
goes to the map. The plain part
(`redirect_error`, `fetch_commands`, `build_map`) does no IO; `resolve` asks with blocking
sockets (`check`), `Topology` with asyncio."""

from __future__ import annotations

import asyncio
import logging

import hiredis

from proxy.cluster import Redirect, SlotMap, key_slot, parse_redirect
from proxy.resp import frame_end

log = logging.getLogger("keyspace-proxy")

REFRESH_EVERY = 2.0     # seconds between two reads of the slot map
MIN_GAP = 0.1           # at most one redirect-driven read per MIN_GAP seconds


class ClusterRouteError(ConnectionError):
    """No owner for the route's slot (map unreadable, or the slot uncovered); the message
    says why. A ConnectionError, so callers that report an unreachable upstream report this."""


def route_slot(route) -> int:
    """The one slot of a pinned route on a cluster (check_cluster_route: all its
    namespaces share it)."""
    return key_slot(route.default.keyspace.namespace)


def redirect_error(raw: bytes) -> tuple[bytes, Redirect | None] | None:
    """A reply `-MOVED slot host:port` or `-ASK slot host:port`: the error the client
    gets instead, and the redirect. `-CLUSTERDOWN`: passed on as it is, with None (the map
    should be read again). None for any other reply."""
    if raw.startswith(b"-CLUSTERDOWN"):
        return raw, None
    if not (raw.startswith(b"-MOVED ") or raw.startswith(b"-ASK ")):
        return None
    r = parse_redirect(raw[1:].rstrip(b"\r\n").decode("utf-8", "replace"))
    if r is None:
        return None
    where = f"{r.host}:{r.port}" if r.host else f"port {r.port}"
    if r.kind == "MOVED":
        why = (f"TRYAGAIN proxy: hash slot {r.slot} of this namespace moved to {where} (Redis Cluster "
               "resharding or failover); the command was not run, the proxy now follows the new owner: retry")
    else:
        why = (f"TRYAGAIN proxy: hash slot {r.slot} of this namespace is being migrated to {where} and the "
               "key is already there (-ASK); the command was not run: retry (after the migration it runs "
               "on the new owner)")
    return b"-" + why.encode() + b"\r\n", r


def split_requests(blob: bytes) -> list[bytes]:
    """The requests in bytes the proxy wrote upstream (whole RESP arrays, as the C path's
    rewrite_plain or encode_command make them), one each. Raises ValueError on bytes that do
    not end on a request's end. (Session._sent_bytes: a batch the C path wrote.)"""
    out, pos, n = [], 0, len(blob)
    while pos < n:
        end = frame_end(blob, pos)
        if end < 0:
            raise ValueError("bytes end inside a request")
        out.append(blob[pos:end])
        pos = end
    return out


def resend_plan(redirected: list[bool]) -> list[bool]:
    """Which of a client's requests outstanding on one connection, in the order written, may
    be sent again: `redirected[i]` is True when request i was answered -MOVED / -ASK (it did
    not run), False for any other reply (it ran, or may have). The rule: a redirected request
    is sent again only if every later one was redirected too (the trailing run), since sent
    again after a request that ran it would run after it, against the client's order; the
    others get -TRYAGAIN. The re-sends go in the client's order, before any later request."""
    plan = [False] * len(redirected)
    for i in range(len(redirected) - 1, -1, -1):
        if not redirected[i]:
            break
        plan[i] = True
    return plan


def fetch_commands(up) -> list[list[bytes]]:
    return up.handshake(0) + [[b"CLUSTER", b"SHARDS"]]


def build_map(up, replies: list, origin_host: str) -> tuple[SlotMap | None, str | None]:
    """The map from the replies to fetch_commands (None and why if they do not give one;
    'slots' when CLUSTER SHARDS is unknown and CLUSTER SLOTS should be asked)."""
    for cmd, reply in zip(fetch_commands(up), replies):
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if cmd[0] == b"CLUSTER" and "unknown subcommand" in text.lower():
                return None, "slots"
            return None, f"{cmd[0].decode()} {'' if cmd[0] == b'AUTH' else cmd[1].decode()}".rstrip() + \
                f" failed: {text}"
    try:
        return SlotMap.from_shards(replies[-1], origin_host), None
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return None, f"unreadable CLUSTER SHARDS reply: {e}"


def _from_slots(up, replies: list, origin_host: str) -> tuple[SlotMap | None, str | None]:
    reply = replies[-1]
    if isinstance(reply, hiredis.ReplyError):
        return None, f"CLUSTER SLOTS failed: {reply}"
    try:
        return SlotMap.from_slots(reply, origin_host), None
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return None, f"unreadable CLUSTER SLOTS reply: {e}"


def owner_text(m: SlotMap | None, slot: int) -> str | None:
    node = m.primary(slot) if m is not None else None
    return None if node is None else f"{node.addr[0]}:{node.addr[1]}"


def _addr(m: SlotMap, slot: int, tls: bool) -> tuple[str, int] | None:
    node = m.primary(slot)
    return None if node is None else (node.addr[0], node.port_for(tls))


def _signature(m: SlotMap) -> tuple:
    """What routing depends on: each slot's primary address."""
    prim = [sh.primary.addr if sh.primary is not None else None for sh in m.shards]
    return tuple(None if o is None else prim[o] for o in m.owners)


# -- blocking: `check`

def resolve(up, slot: int, timeout: float) -> tuple[tuple[str, int], SlotMap]:
    """The primary owning `slot`, read from the seeds now. Raises ClusterRouteError."""
    from proxy.config import format_addr
    from proxy.sentinel import _exchange_sync
    errors = []
    for seed in up.cluster.seeds:
        where = f"seed {format_addr(*seed)}"
        try:
            replies = _exchange_sync(seed, fetch_commands(up), timeout, up)
            m, why = build_map(up, replies, seed[0])
            if why == "slots":
                replies = _exchange_sync(seed, up.handshake(0) + [[b"CLUSTER", b"SLOTS"]], timeout, up)
                m, why = _from_slots(up, replies, seed[0])
        except (OSError, hiredis.ProtocolError) as e:
            errors.append(f"{where}: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}")
            continue
        if m is None:
            errors.append(f"{where}: {why}")
            continue
        addr = _addr(m, slot, up.tls is not None)
        if addr is None:
            raise ClusterRouteError(f"hash slot {slot} has no primary in the cluster's map (from {where})")
        return addr, m
    raise ClusterRouteError(f"no slot map from the seeds of {up.masked()}: " + "; ".join(errors))


# -- asyncio: the proxy's topology

class Topology:
    """The slot map of one cluster upstream for the proxy. `on_change(old, new)` is called
    on the event loop when a read gives a different map (old None: the first)."""

    def __init__(self, up, timeout: float, on_change):
        self.up = up
        self.timeout = timeout
        self.on_change = on_change
        self.map: SlotMap | None = None
        self.error = "the cluster's slot map has not been read yet"
        self.known = asyncio.Event()   # set while a map is known
        self.reads = 0                 # maps read (metrics, tests)
        self.redirects = {"MOVED": 0, "ASK": 0}
        self.tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._soon: asyncio.Handle | None = None
        self._stopped = False
        self._moved = 0                # MOVEDs applied to the map (a read begun before one is stale)

    async def start(self) -> None:
        """First read (its failure is logged, not fatal: retried), then every REFRESH_EVERY."""
        await self.refresh("start")
        self.tasks.append(asyncio.ensure_future(self._poll_loop()))

    def stop(self) -> None:
        self._stopped = True
        for t in self.tasks:
            t.cancel()
        if self._soon is not None:
            self._soon.cancel()

    def owner(self, slot: int | None) -> tuple[str, int] | None:
        """The primary of `slot`; for None (a spread route: every slot) the primary of
        the lowest slot, while the map covers every slot."""
        if slot is None:
            if self.map is None or self.map.uncovered():
                return None
            slot = 0
        return None if self.map is None else _addr(self.map, slot, self.up.tls is not None)

    def down_reason(self, slot: int | None) -> str | None:
        """Why the route of `slot` (None: a spread route) cannot be served now (readiness), or None."""
        if self.map is None:
            return self.error
        if slot is None:
            gaps = self.map.uncovered()
            return f"hash slots without a primary in the cluster's map: {gaps[:3]}" if gaps else None
        if self.owner(slot) is None:
            return f"hash slot {slot} has no primary in the cluster's map (uncovered: {self.map.uncovered()[:3]})"
        return None

    async def wait_owner(self, slot: int, timeout: float) -> tuple[str, int]:
        """The owner of `slot`, waiting up to `timeout` for a first map. Raises ClusterRouteError."""
        if self.map is None:
            try:
                await asyncio.wait_for(self.known.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        why = self.down_reason(slot)
        if why is not None:
            self.refresh_soon("no owner")
            raise ClusterRouteError(why)
        return self.owner(slot)

    def redirected(self, r: Redirect | None) -> None:
        """A node answered -MOVED / -ASK (None: -CLUSTERDOWN): a MOVED is applied to the
        map at once (so new connections go to the new owner), and the map is read again soon."""
        if r is None:
            return self.refresh_soon("CLUSTERDOWN")
        self.redirects[r.kind] = self.redirects.get(r.kind, 0) + 1
        if r.kind == "MOVED" and self.map is not None:
            addr = r.address("", self.map) if r.host else None  # "": a host we cannot know here
            if addr is not None and self.owner(r.slot) != addr:
                old, self.map = self.map, self.map.moved(r)
                self._moved += 1
                self.on_change(old, self.map)
        self.refresh_soon(r.kind)

    def refresh_soon(self, why: str) -> None:
        if self._soon is None and not self._stopped:
            def go():
                self._soon = None
                asyncio.ensure_future(self.refresh(why))
            self._soon = asyncio.get_running_loop().call_later(MIN_GAP, go)

    async def _poll_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await self.refresh("periodic")
            except Exception:  # noqa: BLE001 - a bug here must not end the periodic reads
                log.exception("cluster upstream %s: reading the slot map failed", self.up.masked(),
                              extra={"event": "cluster"})

    async def _ask(self, node) -> tuple[SlotMap | None, str | None]:
        from proxy.sentinel import _exchange
        ssl = self.up.ssl_args(node[0])
        replies = await _exchange(node, fetch_commands(self.up), self.timeout, ssl)
        m, why = build_map(self.up, replies, node[0])
        if why == "slots":
            replies = await _exchange(node, self.up.handshake(0) + [[b"CLUSTER", b"SLOTS"]], self.timeout, ssl)
            m, why = _from_slots(self.up, replies, node[0])
        return m, why

    async def _ask_after_moves(self, node) -> tuple[SlotMap | None, str | None]:
        """_ask, read again while a MOVED was applied meanwhile: a map read before it
        would put the moved slot back on its old owner (redirected's own read is skipped
        while this one holds the lock)."""
        for _ in range(3):
            moved = self._moved
            m, err = await self._ask(node)
            if self._moved == moved:
                return m, err
        return None, "the slot map kept changing (MOVED) while it was read"

    async def refresh(self, why: str) -> None:
        """Read the map from a primary of the current map, then the seeds (one read at a time)."""
        from proxy.config import format_addr
        if self._lock.locked():
            return  # a read is under way; its result is as new as this one would be
        async with self._lock:
            tls = self.up.tls is not None
            nodes = [(n.addr[0], n.port_for(tls)) for n in self.map.primaries()] if self.map else []
            nodes += [s for s in self.up.cluster.seeds if s not in nodes]
            errors = []
            for node in nodes:
                try:
                    m, err = await self._ask_after_moves(node)
                except (OSError, asyncio.TimeoutError, hiredis.ProtocolError) as e:
                    errors.append(f"{format_addr(*node)}: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}")
                    continue
                if m is None:
                    errors.append(f"{format_addr(*node)}: {err}")
                    continue
                self.reads += 1
                old = self.map
                if old is None or _signature(old) != _signature(m):
                    self.map = m
                    self.known.set()
                    if old is None:
                        log.info("cluster upstream %s: slot map read (%d primaries)", self.up.masked(),
                                 len(m.primaries()), extra={"event": "cluster"})
                    self.on_change(old, m)
                return
            self.error = f"no slot map from {self.up.masked()} ({why}): " + "; ".join(errors)
            log.warning("%s", self.error, extra={"event": "cluster"})
