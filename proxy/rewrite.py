"""Request rewriting: client argument list -> server argument list + reply transform.

Pure functions, no I/O. The generic path reads key positions from the
generated command table (the servers' own key specs). HANDLERS holds the
commands whose keys, patterns or dbs the key specs cannot describe; each says why.
Connection-state commands (SELECT, HELLO, MULTI, SUBSCRIBE, ...) live in session.py.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from proxy import replies
from proxy.commands import KEYLESS_SAFE, REFUSED_WHY, CommandTable
from proxy.keyspace import Keyspace, Refused, show
from proxy.keyspecs import KeySpecError
from proxy.pubsub import ChannelMap
from proxy.speedups import C

Transform = Callable[[bytes], bytes]


class Ctx:
    """What a rewrite may look at: the connection's current keyspace and its route's db map."""

    __slots__ = ("ks", "route", "target", "table")

    def __init__(self, route, target, table: CommandTable):
        self.route = route
        self.target = target
        self.ks: Keyspace = target.keyspace
        self.table = table

    def client_db(self, arg: bytes):
        """The DbTarget a client db index names, or Refused."""
        try:
            n = int(arg)
        except ValueError:
            raise Refused("ERR value is not an integer or out of range") from None
        t = self.route.target(n)
        if t is None:
            raise Refused(f"ERR db {n} is not mapped on route {self.route.name}")
        return t


def refuse(name: str, ctx: Ctx, why: str) -> Refused:
    return Refused(f"ERR command '{name.upper().replace('|', ' ')}' is refused on {ctx.ks.describe()}: {why}")


def _t(fn, ks) -> Transform:
    return partial(fn, ks=ks)


# Reply transforms of keyed commands handled by the generic path.
REPLY_KEYS = {
    "blpop": replies.first_is_key, "brpop": replies.first_is_key,
    "bzpopmin": replies.first_is_key, "bzpopmax": replies.first_is_key,
    "blmpop": replies.first_is_key, "lmpop": replies.first_is_key,
    "bzmpop": replies.first_is_key, "zmpop": replies.first_is_key,
    "xread": replies.each_first_is_key, "xreadgroup": replies.each_first_is_key,
}


def rewrite(args: list[bytes], ctx: Ctx) -> Transform | None:
    """Rewrite `args` in place for the server; return the reply transform (or None).

    Raises Refused with the error reply for the client."""
    ks = ctx.ks
    name, cmd = ctx.table.lookup(args)
    handler = HANDLERS.get(name)
    if handler is not None:
        return handler(args, ctx)
    if ks.mode == "none":
        return None
    if cmd is None:
        if "|" in name:
            raise refuse(name, ctx, "unknown subcommand; the proxy fails closed on namespaced routes")
        raise refuse(name, ctx, "unknown command; the proxy fails closed on namespaced routes")
    if cmd.keyed:
        if cmd.incomplete:
            raise refuse(name, ctx, "its key positions are not fully known to the proxy")
        try:
            positions = cmd.positions(args)
        except KeySpecError as e:
            raise Refused(f"ERR {e}") from None
        for i in positions:
            args[i] = ks.key_in(args[i])
        fn = REPLY_KEYS.get(name)
        return _t(fn, ks) if fn is not None else None
    if name in KEYLESS_SAFE:
        return None
    top = name.split("|")[0]
    raise refuse(name, ctx, REFUSED_WHY.get(top) or REFUSED_WHY.get(name) or
                 "it is not known to stay inside the namespace")


# ------------------------------------------------------------------ plans
# The hot path: most requests are plain commands whose treatment depends only on
# their name and the connection's keyspace. A Plan is computed once per (name as
# sent, keyspace) and cached, so a request costs a dict look-up and its key loop.

PASS, KEYS, SLOW = 0, 1, 2


# Commands that give a connection state of its own: on a shared upstream connection
# they would leak that state to other clients (or block them), so a client that
# sends one moves to a dedicated connection first. Blocking commands come from the
# table's "blocking" flag. 2 = CLIENT: depends on the subcommand; 3 = HELLO: a plain
# HELLO 2/3 moves to the shared link of that protocol, with AUTH or SETNAME to a
# dedicated connection (session.py).
CONNECTION_STATE = {
    "multi": 1, "watch": 1, "select": 1, "hello": 3, "auth": 1, "reset": 1, "monitor": 1,
    "subscribe": 1, "psubscribe": 1, "ssubscribe": 1, "unsubscribe": 1, "punsubscribe": 1,
    "sunsubscribe": 1, "readonly": 1, "readwrite": 1, "asking": 1, "client": 2,
    "debug": 1,  # DEBUG PROTOCOL push (transparent routes) sends a push frame to its caller
}


class Plan:
    __slots__ = ("kind", "label", "positions", "key_in", "reply", "count", "dedicated", "entry", "fast")

    def __init__(self, kind, label, positions=None, key_in=None, reply=None):
        self.kind = kind            # PASS: send as is; KEYS: rewrite positions; SLOW: full path
        self.label = label          # lowercase command name, for metrics
        self.positions = positions  # args -> key indexes
        self.key_in = key_in        # the keyspace's key_in
        self.reply = reply          # reply transform or None
        self.count = 0              # requests seen (read by metrics)
        self.dedicated = 0          # needs a connection of its own (CONNECTION_STATE)
        self.entry = None           # the session's pending entry for this plan's replies
        self.fast = None            # its C Spec, if the C path can take it (fast_spec)


def compile_plan(raw_name: bytes, ctx: Ctx, special) -> Plan:
    """The plan for a command name under ctx's keyspace; `special` names session-level commands."""
    plan = _compile_plan(raw_name, ctx, special)
    cmd = ctx.table.commands.get(plan.label)
    plan.dedicated = CONNECTION_STATE.get(plan.label) or int(cmd is not None and "blocking" in cmd.flags)
    return plan


