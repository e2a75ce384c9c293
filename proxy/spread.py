"""Spread (unpinned) routes over a Redis Cluster: which node each request goes to, and
the client's replies put back in order. Sans-IO: proxy/spread_io.py moves the bytes.

A spread route's keys are `NS:key` (or the client's own, without namespace), so they
fall in every hash slot. The Session rewrites each request as on one server, then asks
`Router.dest` where it goes (the Rule's `cluster` class, proxy/overlay.py, is the only
place commands are classified):

  SLOT         the owner of the slot its rewritten keys share (no keys: any node); keys
               in several slots: `-CROSSSLOT`, answered by the proxy, never sent
  SPLIT_*      MGET, MSET, DEL, UNLINK, EXISTS, TOUCH: one command per slot, replies merged
               in key order (MSET is then not atomic)
  ANY / STATE  keyless: the client's home node / every primary (connection state)
  EVERY        every primary (SCRIPT LOAD: caches are per node)
  SCAN_NODES   one primary per call, the cursor carries which one (encode_cursor)
  CONCAT, SUM, FIRST_VALUE  every primary, merged (KEYS, DBSIZE, RANDOMKEY)
  TX           MULTI ... EXEC: one slot for all keys of the transaction, its owner;
               MULTI is held until the first keyed command (or EXEC) names the node
  NOT_ROUTED   refused naming the command, the route and why

Each client request becomes one `Dest` with one or more parts; `Mux` sends each part
to its node, collects the node replies (each node answers its own requests in order)
and hands the Session exactly one reply per request, in request order, so everything
the Session knows about replies (transforms, MULTI, CLIENT REPLY, redirections turned
into -TRYAGAIN) works unchanged.

Subscriptions stay on one node (`Router.sticky`); keyspace / keyevent channels and
patterns, whose events are node-local, are also subscribed on every other primary,
their confirmations there dropped (`Mux._notify`, `Mux.notify_frame`), and a lost
node's subscriptions are made again elsewhere without confirmations (`Mux.resubscribe`).
"""

from __future__ import annotations

from collections import deque

from proxy.cluster import CrossSlot, common_slot, group_by_slot, key_slot, parse_redirect
from proxy.overlay import (ANY, CONCAT, EVERY, FIRST_KEY, FIRST_VALUE, NOT_ROUTED, SCAN_NODES, SLOT, SPLIT_OK,
                           SPLIT_SUM, SPLIT_VALUES, STATE, SUBSCRIBE, SUM, TX)
from proxy.pubsub import NOTIFY
from proxy.resp import encode_command, error, is_error, split, string_value

CROSSSLOT = "CROSSSLOT Keys in request don't hash to the same slot"
# A request answered -MOVED / -ASK is sent again where the redirect says, at most this
# many times; then the client gets the redirect as -TRYAGAIN (Session._redirected).
MAX_REDIRECTS = 5
ASKING = encode_command([b"ASKING"])
# A SCAN cursor of a spread route: server cursor * CURSOR_NODES + the node's index among
# the primaries ordered by their lowest slot (a decimal integer any client parses).
CURSOR_NODES = 1024

# where a part goes
TO_SLOT, TO_HOME, TO_EVERY, TO_INDEX, TO_TX, TO_NODE = range(6)


class TxDest:
    """The node of one MULTI ... EXEC block: decided by its first keyed command (or a
    WATCH before it), else, at EXEC, the home node."""

    __slots__ = ("slot", "closed", "addr", "held")

    def __init__(self, slot: int | None):
        self.slot = slot
        self.closed = False
        self.addr = None
        self.held: list = []   # parts waiting for the node: (entry, index, data)


