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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import hiredis

from proxy.config import ConfigError, Upstream, _value, make_upstream_tls, parse_url
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

    def close(self) -> None:
        self.client.close()


def ident(up: Upstream) -> bytes:
    return f"{up.host}:{up.port}/{up.db}".encode()


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
        self.same_server = (src.host, src.port) == (dst.host, dst.port)
        self.src_id, self.dst_id = ident(src), ident(dst)
        self.applied = APPLIED + self.src_id
        self.summary = Summary(dry_run=dry_run)

    def target(self, key: bytes) -> bytes:
        return self.dst_prefix + key[len(self.src_prefix):]

    def journal(self, key: bytes) -> bytes:
        """The copy journal of a source list, in the target db."""
        return COPIED + self.src_id + b":" + key

    def run(self) -> Summary:
        src = Side(self.src_up, "source")
        try:
            dst = Side(self.dst_up, "target")
        except MigrateError:
            src.close()
            raise
        try:
            if not self.dry_run:
                self._recover(src, dst)
            cursor = self._load_cursor()
            while True:
                cursor, keys = Client.check(src.call("SCAN", cursor, "MATCH", self.pattern, "COUNT", self.batch))
                self._batch(src, dst, [k for k in keys if not k.startswith(RESERVED)])
                if cursor == b"0":
                    break
                self._save_cursor(cursor)
                if self.progress:
                    self.progress(self.summary)
            self._save_cursor(None)
            if not self.dry_run:
                Client.check(src.call("EVAL", LUA_TIDY, 2, INFLIGHT, SEQ))
        finally:
            src.close()
            dst.close()
        return self.summary

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
    def _recover(self, src: Side, dst: Side) -> None:
        records = Client.check(src.call("HGETALL", INFLIGHT))
        mine = []
        for cid, raw in zip(records[0::2], records[1::2]):
            rec = json.loads(raw)
            if rec["to"] == self.dst_id.decode():
                mine.append((cid, rec))
            else:
                self.summary.errors.append(f"chunk {cid.decode()} is in flight toward {rec['to']}: "
                                           f"rerun that migration to finish it")
        for cid, rec in mine:
            items = Client.check(src.call("LRANGE", INFLIGHT + b":" + cid, 0, -1))
            self._put_chunk(dst, cid, rec, items)
            self._done(src, dst, cid)
            self.summary.recovered += 1
        # marks of chunks already dropped from the source (a kill between the last two steps)
        marks = Client.check(dst.call("HKEYS", self.applied))
        if marks:
            live = set(Client.check(src.call("HKEYS", INFLIGHT)))
            stale = [m for m in marks if m not in live]
            if stale:
                Client.check(dst.call("HDEL", self.applied, *stale))

    def _done(self, src: Side, dst: Side, cid: bytes) -> None:
        """Step 3: the chunk is in the target: drop it from the source server, then its mark."""
        Client.check(src.call("EVAL", LUA_DONE, 1, INFLIGHT, cid, INFLIGHT + b":"))
        Client.check(dst.call("HDEL", self.applied, cid))

    def _put_chunk(self, dst: Side, cid: bytes, rec: dict, items: list) -> None:
        tgt, kind = rec["tgt"].encode("latin-1"), rec["type"]
        r = Client.check(dst.call("EVAL", LUA_PUT, 3, tgt, rec["journal"].encode("latin-1"), self.applied,
                                  cid, kind, "move", rec["ttl"], rec["last"], *items))
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
        there = dst.pipeline([c for k, t in zip(keys, targets) for c in (["TYPE", t], ["EXISTS", self.journal(k)])])
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
                copied = sum(int(c) for c in Client.check(dst.call("HVALS", self.journal(key))))
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
        if self.move and self.same_server and not exists and not journaled:
            # one atomic step when the server allows it (TTL kept)
            if self.src_up.db == self.dst_up.db:
                if Client.check(src.call("RENAMENX", key, tgt)) == 1:
                    s.moved += 1
                    return
            elif key == tgt:
                if Client.check(src.call("MOVE", key, self.dst_up.db)) == 1:
                    s.moved += 1
                    return
        if not self.move:
            self._copy_collection(src, dst, key, tgt, kind, ttl)
        elif self.same_server:
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
        for _ in range(self._budget(src, key, kind)):
            taken, added, dropped, left = Client.check(src.call(
                "EVAL", LUA_MOVE_LOCAL, 3, key, tgt, self.journal(key), self.src_up.db, self.dst_up.db,
                kind, self.chunk, ttl))
            s.elements += added
            s.dropped += dropped
            if not left or not taken:
                return

    def _move_remote(self, src, dst, key, tgt, kind, ttl) -> None:
        journal = self.journal(key)
        rec = json.dumps({"to": self.dst_id.decode(), "tgt": tgt.decode("latin-1"), "type": kind.decode(),
                          "journal": journal.decode("latin-1"), "ttl": ttl, "last": 0})
        for _ in range(self._budget(src, key, kind)):
            cid, left, items = Client.check(src.call("EVAL", LUA_TAKE, 3, key, SEQ, INFLIGHT, kind, self.chunk,
                                                     INFLIGHT + b":", rec))
            if not cid:
                return
            cid = str(cid).encode()
            self._put_chunk(dst, cid, dict(json.loads(rec), last=1 - left), items)
            self._done(src, dst, cid)
            if not left:
                return

    def _copy_collection(self, src, dst, key, tgt, kind, ttl) -> None:
        s = self.summary
        if kind == b"list":
            items = Client.check(src.call("LRANGE", key, 0, -1))
            done = Client.check(dst.call("HGETALL", self.journal(key)))
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
            added, _ = Client.check(dst.call("EVAL", LUA_PUT, 3, tgt, self.journal(key), self.applied,
                                             "", kind, "copy", ttl, 0, *part))
            s.elements += added
            s.bytes += sum(len(x) for x in part)

    # --- strings and other types: whole keys ------------------------------------------------
    def _same_value(self, src, dst, key, tgt, kind) -> bool:
        if kind == b"string":
            return src.call("GET", key) == dst.call("GET", tgt)
        return src.call("DUMP", key) == dst.call("DUMP", tgt)

    def _whole(self, src, dst, key, tgt, kind, ttl, exists) -> None:
        s = self.summary
        if self.move and self.same_server and not exists:
            if self.src_up.db == self.dst_up.db:
                if Client.check(src.call("RENAMENX", key, tgt)) == 1:
                    s.moved += 1
                    return
            elif key == tgt:
                if Client.check(src.call("MOVE", key, self.dst_up.db)) == 1:
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
            self._delete_if_unchanged(src, key, payload)
        else:
            s.copied += 1

    def _delete_if_unchanged(self, src, key, payload, counted=False) -> None:
        if not self.move:
            return
        if Client.check(src.call("EVAL", LUA_CAS_DEL, 1, key, payload)) == 1:
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
    a, b = Side(src, "source"), Side(dst, "target")
    problems = []
    try:
        inflight = Client.check(a.call("HLEN", INFLIGHT))
        if inflight:
            problems.append(f"{inflight} chunk(s) still in flight on the source (rerun migrate to finish them)")
        cursor = b"0"
        while True:
            cursor, keys = Client.check(a.call("SCAN", cursor, "MATCH", m.pattern, "COUNT", 500))
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
                    done = Client.check(b.call("HGETALL", m.journal(key))) if kind != b"hash" else []
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
                cursor, keys = Client.check(b.call("SCAN", cursor, "MATCH", pattern, "COUNT", 500, "TYPE", "list"))
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