def fast_spec(plan: Plan):
    """The C path's Spec for a plan it can take whole, else None: a plain command
    (no reply transform, no connection state) whose key positions are fixed or a
    simple range. The C code counts its requests on the Spec (`spec.count`)."""
    if C is None or plan.kind > KEYS or plan.reply is not None or plan.dedicated:
        return None
    if plan.kind == PASS:
        return C.Spec(())
    form = getattr(plan.positions, "fast", None)
    if form is None:
        return None
    if form[0] == "fixed":
        return C.Spec(form[1], form[2]) if len(form[1]) <= 16 else None
    _, first, lastkey, step = form
    # keyspecs' range check (last = argc + lastkey; last >= first and first < argc)
    # holds exactly when argc >= first - lastkey: that is the Spec's min_argc, which
    # Spec_init requires to be above `first` (lastkey < 0, so it is).
    return C.Spec((), first - lastkey, first, lastkey, step)


def _compile_plan(raw_name: bytes, ctx: Ctx, special) -> Plan:
    name = raw_name.lower().decode("latin-1")
    ks = ctx.ks
    if raw_name.lower() in special or name in HANDLERS or name in ctx.table.containers:
        return Plan(SLOW, name)
    cmd = ctx.table.commands.get(name)
    if ks.mode == "none":
        return Plan(PASS, name)
    if cmd is None or (cmd.keyed and cmd.incomplete):
        return Plan(SLOW, name)  # rewrite() refuses with the reason
    if cmd.keyed:
        fn = REPLY_KEYS.get(name)
        # add mode: prefix + key as a C call, no Python frame per key
        key_in = ks.prefix.__add__ if ks.mode == "add" else ks.key_in
        return Plan(KEYS, name, cmd.positions, key_in, _t(fn, ks) if fn is not None else None)
    if name in KEYLESS_SAFE:
        return Plan(PASS, name)
    return Plan(SLOW, name)


# ------------------------------------------------------------------ handlers
# Each handler rewrites args in place and returns a reply transform or None.


def _find_option(args: list[bytes], start: int, option: bytes) -> int:
    for i in range(start, len(args) - 1):
        if args[i].upper() == option:
            return i
    return -1