class Dest:
    """Where one client request goes. `local`: answered by the proxy with this error
    (never sent). `parts`: [(where, arg, data)], `merge(replies) -> reply`."""

    __slots__ = ("parts", "merge", "local", "state", "sub", "own", "hello", "notify")

    def __init__(self, parts=None, merge=None, local: str | None = None, state: bool = False, sub: bool = False):
        self.parts = parts or []
        self.merge = merge
        self.local = local
        self.state = state   # connection state: also sent to node connections opened later
        self.sub = sub       # a subscription: the connection stays on its node (Mux.sticky)
        self.own = False     # needs the client's own node connections (connection state, MULTI, blocking)
        self.hello = 0       # a plain HELLO 2 / 3: the node links of that protocol
        # a SUBSCRIBE-family request naming keyspace / keyevent channels (or without
        # arguments): (command, its notification channels or None for "all", which set,
        # adding), for the other primaries (Mux.submit)
        self.notify = None


def _addr(addr) -> str:
    from proxy.config import format_addr
    return format_addr(*addr)


def not_routed(name: str, route: str, why: str) -> str:
    return (f"ERR {name.upper().replace('|', ' ')} is refused on route {route}: on a spread route over a Redis "
            f"Cluster {why}; a pinned route (slot = \"pinned\") sends every command to one node "
            "(docs/cluster.md)")


