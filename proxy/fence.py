"""Is a route's upstream user itself fenced to the route's namespace by a Redis ACL?

On a `tenant` route scripts and functions are refused unless it is: a script can call
any key, and only the server's own ACL can stop it. The proxy asks the server, without
admin rights and without side effects, what the route's upstream user may do:

  - a key and a channel outside every namespace of the route must answer NOPERM
    (EXISTS; PUBLISH queued in MULTI and discarded, so nothing is published);
  - the keyless commands ACL key patterns do not cover must be denied: KEYS, SCAN,
    RANDOMKEY, FLUSHDB, FLUSHALL. They are queued in a MULTI that is discarded: the
    server checks ACLs when it queues a command (a denied one answers NOPERM, an
    allowed one QUEUED) and none of them runs. SCAN, FLUSHDB and FLUSHALL are also given
    an invalid argument, so that even run they would only answer a syntax error (the
    ACL check comes before it: verified on Redis 7 and Valkey 8).

`probe(route)` is a generator: it yields commands (one at a time, each after the
previous reply) and returns (fenced, detail). server.py runs it on its own connection
after the route's handshake (AUTH, SELECT).
"""

from __future__ import annotations

PROBE_KEY = b"keyspace-proxy-fence-probe"


def _reply_text(reply) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def _denied(reply) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith("NOPERM")


def _outside(prefixes: list[bytes]) -> list[bytes]:
    """Names outside every prefix: an unrelated one, and one sharing all but the last byte
    of each prefix (an ACL pattern like `~app*` would also let `apps:` in)."""
    out = [PROBE_KEY]
    for p in prefixes:
        out.append(p[:-1] + (b"~" if p[-1:] != b"~" else b"!") + PROBE_KEY)
    return [n for n in out if not any(n.startswith(p) for p in prefixes)]


def prefixes(route) -> list[bytes]:
    """The prefixes of the route's add-mode dbs (the only ones an ACL key pattern can fence;
    scripts in a strip-mode db stay refused on a tenant route, see rewrite.Ctx.fenced)."""
    dbs = ([] if 0 in route.databases else [route.default]) + list(route.databases.values())
    return sorted({t.keyspace.prefix for t in dbs if t.keyspace.mode == "add"})


def key(route) -> tuple:
    """What a fence check's answer holds for: the upstream (its user) and the prefixes it
    fences. Routes of one name before and after a reload share their stats; the answer for
    one is not the other's unless this is equal (rewrite.Ctx.fenced)."""
    return route.upstream, tuple(prefixes(route))


def probe(route):
    ps = prefixes(route)
    if not ps:
        return False, "no db of the route adds a namespace: there is nothing an ACL key pattern could fence"
    names = _outside(ps)
    for name in names:
        r = yield [b"EXISTS", name]
        if not _denied(r):
            return False, f"a key outside the namespace is allowed (EXISTS {name.decode('latin-1')} answered " \
                          f"{_reply_text(r)!r})"
    r = yield [b"MULTI"]
    if isinstance(r, Exception):
        return False, f"MULTI answered {_reply_text(r)!r}: the keyless commands could not be checked"
    checks = [([b"KEYS", b"*"], "KEYS"), ([b"SCAN", b"not-a-cursor"], "SCAN"), ([b"RANDOMKEY"], "RANDOMKEY"),
              ([b"FLUSHDB", b"NOT-AN-OPTION"], "FLUSHDB"), ([b"FLUSHALL", b"NOT-AN-OPTION"], "FLUSHALL")]
    checks += [([b"PUBLISH", name, b""], f"a channel outside the namespace ({name.decode('latin-1')})")
               for name in names]
    allowed = []
    for cmd, what in checks:
        r = yield cmd
        if not _denied(r):
            allowed.append(what)
    yield [b"DISCARD"]
    if allowed:
        return False, "the upstream user may run " + ", ".join(allowed)
    return True, "keys and channels outside the namespace, KEYS, SCAN, RANDOMKEY, FLUSHDB and FLUSHALL answer NOPERM"