def h_keys(args, ctx):
    # KEYS takes a glob, not a key: the namespace is escaped before it.
    if len(args) == 2:
        args[1] = ctx.ks.pattern_in(args[1])
    return _t(replies.key_list, ctx.ks) if ctx.ks.mode != "none" else None


def h_scan(args, ctx):
    # SCAN without MATCH would list other namespaces: inject MATCH <prefix>*.
    ks = ctx.ks
    if ks.mode == "none":
        return None
    m = -1
    for i in range(2, len(args) - 1, 2):
        if args[i].upper() == b"MATCH":
            m = i
    if m >= 0:
        args[m + 1] = ks.pattern_in(args[m + 1])
    elif ks.mode == "add":
        args += [b"MATCH", ks.match_all()]
    return _t(replies.scan, ks)


def h_sort(args, ctx):
    # BY/GET patterns are key names with one `*` substituted (sort.c), not globs,
    # so the prefix goes in front unescaped; `GET #` means the element itself; STORE
    # may appear anywhere. Key specs mark these as "unknown".
    ks = ctx.ks
    if ks.mode == "none" or len(args) < 2:
        return None
    args[1] = ks.key_in(args[1])
    i = 2
    while i < len(args):
        opt = args[i].upper()
        if opt in (b"BY", b"GET", b"STORE") and i + 1 < len(args):
            v = args[i + 1]
            # A BY/GET pattern without `*` reads no key (BY nosort, sort.c): leave it.
            if opt == b"STORE" or b"*" in v:  # so `GET #` stays too
                args[i + 1] = ks.key_in(v, "pattern" if opt != b"STORE" else "key")
            i += 2
        elif opt == b"LIMIT":
            i += 3
        else:
            i += 1
    return None


def h_migrate(args, ctx):
    # MIGRATE host port key|"" destination-db timeout [COPY] [REPLACE] [AUTH pw|AUTH2 u pw] [KEYS k...]
    # The key is either at 3 or, when that is "", after KEYS; destination-db is a client db index.
    ks = ctx.ks
    if len(args) < 6:
        return None
    args[4] = str(ctx.client_db(args[4]).db).encode() if ks.mode != "none" or ctx.route.databases else args[4]
    if ks.mode == "none":
        return None
    if args[3]:
        args[3] = ks.key_in(args[3])
    i = 6
    while i < len(args):
        opt = args[i].upper()
        if opt == b"AUTH":
            i += 2
        elif opt == b"AUTH2":
            i += 3
        elif opt == b"KEYS":
            for j in range(i + 1, len(args)):
                args[j] = ks.key_in(args[j])
            break
        else:
            i += 1
    return None


def h_move(args, ctx):
    # MOVE key db: db is a client index; the key keeps its name, so the target db must
    # use the same keyspace or the key would land outside the client's view of it.
    if len(args) != 3:
        return None
    t = ctx.client_db(args[2])
    if t.keyspace != ctx.ks:
        raise Refused(f"ERR MOVE to db {show(args[2])} would change the key's namespace on route {ctx.route.name}")
    args[1] = ctx.ks.key_in(args[1])
    args[2] = str(t.db).encode()
    return None


def h_copy(args, ctx):
    # COPY src dst [DB n] [REPLACE]: dst lives in the keyspace of db n.
    if len(args) < 3:
        return None
    dest = ctx.target
    for i in range(3, len(args) - 1):
        if args[i].upper() == b"DB":
            dest = ctx.client_db(args[i + 1])
            args[i + 1] = str(dest.db).encode()
            break
    args[1] = ctx.ks.key_in(args[1])
    args[2] = dest.keyspace.key_in(args[2])
    return None


def h_swapdb(args, ctx):
    if ctx.ks.mode != "none":
        raise refuse("swapdb", ctx, REFUSED_WHY["swapdb"])
    if len(args) == 3:
        args[1] = str(ctx.client_db(args[1]).db).encode()
        args[2] = str(ctx.client_db(args[2]).db).encode()
    return None