class Router:
    """Chooses the Dest of each request of one client (the Session calls `dest` with the
    rewritten arguments, in order). Keeps the transaction's slot and WATCH's slot."""

    def __init__(self, rules, route_name: str, owner=None, home=None):
        self.rules = rules
        self.route_name = route_name
        self.tx: TxDest | None = None
        self.watch_slot: int | None = None
        # the map, read by the shell (proxy/spread_io.py): slot -> node address, the home node
        self.owner = owner or (lambda slot: None)
        self.home = home or (lambda: None)
        # Subscribed: every request goes to the node of the subscriptions, whose frames
        # (messages, confirmations, replies) reach the Session as they come; set by a
        # SUBSCRIBE-family request, cleared by the shell once no subscription is left.
        self.sticky = None

    def dest(self, args: list[bytes], in_tx: bool) -> Dest:
        d = self._dest(args, in_tx)
        if d.local is None:
            # exactly one reply and no connection state: may share a node link (spread_io.NodeLink)
            rule = self.rules.lookup(args)
            d.own = not rule.shareable or rule.cluster in (STATE, TX, SUBSCRIBE) or self.tx is not None
            if rule.name == "hello" and len(args) == 2 and args[1] in (b"2", b"3") and self.tx is None:
                d.own, d.hello = False, int(args[1])  # RESP2 and RESP3 clients share different links
        if self.sticky is None or d.local is not None or d.sub:
            return d
        for where, arg, _ in d.parts:
            if not (where == TO_HOME or (where == TO_SLOT and self.owner(arg) == self.sticky)):
                name = self.rules.lookup(args).name
                return Dest(local=not_routed(name, self.route_name, "a connection with subscriptions stays on the "
                                             f"node of its subscriptions ({_addr(self.sticky)}), and this request "
                                             "needs another node: unsubscribe first, or use another connection"))
        d = Dest([(TO_NODE, self.sticky, d.parts[0][2])], None)
        d.own = True
        return d

    def _dest(self, args: list[bytes], in_tx: bool) -> Dest:
        """`in_tx`: the Session has a MULTI open (False for MULTI itself and EXEC)."""
        rule = self.rules.lookup(args)
        c = rule.cluster
        name = rule.name
        if self.tx is not None and not in_tx and name not in ("exec", "discard"):
            self._close_tx()  # MULTI refused by the server: nothing is queued
        if c == NOT_ROUTED:
            return Dest(local=not_routed(name, self.route_name, rule.cluster_why))
        data = encode_command(args)
        if c == SUBSCRIBE:
            return self._subscribe(rule, args, data)
        if self.tx is not None:
            return self._in_tx(rule, args, data)
        if c == TX:
            return self._tx_start(rule, args, data)
        if c in (SLOT, FIRST_KEY) or c.startswith("split"):
            try:
                keys = self._keys(rule, args)
            except CrossSlot:
                return Dest(local=CROSSSLOT)
            if c == FIRST_KEY:
                keys = args[1:2]
            if not c.startswith("split"):
                try:
                    slot = common_slot(keys)
                except CrossSlot:
                    return Dest(local=CROSSSLOT)
                return Dest([(TO_HOME, None, data) if slot is None else (TO_SLOT, slot, data)], first_reply)
            return self._split(c, args, rule, data)
        if c == SCAN_NODES:
            return self._scan(args)
        if c == STATE:
            return Dest([(TO_EVERY, None, data)], first_reply, state=True)
        if c == EVERY:
            return Dest([(TO_EVERY, None, data)], first_reply)
        if c == CONCAT:
            return Dest([(TO_EVERY, None, data)], concat)
        if c == SUM:
            return Dest([(TO_EVERY, None, data)], add)
        if c == FIRST_VALUE:
            return Dest([(TO_EVERY, None, data)], first_value)
        return Dest([(TO_HOME, None, data)], first_reply)  # ANY

    def _keys(self, rule, args) -> list[bytes]:
        return [args[i] for i in rule.positions(args)] if rule.positions is not None else []

    def _split(self, c: str, args, rule, data) -> Dest:
        positions = list(rule.positions(args))
        groups = group_by_slot([args[i] for i in positions])
        if len(groups) <= 1:
            slot = next(iter(groups), None)
            return Dest([(TO_HOME, None, data) if slot is None else (TO_SLOT, slot, data)], first_reply)
        step = 2 if c == SPLIT_OK else 1   # MSET: key value pairs
        parts, order = [], []
        for slot, idx in groups.items():
            part = [args[0]]
            for j in idx:
                p = positions[j]
                part += args[p:p + step]
            parts.append((TO_SLOT, slot, encode_command(part)))
            order.append(idx)
        if c == SPLIT_VALUES:
            n = len(positions)
            return Dest(parts, lambda replies: scatter(replies, order, n))
        return Dest(parts, add if c == SPLIT_SUM else first_reply)

    def _scan(self, args) -> Dest:
        try:
            cursor = int(args[1]) if len(args) > 1 else 0
            if cursor < 0:
                raise ValueError
        except ValueError:
            return Dest([(TO_HOME, None, encode_command(args))], first_reply)  # the server's own error
        server, index = divmod(cursor, CURSOR_NODES)
        args = list(args)
        args[1] = str(server).encode()
        return Dest([(TO_INDEX, index, encode_command(args))], None)  # the Mux re-encodes the cursor

    def _subscribe(self, rule, args, data) -> Dest:
        """The node of the subscriptions: shard channels' slot owner, else the node the
        connection is on (classic messages are cluster-wide: any node has them all)."""
        addr = self.sticky
        if rule.subscribe[0] == "shard" and len(args) > 1:
            try:
                slot = common_slot(args[1:])
            except CrossSlot:
                return Dest(local=CROSSSLOT)
            node = self.owner(slot)
            if node is None:
                return Dest(local="CLUSTERDOWN proxy: no primary serves the hash slot of these shard channels in the "
                                  "proxy's map of the cluster")
            if addr is not None and node != addr:
                return Dest(local=not_routed(rule.name, self.route_name, "this connection's subscriptions are on "
                                             f"{_addr(addr)} and these shard channels are served by {_addr(node)}: "
                                             "subscribe to them on another connection"))
            addr = node
        if addr is None:
            addr = self.home()
            if addr is None:
                return Dest(local="CLUSTERDOWN proxy: no node in the proxy's map of the cluster")
        self.sticky = addr
        d = Dest([(TO_NODE, addr, data)], None, sub=True)
        which, adding = rule.subscribe
        if which != "shard":
            # keyspace notifications are node-local: such channels and patterns are also
            # subscribed on every other primary (Mux.submit); classic channels are not
            # (their messages are cluster-wide: they would come once per node)
            names = [a for a in args[1:] if NOTIFY.match(a)]
            if names or (not adding and len(args) == 1):
                d.notify = (args[0], names if len(args) > 1 else None, which, adding)
        return d

    # -- transactions: one slot, one node

    def _tx_start(self, rule, args, data) -> Dest:
        name = rule.name
        if name == "multi":
            self.tx = TxDest(self.watch_slot)
            return Dest([(TO_TX, self.tx, data)], first_reply)
        if name == "watch":
            try:
                slot = common_slot(self._keys(rule, args))
            except CrossSlot:
                return Dest(local=CROSSSLOT)
            if self.watch_slot is not None and slot is not None and slot != self.watch_slot:
                return Dest(local=CROSSSLOT)
            if slot is None:
                return Dest([(TO_HOME, None, data)], first_reply)  # the server's arity error
            self.watch_slot = slot
            return Dest([(TO_SLOT, slot, data)], first_reply)
        # UNWATCH, or EXEC / DISCARD without MULTI: where WATCH went (the server answers)
        slot, self.watch_slot = self.watch_slot, None
        return Dest([(TO_HOME, None, data) if slot is None else (TO_SLOT, slot, data)], first_reply)

    def _in_tx(self, rule, args, data) -> Dest:
        tx = self.tx
        if rule.name in ("exec", "discard"):
            self._close_tx()
            self.watch_slot = None
            return Dest([(TO_TX, tx, data)], first_reply)
        c = rule.cluster
        if c not in (SLOT, FIRST_KEY, ANY, TX) and not c.startswith("split"):
            return Dest(local=not_routed(rule.name, self.route_name, "a transaction runs on one node and this "
                                         "command needs every node: inside MULTI it is not routed"))
        try:
            keys = args[1:2] if c == FIRST_KEY else self._keys(rule, args) if rule.positions is not None else []
            slot = common_slot(keys)
        except CrossSlot:
            return Dest(local=CROSSSLOT)
        if slot is not None:
            if tx.slot is None and tx.addr is None:
                tx.slot = slot
            elif tx.slot is not None and tx.slot != slot:
                return Dest(local=CROSSSLOT)
        return Dest([(TO_TX, tx, data)], first_reply)

    def _close_tx(self) -> None:
        self.tx.closed = True
        self.tx = None


