"""One client connection as a sans-IO state machine.

Bytes from the client go in with `client_data`, bytes from its upstream
connection with `upstream_data`; what to send comes out of `out_upstream` and
`out_client`. No sockets here: the asyncio shell (server.py) only moves bytes.

The rules it keeps, so that a reply cannot reach the wrong client:

- One request, one reply on the upstream wire. Every request sent upstream
  leaves exactly one entry in `pending`, in order; CLIENT REPLY is carried out
  here and never sent, so the server never skips a reply. A reply that arrives
  with nothing pending is a fault: the connection is closed, never the reply
  handed on.
- Sharing by allowlist. On a shared upstream connection only requests whose Rule
  says "exactly one reply, no connection state" are sent; anything else moves the
  client to a connection of its own first (or is refused in place).
- State on the server's confirmation. The db, namespace, protocol and
  subscriptions change when the server confirms (SELECT's +OK, HELLO's reply,
  each element of EXEC's array), never when a command is sent or queued; later
  requests whose rewriting depends on that state wait for the confirmation.
- Owed replies first. A malformed request is answered with its protocol error
  after every request before it has been executed and answered.

Replies the proxy makes itself (refusals, protocol errors) are pending entries
too, so they reach the client in the position of their request. Push frames
(RESP3 `>`, RESP2 pub/sub messages) belong to no request and pop nothing.
"""

from __future__ import annotations

import logging
import random
import sys
from collections import deque
from fnmatch import fnmatchcase
from time import monotonic, time
from itertools import repeat

import hiredis

from proxy import emulate
from proxy.auth import HELLO_NOAUTH, NOAUTH, Login, parse_hello, routing
from proxy.config import Limits, Route
from proxy.keyspace import Refused
from proxy.keyspace import show as show_name
from proxy.overlay import CONFIG_GET_SAFE
from proxy.keyspecs import KeySpecError
from proxy.pubsub import MESSAGES, ChannelMap, rewrite_frame
from proxy.cluster_route import redirect_error, split_requests
from proxy.spread import Router
from proxy.resp import (OK, PartialReply, ProtocolError, RequestReader, encode_command, error, frame_end,
                        frame_run, is_error, pack_command, split, string_value)
from proxy.rewrite import KEYS, SLOW, Ctx, Plan, compile_plan, fast_spec, refusal, rewrite, rewrite_rule
from proxy.rules import EMULATE, REFUSE, RuleBook, default_rules
from proxy.speedups import C
from proxy.stats import RouteStats

log = logging.getLogger("keyspace-proxy")

# The C path's keyspace modes (proxy/_speedups.c, rewrite_plain).
FAST_MODES = {"none": 0, "add": 1, "strip": 2}
_rewrite_plain = C.rewrite_plain if C is not None else None
MULTI_OPENS, EXEC_CLOSES, MAX_BLOCK = (C.MULTI_OPENS, C.EXEC_CLOSES, C.MAX_BLOCK) if C is not None else (1, 2, 64)

# A deep pipeline gains nothing from sharing, and its replies could not be slowed
# down without slowing everyone on the shared connection: past this many owed
# replies a client moves to a dedicated connection, where backpressure is its own.
SHARED_MAX_OWED = 64
EXECABORT = error("EXECABORT Transaction discarded because of previous errors.")
# A reply that needs no rewriting and is still arriving is collected up to this many bytes
# (then written at once, as a whole reply is) and forwarded as it arrives beyond that, so
# a 512 MB value costs its bytes and a 100 KB one costs one write, not one per read.
STREAM_AFTER = 256 * 1024
PLAN_CACHE = 1024   # command names with a cached plan per session's target (names are client input)


class UnexpectedReply(Exception):
    """The server sent a reply no request is owed: the link can no longer be trusted."""


# ------------------------------------------------------------------ requests

# Commands a listener with users answers itself (Session._login); the rest wait for AUTH
# after RESET.
_LOGIN = ("auth", "hello", "reset")

PASS, XFORM, LOCAL, INTERNAL, SUB = range(5)


class Req:
    """One reply owed to the client, in order. A plain `None` in `pending` is the
    common case (the server's reply passed on as it is) and costs no object.

    kind    PASS: the reply as it is; XFORM: fn(raw) -> bytes for the client;
            LOCAL: `data`, made by the proxy; INTERNAL: fn(raw), the proxy's own
            request (nothing for the client); SUB: subscription confirmations
            (`data` = [confirmations left or -1 for "until none left", set]).
    show    False when the client said CLIENT REPLY OFF/SKIP: the reply is
            consumed and dropped, so the upstream still gets one reply per request.
    """

    __slots__ = ("kind", "fn", "data", "show")

    def __init__(self, kind: int, fn=None, data=None, show: bool = True):
        self.kind = kind
        self.fn = fn
        self.data = data
        self.show = show


DROP = Req(PASS, show=False)
# While a pinned cluster route holds a redirected request (Session._hold_redirect), the plain
# entries after it are this instead of None: the same reply (PASS, shown), but the C path stops
# at it, so each reply comes to Python, where the ordering rule is kept.
HELD_PLAIN = Req(PASS)
# The `data` of the pending entry of a blocking command (BLPOP, XREAD, WAIT...): its reply
# may take as long as the client asked, so the shell does not time it (limits.reply_timeout).
BLOCKING = object()


class Fault:
    """A malformed request, held in order behind requests that wait: its error is
    delivered once everything before it has been answered."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class TxItem:
    """A command queued in MULTI: its reply transform, and what its success changes."""

    __slots__ = ("transform", "confirm")

    def __init__(self, transform=None, confirm=None):
        self.transform = transform
        self.confirm = confirm


class ClientFacts:
    """What the shell knows about a client's socket, for CLIENT LIST / CLIENT INFO."""

    __slots__ = ("id", "addr", "laddr", "fd", "created")

    def __init__(self, id: int = 0, addr: str = "?", laddr: str = "?", fd: int = -1, created: float = 0.0):
        self.id, self.addr, self.laddr, self.fd = id, addr, laddr, fd
        self.created = created or monotonic()


class RouteView:
    """The small interface a session is given to its route's other clients (the shell,
    server.py, keeps the registry): the sessions of the route, for CLIENT LIST, and the
    route's monitors. `monitors` is empty (falsy) unless a client of the route runs
    MONITOR: only then do the route's sessions leave the C path and report each command."""

    def __init__(self):
        self.monitors: set = set()
        self._alone: list = []

    def sessions(self) -> list:
        return self._alone

    def add_monitor(self, session) -> None:
        self.monitors.add(session)

    def remove_monitor(self, session) -> None:
        self.monitors.discard(session)

    def feed(self, line: bytes) -> None:
        for m in list(self.monitors):
            m.out_client.append(line)


