"""Hand-written request rewrites: the commands whose keys, patterns, channels or db
indexes the servers' key specs cannot describe. Each says why in its comment.

A handler takes the argument list (rewritten in place) and a rewrite.Ctx, and
returns the reply transform or None. Which command uses which handler is said
in one place: its record in proxy/overlay.py.
"""

from __future__ import annotations

from functools import partial

from proxy import replies
from proxy.keyspace import Refused, show
from proxy.pubsub import ChannelMap


def _t(fn, ks):
    return partial(fn, ks=ks)


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
    # Never to the route's own server: Redis serves both ends of MIGRATE on its one thread, so
    # it blocks every client of the server for the timeout the client chose, then answers
    # IOERR (found by tests/test_fence.py). Another server is outside a tenant route's fence;
    # and since "the same server" can be named many ways (localhost, a DNS alias), a tenant
    # route refuses MIGRATE whatever the address.
    ks = ctx.ks
    if len(args) < 6:
        return None
    if ctx.tenant:
        raise ctx.refused("migrate", "to another server the key leaves the fence, and to this one Redis blocks "
                          "on its own MIGRATE until the timeout; MOVE and COPY ... DB move keys inside the route",
                          by_policy=True)
    up = ctx.route.upstream
    dest = (args[1].decode("latin-1").lower(), args[2])
    # the URL's node, or (Sentinel, cluster) the node the route uses now: up.host is a sentinel or seed there
    node = ctx.node() if ctx.node is not None else None
    if any(n is not None and dest == (n[0].lower(), str(n[1]).encode()) for n in ((up.host, up.port), node)):
        raise Refused(f"ERR MIGRATE to the route's own server is refused by the proxy on route {ctx.route.name}: "
                      "Redis serves both ends on one thread and every client of the server would wait for the "
                      "timeout (then IOERR); use MOVE or COPY ... DB")
    if ks.mode != "none" or ctx.route.databases:
        args[4] = str(ctx.client_db(args[4]).db).encode()
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
        raise ctx.refused("swapdb")
    if len(args) == 3:
        args[1] = str(ctx.client_db(args[1]).db).encode()
        args[2] = str(ctx.client_db(args[2]).db).encode()
    return None


def h_flushall(args, ctx):
    if ctx.ks.mode != "none" or ctx.route.databases:
        raise ctx.refused("flushall")
    return None


def h_debug(args, ctx):
    # DEBUG OBJECT key has no key spec (DEBUG is one command with free-form arguments).
    if len(args) >= 3 and args[1].upper() == b"OBJECT":
        args[2] = ctx.ks.key_in(args[2])
        return None
    if ctx.ks.mode != "none":
        raise ctx.refused("debug")
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
    ctx.rewrite(inner)
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