NOTIFY_NONE, NOTIFY_SESSION, NOTIFY_DROP = range(3)


# ---- merges: the node replies of one request -> its one reply (raw RESP)

def first_error(replies: list[bytes]) -> bytes | None:
    for r in replies:
        if is_error(r):
            if len(replies) > 1 and (r.startswith(b"-MOVED ") or r.startswith(b"-ASK ")) \
                    and not all(is_error(x) for x in replies):
                return split_redirect(r)
            return r
    return None


def split_redirect(raw: bytes) -> bytes:
    """A part of a split command was redirected while other parts ran: the client must
    not read the usual "the command was not run"."""
    words = raw[1:].split()
    where = words[2].decode("utf-8", "replace") if len(words) > 2 else "?"
    return error(f"TRYAGAIN proxy: hash slot {words[1].decode('utf-8', 'replace')} moved to {where} (-"
                 f"{words[0].decode()}: Redis Cluster resharding); the command was split over hash slots and ran "
                 "for the keys of the other slots only: retry it")


def first_reply(replies: list[bytes]) -> bytes:
    return first_error(replies) or replies[0]


def add(replies: list[bytes]) -> bytes:
    err = first_error(replies)
    if err is not None:
        return err
    return b":%d\r\n" % sum(int(r[1:-2]) for r in replies)


def concat(replies: list[bytes]) -> bytes:
    err = first_error(replies)
    if err is not None:
        return err
    items = []
    for r in replies:
        items += split(r)[1]
    return b"*%d\r\n" % len(items) + b"".join(items)


def scatter(replies: list[bytes], order: list[list[int]], n: int) -> bytes:
    """MGET: each part's values back at their keys' positions."""
    err = first_error(replies)
    if err is not None:
        return err
    out = [b""] * n
    for r, idx in zip(replies, order):
        for j, item in zip(idx, split(r)[1]):
            out[j] = item
    return b"*%d\r\n" % n + b"".join(out)


def first_value(replies: list[bytes]) -> bytes:
    err = first_error(replies)
    if err is not None:
        return err
    for r in replies:
        if r not in (b"$-1\r\n", b"_\r\n", b"*-1\r\n"):
            return r
    return replies[0]


def encode_cursor(server: int, index: int, nodes: int) -> int:
    """The client's cursor after node `index` answered `server`: 0 once the last node is done."""
    if server != 0:
        return server * CURSOR_NODES + index
    return index + 1 if index + 1 < nodes else 0


