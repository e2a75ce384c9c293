"""Channels: namespaced like keys, plus the server's own channels that carry keys or dbs.

- `__keyspace@<db>__:<key>`: db and key inside the channel name.
- `__keyevent@<db>__:<event>`: db in the channel, the key is the payload.
- `__redis__:invalidate`: RESP2 client-tracking invalidations, keys in the payload.
Messages that would show a key outside the route's keyspace are dropped.
"""

from __future__ import annotations

import re

from proxy.keyspace import Keyspace, Refused
from proxy.replies import key_list
from proxy.resp import join, replace_string, split, string_value

NOTIFY = re.compile(rb"__(keyspace|keyevent)@(\d+|\*)__:(.*)\Z", re.S)
INVALIDATE = b"__redis__:invalidate"

MESSAGES = frozenset((b"message", b"pmessage", b"smessage"))


class ChannelMap:
    """Maps channels for one connection: its route (db map) and current keyspace."""

    def __init__(self, route, target):
        self.route = route
        self.target = target  # the connection's current DbTarget (db + keyspace)
        self.patterns: dict[bytes, bytes] = {}  # server pattern -> the client's pattern

    @property
    def ks(self) -> Keyspace:
        return self.target.keyspace

    def _target(self, client_db: int):
        t = self.route.target(client_db)
        if t is None:
            raise Refused(f"ERR db {client_db} is not mapped on route {self.route.name}")
        return t

    def channel_in(self, ch: bytes) -> bytes:
        m = NOTIFY.match(ch)
        if m and m.group(2) != b"*":
            kind, db, rest = m.groups()
            t = self._target(int(db))
            if kind == b"keyspace":
                rest = t.keyspace.key_in(rest, "channel")
            return b"__%s@%d__:%s" % (kind, t.db, rest)
        if ch == INVALIDATE:
            return ch
        return self.ks.key_in(ch, "channel")

    def pattern_in(self, pat: bytes) -> bytes:
        m = NOTIFY.match(pat)
        if m:
            kind, db, rest = m.groups()
            # A wildcard db means the dbs this connection can see: its current one.
            t = self.target if db == b"*" else self._target(int(db))
            if kind == b"keyspace":
                rest = t.keyspace.pattern_in(rest, "pattern")
            server = b"__%s@%d__:%s" % (kind, t.db, rest)
        else:
            server = self.ks.pattern_in(pat)
        self.patterns[server] = pat
        return server

    def pattern_out(self, server: bytes) -> bytes:
        return self.patterns.get(server) or self.ks.pattern_out(server)

    def message_out(self, ch: bytes, payload: bytes | None):
        """(client channel, payload ks or None) or None when the message must not be shown."""
        m = NOTIFY.match(ch)
        if m:
            kind, db, rest = m.groups()
            for cdb, t in self.route.reverse(int(db)):
                if kind == b"keyspace":
                    key = t.keyspace.key_out(rest)
                    if key is not None:
                        return b"__keyspace@%d__:%s" % (cdb, key), None
                else:
                    if payload is None or t.keyspace.key_out(payload) is not None:
                        return b"__keyevent@%d__:%s" % (cdb, rest), t.keyspace
            return None
        if ch == INVALIDATE:
            return ch, self.ks
        out = self.ks.key_out(ch)
        return None if out is None else (out, None)


def rewrite_frame(raw: bytes, cmap: ChannelMap, sets: dict, confirms: dict) -> tuple[bytes | None, bytes | None]:
    """Rewrite one pub/sub frame (message or confirmation, RESP2 array or RESP3 push).

    Returns (bytes for the client or None to drop it, confirmation kind or None).
    `sets` holds the connection's current subscriptions, updated by confirmations;
    `confirms` maps a confirmation kind (the command's name) to the set it changes
    and how, from the commands' Rules (RuleBook.confirms)."""
    header, items = split(raw)
    if not items:
        return raw, None
    kind = (string_value(items[0]) or b"").lower()
    if kind in MESSAGES and len(items) >= 3:
        ch_i = 2 if kind == b"pmessage" else 1
        payload_item = items[ch_i + 1]
        got = cmap.message_out(string_value(items[ch_i]) or b"", string_value(payload_item))
        if got is None:
            return None, None
        ch, payload_ks = got
        items[ch_i] = replace_string(items[ch_i], ch)
        if kind == b"pmessage":
            items[1] = replace_string(items[1], cmap.pattern_out(string_value(items[1]) or b""))
        if payload_ks is not None:
            if payload_item[:1] in (b"*", b">"):  # invalidation: a list of keys
                items[ch_i + 1] = key_list(payload_item, payload_ks)
            else:
                key = payload_ks.key_out(string_value(payload_item) or b"")
                if key is None:
                    return None, None
                items[ch_i + 1] = replace_string(payload_item, key)
        return join(header, items), None
    if kind in confirms and len(items) >= 3:
        which, added = confirms[kind]
        name = string_value(items[1])
        if name is not None:
            if added:
                sets[which].add(name)
            else:
                sets[which].discard(name)
            if which == "pattern":
                client = cmap.pattern_out(name)
                if not added:
                    cmap.patterns.pop(name, None)
            else:
                got = cmap.message_out(name, None)
                client = got[0] if got else name
            items[1] = replace_string(items[1], client)
        return join(header, items), kind
    if kind == b"invalidate" and len(items) == 2:  # RESP3 client-tracking push
        if items[1][:1] in (b"*", b"~"):
            items[1] = key_list(items[1], cmap.ks)
        return join(header, items), None
    return raw, None
