"""Commands answered with several internal requests, because the server's own
version would reach outside the namespace (add mode only).

Each emulation is a generator: it yields argument lists to send upstream,
receives each decoded reply, and returns the bytes of the client's reply.
FLUSHDB and DBSIZE walk the namespace with SCAN MATCH <prefix>*; RANDOMKEY
takes a random key from the first non-empty SCAN batch at a random cursor.
"""

from __future__ import annotations

import functools

import hiredis

from proxy.keyspace import Keyspace, Refused
from proxy.resp import OK, bulk, error, integer

SCAN_COUNT = b"1000"


def _arity(name: bytes) -> Refused:
    return Refused(f"ERR wrong number of arguments for '{name.decode()}' command")


def start(name: bytes, args: list[bytes], ks: Keyspace, proto: int, rnd: float):
    if name == b"flushdb":
        if len(args) > 2:
            raise Refused("ERR syntax error")
        mode = args[1].upper() if len(args) == 2 else b"SYNC"
        if mode not in (b"SYNC", b"ASYNC"):
            raise Refused("ERR syntax error")
        return flushdb(ks, b"UNLINK" if mode == b"ASYNC" else b"DEL")
    if len(args) != 1:
        raise _arity(name)
    if name == b"dbsize":
        return dbsize(ks)
    return randomkey(ks, proto, rnd)


def _scan(ks: Keyspace, cursor: bytes) -> list[bytes]:
    return [b"SCAN", cursor, b"MATCH", ks.match_all(), b"COUNT", SCAN_COUNT]


class _Failed(Exception):
    """The server answered a step with an error: the emulation answers with it."""


def _call(cmd: list[bytes]):
    reply = yield cmd
    if isinstance(reply, hiredis.ReplyError):
        raise _Failed(str(reply))
    return reply


def _errors_answered(gen_fn):
    @functools.wraps(gen_fn)
    def run(*args):
        try:
            return (yield from gen_fn(*args))
        except _Failed as e:
            return error(str(e))
    return run


@_errors_answered
def flushdb(ks: Keyspace, delete: bytes):
    cursor = b"0"
    while True:
        cursor, keys = yield from _call(_scan(ks, cursor))
        if keys:
            yield from _call([delete, *keys])
        if cursor == b"0":
            return OK


@_errors_answered
def dbsize(ks: Keyspace):
    cursor, count = b"0", 0
    while True:
        cursor, keys = yield from _call(_scan(ks, cursor))
        count += len(keys)
        if cursor == b"0":
            return integer(count)


@_errors_answered
def randomkey(ks: Keyspace, proto: int, rnd: float):
    nil = b"_\r\n" if proto == 3 else b"$-1\r\n"
    # Start at 0, then walk: the first non-empty batch gives the key. A random
    # element of that batch keeps repeated calls from always naming the same key.
    cursor = b"0"
    while True:
        cursor, keys = yield from _call(_scan(ks, cursor))
        if keys:
            key = keys[int(rnd * len(keys)) % len(keys)]
            return bulk(ks.key_out(key))
        if cursor == b"0":
            return nil


# ---- INFO on a tenant route: the keyspace section is the route's own

_KEYSPACE_SECTIONS = {b"keyspace", b"all", b"everything", b"default"}


def info_has_keyspace(args: list[bytes]) -> bool:
    """Does this INFO answer a keyspace section? (no section = default, which has it)"""
    return len(args) == 1 or any(a.lower() in _KEYSPACE_SECTIONS for a in args[1:])


def _count(ks: Keyspace):
    """Keys of `ks` in the selected db: SCAN MATCH in add mode (as DBSIZE is emulated),
    the server's DBSIZE where the client sees the whole db (strip, none)."""
    if ks.mode != "add":
        return (yield from _call([b"DBSIZE"]))
    cursor, count = b"0", 0
    while True:
        cursor, keys = yield from _call(_scan(ks, cursor))
        count += len(keys)
        if cursor == b"0":
            return count


def _replace_keyspace(text: bytes, section: bytes) -> bytes:
    start = text.find(b"# Keyspace\r\n")
    if start < 0:
        return text
    end = text.find(b"\r\n#", start + 12)
    return text[:start] + section + (text[end + 2:] if end >= 0 else b"")


@_errors_answered
def info(args: list[bytes], dbs: list, current: int, as_text):
    """The server's INFO with its keyspace section replaced by the route's client dbs
    (`dbs`: (client db, DbTarget)), counting the keys each sees. Another backend db is
    SELECTed for its count and `current` SELECTed again; expires and avg_ttl are not
    counted (0)."""
    text = yield from _call(args)
    if isinstance(text, str):
        text = text.encode()
    if text.startswith(b"txt:"):  # a RESP3 verbatim string
        text = text[4:]
    counts: dict = {}
    lines = []
    for client_db, t in dbs:
        key = (t.db, t.keyspace)
        if key not in counts:
            back = [b"SELECT", str(current).encode()]
            if t.db != current:
                yield from _call([b"SELECT", str(t.db).encode()])
            try:
                counts[key] = yield from _count(t.keyspace)
            except _Failed:
                if t.db != current:
                    yield back  # the connection goes back to its db before the error is answered
                raise
            if t.db != current:
                yield from _call(back)
        if counts[key]:
            lines.append(b"db%d:keys=%d,expires=0,avg_ttl=0\r\n" % (client_db, counts[key]))
    return as_text(_replace_keyspace(text, b"# Keyspace\r\n" + b"".join(lines)))