def scan_reply(raw: bytes, index: int, nodes: int) -> bytes:
    if is_error(raw):
        return raw
    header, items = split(raw)
    cursor = str(encode_cursor(int(items[0][items[0].index(b"\r\n") + 2:-2]), index, nodes)).encode()
    return header + b"$%d\r\n%s\r\n" % (len(cursor), cursor) + items[1]


# ---- the reorder queue

class Entry:
    __slots__ = ("replies", "left", "merge", "seq")

    def __init__(self, n: int, merge, seq: int = 0):
        self.replies: list = [None] * n
        self.left = n
        self.merge = merge
        self.seq = seq       # the request's place among the client's requests


class Mux:
    """One client's requests over the cluster's nodes, its replies back in order.

    `owner(slot)` and `primaries()` (addresses, ordered by lowest slot) read the current
    map. `submit(dest)` queues the parts' bytes in `writes` (per node address) and an entry
    in `queue`; `node_reply(addr, raw)` fills the entry owed by that node's oldest request;
    `ready()` gives the replies of the completed prefix of the queue, in request order."""

    def __init__(self, owner, primaries, locate=None):
        self.owner = owner
        self.primaries = primaries
        # locate(redirect, addr of the node that sent it) -> where to send it again, or None
        self.locate = locate or (lambda r, addr: r.address(addr[0]))
        self.redirects: list = []       # followed since the shell last looked (it tells the Topology)
        self.seq = 0
        # slot -> {node: the latest request of that slot sent there}: a redirected request is
        # sent again only if no later request of its slot went to another node (it would have
        # run first: the client's order)
        self.sent: dict = {}
        self.queue: deque[Entry] = deque()
        self.owed: dict = {}            # addr -> deque of (entry, index)
        self.writes: dict = {}          # addr -> [bytes]
        self.state: list[bytes] = []    # connection state sent so far (for nodes opened later)
        self.home = None
        self.sticky = None              # subscribed: requests go here, its frames to the Session as they come
        # keyspace notifications (node-local) subscribed on the primaries other than the
        # sticky node: the channels / patterns, the nodes they went to, and per node the
        # confirmations still to come per command sent (the client gets the sticky node's
        # only: one per channel, with a single server's count)
        self.notify = {"channel": set(), "pattern": set()}
        self.notify_nodes: set = set()
        self.confirms: dict = {}        # addr -> deque of [confirmation frames left]
        self.moved: set = set()         # nodes the subscriptions left (lost): requests for them go to `sticky`
        self.refused: list = []         # (addr, error) a node gave to subscriptions the proxy moved (the shell closes)

    def _home(self):
        if self.home is None:
            prim = self.primaries()
            self.home = prim[0] if prim else None
        return self.home

    def submit(self, dest: Dest) -> None:
        if dest.sub or (self.sticky is not None and dest.local is None):
            # on the subscriptions' node (the shell entered it once nothing else was owed)
            (_, addr, data), = dest.parts
            if addr in self.moved or (not dest.sub and self.sticky is not None):
                addr = self.sticky   # chosen before the subscriptions moved off a lost node
            self.writes.setdefault(addr, []).append(data)
            if dest.notify is not None:
                self._notify(addr, *dest.notify)
            return
        if dest.local is not None:
            e = Entry(1, first_reply)
            e.replies[0], e.left = error(dest.local), 0
            self.queue.append(e)
            return
        targets = []   # (addr or None, data, slot)
        self.seq += 1
        for where, arg, data in dest.parts:
            if where == TO_EVERY:
                prim = self.primaries()
                if dest.state:
                    self.state.append(data)
                targets += [(a, data, None) for a in prim] or [(None, data, None)]
            elif where == TO_SLOT:
                targets.append((self.owner(arg), data, arg))
            elif where == TO_HOME:
                targets.append((self._home(), data, None))
            elif where == TO_INDEX:
                prim = self.primaries()
                if arg >= len(prim):
                    e = Entry(1, first_reply)
                    e.replies[0], e.left = error("ERR invalid cursor"), 0
                    self.queue.append(e)
                    return
                n = len(prim)
                e = Entry(1, lambda r, i=arg, n=n: scan_reply(r[0], i, n), self.seq)
                self.queue.append(e)
                return self._send(prim[arg], e, 0, data)
            else:  # TO_TX
                targets.append((arg, data, None))
        e = Entry(len(targets), dest.merge, self.seq)
        self.queue.append(e)
        for i, (addr, data, slot) in enumerate(targets):
            if isinstance(addr, TxDest):
                self._tx_part(addr, e, i, data)
            else:
                self._send(addr, e, i, data, slot=slot)

    def _notify(self, sticky, cmd: bytes, names, which: str, adding: bool) -> None:
        """Keyspace / keyevent channels or patterns onto (or off) every other primary.
        UNSUBSCRIBE without arguments names what those nodes have, so each command sent
        gets one confirmation per name (or one error) and the shell can drop them all."""
        have = self.notify[which]
        if adding:
            have.update(names)
            nodes = [a for a in self.primaries() if a != sticky]
            self.notify_nodes.update(nodes)
        else:
            names = sorted(have) if names is None else names
            have.difference_update(names)
            nodes = sorted(self.notify_nodes)
            if not self.notify["channel"] and not self.notify["pattern"]:
                self.notify_nodes.clear()
        for a in nodes:
            if a != sticky:
                self._quiet(a, cmd, names)

    def _quiet(self, addr, cmd: bytes, names) -> None:
        """A subscription command whose confirmations the client does not get."""
        if names:
            self.writes.setdefault(addr, []).append(encode_command([cmd, *names]))
            self.confirms.setdefault(addr, deque()).append([len(names)])

    def resubscribe(self, lost, to, subs: dict) -> None:
        """The subscriptions' node `lost` is gone: the connection's subscriptions (the
        Session's sets, server names) again on `to`, their confirmations dropped."""
        self.moved.add(lost)
        self.sticky = to
        self.notify_nodes.discard(to)
        for which, cmd in (("channel", b"SUBSCRIBE"), ("pattern", b"PSUBSCRIBE"), ("shard", b"SSUBSCRIBE")):
            self._quiet(to, cmd, sorted(subs[which]))

    def notify_missing(self, skip) -> list:
        """Primaries (not in `skip`) that should have the keyspace subscriptions and have
        not: a replica promoted after the node that had them was lost."""
        if not self.notify["channel"] and not self.notify["pattern"]:
            return []
        return [a for a in self.primaries() if a != self.sticky and a not in self.notify_nodes and a not in skip]

    def notify_add(self, addr) -> None:
        self.notify_nodes.add(addr)
        self._quiet(addr, b"SUBSCRIBE", sorted(self.notify["channel"]))
        self._quiet(addr, b"PSUBSCRIBE", sorted(self.notify["pattern"]))

    def notify_frame(self, addr, raw: bytes) -> int:
        """A frame from node `addr` that may belong to its keyspace subscriptions:
        NOTIFY_SESSION (a message the client still subscribes to: to the Session),
        NOTIFY_DROP (a confirmation or error of the other nodes' subscriptions, or a
        message for a channel the client already left), NOTIFY_NONE (not one of them)."""
        q = self.confirms.get(addr)
        if not q and addr not in self.notify_nodes:
            return NOTIFY_NONE
        if raw[:1] in (b"-", b"!"):
            if q:
                q.popleft()
                if self.moved:
                    self.refused.append((addr, raw))
                return NOTIFY_DROP
            return NOTIFY_NONE
        if raw[:1] not in (b"*", b">"):
            return NOTIFY_NONE
        items = split(raw)[1]
        kind = (string_value(items[0]) or b"").lower() if items else b""
        if kind in (b"message", b"pmessage", b"smessage") and addr == self.sticky:
            return NOTIFY_NONE   # the subscriptions' node: the Session's
        if kind in (b"message", b"pmessage") and len(items) >= 3:
            which = "pattern" if kind == b"pmessage" else "channel"
            if (string_value(items[1]) or b"") in self.notify[which]:
                return NOTIFY_SESSION
            return NOTIFY_DROP
        if q and kind in (b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
                          b"sunsubscribe"):
            q[0][0] -= 1
            if not q[0][0]:
                q.popleft()
            return NOTIFY_DROP
        return NOTIFY_NONE

    def _tx_part(self, tx: TxDest, e: Entry, i: int, data: bytes) -> None:
        if tx.addr is None:
            if tx.slot is None and not tx.closed:
                # MULTI before any key: the node is not known yet. The proxy answers MULTI
                # (+OK) and the keyless commands queued after it (+QUEUED) itself and sends
                # them, their replies dropped, with the first keyed command (or EXEC): a
                # command the server then refuses makes EXEC answer EXECABORT, as it would.
                e.replies[i] = b"+QUEUED\r\n" if tx.held else b"+OK\r\n"
                e.left -= 1
                tx.held.append((None, 0, data))
                return
            tx.addr = self.owner(tx.slot) if tx.slot is not None else self._home()
            tx.addr = tx.addr or ("", 0)
            for held in tx.held:
                self._send(tx.addr, *held, resend=False)
            tx.held.clear()
        # a transaction is never re-sent in part: a redirect inside it reaches the client
        self._send(tx.addr, e, i, data, resend=False)

    def _send(self, addr, e: Entry | None, i: int, data: bytes, resend: bool = True, tries: int = 0,
              slot: int | None = None) -> None:
        if slot is not None and e is not None and addr:
            nodes = self.sent.setdefault(slot, {})
            nodes[addr] = max(nodes.get(addr, 0), e.seq)
        if not addr or addr == ("", 0):
            if e is None:
                return
            e.replies[i] = error("CLUSTERDOWN proxy: no primary serves this hash slot in the proxy's map of the "
                                 "cluster; the command was not run")
            e.left -= 1
            return
        # the bytes are kept until the reply, to be sent again after a redirect
        self.owed.setdefault(addr, deque()).append((e, i, data if resend else None, tries))
        self.writes.setdefault(addr, []).append(data)

    def node_reply(self, addr, raw: bytes) -> None:
        """A whole reply frame from node `addr` (raises IndexError if none is owed). A
        -MOVED / -ASK means the request was not run: it is sent again where the redirect
        says (ASK: behind ASKING, whose reply is the proxy's), into the same place of the
        reorder queue, so the client's replies stay in order."""
        e, i, data, tries = self.owed[addr].popleft()
        if data is not None and raw[:2] in (b"-M", b"-A") and tries < MAX_REDIRECTS \
                and (raw.startswith(b"-MOVED ") or raw.startswith(b"-ASK ")):
            r = parse_redirect(raw[1:].rstrip(b"\r\n").decode("utf-8", "replace"))
            to = self.locate(r, addr) if r is not None else None
            later = r is not None and any(a != addr and seq > e.seq for a, seq in self.sent.get(r.slot, {}).items())
            if to is not None and not later:
                self.redirects.append(r)
                if r.kind == "ASK":
                    self._send(to, None, 0, ASKING, resend=False)
                return self._send(to, e, i, data, tries=tries + 1, slot=r.slot)
            # (a later request of this slot already went to another node and may have run:
            # sent again, this one would run after it; the client gets -TRYAGAIN instead)
        if e is not None:  # None: a reply the proxy gave already (a held MULTI, ASKING)
            e.replies[i] = raw
            e.left -= 1

    def owes(self, addr) -> bool:
        return bool(self.owed.get(addr))

    def ready(self) -> list[bytes]:
        out = []
        q = self.queue
        while q and q[0].left == 0:
            e = q.popleft()
            out.append(e.merge(e.replies))
        if not q and self.sent:
            self.sent.clear()  # nothing in flight: no redirect can come for an earlier request
        return out

    def take_writes(self) -> dict:
        w, self.writes = self.writes, {}
        return w

    @property
    def idle(self) -> bool:
        return not self.queue


def slot_of(key: bytes) -> int:  # re-exported for tests
    return key_slot(key)