def h_flushall(args, ctx):
    if ctx.ks.mode != "none" or ctx.route.databases:
        raise refuse("flushall", ctx, REFUSED_WHY["flushall"])
    return None


def h_debug(args, ctx):
    # DEBUG OBJECT key has no key spec (DEBUG is one command with free-form arguments).
    if len(args) >= 3 and args[1].upper() == b"OBJECT":
        args[2] = ctx.ks.key_in(args[2])
        return None
    if ctx.ks.mode != "none":
        raise refuse("debug", ctx, REFUSED_WHY["debug"])
    return None


def h_client_tracking(args, ctx):
    # PREFIX arguments are literal key prefixes (not globs); BCAST without PREFIX
    # would broadcast every key of the server, so it gets the namespace as prefix.
    ks = ctx.ks
    if ks.mode == "none":
        return None
    bcast = any(a.upper() == b"BCAST" for a in args[3:])
    has_prefix = False
    i = 3
    while i < len(args):
        opt = args[i].upper()
        if opt == b"PREFIX" and i + 1 < len(args):
            args[i + 1] = ks.key_in(args[i + 1], "prefix")
            has_prefix = True
            i += 2
        elif opt == b"REDIRECT":
            i += 2
        else:
            i += 1
    if bcast and not has_prefix and ks.mode == "add":
        args += [b"PREFIX", ks.prefix]
    return None


def h_client_trackinginfo(args, ctx):
    return _t(replies.tracking_info, ctx.ks) if ctx.ks.mode != "none" else None


def h_command_getkeys(args, ctx):
    # The keys of the inner command, answered in the client's names.
    if len(args) < 3:
        return None
    inner = args[2:]
    rewrite(inner, ctx)
    args[2:] = inner
    if ctx.ks.mode == "none":
        return None
    fn = replies.key_list if args[1].lower() == b"getkeys" else replies.each_first_is_key
    return _t(fn, ctx.ks)


def h_pubsub_channels(args, ctx):
    ks = ctx.ks
    if ks.mode == "none":
        return None
    if len(args) >= 3:
        args[2] = ks.pattern_in(args[2])
    elif ks.mode == "add":
        args.append(ks.match_all())
    return _t(replies.key_list, ks)


def h_pubsub_numsub(args, ctx):
    # The reply names the channels in request order, so the client's own names go back
    # in their places (this also covers __keyspace@N__ channels, whose db is mapped).
    cmap = ChannelMap(ctx.route, ctx.target)
    asked = args[2:]
    args[2:] = [cmap.channel_in(c) for c in asked]
    if args[2:] == asked:
        return None
    return partial(replies.names_in_order, names=asked, ks=ctx.ks)


def h_publish(args, ctx):
    # Channels carry no key spec; they are fenced like keys (special channels mapped).
    if len(args) == 3:
        args[1] = ChannelMap(ctx.route, ctx.target).channel_in(args[1])
    return None


def h_randomkey_passthrough(args, ctx):
    # add mode is emulated in session.py; strip/none modes see the whole db.
    return _t(replies.single_key, ctx.ks) if ctx.ks.mode == "strip" else None


HANDLERS: dict[str, Callable] = {
    "keys": h_keys,
    "scan": h_scan,
    "sort": h_sort, "sort_ro": h_sort,
    "migrate": h_migrate,
    "move": h_move,
    "copy": h_copy,
    "swapdb": h_swapdb,
    "flushall": h_flushall,
    "debug": h_debug,
    "client|tracking": h_client_tracking,
    "client|trackinginfo": h_client_trackinginfo,
    "command|getkeys": h_command_getkeys, "command|getkeysandflags": h_command_getkeys,
    "pubsub|channels": h_pubsub_channels, "pubsub|shardchannels": h_pubsub_channels,
    "pubsub|numsub": h_pubsub_numsub, "pubsub|shardnumsub": h_pubsub_numsub,
    "publish": h_publish,
    "randomkey": h_randomkey_passthrough,
}