class Session:
    def __init__(self, route: Route, rules: RuleBook | None = None, limits: Limits | None = None,
                 stats: RouteStats | None = None, shared: bool = False, login: Login | None = None,
                 view: RouteView | None = None, facts: ClientFacts | None = None):
        self.route = route
        # A listener with users (proxy/auth.py): AUTH and HELLO ... AUTH are checked here,
        # never forwarded; after RESET the client must authenticate again (`locked`).
        self.login = login
        self.locked = False
        self.view = view if view is not None else RouteView()
        self.facts = facts or ClientFacts()
        self.db_index = 0              # the client db the server confirmed (CLIENT LIST says it)
        self.last_active = monotonic()
        self.local_monitor = False     # MONITOR emulated for a tenant route (fed by the RouteView)
        self.stats = stats or RouteStats(route.name)
        self.rules = rules or default_rules()
        self.limits = limits or Limits()
        self.reader = RequestReader(self.limits.max_bulk, self.limits.max_query)
        self.max_bulk = self.limits.max_bulk
        self.pending: deque = deque()
        # What to send, as chunks in order: the shell takes them.
        self.out_upstream: list[bytes] = []
        self.out_client: list[bytes] = []
        self._buf = b""
        self.partial: PartialReply | None = None   # a reply arriving over several reads
        self.partial_chunks: list | None = None     # its bytes so far (None: being streamed)
        self.partial_size = 0
        self.partial_pass = False                   # it needs no rewriting: it may be streamed
        self.proto = 2                 # confirmed by the server
        # Channels: messages and confirmations arrive whenever the server sends them,
        # so they are named by the db and keyspace the server confirmed, never by a
        # SELECT still queued in MULTI (`_use`).
        self.cmap = ChannelMap(route, route.default)
        self.target = route.default    # confirmed by the server (db + keyspace)
        self.q_target = None           # where requests are rewritten now (_use)
        self.block_read = 0            # requests _shared_block read from the reader itself
        self._use(route.default)
        self.tx: list[TxItem] | None = None   # commands queued in MULTI
        self.tx_failed = False
        self.tx_target = None          # where queued commands are rewritten (tentative)
        self.subs = {"channel": set(), "pattern": set(), "shard": set()}
        self.sub_waiting = 0           # SUBSCRIBE-family requests awaiting confirmations
        self.reply_on = True           # CLIENT REPLY ON/OFF, carried out here
        self.skip = False              # CLIENT REPLY SKIP: the next command's reply is dropped
        self.monitor = False
        self.emu = None                # running emulation: (generator, show)
        self.held: deque = deque()     # requests (and Faults) waiting their turn
        self.confirming = 0            # state changes sent, not yet confirmed
        self.valid_dbs: set[int] = set()   # backend dbs the server accepted (SELECT in MULTI)
        self.probed = False            # the mapped dbs were tried (before the first MULTI)
        self.client_name: bytes | None = None   # CLIENT SETNAME, held here while on a shared link
        self.tx_open = None            # the MULTI sent whose answer is not in yet (its tx list)
        self.tx_waiting = False        # a request waits for that answer
        self._in_block = False         # handling a whole MULTI ... EXEC block on a shared link
        self.input_closed = False      # a malformed request or QUIT: read no more
        self.close_when_done = False   # close the client once pending replies are out
        self.protocol_error = False
        self.upstream_error: str | None = None
        self._label = ""               # the command being handled, for refusal counts
        self.owed_sent = 0             # upstream replies asked for so far (shared links count them)
        # On a shared upstream connection (see server.SharedLink) until a command needs
        # a connection of its own; then `need_dedicated` holds requests until the
        # shell has a dedicated connection and every shared reply is in.
        self.shared = shared
        self.need_dedicated = False
        # limits.blocking_pool: a blocking command on a shared link in the plain state is
        # served by a pooled upstream connection borrowed for that one request
        # (server.BlockingPool). `need_borrow` holds it until the shell lends one (once no
        # shared reply is owed); `borrowing` holds later requests until its reply is in, so
        # a pooled connection carries exactly one request and replies stay in order.
        self.need_borrow = False
        self.borrowing = False
        # RESP2 and RESP3 clients share different links: `link_proto` is the one this
        # session is on; `need_link` holds requests after a HELLO that changes it, until
        # the replies owed on the old link are in (the shell then calls switch_link).
        self.link_proto = 2
        self.need_link: int | None = None
        # The C path runs only in the plain state (no MULTI, no CLIENT REPLY, no held
        # requests...). Every state change goes through `handle` or `upstream_lost`,
        # which set this; the next read checks the state once and clears it.
        self.fast_blocked = True
        # A pinned route on a Redis Cluster (proxy/cluster_route.py): every error reply is
        # looked at (frame_run flag 2), a -MOVED / -ASK is answered -TRYAGAIN instead and
        # reported to `on_redirect` (the shell follows the slot).
        self.cluster = route.upstream.cluster is not None
        self.run_flags = 2 if self.cluster else 0
        self.on_redirect = None
        # ... and a request answered -MOVED / -ASK is sent again by the shell (`on_resend`)
        # when cluster_route.resend_plan allows: `sent_log` keeps the bytes of the requests
        # written ([first number, bytes, how many, plain]) until their replies are in;
        # `redirects` holds the redirected ones ([bytes, Redirect, -TRYAGAIN text]) meanwhile.
        self.sent_log: deque | None = None
        self.redirects: list | None = None
        self.resending = False
        self.on_resend = None
        # A spread (unpinned) route on a cluster (proxy/spread.py): every request is sent with
        # the node it goes to (`_spread_send`); the shell's Mux hands back one reply per
        # request, in order, as one dedicated connection would. No shared link, no C path.
        self.spread = Router(self.rules, route.name) if self.cluster and route.upstream.slot is None else None
        if self.spread is not None:
            self.shared = shared = False
        elif self.cluster:
            self.sent_log = deque()
        if not shared:
            self.handshake()
        if view is None:
            self.view._alone.append(self)

    # ------------------------------------------------------------ plumbing

    node_of = None  # () -> the data node the route uses now (set by the server for Sentinel / cluster)

    def _node(self):
        return self.node_of() if self.node_of is not None else None

    def _use(self, target) -> None:
        """Rewrite the next requests for `target` (db + keyspace)."""
        if target is self.q_target:  # (every EXEC and DISCARD says it again: nothing changes)
            return
        self.q_target = target
        self.ctx = Ctx(self.route, target, self.rules, self.stats)
        self.ctx.node = self._node
        key = (target, self.route.policy)  # plans depend on the namespace and the policy
        self.plans = self.stats.plans_for(key)
        self.fast_specs = self.stats.fast_for(key)
        ks = target.keyspace
        self.fast_mode, self.fast_prefix = FAST_MODES[ks.mode], ks.prefix

    def _confirmed(self, target, index: int | None = None) -> None:
        """The server confirmed a db change (SELECT's +OK, its element of EXEC, RESET)."""
        if index is not None:
            self.db_index = index
        self.target = target
        self.cmap.target = target
        self.valid_dbs.add(target.db)

    def take_upstream(self) -> bytes:
        out = b"".join(self.out_upstream)
        self.out_upstream.clear()
        return out

    def take_client(self) -> bytes:
        out = b"".join(self.out_client)
        self.out_client.clear()
        return out

    @property
    def idle(self) -> bool:
        """No reply owed, not in a transaction, not blocked: a safe point to close."""
        return not self.pending and self.tx is None and self.emu is None and not self.held and self.redirects is None

    def owes_timed_reply(self) -> bool:
        """Is a reply owed that the server should send without waiting (no blocking
        command owed)? For limits.reply_timeout on a dedicated connection."""
        pending = self.pending
        if not pending:
            return False
        for e in pending:
            if e is not None and e.data is BLOCKING:
                return False
        return True

    @property
    def may_idle_close(self) -> bool:
        """May limits.idle_timeout close it now? As Redis's clientsCronHandleTimeout: not while
        a reply is owed (a blocked client waits for one), subscribed, or in MONITOR."""
        return not self.pending and not self.held and not self.monitor and not self._subscribed() \
            and not self.sub_waiting and self.redirects is None

    @property
    def output_limit(self) -> int:
        """What the proxy may hold for this client (Redis's classes: normal, pub/sub)."""
        if self.subs["channel"] or self.subs["pattern"] or self.subs["shard"]:
            return self.limits.pubsub_output_limit
        return self.limits.output_limit

    def _show(self) -> bool:
        """Does the client want the reply of the command being handled? (consumes a SKIP)"""
        if self.skip:
            self.skip = False
            return False
        return self.reply_on

    def _expect(self, entry) -> None:
        """The request just sent gets exactly one reply: its entry, in order."""
        if self.sent_log is not None:
            self._log_sent(None, 1, False)
        self.pending.append(entry)
        self.owed_sent += 1

    def _log_sent(self, data: bytes | None, n: int, plain: bool) -> None:
        """A pinned cluster route wrote `n` requests (`data`, or None: not to be sent again),
        numbered from owed_sent. Entries whose replies are all in are dropped (the head of
        `pending` is at least owed_sent - len(pending))."""
        log_ = self.sent_log
        done = self.owed_sent - len(self.pending)
        while log_ and log_[0][0] + log_[0][2] <= done:
            log_.popleft()
        log_.append((self.owed_sent, data, n, plain))

    def _sent_bytes(self, number: int) -> bytes | None:
        """The bytes of request `number` if it may be sent again (a plain request: one reply,
        no connection state), else None."""
        for first, data, n, plain in self.sent_log:
            if first <= number < first + n:
                if not plain or data is None:
                    return None
                if n == 1:
                    return data
                try:
                    return split_requests(data)[number - first]
                except (ValueError, IndexError):  # not whole requests: never guess
                    return None
        return None

    def _local(self, reply: bytes, show: bool = True) -> None:
        """A reply made by the proxy, delivered in its request's position."""
        if not show:
            return
        if self.pending:
            self.pending.append(Req(LOCAL, data=reply))
        else:
            self.out_client.append(reply)

    def _refuse(self, message: str, show: bool = True) -> None:
        stats = self.stats
        stats.refused_command(self._label)
        quiet = stats.may_log_refusal(monotonic())
        if quiet is not None:
            log.info("route %s: refused %s: %s%s", self.route.name, self._label.upper().replace("|", " "),
                     message, f" ({quiet} more refusals not logged)" if quiet else "",
                     extra={"event": "refused", "route": self.route.name, "command": self._label})
        if self.tx is not None:
            self.tx_failed = True  # as Redis does for a command rejected while queueing
        self._local(error(message), show)

    def _send(self, args: list[bytes], entry) -> None:
        if self.spread is not None:
            return self._spread_send(args, entry)
        self.out_upstream.append(encode_command(args))
        self._expect(entry)

    def _spread_send(self, args: list[bytes], entry) -> bool:
        """A spread route on a cluster: `out_upstream` gets the request's spread.Dest (its
        node or nodes). One the proxy answers (CROSSSLOT, not routed) is a refusal here,
        so MULTI fails at EXEC as on Redis; the proxy's own requests get it as their reply."""
        dest = self.spread.dest(args, self.tx is not None)
        if dest.local is not None and (entry is None or entry.kind != INTERNAL):
            if entry is not None and entry.kind == XFORM:
                entry.fn(error(dest.local))  # it sees the error: a wait for its confirmation ends
            self._refuse(dest.local, entry is None or entry.show)
            return False
        self.out_upstream.append(dest)
        self._expect(entry)
        return True

    def _drain_locals(self) -> None:
        pending = self.pending
        while pending:
            head = pending[0]
            if head is None or head.kind != LOCAL:
                return
            pending.popleft()
            self.out_client.append(head.data)

    def _entry(self, transform, show: bool):
        if transform is None:
            return None if show else DROP
        return Req(XFORM, transform, show=show)

    # ------------------------------------------------------------ upstream handshake

    def handshake(self, proto: int = 2, db: int | None = None) -> None:
        """Set up the upstream connection before any client request: AUTH with the route's
        credentials, HELLO 3 when the client is on RESP3, SELECT the db."""
        db = self.target.db if db is None else db
        if self.spread is not None:  # each node connection does its own (proxy/spread_io.py)
            return
        for args in self.route.upstream.handshake(db, proto):
            self._send(args, Req(INTERNAL, self._check_handshake))
        self.valid_dbs.add(db)

    def _probe_dbs(self) -> None:
        """Before the first MULTI on a route with a db map: SELECT each mapped backend db
        once (then the current one again), so a SELECT queued in MULTI can be checked
        against what the server accepts: it must not fail at EXEC after the commands
        queued behind it were rewritten for its namespace."""
        self.probed = True
        dbs = sorted({t.db for t in self.route.databases.values()} - self.valid_dbs)
        if not dbs:
            return
        for db in dbs:
            self._send([b"SELECT", str(db).encode()], Req(INTERNAL, self._probe_db(db)))
        self.confirming += 1  # a SELECT queued behind MULTI is checked against the answers

        def back(raw: bytes) -> None:
            self.confirming -= 1
            self._check_handshake(raw)
        self._send([b"SELECT", str(self.target.db).encode()], Req(INTERNAL, back))

    def _probe_db(self, db: int):
        def done(raw: bytes) -> None:
            if not is_error(raw):
                self.valid_dbs.add(db)
        return done

    def _check_handshake(self, raw: bytes) -> None:
        if is_error(raw):
            msg = raw[1:-2].decode("utf-8", "replace")
            self.upstream_lost(f"upstream refused the proxy's handshake: {msg}")

    # ------------------------------------------------------------ client -> upstream

    def client_data(self, data: bytes) -> None:
        if self.input_closed:
            return
        self.last_active = monotonic()
        depth = self.block_read = 0
        while True:
            if self.fast_blocked:
                self.fast_blocked = not self._plain()
            if not self.fast_blocked and self.reader.idle and data[:1] == b"*" and not self.view.monitors:
                # The C path takes the leading requests whose commands have a Spec (see
                # rewrite.fast_spec), exactly as `handle` would; the rest go on below.
                pending = self.pending
                limit = SHARED_MAX_OWED - len(pending) if self.shared else sys.maxsize
                if limit > 0:
                    out, end, n, keys = _rewrite_plain(data, self.fast_specs, self.fast_mode, self.fast_prefix,
                                                       limit, self.max_bulk, self.shared and self.sent_log is None)
                    if n:
                        self.out_upstream.append(out)
                        if self.sent_log is not None:
                            self._log_sent(out, n, True)
                        if n == 1:
                            pending.append(None)
                        else:
                            pending.extend(repeat(None, n))
                        self.owed_sent += n
                        depth += n
                        self.stats.keys_rewritten += keys
                        if end == len(data):
                            self.stats.depth.observe(depth)
                            return
                        data = data[end:]
            # A read that began inside a request: once the reader has finished that
            # request, what follows may go back to the C path.
            resume = _rewrite_plain is not None and not self.reader.idle
            self.reader.feed(data)
            data = b""
            while True:
                try:
                    args = self.reader.get()
                except Exception as e:
                    if not isinstance(e, ProtocolError):  # a bug in the reader: this client alone pays
                        log.exception("route %s: the request reader failed", self.route.name)
                        e = f"unreadable request ({e.__class__.__name__})"
                    args = Fault(f"ERR Protocol error: {e}")
                if args is None or type(args) is Fault:
                    if depth:
                        self.stats.depth.observe(depth)
                    if args is not None:
                        self._input_fault(args.message)
                    return
                depth += 1
                if self._waiting():
                    self.held.append(args)
                else:
                    try:  # (_handle_safely inline: a call less per request)
                        self.handle(args)
                    except Exception as e:
                        self._handle_failed(args, e)
                    if self.block_read:  # a transaction block read the rest of itself
                        depth += self.block_read
                        self.block_read = 0
                if self.input_closed:
                    return
                if resume:
                    resume = False
                    if self._plain():
                        data = self.reader.take_rest()
                        if data:
                            break  # to the C path with the rest of this read

    def _waiting(self) -> bool:
        """Must the next request wait? (for a connection, a link, a confirmation, an emulation)"""
        return bool(self.held) or self.emu is not None or self.need_dedicated or self.need_link is not None \
            or self.confirming > 0 or self.need_borrow or self.borrowing or self.redirects is not None

    def _input_fault(self, message: str) -> None:
        """A malformed request: every request before it is executed and answered, then its
        error, then the connection closes."""
        self.stats.errors["protocol"] += 1
        self.input_closed = True
        self.fast_blocked = True
        if self._waiting():
            self.held.append(Fault(message))
        else:
            self._fault_now(message)

    def _fault_now(self, message: str) -> None:
        self.protocol_error = True
        self._local(error(message))
        self.input_closed = True
        self.close_when_done = True

    def _plain(self) -> bool:
        """May the C path take the next requests? (no state a request would change)"""
        return _rewrite_plain is not None and self.spread is None and self.tx is None and self.reply_on \
            and not self.skip and not self._waiting() and self.upstream_error is None and not self.input_closed and not self.locked

    def _handle_safely(self, args: list[bytes]) -> None:
        try:
            self.handle(args)
        except Exception as e:
            self._handle_failed(args, e)

    def _handle_failed(self, args: list[bytes], e: Exception) -> None:
        """A bug in handling a request must cost this client alone, never the process.
        (Called inside the except block: log.exception has the traceback.)"""
        log.exception("route %s: internal error handling %s", self.route.name,
                      args[0][:32].decode("latin-1", "replace"))
        self.stats.errors["internal"] += 1
        self._fault_now(f"ERR proxy internal error ({e.__class__.__name__}); closing the connection")

    def handle(self, args: list[bytes]) -> None:
        self.fast_blocked = True
        plan = self.plans.get(args[0])
        if plan is None:
            plan = self._plan(args[0])
        rule = plan.rule
        if plan.kind == SLOW and rule.name in self.rules.containers and len(args) > 1:
            rule = self.rules.lookup(args)
        if self.login is not None and (self.locked or rule.name in _LOGIN) and self._login(args, rule.name):
            return
        if self.shared and not self._in_block and (not rule.shareable or len(self.pending) >= SHARED_MAX_OWED
                                                   or rule.session == "info"):
            if plan.kind <= KEYS and rule.poolable and self._may_borrow():
                # a blocking call (the Sidekiq fetch): straight to the pool. A PASS or KEYS
                # plan is neither refused nor answered by the proxy (compile_plan), so this is
                # _where_on_shared's "dedicated" below without its questions.
                self.need_borrow = True
                self.held.appendleft(args)  # sent by start_borrow once a connection is lent
                return
            if rule.session == "multi" and self.tx is None and len(self.pending) < SHARED_MAX_OWED:
                return self._shared_block(args)
            where = self._where_on_shared(rule, args)
            if where is not None:
                if where == "dedicated":
                    if rule.poolable and self._may_borrow():
                        self.need_borrow = True
                    else:
                        self.need_dedicated = True
                else:
                    self.need_link = where
                self.held.appendleft(args)  # replayed first once the connection is there
                return
        if self.tx_open is not None and rule.session in ("select", "hello", "client_setname") \
                and self._multi_unconfirmed(args):
            return
        if self.view.monitors:
            self._feed_monitors(args, rule)
        plan.count += 1
        self._label = plan.label
        if self.skip:  # (_show inline: every request asks)
            self.skip = show = False
        else:
            show = self.reply_on
        if self.upstream_error is not None:
            return self._local(error(f"ERR upstream unavailable ({self.upstream_error})"), show)
        kind = plan.kind
        if kind <= KEYS:  # PASS or KEYS: the hot path
            if kind == KEYS:
                key_in = plan.key_in
                try:
                    positions = plan.positions(args)
                    for i in positions:
                        args[i] = key_in(args[i])
                except Refused as e:
                    return self._refuse(str(e), show)
                except KeySpecError as e:
                    return self._refuse(f"ERR {e}", show)
                self.stats.keys_rewritten += len(positions)
            if self.spread is not None:
                sent = self._spread_send(args, plan.entry if self.tx is None and show else
                                         self._entry(None, show) if self.tx is not None else
                                         self._entry(plan.reply, show))
                if sent and self.tx is not None:
                    self.tx.append(TxItem(plan.reply))
                elif sent and plan.entry is not None and plan.entry.data is BLOCKING and not show:
                    self.pending[-1] = Req(plan.entry.kind, plan.entry.fn, BLOCKING, show=False)
                return
            if self.tx is None and show:
                data = pack_command(tuple(args))
                self.out_upstream.append(data)
                if self.sent_log is not None:
                    self._log_sent(data, 1, plan.entry is None and rule.shareable)
                self.pending.append(plan.entry)
                self.owed_sent += 1
                return
            self._queue_or_send(args, plan.reply, show)
            entry = plan.entry
            if entry is not None and entry.data is BLOCKING and self.tx is None:  # CLIENT REPLY OFF/SKIP
                last = self.pending[-1]
                self.pending[-1] = Req(entry.kind, entry.fn, BLOCKING, show=last is None or last.show)
            return
        if rule.session is not None and not rule.everywhere:
            if self.ctx.treat(rule) == REFUSE:
                return self._refuse(str(refusal(rule, self.ctx)), show)
            return getattr(self, "_cmd_" + rule.session)(args, show)
        try:
            transform = rewrite_rule(rule, args, self.ctx)
        except Refused as e:
            return self._refuse(str(e), show)
        self._queue_or_send(args, transform, show)

    def start(self, first: list[bytes] | None, rest: bytes) -> None:
        """The client authenticated at the gate (proxy/auth.py): `first`, a request to
        handle before anything else (HELLO without its AUTH), then the bytes that followed."""
        if first is not None:
            self.fast_blocked = True
            self._handle_safely(first)
        if rest and not self.input_closed:
            self.client_data(rest)

    def _login(self, args: list[bytes], name: str) -> bool:
        """AUTH, HELLO ... AUTH and RESET on a listener with users, and every command
        while `locked` (after RESET): True if answered here. Never forwarded: the
        upstream connection is authenticated with the route's own credentials."""
        self._label = name
        creds = rest = err = None
        if name == "auth":
            if len(args) < 2:
                err = error("ERR wrong number of arguments for 'auth' command")
            elif len(args) > 3:
                err = error("ERR syntax error")
            else:
                creds = (args[1] if len(args) == 3 else None, args[-1])
        elif name == "hello":
            err, creds, rest = parse_hello(args)
            if err is None and creds is None:  # a plain HELLO: the server answers it
                if not self.locked:
                    return False
                err = HELLO_NOAUTH
        elif name == "reset" and len(args) == 1:
            # RESET logs the connection out, as Redis does when the default user has a
            # password: what follows needs AUTH again. The server resets the upstream
            # connection (the proxy authenticates it again with the route's credentials).
            self.locked = True
            return False
        elif not self.locked or name in ("quit", "reset"):
            return False
        else:
            err = NOAUTH
        if self.tx is not None and name in ("auth", "hello"):
            # queued commands run at EXEC; a password is checked when read: refused, so
            # EXEC answers EXECABORT as for any command rejected while queueing
            self._refuse(f"ERR {name.upper()}{' ... AUTH' if name == 'hello' else ''} inside MULTI is refused "
                         f"by the proxy on route {self.route.name}: it checks passwords as it reads them, "
                         "not at EXEC", self._show())
            return True
        if err is None:
            user, err = self.login.check(*creds)
            if user is not None and routing(user.route) != routing(self.route):
                err = error(f"ERR user '{user.name}' is on route {user.route.name} and this connection is on route "
                            f"{self.route.name}: a connection's route cannot change; reconnect to authenticate "
                            f"as {user.name} (nothing changed)")
            elif user is not None:
                self.login.user = user
                self.locked = False
                if rest is None:
                    self._local(OK, self._show())
                    return True
                args[:] = rest  # HELLO <proto> [SETNAME n], answered by the server as always
                return False
        self._local(err, self._show())  # the current user (and its route) stays
        return True

    def _where_on_shared(self, rule, args):
        """A request on a shared link whose Rule is not shareable (or past the owed cap):
        None if it stays (the proxy answers it itself: CLIENT REPLY, QUIT, a refusal),
        a protocol number for a plain HELLO 2/3 (the shared link of that protocol),
        else "dedicated"."""
        if len(self.pending) >= SHARED_MAX_OWED:
            return "dedicated"
        if rule.session == "info":  # counting another backend db's keys needs SELECT
            return "dedicated" if self._info_selects(args) else None
        if rule.session in ("client_reply", "quit", "client_setname", "client_getname"):
            return None
        if rule.session == "hello" and self.tx is None and len(args) == 2 and args[1] in (b"2", b"3"):
            version = int(args[1])
            return version if version != self.link_proto else None
        if rule.everywhere or self.ctx.treat(rule) == REFUSE or self._answers_itself(rule):
            return None
        if rule.rewrite is not None:
            try:  # refused by its handler? then refused here, on the shared connection
                rule.rewrite(list(args), self.ctx)
            except Refused:
                return None
        return "dedicated"

    def _answers_itself(self, rule) -> bool:
        """A tenant emulation answered by the proxy without a connection of its own."""
        return rule.session in ("client_info", "client_list", "config_get", "monitor") \
            and self.ctx.treat(rule) == EMULATE

    def _shared_block(self, args: list[bytes]) -> None:
        """MULTI on a shared link. If this read holds the whole block up to EXEC or DISCARD
        (as redis-py, redis-rb and redis-client send it: pipelined) and every command in it
        may share a connection, the block goes to the shared link in one write, so no
        other client's command can fall inside it, and its replies come back as from a
        connection of its own. Otherwise (typed command by command, split over reads,
        WATCH, a command with connection state inside) the client moves to a connection
        of its own, with what was read of the block held in order."""
        block: list = []
        complete = False
        held = self.held  # when replayed, the rest of the block waits there, then in the reader
        while len(self.pending) + len(block) + 2 < SHARED_MAX_OWED:
            if held:
                nxt = held.popleft()
            else:
                try:
                    nxt = self.reader.get()
                    if nxt is not None:
                        self.block_read += 1  # (client_data counts it in the read's depth)
                except Exception as e:
                    msg = e if isinstance(e, ProtocolError) else f"unreadable request ({e.__class__.__name__})"
                    nxt = Fault(f"ERR Protocol error: {msg}")
                    self.stats.errors["protocol"] += 1
                    self.input_closed = True
                if nxt is None:
                    break
            block.append(nxt)
            if type(nxt) is Fault:
                break
            name = nxt[0].lower()
            if name in (b"exec", b"discard"):
                complete = True
                break
            # the rule handle will find (a name past the plan cache's bound is not planned
            # here: _plan counts it in uncached_commands, and handle does once it runs)
            plan = self.plans.get(nxt[0])
            if plan is None and len(self.plans) < PLAN_CACHE:
                plan = self._plan(nxt[0])
            rule = plan.rule if plan is not None else self.rules.by_raw_name(nxt[0])
            if rule.name in self.rules.containers and len(nxt) > 1:  # (containers plan SLOW)
                rule = self.rules.lookup(nxt)
            if not (rule.shareable or self._answered_here(rule, nxt)):
                break
        if not complete:
            self.need_dedicated = True
            held.extendleft(reversed([args] + block))  # in order, ahead of anything held
            return
        self._in_block = True
        mark = (len(self.out_upstream), len(self.pending), self.owed_sent)
        try:
            if self._plain_block(args, block):
                # every reply passes as it comes: no transaction state to keep
                self._pass_edge(args)
                for a in block[:-1]:
                    self.handle(a)
                self._pass_edge(block[-1])
                return
            self.handle(args)
            for a in block:
                self.handle(a)
        except BaseException:
            # a bug half-way through the block: none of it may reach the shared link (a
            # MULTI without its EXEC would queue other clients' commands); the caller
            # answers the error and closes this client
            self._unsend(*mark)
            raise
        finally:
            self._in_block = False

    def _unsend(self, n_out: int, n_pending: int, owed: int) -> None:
        """Take back what was queued for the upstream since the mark (nothing is written
        before the shell's flush), and the transaction state it opened."""
        del self.out_upstream[n_out:]
        while len(self.pending) > n_pending:
            self.pending.pop()
        self.owed_sent = owed
        log_ = self.sent_log
        while log_ and log_[-1][0] >= owed:
            log_.pop()
        self.tx = self.tx_open = None
        self.tx_failed = False

    def _plain_block(self, multi: list[bytes], block: list) -> bool:
        """Would the C path take this block whole (rewrite_plain's `blocks`)? A bare
        MULTI and EXEC around commands it takes (a Spec, an argument count the Spec
        accepts, keys that rewrite), on a shared link without MONITOR, CLIENT REPLY
        OFF/SKIP or pinned-cluster resends. Then its replies (+OK, +QUEUED..., EXEC's
        array) pass unchanged, so both paths send it without transaction state."""
        if self.spread is not None or self.sent_log is not None or not self.reply_on or self.skip \
                or self.view.monitors or self.upstream_error is not None or len(block) >= MAX_BLOCK:
            return False
        for a in [multi] + block:
            plan = self.plans.get(a[0])
            if plan is None or plan.fast is None:
                return False
            role = plan.fast.role
            if role != (MULTI_OPENS if a is multi else EXEC_CLOSES if a is block[-1] else 0) \
                    or (role and len(a) != 1):
                return False
            if plan.kind == KEYS:
                try:
                    for i in plan.positions(a):
                        plan.key_in(a[i])
                except (Refused, KeySpecError):
                    return False
        return True

    def _pass_edge(self, args: list[bytes]) -> None:
        """MULTI or EXEC of a plain block: sent as it is, its reply passed as it comes."""
        plan = self.plans[args[0]]
        plan.count += 1
        self._label = plan.label
        data = pack_command(tuple(args))
        self.out_upstream.append(data)
        self.pending.append(None)
        self.owed_sent += 1

    def _answered_here(self, rule, args) -> bool:
        """Inside MULTI on a shared link: a command the proxy answers itself (a refusal,
        CLIENT REPLY, which is refused inside MULTI, QUIT), so nothing reaches the link."""
        if rule.session in ("client_reply", "quit") or rule.everywhere:
            return True
        if self.ctx.treat(rule) == REFUSE:
            return True
        if rule.rewrite is not None:
            try:
                rule.rewrite(list(args), self.ctx)
            except Refused:
                return True
        return False

    def _plan(self, raw_name: bytes) -> Plan:
        plan = compile_plan(raw_name, self.ctx)
        plan.entry = None if plan.reply is None else Req(XFORM, plan.reply)
        if "blocking" in plan.rule.flags:
            plan.entry = Req(PASS if plan.reply is None else XFORM, plan.reply, BLOCKING)
        if len(self.plans) < PLAN_CACHE:  # names are client input: bound the cache
            self.plans[raw_name] = plan
            plan.fast = fast_spec(plan)
            if plan.fast is not None:
                self.fast_specs[raw_name] = plan.fast
        else:
            self.stats.uncached_commands += 1
        return plan

    def _queue_or_send(self, args, transform, show: bool, confirm=None) -> None:
        if self.tx is not None:
            self.tx.append(TxItem(transform, confirm))
            self._send(args, self._entry(None, show))  # +QUEUED (or the server's error)
        else:
            self._send(args, self._entry(transform, show))

    def _hold_until(self, fn):
        """A reply transform that also ends a wait for confirmation."""
        self.confirming += 1

        def done(raw: bytes) -> bytes:
            self.confirming -= 1
            return fn(raw)
        return done

    # ---- connection state, changed on the server's confirmation

    def _cmd_select(self, args, show) -> None:
        if len(args) != 2:
            return self._queue_or_send(args, None, show)  # the server's arity error
        try:
            target = self.ctx.client_db(args[1])
        except Refused as e:
            return self._refuse(str(e), show)
        server_args = [args[0], str(target.db).encode()]
        index = int(args[1])
        if self.tx is not None:
            # Queued: it runs at EXEC. Later queued commands are rewritten for its
            # keyspace, so it must not fail there: only a db the server accepted.
            if target.keyspace != self.q_target.keyspace and target.db not in self.valid_dbs:
                return self._refuse(f"ERR SELECT {int(args[1])} inside MULTI is refused on route "
                                    f"{self.route.name}: backend db {target.db} has another namespace and "
                                    f"the server has not accepted it on this connection (SELECT it "
                                    f"outside MULTI first)", show)
            self._use(target)

            def confirm(raw: bytes) -> None:
                if not is_error(raw):
                    self._confirmed(target, index)
            return self._queue_or_send(server_args, None, show, confirm)

        def done(raw: bytes) -> bytes:
            if not is_error(raw):
                self._confirmed(target, index)
                self._use(target)
            return raw
        # What follows waits for the server's answer, so that outside MULTI `target` is
        # always the db the server is on (requests are rewritten for it, and the db
        # probe before MULTI returns to it).
        self._send(server_args, Req(XFORM, self._hold_until(done), show=show))

    def _cmd_hello(self, args, show) -> None:
        version = None
        if len(args) > 1:
            try:
                version = int(args[1])
            except ValueError:
                pass
        if self.tx is not None:
            def confirm(raw: bytes) -> None:
                if version in (2, 3) and not is_error(raw):
                    self.proto = version
            return self._queue_or_send(args, None, show, confirm)

        def done(raw: bytes) -> bytes:
            if version in (2, 3) and not is_error(raw):
                self.proto = version
            return raw
        self._send(args, Req(XFORM, self._hold_until(done), show=show))

    def _cmd_reset(self, args, show) -> None:
        # RESET always succeeds and turns replies back on: its +RESET is shown.
        self.reply_on, self.skip = True, False
        self.tx, self.tx_failed = None, False

        def done(raw: bytes) -> bytes:
            if raw.startswith(b"+RESET"):
                self.monitor = False
                self._stop_local_monitor()
                self.client_name = None
                self.proto = 2
                for s in self.subs.values():
                    s.clear()
                self.cmap.patterns.clear()
                self._confirmed(self.route.default, 0)
                self._use(self.target)
            return raw
        self._send(args, Req(XFORM, self._hold_until(done)))
        # RESET logs the connection out and selects db 0: set up again what the proxy
        # set up (a failure closes the client with the reason).
        self.handshake(db=self.route.default.db)

    def _cmd_multi(self, args, show) -> None:
        if self.tx is not None:
            return self._send(args, self._entry(None, show))  # nested MULTI: the server's error
        if not self.probed and self.route.databases and not self.shared:
            self._probe_dbs()  # (a SELECT inside MULTI pins: never on a shared link)
        tx: list = []

        def done(raw: bytes) -> bytes:
            # The server may refuse MULTI (ACL, a RESP2 subscriber): then nothing after
            # it is queued. Commands whose queueing changes the proxy's picture (SELECT,
            # HELLO in MULTI) wait for this answer (_multi_unconfirmed).
            self.tx_open = None
            if is_error(raw) and self.tx is tx:
                self.tx, self.tx_failed = None, False
                self._use(self.target)
            if self.tx_waiting:
                self.tx_waiting = False
                self.confirming -= 1
            return raw
        self._send(args, Req(XFORM, done, show=show))
        self.tx, self.tx_failed = tx, False
        self.tx_open = tx

    def _multi_unconfirmed(self, args) -> bool:
        """Inside MULTI before the server's +OK for it: hold `args` (a command that
        changes the proxy's picture when queued) until that answer is in."""
        if self.tx_open is None:
            return False
        if not self.tx_waiting:
            self.tx_waiting = True
            self.confirming += 1
        self.held.appendleft(args)
        return True

    def _cmd_exec(self, args, show) -> None:
        items, failed = self.tx, self.tx_failed
        self.tx, self.tx_failed = None, False
        if items is None:
            return self._send(args, self._entry(None, show))  # EXEC without MULTI: the server's error
        if failed:
            self._use(self.target)
            return self._send([b"DISCARD"], Req(XFORM, lambda raw: EXECABORT, show=show))
        confirms = any(t.confirm is not None for t in items)

        def done(raw: bytes) -> bytes:
            out = _exec_reply(raw, items)
            if confirms:
                self._use(self.target)
            return out
        if confirms:
            # The queued SELECT/HELLO take effect with EXEC's array (not on a nil or an
            # error): what follows waits for it.
            return self._send(args, Req(XFORM, self._hold_until(done), show=show))
        self._use(self.target)
        if any(t.transform is not None for t in items):
            return self._send(args, Req(XFORM, done, show=show))
        self._send(args, self._entry(None, show))

    def _cmd_discard(self, args, show) -> None:
        self.tx, self.tx_failed = None, False
        self._use(self.target)
        self._send(args, self._entry(None, show))

    def _cmd_quit(self, args, show) -> None:
        self._local(OK, show)
        self.input_closed = True
        self.close_when_done = True

    def _cmd_client_reply(self, args, show) -> None:
        mode = args[2].lower() if len(args) == 3 else None
        if mode not in (b"on", b"off", b"skip"):
            return self._queue_or_send(args, None, show)  # the server's syntax error
        if self.tx is not None:
            # Redis runs it inside EXEC and then leaves EXEC's array short of elements.
            return self._refuse("ERR CLIENT REPLY inside MULTI is refused by the proxy: the server "
                                "would send an EXEC reply with elements missing", show)
        if mode == b"on":
            self.reply_on, self.skip = True, False
            self._local(OK)
        elif mode == b"off":
            self.reply_on, self.skip = False, False
        elif self.reply_on:
            self.skip = True

    def _cmd_client_setname(self, args, show) -> None:
        if len(args) != 3 or self.tx is not None or not self.shared:
            # the server's own arity error, queued in MULTI, or a connection of its own:
            # the server names it, and the proxy keeps the name once it says +OK
            name = args[2] if len(args) == 3 else None

            def done(raw: bytes) -> bytes:
                if name is not None and not is_error(raw):
                    self.client_name = name or None
                return raw
            if self.tx is not None:
                return self._queue_or_send(args, None, show, done)
            return self._send(args, Req(XFORM, done, show=show))
        name = args[2]
        if any(c < 0x21 or c > 0x7E for c in name):  # as Redis validates it (networking.c)
            return self._local(error("ERR Client names cannot contain spaces, newlines or special characters."),
                               show)
        self.client_name = name or None
        self._local(OK, show)

    def _cmd_client_getname(self, args, show) -> None:
        if len(args) != 2 or self.tx is not None or not self.shared:
            return self._queue_or_send(args, None, show)
        name = self.client_name
        nil = b"_\r\n" if self.link_proto == 3 else b"$-1\r\n"
        self._local(nil if name is None else b"$%d\r\n%s\r\n" % (len(name), name), show)

    def _cmd_subscribe(self, args, show) -> None:
        which, adding = self.rules.get(args[0].lower().decode("latin-1")).subscribe
        if self.tx is not None:
            return self._refuse(f"ERR {args[0].decode('latin-1').upper()} inside MULTI is refused by the "
                                "proxy: subscription state changes only outside transactions", show)
        try:
            mapper = self.cmap.pattern_in if which == "pattern" else self.cmap.channel_in
            for i in range(1, len(args)):
                args[i] = mapper(args[i])
        except Refused as e:
            return self._refuse(str(e), show)
        if self.spread is not None:  # a spread route on a cluster: the node of its subscriptions
            dest = self.spread.dest(args, False)
            if dest.local is not None:
                return self._refuse(dest.local, show)
            self.out_upstream.append(dest)
        else:
            self.out_upstream.append(encode_command(args))
        n = len(args) - 1
        if n == 0 and adding:
            return self._expect(self._entry(None, show))  # arity error from the server
        self._expect(Req(SUB, data=[n if n else -1, which], show=show))
        self.sub_waiting += 1

    def _cmd_monitor(self, args, show) -> None:
        if self.tx is not None:
            return self._refuse("ERR MONITOR inside MULTI is refused by the proxy", show)
        if self.ctx.treat(self.rules.get("monitor")) == EMULATE:
            # the route's own traffic, in client terms, from the route's sessions (RouteView)
            if not self.local_monitor:
                self.local_monitor = True
                self.view.add_monitor(self)
            return self._local(OK, show)

        def started(raw: bytes) -> bytes:
            if not is_error(raw):
                self.monitor = True
            return raw
        self._send(args, Req(XFORM, self._hold_until(started), show=show))

    def _stop_local_monitor(self) -> None:
        if self.local_monitor:
            self.local_monitor = False
            self.view.remove_monitor(self)

    def _feed_monitors(self, args: list[bytes], rule) -> None:
        """One MONITOR line for this request, in client terms (Redis's format), to the
        route's monitors. AUTH and commands Redis keeps out of MONITOR are left out."""
        if "skip_monitor" in rule.flags or rule.name in ("auth", "hello") or self.local_monitor:
            return
        shown = [_repr(a) for a in args]
        if rule.name == "migrate":  # its AUTH / AUTH2 arguments are passwords: redacted, as Redis does
            for i, a in enumerate(args):
                if a.upper() == b"AUTH" and i + 1 < len(args):
                    shown[i + 1] = b'"(redacted)"'
                elif a.upper() == b"AUTH2" and i + 2 < len(args):
                    shown[i + 1] = shown[i + 2] = b'"(redacted)"'
        line = b"+%.6f [%d %s] %s\r\n" % (time(), self.db_index, self.facts.addr.encode(), b" ".join(shown))
        self.view.feed(line)

    # ---- tenant emulations: what the server would answer about every route

    def _pass(self, args, show) -> None:
        """The command as the server answers it (app routes, routes without namespace)."""
        try:
            transform = rewrite_rule(self.rules.lookup(args), args, self.ctx)
        except Refused as e:
            return self._refuse(str(e), show)
        self._queue_or_send(args, transform, show)

    def _text(self, text: bytes) -> bytes:
        """A text reply: a verbatim string on RESP3 (as Redis answers INFO, CLIENT LIST)."""
        if self.proto == 3:
            return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
        return b"$%d\r\n%s\r\n" % (len(text), text)

    def _cmd_info(self, args, show) -> None:
        if self.ctx.treat(self.rules.get("info")) != EMULATE or not emulate.info_has_keyspace(args):
            return self._pass(args, show)
        if self.tx is not None:
            return self._refuse(str(self.ctx.refused("info", "its keyspace section is emulated with SCAN and "
                                                             "cannot run inside MULTI")), show)
        gen = emulate.info(args, self._client_dbs(), self.target.db, self._text)
        self.emu = (gen, show)
        self._emu_step(None)

    def _info_selects(self, args) -> bool:
        """Would this INFO's emulation SELECT another backend db? (not on a shared link)"""
        return self.tx is None and self.ctx.treat(self.rules.get("info")) == EMULATE \
            and emulate.info_has_keyspace(args) and any(t.db != self.target.db for _, t in self._client_dbs())

    def _client_dbs(self) -> list:
        """(client db, DbTarget) for each client db of the route."""
        out = [] if 0 in self.route.databases else [(0, self.route.default)]
        return out + sorted(self.route.databases.items())

    def client_line(self, now: float) -> bytes:
        """This client as a line of CLIENT LIST, in client terms (Redis's format)."""
        f = self.facts
        subs = self.subs
        flags = "O" if self.local_monitor else ("P" if self._subscribed() else ("x" if self.tx is not None else "N"))
        name = (self.client_name or b"").decode("latin-1")
        login = getattr(self.login, "user", None)  # the proxy's user (a listener with users), else the upstream's
        user = login.name if login is not None else (self.route.upstream.username or "default")
        return (f"id={f.id} addr={f.addr} laddr={f.laddr} fd={f.fd} name={name} age={int(now - f.created)} "
                f"idle={int(now - self.last_active)} flags={flags} db={self.db_index} sub={len(subs['channel'])} "
                f"psub={len(subs['pattern'])} ssub={len(subs['shard'])} "
                f"multi={len(self.tx) if self.tx is not None else -1} watch=0 qbuf=0 qbuf-free=0 argv-mem=0 "
                f"multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r "
                f"cmd={self._label or 'NULL'} user={user} redir=-1 resp={self.proto}\n"
                ).encode("utf-8", "surrogateescape")  # (a user name is any TOML string)

    def _cmd_client_info(self, args, show) -> None:
        if self.ctx.treat(self.rules.get("client|info")) != EMULATE or len(args) != 2:
            return self._pass(args, show)
        if self.tx is not None:
            return self._refuse(str(self.ctx.refused("client|info", "answered by the proxy, it cannot be "
                                                                    "queued in MULTI")), show)
        self._label = "client|info"
        self._local(self._text(self.client_line(monotonic())), show)

    def _cmd_client_list(self, args, show) -> None:
        if self.ctx.treat(self.rules.get("client|list")) != EMULATE:
            return self._pass(args, show)
        if self.tx is not None:
            return self._refuse(str(self.ctx.refused("client|list", "answered by the proxy, it cannot be "
                                                                    "queued in MULTI")), show)
        ids, kind = None, None
        i = 2
        while i < len(args):
            opt = args[i].upper()
            if opt == b"TYPE" and i + 1 < len(args):
                kind = args[i + 1].lower()
                if kind not in (b"normal", b"pubsub", b"master", b"replica", b"slave"):
                    return self._local(error(f"ERR Unknown client type '{args[i + 1].decode('latin-1')}'"), show)
                i += 2
            elif opt == b"ID" and i + 1 < len(args):
                try:
                    ids = {int(a) for a in args[i + 1:]}
                except ValueError:
                    return self._local(error("ERR Invalid client ID"), show)
                break
            else:
                return self._local(error("ERR syntax error"), show)
        self._label = "client|list"
        now = monotonic()
        lines = []
        for sess in sorted(self.view.sessions(), key=lambda x: x.facts.id):
            if ids is not None and sess.facts.id not in ids:
                continue
            if kind is not None and kind != (b"pubsub" if sess._subscribed() else b"normal"):
                continue
            lines.append(sess.client_line(now))
        self._local(self._text(b"".join(lines)), show)

    def _cmd_config_get(self, args, show) -> None:
        if self.ctx.treat(self.rules.get("config|get")) != EMULATE or len(args) < 3:
            return self._pass(args, show)
        names: list[bytes] = []
        for pattern in args[2:]:
            p = pattern.decode("latin-1").lower()
            if any(c in p for c in "*?["):
                names += [n.encode() for n in CONFIG_GET_SAFE if fnmatchcase(n, p) and n.encode() not in names]
            elif p in CONFIG_GET_SAFE:
                if p.encode() not in names:
                    names.append(p.encode())
            else:
                return self._refuse(str(self.ctx.refused(
                    "config|get", f"CONFIG GET answers only {', '.join(CONFIG_GET_SAFE)}; "
                                  f"'{show_name(pattern)}' is not among them")), show)
        if not names:
            return self._local(b"%0\r\n" if self.proto == 3 else b"*0\r\n", show)
        self._queue_or_send([args[0], args[1], *names], None, show)

    def _cmd_emulated(self, args, show) -> None:
        name = args[0].lower()
        ks = self.ctx.ks
        if ks.mode != "add":
            # strip and none modes see exactly the backend db: the real command is right.
            try:
                transform = rewrite(args, self.ctx)
            except Refused as e:
                return self._refuse(str(e), show)
            return self._queue_or_send(args, transform, show)
        if self.tx is not None:
            return self._refuse(str(self.ctx.refused(name.decode(),
                                                     "it is emulated with SCAN and cannot run inside MULTI")), show)
        try:
            gen = emulate.start(name, args, ks, self.proto, random.random())
        except Refused as e:
            return self._refuse(str(e), show)
        self.emu = (gen, show)
        self._emu_step(None)

    # ---- emulations: several internal round trips answer one client request

    def _emu_step(self, raw) -> None:
        gen, show = self.emu
        try:
            cmd = gen.send(None if raw is None else _decode(raw))
        except StopIteration as stop:
            self.emu = None
            self._local(stop.value, show)
            return
        self._send(cmd, Req(INTERNAL, self._emu_step))

    # ------------------------------------------------------------ shared -> dedicated

    @property
    def shared_quiet(self) -> bool:
        """No reply owed on the shared connection: the session may leave it."""
        pending = self.pending
        return self.emu is None and self.partial is None and self.redirects is None \
            and (not pending or all(e is not None and e.kind == LOCAL for e in pending))

    def switch_to_dedicated(self) -> None:
        """Continue on a dedicated upstream connection: handshake, then the held requests."""
        self.shared = False
        self.need_dedicated = False
        self.need_link = None
        # the client said HELLO 3 on a shared link: its own connection speaks RESP3 too
        self.handshake(self.link_proto)
        if self.client_name is not None:  # the name the proxy held goes to the server
            self._send([b"CLIENT", b"SETNAME", self.client_name], Req(INTERNAL, lambda raw: None))
        self._replay_held()

    def _may_borrow(self) -> bool:
        """May this blocking command go to a pooled connection? Only from the plain state:
        nothing on the connection that the pooled one would lack (MULTI, subscriptions,
        CLIENT REPLY OFF/SKIP, MONITOR, a confirmation awaited)."""
        # (on a cluster route the pool's connections are on the slot's owner, and moved with it:
        # Proxy.cluster_changed)
        return self.limits.blocking_pool > 0 and self.tx is None and self.tx_open is None \
            and not self._subscribed() and not self.sub_waiting and self.reply_on and not self.skip \
            and not self.monitor and self.emu is None and not self.confirming and self.need_link is None \
            and not self.locked

    def start_borrow(self) -> None:
        """The shell lent a pooled connection (set up for this route, db and protocol):
        the held blocking command goes there, alone; what follows waits for its reply."""
        self.need_borrow = False
        self.shared = False
        args = self.held.popleft()  # the blocking command (held first: handle's appendleft)
        self._handle_safely(args)
        self.borrowing = bool(self.pending)

    def end_borrow(self) -> None:
        """Its reply is in (the shell took the connection back): on the shared link again."""
        self.borrowing = False
        self.shared = True
        self.fast_blocked = True
        if self.held:
            self._replay_held()

    def switch_link(self) -> None:
        """Continue on the shared link of protocol `need_link`: the held requests, HELLO first."""
        self.link_proto, self.need_link = self.need_link, None
        self._replay_held()

    def _replay_held(self) -> None:
        held = self.held
        while held and self.emu is None and not self.need_dedicated and self.need_link is None \
                and not self.confirming and not self.close_when_done and not self.need_borrow \
                and not self.borrowing and self.redirects is None:
            item = held.popleft()
            if type(item) is Fault:
                held.clear()
                return self._fault_now(item.message)
            self._handle_safely(item)

    # ------------------------------------------------------------ upstream -> client

    def upstream_data(self, data: bytes) -> None:
        """Replies from a dedicated upstream connection."""
        try:
            buf = self._buf + data if self._buf else data  # _buf: at most a header line
            self._buf = b""
            pos = 0
            if self.partial is not None:
                pos = self._feed_partial(buf, 0)
                if self.partial is not None:
                    return
            self._buf = b""
            n = len(buf)
            pending, out, subs = self.pending, self.out_client, self.subs
            while pos < n:
                if pending and pending[0] is None and not self.sub_waiting and not self.monitor \
                        and not (self.proto == 2 and (subs["channel"] or subs["pattern"] or subs["shard"])):
                    # the common case: replies that need nothing, passed on as they came
                    end, m = frame_run(buf, pos, len(pending), 1 | self.run_flags, pending)
                    if m:
                        out.append(buf[pos:end])
                        pos = end
                        if pending and pending[0] is not None:
                            self._drain_locals()
                        continue
                end = frame_end(buf, pos)
                if end < 0:
                    pos = self._start_partial(buf, pos)
                    break
                self._reply(buf[pos:end], buf[pos])
                pos = end
        except ProtocolError as e:
            self._buf = b""
            self.partial = None
            return self.upstream_lost(f"upstream sent bytes that are not RESP: {e}")
        except UnexpectedReply:
            self.stats.errors["unexpected_reply"] += 1
            log.warning("route %s: the server sent a reply no request was waiting for; closing the client "
                        "and its upstream connection", self.route.name,
                        extra={"event": "upstream_error", "route": self.route.name})
            return self.upstream_lost("the server sent a reply no request was waiting for")
        if self.partial is None and pos < len(buf):
            self._buf = buf[pos:]
        if self.held and not self._waiting_for_reply():
            self._replay_held()

    def _waiting_for_reply(self) -> bool:
        return self.emu is not None or self.need_dedicated or self.need_link is not None or self.confirming > 0 \
            or self.need_borrow or self.borrowing or self.redirects is not None

    def _streams(self) -> bool:
        """May the reply at the head be forwarded as its bytes arrive? (needs nothing)"""
        return bool(self.pending) and self.pending[0] is None and not self.monitor and not self.sub_waiting \
            and not (self.proto == 2 and self._subscribed())

    def _start_partial(self, buf: bytes, pos: int) -> int:
        """The reply at `pos` is not whole yet: frame it across reads from here on. A reply
        that needs nothing is collected up to STREAM_AFTER bytes (one write, as a whole
        reply), then forwarded as its bytes arrive; one that must be rewritten is held whole."""
        self.partial = PartialReply()
        self.partial_chunks = []
        self.partial_size = 0
        self.partial_pass = self._streams()
        return self._feed_partial(buf, pos)

    def _feed_partial(self, buf: bytes, pos: int) -> int:
        end, done = self.partial.feed(buf, pos)
        chunk = buf[pos:end]
        chunks = self.partial_chunks
        if chunks is None:
            if chunk:
                self.out_client.append(chunk)  # streamed: the client gets the bytes now
        else:
            chunks.append(chunk)
            self.partial_size += len(chunk)
            if self.partial_pass and self.partial_size >= STREAM_AFTER:
                self.out_client.extend(chunks)  # large: stream it from here on
                self.partial_chunks = None
        if not done:
            self._buf = buf[end:]  # at most an unfinished header line
            return len(buf)
        self.partial = None
        if self.partial_chunks is None:
            self.pending.popleft()  # the streamed reply's entry (None)
            self._drain_locals()
        else:
            raw = b"".join(self.partial_chunks)
            self.partial_chunks = None
            self._reply(raw, raw[0])
        return end

    def shared_run(self, buf: bytes, pos: int, limit: int) -> tuple[int, int]:
        """Pass up to `limit` replies from a shared connection that need nothing
        through as one slice; (position after them, how many)."""
        pending = self.pending
        start = pos
        # a RESP3 push is no reply: the link skips it
        pos, m = frame_run(buf, pos, limit, (self.link_proto == 3) | self.run_flags, pending)
        if m:
            self.out_client.append(buf[start:pos])
            if pending and pending[0] is not None:
                self._drain_locals()
        return pos, m

    def shared_reply(self, raw: bytes, first: int) -> None:
        """One reply from a shared upstream connection (framed by the link)."""
        if first == 0x2D and self.cluster:
            raw = self._redirected(raw)
        pending = self.pending
        if self.redirects is not None:  # a redirected request held: this reply in order after it
            self._after_held(raw)
        elif pending and pending[0] is None:
            pending.popleft()
            self.out_client.append(raw)
            if pending and pending[0] is not None:
                self._drain_locals()
        else:
            self._reply(raw, first)
        if self.held and not self._waiting_for_reply():
            self._replay_held()

    def shared_streams(self) -> bool:
        """May the link forward the head reply to this client as it arrives?"""
        return self._streams()

    def shared_stream_done(self) -> None:
        """The link finished streaming the head reply (entry None) to this client."""
        self.pending.popleft()
        self._drain_locals()

    def _subscribed(self) -> bool:
        s = self.subs
        return bool(s["channel"] or s["pattern"] or s["shard"])

    def _redirected(self, raw: bytes) -> bytes | None:
        """A -MOVED / -ASK never reaches the client (it speaks to one ordinary Redis):
        the shell is told, so the route follows its slot, and the request (it was not run)
        is held to be sent again (None: `_hold_redirect`), or gets -TRYAGAIN naming what
        happened."""
        got = redirect_error(raw)
        if got is None:
            return raw
        if self.on_redirect is not None:
            self.on_redirect(got[1])
        if got[1] is not None:
            if self.on_resend is not None and self._hold_redirect(got):
                return None
            self.stats.errors["cluster_redirect"] += 1  # (counted when the client gets -TRYAGAIN)
        return got[0]

    def _hold_redirect(self, got) -> bool:
        """Hold the redirected request at the head of `pending` to be sent again, if it and
        every request after it on the connection are plain (no transform, no connection
        state, no proxy-made reply between: then only their order matters). The replies of
        the later ones then come to `_after_held` one by one (HELD_PLAIN stops the C path)."""
        pending = self.pending
        if not pending or self.resending or self.partial is not None:
            return False
        if self.redirects is None:
            if self.tx is not None or self.tx_open is not None or self._in_block or self.emu is not None \
                    or self.monitor or self.sub_waiting or self._subscribed() or self.confirming \
                    or self.need_dedicated or self.need_link is not None or self.need_borrow or self.borrowing \
                    or self.upstream_error is not None or any(e is not None for e in pending):
                return False
        elif any(e is not HELD_PLAIN for e in pending):
            return False
        data = self._sent_bytes(self.owed_sent - len(pending))  # (no LOCAL entry among them)
        if data is None:
            return False
        if self.redirects is None:
            self.redirects = []
            self.fast_blocked = True
            for i in range(1, len(pending)):
                pending[i] = HELD_PLAIN
        pending.popleft()
        self.redirects.append([data, got[1], got[0]])
        if not pending:
            self._start_resend()
        return True

    def _after_held(self, raw: bytes | None) -> None:
        """A reply while redirected requests are held (None: it was redirected too, and held).
        A request that ran after them: each held one gets its -TRYAGAIN first (sent again it
        would run after this one, against the client's order: cluster_route.resend_plan)."""
        pending = self.pending
        if raw is not None:
            if not pending:
                raise UnexpectedReply()
            pending.popleft()
            out = self.out_client
            for item in self.redirects:
                out.append(item[2])
            self.stats.errors["cluster_redirect"] += len(self.redirects)
            self.redirects.clear()
            out.append(raw)
            if not pending:
                self._end_hold()
        elif not pending and not self.resending:  # (already started by _hold_redirect)
            self._start_resend()

    def _start_resend(self) -> None:
        """Every reply owed on the connection is in; the held requests (the trailing run of
        redirected ones) go to the shell, in order; later requests wait for their replies."""
        if not self.redirects:
            return self._end_hold()
        self.resending = True
        self.on_resend([(item[0], item[1]) for item in self.redirects])

    def resent(self, replies: list[bytes]) -> None:
        """The shell's replies to the requests sent again, in order (a redirect still, after
        MAX_REDIRECTS: its -TRYAGAIN). Then the requests that waited go on."""
        if not self.resending or self.upstream_error is not None:
            return  # answered meanwhile (upstream_lost)
        out = self.out_client
        for item, raw in zip(self.redirects, replies):
            got = redirect_error(raw) if raw[:1] == b"-" else None
            if got is not None and got[1] is not None:
                self.stats.errors["cluster_redirect"] += 1
            out.append(raw if got is None else got[0])
        self.redirects.clear()
        self._end_hold()
        if self.held and not self._waiting_for_reply():
            self._replay_held()

    def _end_hold(self) -> None:
        self.redirects = None
        self.resending = False
        self.fast_blocked = True

    def _reply(self, raw: bytes, first: int) -> None:
        if first == 0x2D and self.cluster:
            raw = self._redirected(raw)
            if raw is None or self.redirects is not None:
                return self._after_held(raw)
        elif self.redirects is not None and first != 0x3E:
            return self._after_held(raw)
        if first == 0x3E:  # '>' RESP3 push: pub/sub, invalidations; never a reply to a request
            return self._pubsub(raw)
        if self.monitor and first == 0x2B:
            self.out_client.append(raw)
            return
        # Before the subscription, an array reply to an earlier request (LRANGE giving
        # ["message", ...]) is that request's reply, not a pub/sub frame.
        pending = self.pending
        head = pending[0] if pending else None
        if self.proto == 2 and first == 0x2A and (
                self._subscribed() or (head is not None and head.kind == SUB)):
            _, items = split(raw)
            if items:
                kind = (string_value(items[0]) or b"").lower()
                if kind in MESSAGES or kind in self.rules.confirms:
                    return self._pubsub(raw)
        if head is not None and head.kind == LOCAL:
            self._drain_locals()
            head = pending[0] if pending else None
        if not pending:
            raise UnexpectedReply()
        entry = pending.popleft()
        if entry is None:
            self.out_client.append(raw)
        else:
            kind = entry.kind
            if kind == PASS:
                if entry.show:
                    self.out_client.append(raw)
            elif kind == XFORM:
                out = entry.fn(raw)
                if entry.show:
                    self.out_client.append(out)
            elif kind == INTERNAL:
                entry.fn(raw)
            elif kind == SUB:  # an error instead of confirmations
                self.sub_waiting -= 1
                if entry.show:
                    self.out_client.append(raw)
        self._drain_locals()

    def _pubsub(self, raw: bytes) -> None:
        out, kind = rewrite_frame(raw, self.cmap, self.subs, self.rules.confirms)
        head = self.pending[0] if self.pending else None
        waiting = kind is not None and head is not None and head.kind == SUB
        if out is not None and (not waiting or head.show):
            self.out_client.append(out)
        if not waiting:
            return
        state = head.data
        if state[0] == -1:
            if not self.subs[state[1]]:
                state[0] = 0
        else:
            state[0] -= 1
        if state[0] == 0:
            self.pending.popleft()
            self.sub_waiting -= 1
            self._drain_locals()

    # ------------------------------------------------------------ faults

    def upstream_lost(self, reason: str, tell_idle: bool = False) -> None:
        """The upstream connection is gone: answer everything owed with an error, then close.

        The client's library reconnects, and its new connection gets a new upstream.
        With `tell_idle` (the upstream could not be reached at all) a client that has
        asked nothing yet gets the error anyway, as Redis does when it refuses a
        connection (maxclients): it reads it as the reply to its first request."""
        if self.upstream_error is not None:
            return
        self.stats.errors["upstream"] += 1
        self.upstream_error = reason
        self.need_borrow = False  # a blocking command waiting for a pooled connection is answered below
        self.fast_blocked = True
        self.input_closed = True
        err = error(f"ERR upstream unavailable ({reason})")
        if tell_idle and not self.pending and not self.held:
            self.out_client.append(err)
        emu_answered = False
        partial_streamed = self.partial is not None and self.partial_chunks is None
        self.partial = self.partial_chunks = None
        if partial_streamed:
            # half a reply went out already: nothing after it could be read right
            self.pending.clear()
        for _ in self.redirects or ():  # held to be sent again: before the pending ones
            self.out_client.append(err)
        self.redirects = None
        self.resending = False
        while self.pending:
            entry = self.pending.popleft()
            if entry is None:
                self.out_client.append(err)
            elif entry.kind == LOCAL:
                self.out_client.append(entry.data)
            elif entry.kind == INTERNAL:
                if entry.fn == self._emu_step and not emu_answered and self.emu and self.emu[1]:
                    self.out_client.append(err)
                    emu_answered = True
            elif entry.show:
                self.out_client.append(err)
        self.emu = None
        while self.held:
            item = self.held.popleft()
            self.out_client.append(err if type(item) is not Fault else error(item.message))
        self.out_upstream.clear()
        self.close_when_done = True


