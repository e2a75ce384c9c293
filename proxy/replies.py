"""Reply transforms: give key names in replies back in the client's keyspace.

Each transform takes one reply frame (bytes exactly as the server sent them)
and returns the bytes for the client. Only the name elements are re-encoded;
every other byte is reused, so what is not a key stays byte for byte.
Error replies and nils pass untouched.
"""

from __future__ import annotations

from proxy.keyspace import Keyspace
from proxy.resp import aggregate, error, join, replace_string, split, string_value

_AGGREGATES = frozenset(b"*~>%|")


def _name_out(item: bytes, ks: Keyspace) -> bytes | None:
    name = string_value(item)
    if name is None:
        return item  # nil or not a string: nothing to rewrite
    out = ks.key_out(name)
    return None if out is None else replace_string(item, out)


def _rebuild(raw: bytes, header: bytes, items: list[bytes], out: list[bytes]) -> bytes:
    if len(out) == len(items):
        return join(header, out)
    return aggregate(raw[:1] if raw[:1] != b"|" else b"*", out)


def key_list(raw: bytes, ks: Keyspace) -> bytes:
    """KEYS, COMMAND GETKEYS, PUBSUB CHANNELS: a flat list of names; foreign names are dropped."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    out = [o for o in (_name_out(i, ks) for i in items) if o is not None]
    return _rebuild(raw, header, items, out)


def scan(raw: bytes, ks: Keyspace) -> bytes:
    """SCAN: [cursor, [keys...]]."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    if len(items) != 2:
        return raw
    return join(header, [items[0], key_list(items[1], ks)])


def first_is_key(raw: bytes, ks: Keyspace) -> bytes:
    """BLPOP/BRPOP [key, elem], BZPOPMIN/MAX [key, member, score], *MPOP [key, [...]]."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    if not items:
        return raw
    first = _name_out(items[0], ks)
    if first is None:
        return error("ERR proxy: the server replied with a key outside " + ks.describe())
    items[0] = first
    return join(header, items)


def each_first_is_key(raw: bytes, ks: Keyspace) -> bytes:
    """XREAD/XREADGROUP (RESP2 [[key, entries]...], RESP3 map key -> entries),
    COMMAND GETKEYSANDFLAGS [[key, flags]...]."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    if raw[:1] == b"%":
        out = []
        for k, v in zip(items[0::2], items[1::2]):
            k2 = _name_out(k, ks)
            if k2 is not None:
                out += [k2, v]
        if len(out) == len(items):
            return join(header, out)
        return b"%" + str(len(out) // 2).encode() + b"\r\n" + b"".join(out)
    return _rebuild(raw, header, items, [first_is_key(i, ks) for i in items])


def names_in_order(raw: bytes, names: list[bytes], ks: Keyspace) -> bytes:
    """PUBSUB NUMSUB / SHARDNUMSUB: [name, count, ...] (a map in RESP3) in request order,
    so the client's own names go back in place. A reply of another shape keeps only
    the names inside the keyspace."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    if len(items) == 2 * len(names):
        for i, name in enumerate(names):
            items[2 * i] = replace_string(items[2 * i], name)
        return join(header, items)
    out = []
    for k, v in zip(items[0::2], items[1::2]):
        k2 = _name_out(k, ks)
        if k2 is not None:
            out += [k2, v]
    n = len(out) if raw[:1] == b"*" else len(out) // 2
    return raw[:1] + str(n).encode() + b"\r\n" + b"".join(out)


def single_key(raw: bytes, ks: Keyspace) -> bytes:
    """RANDOMKEY in strip and none mode."""
    if raw[:1] not in (b"$", b"+"):
        return raw
    out = _name_out(raw, ks)
    return raw if out is None else out


def tracking_info(raw: bytes, ks: Keyspace) -> bytes:
    """CLIENT TRACKINGINFO: the `prefixes` field lists key prefixes."""
    if raw[0] not in _AGGREGATES:
        return raw
    header, items = split(raw)
    for i in range(0, len(items) - 1, 2):
        if string_value(items[i]) == b"prefixes":
            items[i + 1] = key_list(items[i + 1], ks)
    return join(header, items)
