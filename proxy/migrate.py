"""`keyspace-proxy migrate`: copy or move the keys of one keyspace into another, exactly once.

A keyspace is an upstream URL (host, port, db) plus an optional namespace. Keys are walked
with SCAN in batches. What moves, and how (the README's "Moving data" states the guarantee):

- Lists, sorted sets, sets and hashes move element by element in chunks, each chunk one Lua
  script. On one server (any two dbs: SELECT inside a script is local to it) the script takes
  the elements out of the source and adds them to the target atomically, so every element is
  in exactly one of the two at every instant. Across servers a chunk goes through an
  in-flight key on the source server (taken out of the source atomically, with a record), is
  added to the target together with an "applied" mark (one script, so a rerun never adds it
  twice), and is then dropped from the source server; a rerun finishes any chunk left in
  flight before it starts.
- A copy (no --move) of a list records, in the target, how many times each element was
  copied (the copy journal): a rerun copies only what is new, and a later --move drops the
  elements a copy already delivered instead of adding them again. Sorted sets, sets and
  hashes are merged with ZADD NX / SADD / HSETNX, which are idempotent.
- Strings and other types are copied whole (DUMP/RESTORE, TTL kept); --move then deletes the
  source only if it is still byte for byte what was copied (compare-and-delete), so a write
  that lands in between is never lost: the key is reported and stays.
- RENAMENX (same server and db) and MOVE (same server, same name) move a key the target
  lacks in one atomic step.

Journal keys live under `keyspace-proxy:migrate:` (source db: the in-flight chunks; target
db: the applied marks and copy journals) and are never migrated themselves.

Either side may be a Redis Cluster (`redis+cluster://`, `rediss+cluster://`): ClusterSide sends
each command to the primary serving its key's slot (map from CLUSTER SHARDS, else CLUSTER
SLOTS), follows -MOVED (map refreshed) and -ASK (ASKING, map kept), waits out -TRYAGAIN, and
walks SCAN over every primary. A script may only touch keys of one slot, so on a cluster every
journal key carries the slot of the data key it protects: `keyspace-proxy:migrate:{T}:...`
where T is a short tag hashing to that slot (the same names as on one server after the
`{T}:`). Every script on a cluster also declares a probe key of that slot that never exists:
a node refuses a script with a missing key while the slot is being migrated (TRYAGAIN or ASK,
before anything runs), so a script never runs half (a key it empties would be "non local"
to the rest of it during a migration). "One server" (the atomic scripts) is one cluster and
one slot for the source and the target name; anything else goes through in-flight chunks,
and on a cluster each of their steps waits (WAIT) until the node's online replicas have it
before the next step, so a failover cannot undo a step that the next one relies on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import hiredis

from proxy.cluster import SlotMap, key_slot, parse_redirect
from proxy.config import (CLUSTER_SCHEMES, ClusterUpstream, ConfigError, Invalid, Upstream, _value,
                          format_addr, make_upstream_tls, parse_cluster_url, parse_url)
from proxy.schema import section_fields
from proxy.keyspace import escape_glob
from proxy.resp import encode_command

RESERVED = b"keyspace-proxy:migrate:"
SEQ = RESERVED + b"seq"                 # source db: chunk ids
INFLIGHT = RESERVED + b"inflight"       # source db: hash id -> what the chunk is; the chunk in INFLIGHT:<id>
APPLIED = RESERVED + b"applied:"        # target db: hash (per source) of chunk ids already added
COPIED = RESERVED + b"copied:"          # target db: hash (per source list) element -> times copied
COLLECTIONS = (b"list", b"zset", b"set", b"hash")
MAX_CHUNK = 1000                        # elements per script (Lua's unpack limit is ~8000 values)
# a cluster source's per-slot record and chunk counter (group 1: the scope)
SOURCE_JOURNAL = re.compile(rb"^(" + re.escape(RESERVED) + rb"\{\d+\}:)(seq|inflight)$")
WAIT_MS = 10_000                        # a cluster node's replicas: how long to wait for them
REDIRECT_WAIT = 120.0                   # a cluster slot in migration: how long to keep retrying


def is_cluster(up) -> bool:
    return isinstance(up, ClusterUpstream)


_TAGS: dict[int, bytes] = {}
_NEXT = [0]


def slot_tag(slot: int) -> bytes:
    """The smallest decimal number whose key slot is `slot`, found by counting up (all 16384
    within ~110000 numbers, ~0.3 s in all; a first lookup ~16000 on average)."""
    while slot not in _TAGS:
        tag = b"%d" % _NEXT[0]
        _TAGS.setdefault(key_slot(tag), tag)
        _NEXT[0] += 1
    return _TAGS[slot]


def scope_of(cluster: bool, key: bytes) -> bytes:
    """Where the journal keys that protect `key` live: `keyspace-proxy:migrate:` on one server,
    `keyspace-proxy:migrate:{T}:` on a cluster (T: a tag of `key`'s slot)."""
    return RESERVED + b"{" + slot_tag(key_slot(key)) + b"}:" if cluster else RESERVED


def probe(cluster: bool, key: bytes) -> list[bytes]:
    """The never-existing key a cluster script declares (see the module docstring)."""
    return [scope_of(True, key) + b"probe"] if cluster else []


def key_of(cmd: list[bytes]) -> bytes | None:
    """The key that routes a command migrate sends (its first key; EVAL: KEYS[1])."""
    if cmd[0].upper() in (b"EVAL", b"EVALSHA"):
        return cmd[3] if int(cmd[2]) > 0 else None
    return cmd[1] if len(cmd) > 1 else None


class MigrateError(Exception):
    """A failure to report on one line (it names the side and the address)."""


class Client:
    """A minimal blocking RESP2 client (hiredis parses, pack_command encodes)."""

    def __init__(self, up: Upstream, timeout: float = 30.0):
        self.up = up
        self.sock = up.open_socket(timeout)  # TLS for rediss://
        self.reader = hiredis.Reader()
        for args in up.handshake():
            self.check(self.call(*args))

    def pipeline(self, commands: list) -> list:
        if not commands:
            return []
        self.sock.sendall(b"".join(encode_command([a if isinstance(a, bytes) else str(a).encode()
                                                   for a in c]) for c in commands))
        out = []
        while len(out) < len(commands):
            r = self.reader.gets()
            if r is False:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError(f"{self.up.masked()} closed the connection")
                self.reader.feed(data)
                continue
            out.append(r)
        return out

    def call(self, *args):
        return self.pipeline([list(args)])[0]

    @staticmethod
    def check(reply):
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(str(reply))
        return reply

    def close(self) -> None:
        self.sock.close()



class Side:
    """A Client with the side it talks to (source or target), so that every error names both."""

    def __init__(self, up: Upstream, side: str):
        self.up, self.side = up, side
        try:
            self.client = Client(up)
        except OSError as e:
            raise MigrateError(f"cannot connect to the {side} {up.masked()}: {e.strerror or e}") from None
        except RuntimeError as e:
            raise MigrateError(f"the {side} {up.masked()} refused the connection set-up: {e}") from None

    def pipeline(self, commands: list) -> list:
        try:
            return self.client.pipeline(commands)
        except OSError as e:
            raise MigrateError(f"lost the connection to the {self.side} {self.up.masked()}: "
                               f"{e.strerror or e}") from None

    def call(self, *args):
        return self.pipeline([list(args)])[0]

    cluster = False
    redirects = 0

    def scan(self, state: bytes, pattern: bytes, count: int, kind: str | None = None):
        """One SCAN step: (next state, keys); the state starts and ends as b"0"."""
        cursor, keys = Client.check(self.call("SCAN", state, "MATCH", pattern, "COUNT", count,
                                              *(["TYPE", kind] if kind else [])))
        return cursor, keys

    def refresh(self) -> None:
        pass

    def signature(self):
        return None

    def replicated(self, key: bytes) -> None:
        """A cluster waits for its replicas here (ClusterSide); one server's failover is not
        migrate's to cover."""

    def close(self) -> None:
        self.client.close()


def _addr_text(addr: tuple[str, int]) -> bytes:
    return f"{addr[0]}:{addr[1]}".encode()


class ClusterSide:
    """A source or target that is a Redis Cluster: one blocking Client per node, commands
    routed by the slot of their key, redirections followed (see the module docstring)."""

    cluster = True

    def __init__(self, up: ClusterUpstream, side: str):
        self.up, self.side = up, side
        self.links: dict[tuple[str, int], Client] = {}
        self.map: SlotMap | None = None
        self.redirects = 0   # MOVED/ASK followed (a SCAN walk during which any were seen is redone)
        self.ran_at: dict[int, tuple[str, int]] = {}   # slot -> the node that answered its last command
        try:
            self.refresh()
        except MigrateError:
            self.close()
            raise

    def _where(self, addr) -> str:
        return f"the {self.side} {self.up.masked()} (node {format_addr(*addr)})"

    def _send(self, addr: tuple[str, int], commands: list) -> list:
        c = self.links.get(addr)
        try:
            if c is None:
                c = self.links[addr] = Client(Upstream(addr[0], addr[1], 0, self.up.username, self.up.password,
                                                       self.up.tls))
            return c.pipeline(commands)
        except OSError as e:
            self.links.pop(addr, None)
            raise MigrateError(f"lost or cannot open the connection to {self._where(addr)}: "
                               f"{e.strerror or e}") from None
        except RuntimeError as e:
            raise MigrateError(f"{self._where(addr)} refused the connection set-up: {e}") from None

    def _node_addr(self, node) -> tuple[str, int]:
        return node.host, node.port_for(self.up.tls is not None)

    def refresh(self) -> None:
        """The slot map, asked of the known primaries, then of the seeds."""
        seen, last = [], None
        known = [self._node_addr(n) for n in self.map.primaries()] if self.map else []
        for addr in known + list(self.up.seeds):
            if addr in seen:
                continue
            seen.append(addr)
            try:
                reply = self._send(addr, [["CLUSTER", "SHARDS"]])[0]
                if isinstance(reply, hiredis.ReplyError) and "unknown" in str(reply).lower():
                    m = SlotMap.from_slots(self._send(addr, [["CLUSTER", "SLOTS"]])[0], addr[0])
                else:
                    m = SlotMap.from_shards(reply, addr[0])
            except MigrateError as e:
                last = e
                continue
            except ValueError as e:
                raise MigrateError(f"{self._where(addr)} is not a usable cluster: {e}") from None
            if not m.primaries():
                last = MigrateError(f"{self._where(addr)} serves no slots")
                continue
            self.map = m
            return
        raise last or MigrateError(f"the {self.side} {self.up.masked()}: no seed answered")

    def replicated(self, key: bytes) -> None:
        """Wait until every online replica of the node serving `key` has what that node
        acknowledged (WAIT): a step of a move that a failover could undo (the chunk taken, added,
        dropped) is never followed by the next step before it would survive one. A replica
        that does not confirm within WAIT_MS stops the run (a rerun finishes it)."""
        slot = key_slot(key)
        addr = self.ran_at.get(slot) or self.owner(key)   # where the step ran (after an ASK: the importing node)
        shard = next((sh for sh in self.map.shards if sh.primary and self._node_addr(sh.primary) == addr),
                     self.map.shard(slot))
        n = sum(1 for r in shard.replicas if r.health == "online") if shard else 0
        if not n:
            return
        got = self._send(addr, [[b"WAIT", b"%d" % n, b"%d" % WAIT_MS]])[0]
        if isinstance(got, hiredis.ReplyError) or got < n:
            raise MigrateError(f"{self._where(addr)}: a step was confirmed by {got} of its {n} replica(s) within "
                               f"{WAIT_MS // 1000} s (WAIT); stopped so that a failover cannot undo it")

    def signature(self):
        return sorted((self._node_addr(sh.primary), sh.ranges) for sh in self.map.shards if sh.primary and sh.ranges)

    def node_ids(self) -> set[str]:
        return {n.id for n in self.map.nodes() if n.id}

    def owner(self, key: bytes) -> tuple[str, int]:
        slot = key_slot(key)
        node = self.map.primary(slot)
        if node is None:
            self.refresh()
            node = self.map.primary(slot)
            if node is None:
                raise MigrateError(f"the {self.side} {self.up.masked()}: slot {slot} is not served by any node")
        return self._node_addr(node)

    def pipeline(self, commands: list) -> list:
        commands = [[a if isinstance(a, bytes) else str(a).encode() for a in c] for c in commands]
        where = [self.owner(key_of(c)) for c in commands]
        out: list = [None] * len(commands)
        for addr in dict.fromkeys(where):
            idx = [i for i, a in enumerate(where) if a == addr]
            for i, r in zip(idx, self._send(addr, [commands[i] for i in idx])):
                out[i] = r
        for i, r in enumerate(out):
            if isinstance(r, hiredis.ReplyError):
                out[i] = self._redirected(commands[i], r, where[i])
            elif key_of(commands[i]) is not None:
                self.ran_at[key_slot(key_of(commands[i]))] = where[i]
        return out

    def _redirected(self, cmd: list, reply, addr):
        """Follow MOVED/ASK, wait out TRYAGAIN/CLUSTERDOWN (the command did not run), within
        REDIRECT_WAIT; any other reply is the answer."""
        deadline, pause, tries = time.monotonic() + REDIRECT_WAIT, 0.005, 0
        key = key_of(cmd)
        while isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            r = parse_redirect(text)
            if r is None and not text.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                return reply
            if time.monotonic() > deadline:
                raise MigrateError(f"the {self.side} {self.up.masked()}: {cmd[0].decode()} on slot {key_slot(key)} "
                                   f"still answered {text!r} after {REDIRECT_WAIT:.0f} s")
            if tries:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
            tries += 1
            if r is None:      # a slot in migration or a failover: ask the owner again
                addr = self.owner(key)
                reply = self._send(addr, [cmd])[0]
                continue
            self.redirects += 1
            to = r.address(addr[0], self.map)
            if r.kind == "MOVED":
                if to is None or self.owner(key) != to:
                    self.refresh()
                addr = to or self.owner(key)
                reply = self._send(addr, [cmd])[0]
            else:              # ASK: this one command, at the importing node, after ASKING
                addr = to or self.owner(key)
                reply = self._send(addr, [["ASKING"], cmd])[1]
        self.ran_at[key_slot(key)] = addr
        return reply

    def call(self, *args):
        return self.pipeline([list(args)])[0]

    def primaries(self) -> list[tuple[str, int]]:
        return sorted({self._node_addr(n) for n in self.map.primaries()})

    def scan(self, state: bytes, pattern: bytes, count: int, kind: str | None = None):
        """SCAN over every primary in turn: the state is `cursor@host:port` (b"0": start, end)."""
        nodes = self.primaries()
        cursor, _, at = state.partition(b"@")
        addr = nodes[0]
        if at:
            host, _, port = at.decode().rpartition(":")
            if (host, int(port)) in nodes:
                addr = (host, int(port))
            else:
                cursor = b"0"   # that node no longer serves slots: start over (only rescans)
        else:
            cursor = b"0"
        cmd = ["SCAN", cursor, "MATCH", pattern, "COUNT", count] + (["TYPE", kind] if kind else [])
        reply = self._send(addr, [[a if isinstance(a, bytes) else str(a).encode() for a in cmd]])[0]
        nxt, keys = Client.check(reply)
        if nxt != b"0":
            return nxt + b"@" + _addr_text(addr), keys
        i = nodes.index(addr) + 1
        return (b"0@" + _addr_text(nodes[i]) if i < len(nodes) else b"0"), keys

    def close(self) -> None:
        for c in self.links.values():
            c.close()
        self.links.clear()


def open_side(up, side: str):
    return ClusterSide(up, side) if is_cluster(up) else Side(up, side)


def server_id(up: Upstream) -> str:
    """The server, as the same across runs: a sentinel upstream is its master's name
    (with its first sentinel), whichever node is the primary now."""
    if up.sentinel is not None:
        return f"{up.sentinel.master}@{up.host}:{up.port}"
    return f"{up.host}:{up.port}"


def ident(up) -> bytes:
    """A side's name in the journal (copy journals and applied marks are per source)."""
    if is_cluster(up):  # the seeds as given, sorted: give the same seeds to a rerun
        return b"cluster:" + b",".join(sorted(_addr_text(a) for a in up.seeds))
    return f"{server_id(up)}/{up.db}".encode()


def same_place(a, b) -> bool:
    """Whether two URLs name the same server and db (clusters: a seed in common)."""
    if is_cluster(a) and is_cluster(b):
        return bool(set(a.seeds) & set(b.seeds))
    if is_cluster(a) or is_cluster(b):
        return False
    return ident(a) == ident(b)


# --- Lua ------------------------------------------------------------------------------------
# take(): remove up to n elements from a collection, returned flat (list: values; zset: member,
# score, ...; set: members; hash: field, value, ...). put(): add them to the target. For lists
# the copy journal C (element -> times already delivered by a copy) is consulted: a move drops
# an element a copy already delivered, a copy records what it adds.
LUA_LIB = """
local function take(src, t, n)
  local out = {}
  if t == 'list' then
    for i = 1, n do
      local v = redis.call('LPOP', src)
      if not v then break end
      out[#out + 1] = v
    end
  elseif t == 'zset' then
    out = redis.call('ZRANGE', src, 0, n - 1, 'WITHSCORES')
    for i = 1, #out, 2 do redis.call('ZREM', src, out[i]) end
  elseif t == 'set' then
    out = redis.call('SRANDMEMBER', src, n)
    if #out > 0 then redis.call('SREM', src, unpack(out)) end
  elseif t == 'hash' then
    out = redis.call('HRANDFIELD', src, n, 'WITHVALUES')
    for i = 1, #out, 2 do redis.call('HDEL', src, out[i]) end
  end
  return out
end
local function put(tgt, C, t, mode, ttl, items, first)
  local existed = redis.call('EXISTS', tgt)
  local added, dropped = 0, 0
  if t == 'list' then
    for i = first, #items do
      local v = items[i]
      local c = tonumber(redis.call('HGET', C, v) or '0')
      if mode == 'move' and c > 0 then
        if c == 1 then redis.call('HDEL', C, v) else redis.call('HINCRBY', C, v, -1) end
        dropped = dropped + 1
      else
        redis.call('RPUSH', tgt, v)
        added = added + 1
        if mode == 'copy' then redis.call('HINCRBY', C, v, 1) end
      end
    end
  elseif t == 'zset' or t == 'set' then
    local step = 1
    if t == 'zset' then step = 2 end
    for i = first, #items, step do
      local m = items[i]
      if redis.call('HEXISTS', C, m) == 1 then
        -- a copy delivered it already (it may have been consumed since): never again
        if mode == 'move' then redis.call('HDEL', C, m) end
        dropped = dropped + 1
      else
        if t == 'zset' then
          added = added + redis.call('ZADD', tgt, 'NX', items[i + 1], m)
        else
          added = added + redis.call('SADD', tgt, m)
        end
        if mode == 'copy' then redis.call('HSET', C, m, 1) end
      end
    end
  elseif t == 'hash' then
    for i = first, #items, 2 do added = added + redis.call('HSETNX', tgt, items[i], items[i + 1]) end
  end
  if existed == 0 and added > 0 and tonumber(ttl) > 0 then redis.call('PEXPIRE', tgt, ttl) end
  return {added, dropped}
end
local function count(t, items)
  if t == 'zset' or t == 'hash' then return #items / 2 end
  return #items
end
"""

# One server: take from the source db and put into the target db in one atomic script.
# KEYS: src, tgt, copy journal. ARGV: src db, dst db, type, n, ttl.
# Returns {taken, added, dropped, source left (0/1)}.
LUA_MOVE_LOCAL = LUA_LIB + """
local t = ARGV[3]
if ARGV[1] ~= ARGV[2] then redis.call('SELECT', ARGV[1]) end
local items = take(KEYS[1], t, tonumber(ARGV[4]))
local left = redis.call('EXISTS', KEYS[1])
if ARGV[1] ~= ARGV[2] then redis.call('SELECT', ARGV[2]) end
local r = put(KEYS[2], KEYS[3], t, 'move', ARGV[5], items, 1)
if left == 0 then redis.call('DEL', KEYS[3]) end
return {count(t, items), r[1], r[2], left}
"""

# Across servers, step 1 (source): take a chunk into an in-flight key, recorded in INFLIGHT.
# KEYS: src, seq, inflight hash. ARGV: type, n, in-flight key prefix, record (JSON, with
# "last" to fill in). Returns {id, source left, items} (id 0: nothing taken).
LUA_TAKE = LUA_LIB + """
local items = take(KEYS[1], ARGV[1], tonumber(ARGV[2]))
local left = redis.call('EXISTS', KEYS[1])
if #items == 0 then return {0, left, {}} end
local id = redis.call('INCR', KEYS[2])
redis.call('RPUSH', ARGV[3] .. id, unpack(items))
redis.call('HSET', KEYS[3], id, (string.gsub(ARGV[4], '"last": 0', '"last": ' .. (1 - left))))
return {id, left, items}
"""

# Step 2 (target), also a copy's only step: add the items unless this chunk id is already
# marked applied, and mark it, in one script. KEYS: tgt, copy journal, applied hash.
# ARGV: id ('' for a copy: no mark), type, mode, ttl, last (1: drop the copy journal), items...
LUA_PUT = LUA_LIB + """
if ARGV[1] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {-1, 0} end
local r = put(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV, 6)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], 1) end
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
return r
"""

# Step 3 (source): the chunk is in the target: forget it. KEYS: inflight hash. ARGV: id, prefix.
LUA_DONE = """
redis.call('DEL', ARGV[2] .. ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# End of a run (source): with no chunk in flight the chunk counter goes too, so a finished
# --move leaves no key of its own on the source server (a drained server is empty). Safe:
# every run first drops stale applied marks, so a chunk id used again is never taken for done.
LUA_TIDY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('DEL', KEYS[2]) end
return 0
"""

# Compare-and-delete: delete the source key only if it is still what was copied.
LUA_CAS_DEL = """
if redis.call('DUMP', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Summary:
    seen: int = 0
    copied: int = 0
    moved: int = 0
    merged: int = 0
    conflicts: list = field(default_factory=list)
    skipped: int = 0          # already in the target, unchanged
    elements: int = 0         # list elements / set and sorted-set members / hash fields added
    dropped: int = 0          # list elements a move dropped because a copy had delivered them
    recovered: int = 0        # in-flight chunks a rerun finished
    redirects: int = 0        # cluster MOVED/ASK redirections followed
    bytes: int = 0
    errors: list = field(default_factory=list)
    plan: list = field(default_factory=list)  # dry run: what would happen, per key
    dry_run: bool = False

    def lines(self) -> list[str]:
        if self.dry_run:
            out = [f"dry run: keys seen {self.seen}, would copy {self.copied}, would move {self.moved}, "
                   f"would merge {self.merged}, conflicts {len(self.conflicts)}, already there {self.skipped}"]
            out += [f"would {p}" for p in self.plan[:50]]
            if len(self.plan) > 50:
                out.append(f"... and {len(self.plan) - 50} more")
        else:
            out = [f"keys seen {self.seen}, copied {self.copied}, moved {self.moved}, merged {self.merged}, "
                   f"conflicts {len(self.conflicts)}, skipped {self.skipped}, elements {self.elements}, "
                   f"bytes {self.bytes}"]
            if self.dropped:
                out.append(f"{self.dropped} element(s) not added again: an earlier copy had delivered them")
            if self.recovered:
                out.append(f"{self.recovered} in-flight chunk(s) of an interrupted run finished")
            if self.redirects:
                out.append(f"cluster: {self.redirects} MOVED/ASK redirection(s) followed (slots moved during the run)")
        out += [f"conflict: {k} ({why})" for k, why in self.conflicts[:50]]
        out += [f"error: {e}" for e in self.errors[:50]]
        return out


def show(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


class Migration:
    def __init__(self, src: Upstream, dst: Upstream, src_ns: str, dst_ns: str, sep: str = ":",
                 match: str = "*", move: bool = False, overwrite: bool = False, dry_run: bool = False,
                 batch: int = 500, state: str | None = None, progress=None):
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.src_up, self.dst_up = src, dst
        self.src_prefix = (src_ns + sep).encode() if src_ns else b""
        self.dst_prefix = (dst_ns + sep).encode() if dst_ns else b""
        self.pattern = escape_glob(self.src_prefix) + match.encode()
        self.move, self.overwrite, self.dry_run = move, overwrite, dry_run
        self.batch, self.state, self.progress = batch, state, progress
        self.chunk = min(batch, MAX_CHUNK)
        self.src_cluster, self.dst_cluster = is_cluster(src), is_cluster(dst)
        self.src_db = 0 if self.src_cluster else src.db
        self.dst_db = 0 if self.dst_cluster else dst.db
        # one server: the atomic scripts; two clusters may turn out to be one (run() asks them)
        self.same_server = (not self.src_cluster and not self.dst_cluster
                            and server_id(src) == server_id(dst))
        self.src_id, self.dst_id = ident(src), ident(dst)
        self.scopes: set[bytes] = set()   # source journal scopes this run used (tidied at the end)
        self.summary = Summary(dry_run=dry_run)

    def target(self, key: bytes) -> bytes:
        return self.dst_prefix + key[len(self.src_prefix):]

    def local(self, key: bytes, tgt: bytes) -> bool:
        """Whether one script can see both names: one server, or one cluster and one slot."""
        return self.same_server and (not self.src_cluster or key_slot(key) == key_slot(tgt))

    def src_scope(self, key: bytes) -> bytes:
        return scope_of(self.src_cluster, key)

    def dst_scope(self, tgt: bytes) -> bytes:
        return scope_of(self.dst_cluster, tgt)

    def journal(self, key: bytes, tgt: bytes) -> bytes:
        """The copy journal of a source key, in the target db (in the target name's slot)."""
        return self.dst_scope(tgt) + b"copied:" + self.src_id + b":" + key

    def applied_for(self, tgt: bytes) -> bytes:
        """The applied marks of chunks from this source, beside the target name."""
        return self.dst_scope(tgt) + b"applied:" + self.src_id

    def qualified(self, scope: bytes, n: bytes) -> bytes:
        """A chunk's name in the applied marks: its id, after its source scope on a cluster
        (ids count per slot there)."""
        return n if scope == RESERVED else scope[len(RESERVED):] + n

    def open(self):
        src = open_side(self.src_up, "source")
        try:
            dst = open_side(self.dst_up, "target")
        except MigrateError:
            src.close()
            raise
        if src.cluster and dst.cluster:
            self.same_server = bool(src.node_ids() & dst.node_ids())
        return src, dst

    def run(self) -> Summary:
        src, dst = self.open()
        try:
            if not self.dry_run:
                self._recover(src, dst)
            cursor = self._load_cursor()
            for walk in range(3):
                # a cluster whose slots move during the walk may hide keys from it (moved from a
                # node not yet walked to one already walked): walk again, at most twice
                before, redirects = src.signature(), src.redirects
                while True:
                    cursor, keys = src.scan(cursor, self.pattern, self.batch)
                    self._batch(src, dst, [k for k in keys if not k.startswith(RESERVED)])
                    if cursor == b"0":
                        break
                    self._save_cursor(cursor)
                    if self.progress:
                        self.progress(self.summary)
                if not src.cluster:
                    break
                src.refresh()
                if src.signature() == before and src.redirects == redirects:
                    break
            self._save_cursor(None)
            if not self.dry_run:
                for scope in sorted(self.scopes | ({RESERVED} if not self.src_cluster else set())):
                    Client.check(src.call("EVAL", LUA_TIDY, 2 + self.src_cluster, scope + b"inflight",
                                          scope + b"seq", *self._probe(scope)))
        finally:
            self.summary.redirects = src.redirects + dst.redirects
            src.close()
            dst.close()
        return self.summary

    def _probe(self, scope: bytes) -> list[bytes]:
        return [scope + b"probe"] if scope != RESERVED else []

    # resumable: the SCAN cursor after each finished batch (correctness never depends on it:
    # every step is idempotent; it only saves rescanning)
    def _state_id(self) -> dict:
        return {"from": self.src_up.masked(), "to": self.dst_up.masked(), "match": self.pattern.decode("latin-1"),
                "to_prefix": self.dst_prefix.decode("latin-1")}

    def _load_cursor(self) -> bytes:
        if self.state and not self.dry_run and os.path.exists(self.state):
            saved = read_state(self.state)
            if {k: saved.get(k, v) for k, v in self._state_id().items()} != self._state_id():
                raise MigrateError(f"--state {self.state} belongs to another migration "
                                   f"({saved.get('from')} -> {saved.get('to')}); remove it or use another file")
            return saved["cursor"].encode()
        return b"0"

    def _save_cursor(self, cursor) -> None:
        if not self.state or self.dry_run:
            return
        if cursor is None:
            if os.path.exists(self.state):
                os.remove(self.state)
            return
        tmp = self.state + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(self._state_id(), cursor=cursor.decode()), f)
        os.replace(tmp, self.state)  # a kill never leaves half a file

    # --- chunks an interrupted cross-server move left in flight -----------------------------
    def inflight_hashes(self, src) -> list[bytes]:
        """The source's in-flight records: one hash on a server, one per slot on a cluster."""
        if not src.cluster:
            return [INFLIGHT]
        return [scope + b"inflight" for scope in self._source_scopes(src, with_seq=False)]

    def _source_scopes(self, src, with_seq: bool = True) -> list[bytes]:
        """Cluster source: the slot scopes holding an in-flight record (and a chunk counter)."""
        out, state = set(), b"0"
        while True:
            state, keys = src.scan(state, RESERVED + b"{*}:*", 1000)
            for k in keys:
                m = SOURCE_JOURNAL.match(k)
                if m and (with_seq or m.group(2) == b"inflight"):
                    out.add(m.group(1))
            if state == b"0":
                return sorted(out)

    def applied_hashes(self, dst) -> list[bytes]:
        if not dst.cluster:
            return [APPLIED + self.src_id]
        out, state = [], b"0"
        while True:
            state, keys = dst.scan(state, RESERVED + b"{*}:applied:" + escape_glob(self.src_id), 1000, "hash")
            out += keys
            if state == b"0":
                return sorted(set(out))

    def _recover(self, src, dst) -> None:
        if src.cluster:   # tidied at the end, also when a killed run left only a chunk counter
            self.scopes.update(self._source_scopes(src))
        live = set()   # chunks in flight toward other targets (their marks are not ours to drop)
        for h in self.inflight_hashes(src):
            scope = h[:-len(b"inflight")]
            records = Client.check(src.call("HGETALL", h))
            for n, raw in zip(records[0::2], records[1::2]):
                rec = json.loads(raw)
                if rec["to"] != self.dst_id.decode():
                    live.add(self.qualified(scope, n))
                    self.summary.errors.append(f"chunk {self.qualified(scope, n).decode()} is in flight toward "
                                               f"{rec['to']}: rerun that migration to finish it (the same --to; "
                                               f"for a cluster the same seed list)")
                    continue
                items = Client.check(src.call("LRANGE", scope + b"inflight:" + n, 0, -1))
                self._put_chunk(dst, self.qualified(scope, n), rec, items)
                self._done(src, dst, scope, n, rec["tgt"].encode("latin-1"))
                self.summary.recovered += 1
                if src.cluster:
                    self.scopes.add(scope)
        # marks of chunks already dropped from the source (a kill between the last two steps)
        for applied in self.applied_hashes(dst):
            stale = [m for m in Client.check(dst.call("HKEYS", applied)) if m not in live]
            if stale:
                Client.check(dst.call("HDEL", applied, *stale))

    def _done(self, src, dst, scope: bytes, n: bytes, tgt: bytes) -> None:
        """Step 3: the chunk is in the target: drop it from the source server, then its mark."""
        probe_keys = self._probe(scope)
        Client.check(src.call("EVAL", LUA_DONE, 1 + len(probe_keys), scope + b"inflight", *probe_keys,
                              n, scope + b"inflight:"))
        src.replicated(scope + b"inflight")   # the mark goes only once the drop would survive a failover
        Client.check(dst.call("HDEL", self.applied_for(tgt), self.qualified(scope, n)))

    def _put_chunk(self, dst, cid: bytes, rec: dict, items: list) -> None:
        tgt, kind = rec["tgt"].encode("latin-1"), rec["type"]
        keys = [tgt, rec["journal"].encode("latin-1"), self.applied_for(tgt)] + probe(self.dst_cluster, tgt)
        r = Client.check(dst.call("EVAL", LUA_PUT, len(keys), *keys,
                                  cid, kind, "move", rec["ttl"], rec["last"], *items))
        dst.replicated(tgt)   # added for good before the source drops the chunk
        if r[0] >= 0:
            self.summary.elements += r[0]
            self.summary.dropped += r[1]
            self.summary.bytes += sum(len(x) for x in items)

    # --- one SCAN batch ---------------------------------------------------------------------
    def _batch(self, src: Side, dst: Side, keys: list[bytes]) -> None:
        if not keys:
            return
        s = self.summary
        s.seen += len(keys)
        targets = [self.target(k) for k in keys]
        info = src.pipeline([c for k in keys for c in (["TYPE", k], ["PTTL", k])])
        there = dst.pipeline([c for k, t in zip(keys, targets)
                              for c in (["TYPE", t], ["EXISTS", self.journal(k, t)])])
        for i, (key, tgt) in enumerate(zip(keys, targets)):
            kind, ttl, tkind, journaled = info[2 * i], info[2 * i + 1], there[2 * i], there[2 * i + 1]
            if kind == b"none":
                continue  # gone meanwhile (a live source)
            ttl = ttl if isinstance(ttl, int) and ttl > 0 else 0
            name = show(key)
            try:
                if tkind != b"none" and kind != tkind:
                    s.conflicts.append((name, f"source is a {kind.decode()}, target a {tkind.decode()}"))
                elif self.dry_run:
                    self._plan(src, dst, key, tgt, kind, tkind, journaled)
                elif kind in COLLECTIONS:
                    self._collection(src, dst, key, tgt, kind, ttl, tkind != b"none", journaled)
                else:
                    self._whole(src, dst, key, tgt, kind, ttl, tkind != b"none")
            except RuntimeError as e:
                s.errors.append(f"{name}: {e}")

    def _plan(self, src, dst, key, tgt, kind, tkind, journaled) -> None:
        s, k = self.summary, kind.decode()
        verb = "move" if self.move else "copy"
        arrow = f"{show(key)} -> {show(tgt)}"
        if kind in COLLECTIONS:
            size = Client.check(src.call({b"list": "LLEN", b"zset": "ZCARD", b"set": "SCARD",
                                          b"hash": "HLEN"}[kind], key))
            what = {b"list": "element(s)", b"zset": "member(s)", b"set": "member(s)", b"hash": "field(s)"}[kind]
            if journaled and kind != b"hash":
                copied = sum(int(c) for c in Client.check(dst.call("HVALS", self.journal(key, tgt))))
                what += f", {copied} delivered by an earlier copy and not added again"
            if tkind != b"none":
                s.merged += 1
                s.plan.append(f"merge ({verb}) {k} {arrow}: {size} {what}")
            else:
                s.moved += self.move
                s.copied += not self.move
                s.plan.append(f"{verb} {k} {arrow}: {size} {what}")
            return
        if tkind == b"none":
            s.moved += self.move
            s.copied += not self.move
            s.plan.append(f"{verb} {k} {arrow}")
        elif self._same_value(src, dst, key, tgt, kind):
            s.skipped += 1
            s.plan.append(f"skip {k} {arrow}: already there" + (" (delete the source)" if self.move else ""))
        elif self.overwrite:
            s.moved += self.move
            s.copied += not self.move
            s.plan.append(f"{verb} {k} {arrow}, replacing the target")
        else:
            s.conflicts.append((show(key), f"target {k} exists (use --overwrite)"))

    # --- lists, sorted sets, sets, hashes: element by element --------------------------------
    def _collection(self, src, dst, key, tgt, kind, ttl, exists, journaled) -> None:
        s = self.summary
        if self.move and self.local(key, tgt) and not exists and not journaled:
            # one atomic step when the server allows it (TTL kept)
            if self.src_db == self.dst_db:
                if Client.check(src.call("RENAMENX", key, tgt)) == 1:
                    s.moved += 1
                    return
            elif key == tgt:
                if Client.check(src.call("MOVE", key, self.dst_db)) == 1:
                    s.moved += 1
                    return
        if not self.move:
            self._copy_collection(src, dst, key, tgt, kind, ttl)
        elif self.local(key, tgt):
            self._move_local(src, key, tgt, kind, ttl)
        else:
            self._move_remote(src, dst, key, tgt, kind, ttl)
        if exists:
            s.merged += 1
        elif self.move:
            s.moved += 1
        else:
            s.copied += 1

    def _budget(self, src, key, kind) -> int:
        """Chunks to take from a key at most: a producer still pushing to the source must not
        keep one run going forever (what arrives later is for the next run)."""
        size = Client.check(src.call({b"list": "LLEN", b"zset": "ZCARD", b"set": "SCARD", b"hash": "HLEN"}[kind], key))
        return size // self.chunk + 2

    def _move_local(self, src, key, tgt, kind, ttl) -> None:
        s = self.summary
        keys = [key, tgt, self.journal(key, tgt)] + probe(self.src_cluster, key)
        for _ in range(self._budget(src, key, kind)):
            taken, added, dropped, left = Client.check(src.call(
                "EVAL", LUA_MOVE_LOCAL, len(keys), *keys, self.src_db, self.dst_db, kind, self.chunk, ttl))
            s.elements += added
            s.dropped += dropped
            if not left or not taken:
                return

    def _move_remote(self, src, dst, key, tgt, kind, ttl) -> None:
        journal = self.journal(key, tgt)
        rec = json.dumps({"to": self.dst_id.decode(), "tgt": tgt.decode("latin-1"), "type": kind.decode(),
                          "journal": journal.decode("latin-1"), "ttl": ttl, "last": 0})
        scope = self.src_scope(key)
        if self.src_cluster:
            self.scopes.add(scope)
        keys = [key, scope + b"seq", scope + b"inflight"] + self._probe(scope)
        for _ in range(self._budget(src, key, kind)):
            n, left, items = Client.check(src.call("EVAL", LUA_TAKE, len(keys), *keys, kind, self.chunk,
                                                   scope + b"inflight:", rec))
            if not n:
                return
            src.replicated(key)   # taken for good before the target gets the chunk
            n = str(n).encode()
            self._put_chunk(dst, self.qualified(scope, n), dict(json.loads(rec), last=1 - left), items)
            self._done(src, dst, scope, n, tgt)
            if not left:
                return

    def _copy_collection(self, src, dst, key, tgt, kind, ttl) -> None:
        s = self.summary
        if kind == b"list":
            items = Client.check(src.call("LRANGE", key, 0, -1))
            done = Client.check(dst.call("HGETALL", self.journal(key, tgt)))
            have = Counter({e: int(c) for e, c in zip(done[0::2], done[1::2])})
            new = []
            for e in items:  # the source minus what earlier copies delivered, in order
                if have[e] > 0:
                    have[e] -= 1
                else:
                    new.append(e)
            items, step = new, self.chunk
        else:
            read = {b"zset": ("ZRANGE", key, 0, -1, "WITHSCORES"), b"set": ("SMEMBERS", key),
                    b"hash": ("HGETALL", key)}[kind]
            items = Client.check(src.call(*read))
            step = self.chunk * (2 if kind in (b"zset", b"hash") else 1)
        for i in range(0, len(items), step):
            part = items[i:i + step]
            keys = [tgt, self.journal(key, tgt), self.applied_for(tgt)] + probe(self.dst_cluster, tgt)
            added, _ = Client.check(dst.call("EVAL", LUA_PUT, len(keys), *keys, "", kind, "copy", ttl, 0, *part))
            s.elements += added
            s.bytes += sum(len(x) for x in part)

    # --- strings and other types: whole keys ------------------------------------------------
    def _same_value(self, src, dst, key, tgt, kind) -> bool:
        if kind == b"string":
            return src.call("GET", key) == dst.call("GET", tgt)
        return src.call("DUMP", key) == dst.call("DUMP", tgt)

    def _whole(self, src, dst, key, tgt, kind, ttl, exists) -> None:
        s = self.summary
        if self.move and self.local(key, tgt) and not exists:
            if self.src_db == self.dst_db:
                if Client.check(src.call("RENAMENX", key, tgt)) == 1:
                    s.moved += 1
                    return
            elif key == tgt:
                if Client.check(src.call("MOVE", key, self.dst_db)) == 1:
                    s.moved += 1
                    return
        payload = Client.check(src.call("DUMP", key))
        if payload is None:
            return  # deleted meanwhile
        replace = False
        if exists:
            if self._same_value(src, dst, key, tgt, kind):
                s.skipped += 1
                return self._delete_if_unchanged(src, key, payload, counted=True)
            if not self.overwrite:
                s.conflicts.append((show(key), f"target {kind.decode()} exists (use --overwrite)"))
                return
            replace = True
        reply = dst.call("RESTORE", tgt, ttl, payload, *(["REPLACE"] if replace else []))
        if isinstance(reply, hiredis.ReplyError) and "BUSYKEY" in str(reply):
            # created by a live client since we looked
            return self._whole(src, dst, key, tgt, kind, ttl, True)
        Client.check(reply)
        s.bytes += len(payload)
        if self.move:
            dst.replicated(tgt)
            self._delete_if_unchanged(src, key, payload)
        else:
            s.copied += 1

    def _delete_if_unchanged(self, src, key, payload, counted=False) -> None:
        if not self.move:
            return
        keys = [key] + probe(self.src_cluster, key)
        if Client.check(src.call("EVAL", LUA_CAS_DEL, len(keys), *keys, payload)) == 1:
            if not counted:
                self.summary.moved += 1
        else:
            self.summary.errors.append(f"{show(key)}: changed in the source while being moved; left there "
                                       f"(rerun to move it)")


def read_state(path: str) -> dict:
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or not isinstance(saved.get("cursor"), str):
            raise ValueError("no cursor")
        return saved
    except (OSError, ValueError) as e:
        raise MigrateError(f"--state {path}: not a state file of migrate ({e})") from None


# --- verify ---------------------------------------------------------------------------------
def _multiset(c: Side, key: bytes, kind: bytes) -> Counter:
    if kind == b"list":
        return Counter(Client.check(c.call("LRANGE", key, 0, -1)))
    if kind in (b"set", b"zset", b"hash"):
        read = {b"set": ("SMEMBERS",), b"zset": ("ZRANGE", 0, -1), b"hash": ("HKEYS",)}[kind]
        return Counter(Client.check(c.call(read[0], key, *read[1:])))
    return Counter()


def _compare(name: str, s: Counter, t: Counter, kind: bytes, delivered: Counter = Counter()) -> str | None:
    """Losses: elements fewer times in the target than in the source, not counting what the copy
    journal says a copy delivered (a consumer on the target may have taken it since).
    Duplicates (lists): elements more times in the target than in the source, or more than once
    when the source does not have them. Elements only the target has are the live side's."""
    missing = {e: n - max(t[e], delivered[e]) for e, n in s.items() if n > max(t[e], delivered[e])}
    lost = sum(missing.values())
    dup = sum(max(0, n - max(s[e], 1)) for e, n in t.items()) if kind == b"list" else 0
    if not lost and not dup:
        return None
    what = {b"list": "element", b"zset": "member", b"set": "member", b"hash": "field"}[kind]
    parts = []
    if dup:
        parts.append(f"{dup} duplicate {what}(s) in the target")
    if lost:
        parts.append(f"{lost} {what}(s) of the source missing in the target")
    example = next(e for e, n in t.items() if n > max(s[e], 1)) if dup else next(iter(missing))
    return f"{name}: " + ", ".join(parts) + f" (e.g. {example[:60]!r})"


def verify(src: Upstream, dst: Upstream, src_ns: str, dst_ns: str, sep=":", match="*", moved=False) -> list[str]:
    """Differences between the two keyspaces, per key, comparing multisets. After a copy every
    source key must be in its target: strings equal, every source element as many times as in
    the source (fewer: losses), list elements no more often (more: duplicates). After a move no
    source key and no chunk in flight may remain, and no target list may hold an element twice."""
    m = Migration(src, dst, src_ns, dst_ns, sep, match)
    a, b = m.open()
    problems = []
    try:
        inflight = sum(Client.check(a.call("HLEN", h)) for h in m.inflight_hashes(a))
        if inflight:
            problems.append(f"{inflight} chunk(s) still in flight on the source (rerun migrate to finish them)")
        cursor = b"0"
        while True:
            cursor, keys = a.scan(cursor, m.pattern, 500)
            for key in keys:
                if key.startswith(RESERVED):
                    continue
                name = show(key)
                if moved:
                    problems.append(f"{name}: still in the source after --move")
                    continue
                tgt = m.target(key)
                kind, tkind = a.call("TYPE", key), b.call("TYPE", tgt)
                if kind == b"none":
                    continue
                if kind != tkind:
                    problems.append(f"{name}: {kind.decode()} in the source, {tkind.decode()} in the target")
                elif kind == b"string":
                    if a.call("GET", key) != b.call("GET", tgt):
                        problems.append(f"{name}: values differ")
                elif kind in COLLECTIONS:
                    done = Client.check(b.call("HGETALL", m.journal(key, tgt))) if kind != b"hash" else []
                    delivered = Counter({e: int(n) for e, n in zip(done[0::2], done[1::2])})
                    p = _compare(name, _multiset(a, key, kind), _multiset(b, tgt, kind), kind, delivered)
                    if p:
                        problems.append(p)
                elif a.call("DUMP", key) != b.call("DUMP", tgt):
                    problems.append(f"{name}: values differ")
            if cursor == b"0":
                break
        if moved:  # the source is gone: what can still be seen is a list element held twice
            pattern = escape_glob(m.dst_prefix) + match.encode()
            cursor = b"0"
            while True:
                cursor, keys = b.scan(cursor, pattern, 500, "list")
                for tgt in keys:
                    if not tgt.startswith(RESERVED):
                        p = _compare(show(tgt), Counter(), _multiset(b, tgt, b"list"), b"list")
                        if p:
                            problems.append(p)
                if cursor == b"0":
                    break
        return problems
    finally:
        a.close()
        b.close()


# --- command line ---------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, before anything connects
        print(f"keyspace-proxy migrate: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def check_state_path(path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--state {path}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"--state {path}: folder {folder} is not writable"
    if os.path.isdir(path):
        return f"--state {path} is a folder"
    if os.path.exists(path):
        try:
            read_state(path)
        except MigrateError as e:
            return str(e)
    return None


def parse_side(url: str, flag: str):
    """--from / --to: a redis:// or rediss:// URL, or a cluster's seeds (redis+cluster://,
    rediss+cluster://, db 0 only), which migrate accepts although the proxy does not yet."""
    if url.partition("://")[0] in CLUSTER_SCHEMES:
        try:
            return parse_cluster_url(url)
        except Invalid as e:
            raise ConfigError(f"{flag}: {e}") from None
    return parse_url(url, flag)


def _with_tls(up, side: str, a, tls_fields: dict):
    """`up` with the --from-tls-* / --to-tls-* settings (the proxy's [upstream_tls] fields,
    checked the same way; unreadable files are refused before anything is read or moved)."""
    vals = {}
    for name in tls_fields:
        raw = getattr(a, f"{side}_tls_{name}")
        if raw is not None:
            label = f"--{side}-tls-{name.replace('_', '-')}"
            vals[name] = (_value(f"upstream_tls.{name}", raw, label, True), label)
    if up.tls is None:
        if vals:
            first = next(iter(vals.values()))[1]
            raise ConfigError(f"{first}: the {'source' if side == 'from' else 'target'} is {up.masked()}, "
                              f"plain TCP; write {'rediss+cluster' if is_cluster(up) else 'rediss'}:// to "
                              "connect with TLS")
        return up
    tls = make_upstream_tls(vals)
    if not tls.verify:
        print(f"keyspace-proxy migrate: warning: TLS certificate verification is off for the "
              f"{'source' if side == 'from' else 'target'} (--{side}-tls-verify false)", file=sys.stderr)
    return replace(up, tls=tls)


def _sentinel_auth(up: Upstream) -> Upstream:
    """A redis+sentinel:// side: the sentinels' credentials from PROXY_SENTINEL_USERNAME /
    PROXY_SENTINEL_PASSWORD, as the proxy reads them (the URL's are the data nodes')."""
    user, password = os.environ.get("PROXY_SENTINEL_USERNAME"), os.environ.get("PROXY_SENTINEL_PASSWORD")
    if is_cluster(up) or up.sentinel is None or not password:
        return up
    return replace(up, sentinel=replace(up.sentinel, username=user or None, password=password))


def main(argv: list[str]) -> int:
    p = Parser(prog="keyspace-proxy migrate",
               description="Copy or move the keys of one keyspace (URL + db + namespace) into another, each "
                           "list element and set member exactly once; collections are merged, never overwritten; "
                           "reruns never duplicate.")
    p.add_argument("--from", dest="src", required=True, metavar="URL",
                   help="source redis://host:port/db, or a cluster: redis+cluster://host:port[,host:port...]")
    p.add_argument("--from-namespace", default="", metavar="NS", help="source namespace (keys NS:...)")
    p.add_argument("--to", dest="dst", required=True, metavar="URL",
                   help="target redis://host:port/db, or a cluster: redis+cluster://host:port[,host:port...]")
    p.add_argument("--to-namespace", default="", metavar="NS", help="target namespace (empty: none)")
    p.add_argument("--separator", default=":")
    p.add_argument("--match", default="*", help="glob over the key names inside the source namespace")
    p.add_argument("--move", action="store_true", help="take each element out of the source as it goes into "
                                                       "the target")
    p.add_argument("--overwrite", action="store_true", help="replace strings and other non-mergeable types")
    p.add_argument("--dry-run", action="store_true", help="change nothing; report what would be copied, moved "
                                                          "and merged (with --verify: compare the sides as they are)")
    p.add_argument("--verify", action="store_true", help="afterwards compare both sides and report duplicates "
                                                         "and losses per key")
    p.add_argument("--batch", type=int, default=500, metavar="N",
                   help="SCAN COUNT, and elements per atomic step (at most 1000) (default 500)")
    p.add_argument("--state", metavar="FILE", help="resume file: the SCAN cursor after each batch "
                                                   "(an interrupted run resumes from it)")
    tls_fields = section_fields("upstream_tls")
    for side, url in (("from", "--from"), ("to", "--to")):
        for name, f in tls_fields.items():
            p.add_argument(f"--{side}-tls-{name.replace('_', '-')}", dest=f"{side}_tls_{name}", metavar=f.metavar,
                           help=f"{f.help.replace('rediss:// upstreams: ', '').replace('rediss://: ', '')} "
                                f"(for a rediss:// {url})".replace("%", "%%"))
    a = p.parse_args(argv)

    def refuse(msg: str) -> int:
        print(f"keyspace-proxy migrate: {msg}", file=sys.stderr)
        return 2

    if a.batch < 1:
        return refuse(f"--batch must be a positive number, got {a.batch}")
    if not a.match:
        return refuse("--match must not be empty (use '*' for every key)")
    if not a.separator and (a.from_namespace or a.to_namespace):
        return refuse("--separator must not be empty with a namespace")
    try:
        src, dst = parse_side(a.src, "--from"), parse_side(a.dst, "--to")
        src, dst = _sentinel_auth(src), _sentinel_auth(dst)
        src, dst = (_with_tls(up, side, a, tls_fields) for up, side in ((src, "from"), (dst, "to")))
    except ConfigError as e:
        return refuse(str(e))
    if same_place(src, dst) and a.from_namespace == a.to_namespace:
        return refuse("source and target are the same keyspace")
    if a.state and not a.dry_run:
        problem = check_state_path(a.state)
        if problem:
            return refuse(problem)
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def progress(s: Summary) -> None:
        if tty:
            print(f"\r{s.seen} keys seen, {s.copied + s.moved} copied/moved, {s.merged} merged, "
                  f"{len(s.conflicts)} conflicts, {time.monotonic() - started:.0f}s", end="", file=sys.stderr)

    resume = " (rerun with the same --state to resume)" if a.state and not a.dry_run else \
        ("" if a.dry_run else " (a rerun finishes the job: nothing is duplicated)")
    m = Migration(src, dst, a.from_namespace, a.to_namespace, a.separator, a.match, a.move, a.overwrite,
                  a.dry_run, a.batch, a.state, progress)
    try:
        summary = m.run()
    except (MigrateError, RuntimeError) as e:
        print(("\n" if tty else "") + f"keyspace-proxy migrate: {e}{resume}", file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    print("\n".join(summary.lines()))
    code = 1 if summary.errors else 0
    if a.verify:
        try:
            problems = verify(src, dst, a.from_namespace, a.to_namespace, a.separator, a.match,
                              a.move and not a.dry_run)
        except (MigrateError, RuntimeError) as e:
            print(f"keyspace-proxy migrate: verify: {e}", file=sys.stderr)
            return 1
        note = " (dry run: the sides as they are now, nothing was changed)" if a.dry_run else ""
        print(f"verify: {len(problems)} difference(s){note}")
        for line in problems[:50]:
            print(f"verify: {line}")
        if len(problems) > 50:
            print(f"verify: ... and {len(problems) - 50} more")
        if problems:
            code = 1
    return code
