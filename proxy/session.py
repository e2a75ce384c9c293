"""One client connection as a sans-IO state machine.

Bytes from the client go in with `client_data`, bytes from its upstream
connection with `upstream_data`; what to send comes out of `take_upstream` and
`take_client`. No sockets here: the asyncio shell (server.py) only moves bytes.

Ordering: every request that expects a reply leaves one entry in `pending`, in
order. Replies the proxy makes itself (refusals, protocol errors) are entries
too, so they reach the client in the position of their request. Push frames
(RESP3 `>`, RESP2 pub/sub messages) belong to no request and pop nothing.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from itertools import repeat

import hiredis

from proxy import emulate
from proxy.commands import CommandTable, default_table
from proxy.config import Limits, Route
from proxy.keyspace import Refused
from proxy.pubsub import CONFIRMS, MESSAGES, ChannelMap, rewrite_frame
from proxy.replies import exec_array
from proxy.resp import (OK, ProtocolError, RequestReader, encode_command, error, frame_end, frame_run,
                        pack_command, is_error, split, string_value)
from proxy.keyspecs import KeySpecError
from proxy.rewrite import KEYS, Ctx, Plan, compile_plan, fast_spec, refuse, rewrite
from proxy.speedups import C
from proxy.stats import RouteStats

# The C path's keyspace modes (proxy/_speedups.c, rewrite_plain).
FAST_MODES = {"none": 0, "add": 1, "strip": 2}
_rewrite_plain = C.rewrite_plain if C is not None else None

# Kinds of pending entries (a plain None is the common "pass the reply through").
XFORM, LOCAL, INTERNAL, SUB = 1, 2, 3, 4

SUBSCRIBE_CMDS = {
    b"subscribe": ("channel", True), b"unsubscribe": ("channel", False),
    b"psubscribe": ("pattern", True), b"punsubscribe": ("pattern", False),
    b"ssubscribe": ("shard", True), b"sunsubscribe": ("shard", False),
}
# A deep pipeline gains nothing from sharing, and its replies could not be slowed
# down without slowing everyone on the shared connection: past this many owed
# replies a client moves to a dedicated connection, where backpressure is its own.
SHARED_MAX_OWED = 64
# CLIENT subcommands that set nothing a later command depends on: fine on a shared connection.
SHARED_CLIENT_SUBCOMMANDS = frozenset((b"setinfo", b"help"))
EXECABORT = error("EXECABORT Transaction discarded because of previous errors.")


class Session:
    def __init__(self, route: Route, table: CommandTable | None = None, limits: Limits | None = None,
                 stats: RouteStats | None = None, shared: bool = False):
        self.route = route
        self.stats = stats or RouteStats(route.name)
        self.table = table or default_table()
        self.limits = limits or Limits()
        self.reader = RequestReader(self.limits.max_bulk, self.limits.max_query)
        self.max_bulk = self.limits.max_bulk
        self.pending: deque = deque()
        # What to send, as chunks in order: the shell takes them (take_upstream and
        # take_client join them; the shell's hot path hands the lists on as they are).
        self.out_upstream: list[bytes] = []
        self.out_client: list[bytes] = []
        self._buf = b""
        self.proto = 2
        self._set_target(route.default)
        self.multi: list | None = None      # transforms of commands queued in MULTI
        self.multi_failed = False
        self._multi_saved = None
        self.subs = {"channel": set(), "pattern": set(), "shard": set()}
        self.sub_waiting = 0                  # SUBSCRIBE-family requests awaiting confirmations
        self.reply_off = False
        self.skip_next = False
        self.monitor = False
        self.emu = None                       # running emulation (a generator)
        self.held: deque = deque()            # requests waiting for the emulation to finish
        self.close_when_done = False          # close the client once pending replies are out
        self.protocol_error = False
        self.upstream_error: str | None = None
        self._label = ""                      # the command being handled, for refusal counts
        self.owed_sent = 0                    # upstream replies asked for so far (shared links count them)
        # On a shared upstream connection (see server.SharedLink) until a command needs
        # connection state of its own; then `need_dedicated` holds requests until the
        # shell has a dedicated connection and every shared reply is in.
        self.shared = shared
        self.need_dedicated = False
        # RESP2 and RESP3 clients share different links: `link_proto` is the one this
        # session is on; `need_link` holds requests after a HELLO that changes it, until
        # the replies owed on the old link are in (the shell then calls switch_link).
        self.link_proto = 2
        self.need_link: int | None = None
        # The C path runs only in the plain state (no MULTI, no CLIENT REPLY, no held
        # requests...). Every state change goes through `handle` or `upstream_lost`,
        # which set this; the next read checks the state once and clears it.
        self.fast_blocked = True
        if not shared:
            self.handshake()

    # ------------------------------------------------------------ plumbing

    def _set_target(self, target) -> None:
        self.target = target
        self.ctx = Ctx(self.route, target, self.table)
        self.plans = self.stats.plans_for(target)
        self.fast_specs = self.stats.fast_for(target)
        ks = target.keyspace
        self.fast_mode, self.fast_prefix = FAST_MODES[ks.mode], ks.prefix
        if getattr(self, "cmap", None) is None:
            self.cmap = ChannelMap(self.route, target)
        else:
            self.cmap.target = target

    def take_upstream(self) -> bytes:
        if not self.out_upstream:
            return b""
        out = b"".join(self.out_upstream)
        self.out_upstream.clear()
        return out

    def take_client(self) -> bytes:
        if not self.out_client:
            return b""
        out = b"".join(self.out_client)
        self.out_client.clear()
        return out

    @property
    def should_close(self) -> bool:
        return self.close_when_done and not self.pending

    @property
    def idle(self) -> bool:
        """No reply owed, not in a transaction, not blocked: a safe point to close."""
        return not self.pending and self.multi is None and self.emu is None

    def _expect(self, entry) -> bool:
        """Record that the request just sent gets a reply, unless CLIENT REPLY says none."""
        if self.reply_off:
            return False
        if self.skip_next:
            self.skip_next = False
            return False
        self.pending.append(entry)
        self.owed_sent += 1
        return True

    def _owe(self, entry) -> None:
        """An upstream reply the proxy itself asked for (handshake, emulation steps)."""
        self.pending.append(entry)
        self.owed_sent += 1

    def _local(self, reply: bytes) -> None:
        """A reply made by the proxy, delivered in its request's position."""
        if self.reply_off:
            return
        if self.skip_next:
            self.skip_next = False
            return
        if self.pending:
            self.pending.append((LOCAL, reply))
        else:
            self.out_client.append(reply)

    def _refuse(self, message: str) -> None:
        self.stats.refused_command(self._label)
        if self.multi is not None:
            self.multi_failed = True  # as Redis does for a command rejected while queueing
        self._local(error(message))

    def _send(self, args: list[bytes], entry=None) -> None:
        self.out_upstream.append(encode_command(args))
        self._expect(entry)

    def _drain_locals(self) -> None:
        pending = self.pending
        while pending:
            head = pending[0]
            if head is None or head[0] != LOCAL:
                return
            pending.popleft()
            self.out_client.append(head[1])

    # ------------------------------------------------------------ upstream handshake

    def handshake(self) -> None:
        """AUTH with the URL's credentials and SELECT the route's db, before any client request."""
        up = self.route.upstream
        if up.password:
            args = [b"AUTH"] + ([up.username.encode()] if up.username else []) + [up.password.encode()]
            self.out_upstream.append(encode_command(args))
            self._owe((INTERNAL, self._check_handshake))
        if self.target.db != 0:
            self.out_upstream.append(encode_command([b"SELECT", str(self.target.db).encode()]))
            self._owe((INTERNAL, self._check_handshake))

    def _check_handshake(self, raw: bytes) -> None:
        if is_error(raw):
            msg = raw[1:-2].decode("utf-8", "replace")
            self.upstream_lost(f"upstream refused the proxy's handshake: {msg}")

    # ------------------------------------------------------------ client -> upstream

    def client_data(self, data: bytes) -> None:
        if self.close_when_done:
            return
        depth = 0
        if self.fast_blocked:
            self.fast_blocked = not self._plain()
        if not self.fast_blocked and self.reader.idle and data[:1] == b"*":
            # The C path takes the leading requests whose commands have a Spec (see
            # rewrite.fast_spec), exactly as `handle` would; the rest go on below.
            pending = self.pending
            limit = SHARED_MAX_OWED - len(pending) if self.shared else sys.maxsize
            if limit > 0:
                out, end, depth, keys = _rewrite_plain(data, self.fast_specs, self.fast_mode, self.fast_prefix,
                                                       limit, self.max_bulk)
                if depth:
                    self.out_upstream.append(out)
                    if depth == 1:
                        pending.append(None)
                    else:
                        pending.extend(repeat(None, depth))
                    self.owed_sent += depth
                    stats = self.stats
                    stats.keys_rewritten += keys
                    if end == len(data):
                        stats.depth.observe(depth)
                        return
                    data = data[end:]
        self.reader.feed(data)
        while True:
            try:
                args = self.reader.get()
            except ProtocolError as e:
                self.stats.errors["protocol"] += 1
                self.protocol_error = True
                self.reply_off = self.skip_next = False
                self._local(error(f"ERR Protocol error: {e}"))
                self.close_when_done = True
                return
            if args is None:
                if depth:
                    self.stats.depth.observe(depth)
                return
            depth += 1
            if self.emu is not None or self.held or self.need_dedicated or self.need_link is not None:
                self.held.append(args)
            else:
                self.handle(args)
            if self.close_when_done:
                return

    def _plain(self) -> bool:
        """May the C path take the next requests? (no state a request would change)"""
        return _rewrite_plain is not None and self.multi is None and not self.reply_off and not self.skip_next \
            and self.emu is None and not self.held and not self.need_dedicated and self.need_link is None \
            and self.upstream_error is None

    def handle(self, args: list[bytes]) -> None:
        self.fast_blocked = True
        plan = self.plans.get(args[0])
        if plan is None:
            plan = self._plan(args[0])
        if self.shared and plan.dedicated == 3 and self.multi is None and len(args) == 2 \
                and args[1] in (b"2", b"3"):
            # plain HELLO 2/3 (no AUTH, no SETNAME): the link of that protocol, still shared
            version = int(args[1])
            if version != self.link_proto:
                self.need_link = version
                self.held.appendleft(args)
                return
        elif self.shared and ((plan.dedicated and not (
                plan.dedicated == 2 and len(args) > 1 and args[1].lower() in SHARED_CLIENT_SUBCOMMANDS))
                or len(self.pending) >= SHARED_MAX_OWED):
            if plan.dedicated == 2:
                # A CLIENT subcommand the route refuses (redis-py 8 sends CLIENT
                # MAINT_NOTIFICATIONS on connect) needs no connection of its own.
                try:
                    rewrite(list(args), self.ctx)
                except Refused as e:
                    plan.count += 1
                    self._label = plan.label
                    return self._refuse(str(e))
            self.need_dedicated = True
            # to the front: when replayed from `held`, it must stay ahead of what follows
            self.held.appendleft(args)
            return
        plan.count += 1
        self._label = plan.label
        if self.upstream_error is not None:
            self._local(error(f"ERR upstream unavailable ({self.upstream_error})"))
            return
        kind = plan.kind
        if kind <= KEYS:  # PASS or KEYS: the hot path
            if kind == KEYS:
                key_in = plan.key_in
                try:
                    positions = plan.positions(args)
                    for i in positions:
                        args[i] = key_in(args[i])
                except Refused as e:
                    return self._refuse(str(e))
                except KeySpecError as e:
                    return self._refuse(f"ERR {e}")
                self.stats.keys_rewritten += len(positions)
            if self.multi is None and not self.reply_off and not self.skip_next:
                self.out_upstream.append(pack_command(tuple(args)))
                self.pending.append(plan.entry)
                self.owed_sent += 1
                return
            return self._queue_or_send(args, plan.reply)
        name = args[0].lower()
        special = _SPECIAL.get(name)
        if special is not None:
            special(self, args)
            return
        try:
            transform = rewrite(args, self.ctx)
        except Refused as e:
            self._refuse(str(e))
            return
        self._queue_or_send(args, transform)

    def _plan(self, raw_name: bytes) -> Plan:
        plan = compile_plan(raw_name, self.ctx, _SPECIAL)
        plan.entry = None if plan.reply is None else (XFORM, plan.reply)
        if len(self.plans) < 1024:  # names are client input: bound the cache
            self.plans[raw_name] = plan
            plan.fast = fast_spec(plan)
            if plan.fast is not None:
                self.fast_specs[raw_name] = plan.fast
        else:
            self.stats.uncached_commands += 1
        return plan

    def _queue_or_send(self, args, transform) -> None:
        if self.multi is not None:
            self.multi.append(transform)
            self._send(args)                      # +QUEUED passes through
        else:
            self._send(args, None if transform is None else (XFORM, transform))

    # ---- connection-state commands

    def _cmd_select(self, args) -> None:
        if len(args) != 2:
            return self._send(args)  # the server's arity error
        try:
            target = self.ctx.client_db(args[1])
        except Refused as e:
            return self._refuse(str(e))
        self._set_target(target)
        self._queue_or_send([args[0], str(target.db).encode()], None)

    def _cmd_hello(self, args) -> None:
        version = None
        if len(args) > 1:
            try:
                version = int(args[1])
            except ValueError:
                pass

        def done(raw: bytes) -> bytes:
            if version in (2, 3) and not is_error(raw):
                self.proto = version
            return raw
        self._send(args, (XFORM, done))

    def _cmd_reset(self, args) -> None:
        self._send(args)
        self.multi, self.multi_failed, self.monitor = None, False, False
        self.reply_off = self.skip_next = False
        self.proto = 2
        for s in self.subs.values():
            s.clear()
        self.cmap.patterns.clear()
        self._set_target(self.route.default)
        # RESET selects db 0 on the server; the route's db may be another one.
        self.out_upstream.append(encode_command([b"SELECT", str(self.target.db).encode()]))
        self._owe((INTERNAL, lambda raw: None))

    def _cmd_multi(self, args) -> None:
        if self.multi is not None:
            return self._send(args)  # nested MULTI: the server's error
        self._send(args)
        self.multi, self.multi_failed, self._multi_saved = [], False, self.target

    def _cmd_exec(self, args) -> None:
        transforms, failed = self.multi, self.multi_failed
        self.multi, self.multi_failed = None, False
        if transforms is None:
            return self._send(args)
        if failed:
            self._set_target(self._multi_saved)
            self.out_upstream.append(encode_command([b"DISCARD"]))
            return self._expect((XFORM, lambda raw: EXECABORT))
        if any(t is not None for t in transforms):
            return self._send(args, (XFORM, lambda raw, ts=transforms: exec_array(raw, ts)))
        self._send(args)

    def _cmd_discard(self, args) -> None:
        if self.multi is not None:
            self._set_target(self._multi_saved)
        self.multi, self.multi_failed = None, False
        self._send(args)

    def _cmd_quit(self, args) -> None:
        self._local(OK)
        self.close_when_done = True

    def _cmd_client(self, args) -> None:
        if len(args) == 3 and args[1].lower() == b"reply":
            mode = args[2].lower()
            if mode in (b"on", b"off", b"skip"):
                self.out_upstream.append(encode_command(args))
                if mode == b"on":
                    self.reply_off = self.skip_next = False
                    self._owe(None)  # ON always answers +OK
                elif mode == b"off":
                    self.reply_off = True
                else:
                    self.skip_next = True
                return
        try:
            transform = rewrite(args, self.ctx)
        except Refused as e:
            return self._refuse(str(e))
        self._queue_or_send(args, transform)

    def _cmd_subscribe(self, args) -> None:
        which, adding = SUBSCRIBE_CMDS[args[0].lower()]
        try:
            mapper = self.cmap.pattern_in if which == "pattern" else self.cmap.channel_in
            for i in range(1, len(args)):
                args[i] = mapper(args[i])
        except Refused as e:
            return self._refuse(str(e))
        if self.multi is not None:
            return self._send(args)  # the server refuses or queues it; no confirmations counted
        self.out_upstream.append(encode_command(args))
        n = len(args) - 1
        if n == 0 and adding:
            return self._expect(None)  # arity error from the server
        if self._expect((SUB, [n if n else -1, which])):
            self.sub_waiting += 1

    def _cmd_monitor(self, args) -> None:
        if self.target.keyspace.mode != "none":
            return self._refuse(str(refuse("monitor", self.ctx, "it shows every client's commands and keys")))

        def started(raw: bytes) -> bytes:
            if not is_error(raw):
                self.monitor = True
            return raw
        self._send(args, (XFORM, started))

    def _cmd_emulated(self, args) -> None:
        name = args[0].lower()
        ks = self.target.keyspace
        if ks.mode != "add":
            # strip and none modes see exactly the backend db: the real command is right.
            if name != b"randomkey":  # FLUSHDB/DBSIZE are keyless: the generic path would refuse them
                return self._queue_or_send(args, None)
            try:
                transform = rewrite(args, self.ctx)
            except Refused as e:
                return self._refuse(str(e))
            return self._queue_or_send(args, transform)
        if self.multi is not None:
            return self._refuse(str(refuse(name.decode(), self.ctx,
                                           "it is emulated with SCAN and cannot run inside MULTI")))
        try:
            gen = emulate.start(name, args, ks, self.proto, random.random())
        except Refused as e:
            return self._refuse(str(e))
        self._run_emulation(gen)

    # ---- emulations: several internal round trips answer one client request

    def _run_emulation(self, gen) -> None:
        if self.reply_off or self.skip_next:
            show = False
            if self.skip_next:
                self.out_upstream.append(encode_command([b"PING"]))  # absorbs the SKIP
                self.skip_next = False
            else:
                self.out_upstream.append(encode_command([b"CLIENT", b"REPLY", b"ON"]))
                self._owe((INTERNAL, lambda raw: None))
        else:
            show = True
        self.emu = (gen, show)
        self._emu_step(None)

    def _emu_step(self, raw) -> None:
        gen, show = self.emu
        try:
            cmd = gen.send(None if raw is None else _decode(raw))
        except StopIteration as stop:
            self.emu = None
            if show:
                self.out_client.append(stop.value)
            elif self.reply_off:
                self.out_upstream.append(encode_command([b"CLIENT", b"REPLY", b"OFF"]))
            self._drain_locals()
            self._replay_held()
            return
        self.out_upstream.append(encode_command(cmd))
        self._owe((INTERNAL, self._emu_step))

    # ------------------------------------------------------------ shared -> dedicated

    @property
    def shared_quiet(self) -> bool:
        """No reply owed on the shared connection: the session may leave it."""
        return self.emu is None and all(e is not None and e[0] == LOCAL for e in self.pending)

    def switch_to_dedicated(self) -> None:
        """Continue on a dedicated upstream connection: handshake, then the held requests."""
        self.shared = False
        self.need_dedicated = False
        self.need_link = None
        self.handshake()
        if self.link_proto == 3:  # the client said HELLO 3 on a shared link: keep its protocol
            self.out_upstream.append(encode_command([b"HELLO", b"3"]))
            self._owe((INTERNAL, self._check_handshake))
        self._replay_held()

    def switch_link(self) -> None:
        """Continue on the shared link of protocol `need_link`: the held requests, HELLO first."""
        self.link_proto, self.need_link = self.need_link, None
        self._replay_held()

    def _replay_held(self) -> None:
        while self.held and self.emu is None and not self.close_when_done and not self.need_dedicated \
                and self.need_link is None:
            self.handle(self.held.popleft())

    # ------------------------------------------------------------ upstream -> client

    def upstream_data(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        pending, out = self.pending, self.out_client
        try:
            while pos < n:
                if pending and pending[0] is None and not self.sub_waiting and not self.monitor \
                        and not (self.proto == 2 and self._subscribed()):
                    # the common case: replies that need nothing, passed on as they came
                    end, m = frame_run(buf, pos, len(pending), True, pending)
                    if m:
                        out.append(buf[pos:end])
                        pos = end
                        if pending and pending[0] is not None:
                            self._drain_locals()
                        continue
                end = frame_end(buf, pos)
                if end < 0:
                    break
                first = buf[pos]
                raw = buf[pos:end]
                pos = end
                self._reply(raw, first)
        except ProtocolError as e:
            self._buf = b""
            self.upstream_lost(f"upstream sent bytes that are not RESP: {e}")
            return
        self._buf = buf[pos:]

    def shared_run(self, buf: bytes, pos: int, limit: int) -> tuple[int, int]:
        """Pass up to `limit` replies from a shared connection that need nothing
        through as one slice; (position after them, how many)."""
        pending = self.pending
        start = pos
        # a RESP3 push is no reply: the link skips it
        pos, m = frame_run(buf, pos, limit, self.link_proto == 3, pending)
        if m:
            self.out_client.append(buf[start:pos])
            if pending and pending[0] is not None:
                self._drain_locals()
        return pos, m

    def shared_reply(self, raw: bytes, first: int) -> None:
        """One reply from a shared upstream connection (framed by the link)."""
        pending = self.pending
        if pending and pending[0] is None:
            pending.popleft()
            self.out_client.append(raw)
            if pending and pending[0] is not None:
                self._drain_locals()
        else:
            self._reply(raw, first)

    def _subscribed(self) -> bool:
        s = self.subs
        return bool(s["channel"] or s["pattern"] or s["shard"])

    def _reply(self, raw: bytes, first: int) -> None:
        if first == 0x3E:  # '>' RESP3 push: pub/sub, invalidations; never a reply to a request
            return self._pubsub(raw)
        if self.monitor and first == 0x2B:
            self.out_client.append(raw)
            return
        # Before the subscription, an array reply to an earlier request (LRANGE giving
        # ["message", ...]) is that request's reply, not a pub/sub frame.
        head = self.pending[0] if self.pending else None
        if self.proto == 2 and first == 0x2A and (
                self._subscribed() or (head is not None and head[0] == SUB)):
            _, items = split(raw)
            if items:
                kind = (string_value(items[0]) or b"").lower()
                if kind in MESSAGES or kind in CONFIRMS:
                    return self._pubsub(raw)
        if not self.pending:
            return  # a reply nobody asked for (the server never does this): never misdeliver it
        entry = self.pending.popleft()
        if entry is None:
            self.out_client.append(raw)
        elif entry[0] == XFORM:
            self.out_client.append(entry[1](raw))
        elif entry[0] == INTERNAL:
            entry[1](raw)
        elif entry[0] == SUB:  # an error instead of confirmations
            self.sub_waiting -= 1
            self.out_client.append(raw)
        self._drain_locals()

    def _pubsub(self, raw: bytes) -> None:
        out, kind = rewrite_frame(raw, self.cmap, self.subs)
        if out is not None:
            self.out_client.append(out)
        if kind is None:
            return
        head = self.pending[0] if self.pending else None
        if head is None or head[0] != SUB:
            return
        state = head[1]
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
        self.fast_blocked = True
        err = error(f"ERR upstream unavailable ({reason})")
        if tell_idle and not self.pending and not self.held:
            self.out_client.append(err)
        emu_answered = False
        while self.pending:
            entry = self.pending.popleft()
            if entry is not None and entry[0] == LOCAL:
                self.out_client.append(entry[1])
            elif entry is not None and entry[0] == INTERNAL:
                if entry[1] == self._emu_step and not emu_answered and self.emu and self.emu[1]:
                    self.out_client.append(err)
                    emu_answered = True
            else:
                self.out_client.append(err)
        self.emu = None
        while self.held:
            self.held.popleft()
            self.out_client.append(err)
        self.out_upstream.clear()
        self.close_when_done = True


def _decode(raw: bytes):
    r = hiredis.Reader()
    r.feed(raw)
    return r.gets()


_SPECIAL = {
    b"select": Session._cmd_select,
    b"hello": Session._cmd_hello,
    b"reset": Session._cmd_reset,
    b"multi": Session._cmd_multi,
    b"exec": Session._cmd_exec,
    b"discard": Session._cmd_discard,
    b"quit": Session._cmd_quit,
    b"client": Session._cmd_client,
    b"monitor": Session._cmd_monitor,
    b"flushdb": Session._cmd_emulated,
    b"dbsize": Session._cmd_emulated,
    b"randomkey": Session._cmd_emulated,
    **{k: Session._cmd_subscribe for k in SUBSCRIBE_CMDS},
}