def _with_tls(up: Upstream, side: str, a, tls_fields: dict) -> Upstream:
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
                              "plain TCP; write rediss:// to connect with TLS")
        return up
    tls = make_upstream_tls(vals)
    if not tls.verify:
        print(f"keyspace-proxy migrate: warning: TLS certificate verification is off for the "
              f"{'source' if side == 'from' else 'target'} (--{side}-tls-verify false)", file=sys.stderr)
    return replace(up, tls=tls)


def main(argv: list[str]) -> int:
    p = Parser(prog="keyspace-proxy migrate",
               description="Copy or move the keys of one keyspace (URL + db + namespace) into another, each "
                           "list element and set member exactly once; collections are merged, never overwritten; "
                           "reruns never duplicate.")
    p.add_argument("--from", dest="src", required=True, metavar="URL", help="source redis://host:port/db")
    p.add_argument("--from-namespace", default="", metavar="NS", help="source namespace (keys NS:...)")
    p.add_argument("--to", dest="dst", required=True, metavar="URL", help="target redis://host:port/db")
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
        src, dst = parse_url(a.src, "--from"), parse_url(a.dst, "--to")
        src, dst = (_with_tls(up, side, a, tls_fields) for up, side in ((src, "from"), (dst, "to")))
    except ConfigError as e:
        return refuse(str(e))
    if (src.host, src.port, src.db) == (dst.host, dst.port, dst.db) and a.from_namespace == a.to_namespace:
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