def _exec_reply(raw: bytes, items: list[TxItem]) -> bytes:
    """EXEC's array: each queued command's success confirms its state change, and its
    transform gives its element in client terms. A nil (WATCH) or an error changes nothing."""
    if raw[:1] != b"*":
        return raw
    header, elems = split(raw)
    if len(elems) != len(items):
        return raw  # *-1 (aborted by WATCH)
    for item, elem in zip(items, elems):
        if item.confirm is not None:
            item.confirm(elem)
    if all(item.transform is None for item in items):
        return raw
    return header + b"".join(e if t.transform is None else t.transform(e) for t, e in zip(items, elems))


def _repr(arg: bytes) -> bytes:
    """An argument quoted as Redis's MONITOR shows it (sdscatrepr)."""
    out = bytearray(b'"')
    for c in arg:
        if c in (0x22, 0x5C):
            out += b"\\" + bytes((c,))
        elif c in _ESCAPES:
            out += _ESCAPES[c]
        elif 0x20 <= c < 0x7F:
            out.append(c)
        else:
            out += b"\\x%02x" % c
    out += b'"'
    return bytes(out)


_ESCAPES = {0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t", 0x07: b"\\a", 0x08: b"\\b"}


def _decode(raw: bytes):
    r = hiredis.Reader()
    r.feed(raw)
    return r.gets()
