"""`keyspace-proxy migrate`: copy or move the keys of one keyspace into another.

A keyspace is an upstream URL (host, port, db) plus an optional namespace. Keys
are walked with SCAN in batches and pipelined. A key the target lacks is copied
with DUMP/RESTORE (its TTL kept), or moved with RENAME / MOVE when source and
target share a server and the rules allow. A key the target already has (the
live case: new clients already write there) is merged, never overwritten:
sorted sets by ZADD NX of each member with its score, sets by SADD, hashes by
HSETNX field by field, lists appended in order; strings and other types are
conflicts, left alone unless --overwrite. Safe to run while both sides are live.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field

import hiredis

from proxy.config import ConfigError, Upstream, parse_url
from proxy.keyspace import escape_glob
from proxy.resp import encode_command


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


@dataclass
class Summary:
    seen: int = 0
    copied: int = 0
    moved: int = 0
    merged: int = 0
    conflicts: list = field(default_factory=list)
    skipped: int = 0
    bytes: int = 0
    errors: list = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"keys seen {self.seen}, copied {self.copied}, moved {self.moved}, merged {self.merged}, "
               f"conflicts {len(self.conflicts)}, skipped {self.skipped}, bytes {self.bytes}"]
        out += [f"conflict: {k} ({why})" for k, why in self.conflicts[:50]]
        out += [f"error: {e}" for e in self.errors[:50]]
        return out


class Migration:
    def __init__(self, src: Upstream, dst: Upstream, src_ns: str, dst_ns: str, sep: str = ":",
                 match: str = "*", move: bool = False, overwrite: bool = False, dry_run: bool = False,
                 batch: int = 500, state: str | None = None, progress=None):
        self.src_up, self.dst_up = src, dst
        self.src_prefix = (src_ns + sep).encode() if src_ns else b""
        self.dst_prefix = (dst_ns + sep).encode() if dst_ns else b""
        self.pattern = escape_glob(self.src_prefix) + match.encode()
        self.move, self.overwrite, self.dry_run = move, overwrite, dry_run
        self.batch, self.state, self.progress = batch, state, progress
        self.same_server = (src.host, src.port) == (dst.host, dst.port)
        self.summary = Summary()

    def target(self, key: bytes) -> bytes:
        return self.dst_prefix + key[len(self.src_prefix):]

    def run(self) -> Summary:
        src, dst = Client(self.src_up), Client(self.dst_up)
        try:
            cursor = self._load_cursor()
            while True:
                cursor, keys = src.call("SCAN", cursor, "MATCH", self.pattern, "COUNT", self.batch)
                self._batch(src, dst, keys)
                if cursor == b"0":
                    break
                self._save_cursor(cursor)
                if self.progress:
                    self.progress(self.summary)
            self._save_cursor(None)
        finally:
            src.close()
            dst.close()
        return self.summary

    # resumable: the SCAN cursor after each finished batch
    def _load_cursor(self) -> bytes:
        if self.state and os.path.exists(self.state):
            with open(self.state) as f:
                return json.load(f)["cursor"].encode()
        return b"0"

    def _save_cursor(self, cursor) -> None:
        if not self.state or self.dry_run:
            return
        if cursor is None:
            if os.path.exists(self.state):
                os.remove(self.state)
            return
        with open(self.state, "w") as f:
            json.dump({"cursor": cursor.decode()}, f)

    def _batch(self, src: Client, dst: Client, keys: list[bytes]) -> None:
        if not keys:
            return
        s = self.summary
        s.seen += len(keys)
        targets = [self.target(k) for k in keys]
        info = src.pipeline([c for k in keys for c in (["TYPE", k], ["PTTL", k])])
        there = dst.pipeline([["TYPE", t] for t in targets])
        for i, (key, tgt) in enumerate(zip(keys, targets)):
            kind, ttl, tkind = info[2 * i], info[2 * i + 1], there[i]
            if kind == b"none":
                continue  # gone meanwhile (a live source)
            name = key.decode("utf-8", "backslashreplace")
            try:
                if tkind == b"none":
                    self._copy(src, dst, key, tgt, ttl)
                elif kind != tkind:
                    s.conflicts.append((name, f"source is a {kind.decode()}, target a {tkind.decode()}"))
                elif kind in (b"zset", b"set", b"hash", b"list"):
                    self._merge(src, dst, key, tgt, kind)
                elif self.overwrite:
                    self._copy(src, dst, key, tgt, ttl, replace=True)
                else:
                    s.conflicts.append((name, f"target {kind.decode()} exists (use --overwrite)"))
            except RuntimeError as e:
                s.errors.append(f"{name}: {e}")

    def _copy(self, src, dst, key, tgt, ttl, replace=False) -> None:
        s = self.summary
        if self.dry_run:
            s.skipped += 1
            return
        if self.move and self.same_server and self.src_up.db == self.dst_up.db and not replace:
            # RENAMENX: atomic, and refuses if a live client created the target meanwhile
            if Client.check(src.call("RENAMENX", key, tgt)) == 1:
                s.moved += 1
                return
        if self.move and self.same_server and key == tgt and not replace:
            if Client.check(src.call("MOVE", key, self.dst_up.db)) == 1:
                s.moved += 1
                return
        payload = Client.check(src.call("DUMP", key))
        if payload is None:
            return  # deleted meanwhile
        s.bytes += len(payload)
        args = ["RESTORE", tgt, max(ttl, 0) if isinstance(ttl, int) else 0, payload] + (["REPLACE"] if replace else [])
        reply = dst.call(*args)
        if isinstance(reply, hiredis.ReplyError) and "BUSYKEY" in str(reply):
            # created by a live client since we looked: merge instead
            return self._merge(src, dst, key, tgt, Client.check(src.call("TYPE", key)))
        Client.check(reply)
        if self.move:
            Client.check(src.call("UNLINK", key))
            s.moved += 1
        else:
            s.copied += 1

    def _merge(self, src, dst, key, tgt, kind) -> None:
        s = self.summary
        if self.dry_run:
            s.skipped += 1
            return
        if kind == b"zset":
            items = Client.check(src.call("ZRANGE", key, 0, -1, "WITHSCORES"))
            cmds = [["ZADD", tgt, "NX"] + [x for m, sc in zip(items[0::2], items[1::2]) for x in (sc, m)]] if items else []
        elif kind == b"set":
            items = Client.check(src.call("SMEMBERS", key))
            cmds = [["SADD", tgt] + items] if items else []
        elif kind == b"hash":
            items = Client.check(src.call("HGETALL", key))
            cmds = [["HSETNX", tgt, f, v] for f, v in zip(items[0::2], items[1::2])]
        elif kind == b"list":
            items = Client.check(src.call("LRANGE", key, 0, -1))
            cmds = [["RPUSH", tgt] + items] if items else []
        else:
            raise RuntimeError(f"cannot merge a {kind.decode()}")
        for r in dst.pipeline(cmds):
            Client.check(r)
        s.bytes += sum(len(x) for x in items if isinstance(x, bytes))
        if self.move:
            Client.check(src.call("UNLINK", key))
        s.merged += 1


def verify(src: Upstream, dst: Upstream, src_ns: str, dst_ns: str, sep=":", match="*", moved=False) -> list[str]:
    """Differences between the two keyspaces: every source key must be contained in its target
    (equal for strings, a subset for collections); after a move no source key may remain."""
    m = Migration(src, dst, src_ns, dst_ns, sep, match)
    a, b = Client(src), Client(dst)
    problems = []
    try:
        cursor = b"0"
        while True:
            cursor, keys = a.call("SCAN", cursor, "MATCH", m.pattern, "COUNT", 500)
            for key in keys:
                name = key.decode("utf-8", "backslashreplace")
                if moved:
                    problems.append(f"{name}: still in the source after --move")
                    continue
                tgt = m.target(key)
                kind, tkind = a.call("TYPE", key), b.call("TYPE", tgt)
                if kind != tkind:
                    problems.append(f"{name}: {kind.decode()} in the source, {tkind.decode()} in the target")
                elif kind == b"string" and a.call("GET", key) != b.call("GET", tgt):
                    problems.append(f"{name}: values differ")
                elif kind in (b"set", b"zset", b"hash"):
                    read = {b"set": ("SMEMBERS",), b"zset": ("ZRANGE", 0, -1), b"hash": ("HKEYS",)}[kind]
                    missing = set(a.call(read[0], key, *read[1:])) - set(b.call(read[0], tgt, *read[1:]))
                    if missing:
                        problems.append(f"{name}: {len(missing)} members missing in the target")
                elif kind == b"list" and a.call("LLEN", key) > b.call("LLEN", tgt):
                    problems.append(f"{name}: the target list is shorter")
            if cursor == b"0":
                return problems
    finally:
        a.close()
        b.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="keyspace-proxy migrate",
                                description="Copy or move the keys of one keyspace (URL + db + namespace) into "
                                            "another; collections are merged, never overwritten.")
    p.add_argument("--from", dest="src", required=True, metavar="URL", help="source redis://host:port/db")
    p.add_argument("--from-namespace", default="", metavar="NS", help="source namespace (keys NS:...)")
    p.add_argument("--to", dest="dst", required=True, metavar="URL", help="target redis://host:port/db")
    p.add_argument("--to-namespace", default="", metavar="NS", help="target namespace (empty: none)")
    p.add_argument("--separator", default=":")
    p.add_argument("--match", default="*", help="glob over the key names inside the source namespace")
    p.add_argument("--move", action="store_true", help="delete each source key once it is in the target")
    p.add_argument("--overwrite", action="store_true", help="replace strings and other non-mergeable types")
    p.add_argument("--dry-run", action="store_true", help="change nothing; report what would happen")
    p.add_argument("--verify", action="store_true", help="afterwards compare both sides and report differences")
    p.add_argument("--batch", type=int, default=500, help="SCAN COUNT and pipeline size (default 500)")
    p.add_argument("--state", metavar="FILE", help="resume file: the SCAN cursor after each batch "
                                                   "(an interrupted run resumes from it)")
    a = p.parse_args(argv)
    try:
        src, dst = parse_url(a.src, "--from"), parse_url(a.dst, "--to")
    except ConfigError as e:
        print(f"keyspace-proxy migrate: {e}", file=sys.stderr)
        return 2
    if (src.host, src.port, src.db) == (dst.host, dst.port, dst.db) and a.from_namespace == a.to_namespace:
        print("keyspace-proxy migrate: source and target are the same keyspace", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def progress(s: Summary) -> None:
        if tty:
            print(f"\r{s.seen} keys seen, {s.copied + s.moved} copied/moved, {s.merged} merged, "
                  f"{len(s.conflicts)} conflicts, {time.monotonic() - started:.0f}s", end="", file=sys.stderr)

    m = Migration(src, dst, a.from_namespace, a.to_namespace, a.separator, a.match, a.move, a.overwrite,
                  a.dry_run, a.batch, a.state, progress)
    try:
        summary = m.run()
    except (OSError, RuntimeError) as e:
        print(f"\nkeyspace-proxy migrate: {e} (rerun with the same --state to resume)", file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    print(("dry run: " if a.dry_run else "") + "\n".join(summary.lines()))
    code = 1 if summary.errors else 0
    if a.verify and not a.dry_run:
        problems = verify(src, dst, a.from_namespace, a.to_namespace, a.separator, a.match, a.move)
        print(f"verify: {len(problems)} difference(s)")
        for line in problems[:50]:
            print(f"verify: {line}")
        if problems:
            code = 1
    return code
