"""The hand-written part of the command rules: what the servers' specs cannot say.

`data/commands.json` (generated from the servers' COMMAND INFO / COMMAND DOCS)
says which arguments are keys, the arity and the flags. proxy/rules.py builds one
Rule per command and subcommand from it, with these defaults:

  - a command with complete key specs is passed on a namespaced route (its keys
    rewritten) and may share an upstream connection, unless its flags say it
    blocks (`blocking`) or subscribes (`pubsub`), which pin a connection (on a
    shared link, such a blocking command left at its default borrows a pooled
    connection for the one call instead: Rule.poolable, limits.blocking_pool;
    an entry that sets `effect` here, as WAIT's, keeps it pinned);
  - anything else (keyless, key positions not fully known, unknown to the
    table) is refused on a namespaced route and pins a connection elsewhere.

Every entry below overrides a default, and says why. This is the only place a
command is classified by hand: the session, the shared links, the rewriter and
the error messages all read the Rule.

Fields (all optional):
  effect     PLAIN  exactly one reply and no connection state: may share a connection
             STATE  changes connection state the proxy must follow (db, protocol, name,
                    tracking, reply mode): carried out by a Session method, on the
                    server's confirmation
             PIN    needs a connection of its own (MULTI, WATCH, subscriptions, blocking)
             STREAM sends no reply or a stream of them (REPLCONF, SYNC, MONITOR)
  policy     on a namespaced route: PASS, EMULATE (answered with several internal
             requests, add mode), REFUSE (with `why`)
  tenant     on a namespaced route with policy "tenant", when it differs from `policy`:
             PASS, EMULATE, REFUSE, or FENCED (passed only when the route's upstream user
             is itself fenced to the namespace by a Redis ACL, checked at start; refused
             otherwise); `tenant_why` says why (shown in the refusal)
  app        on a namespaced route with policy "app", when it differs from `policy`: the
             read-only server commands a trusted application may run (PASS)
  everywhere refuse on every route, namespaced or not (`why` says why)
  rewrite    a handlers.py function for keys/patterns/dbs the specs cannot describe
  reply      a replies.py transform that gives names in the reply back in client terms
  session    the Session method (`_cmd_<name>`) that carries the command out
  subscribe  (set, adding) for the SUBSCRIBE family: which subscription set it changes
  why        the reason, shown in refusals; required for PASS overrides too (docs)
  cluster    on a spread (unpinned) route over a Redis Cluster, where the request goes
             (proxy/spread.py); the default follows from the specs: SLOT for a command whose
             keys are all known, STATE for one that changes connection state, ANY for a
             keyless one, NOT_ROUTED for a keyed one whose key positions are not known or one
             the table does not know (fail closed). The other values:
               EVERY        every primary; the first error, else the first reply (SCRIPT LOAD:
                            script caches are per node)
               SPLIT_VALUES / SPLIT_SUM / SPLIT_OK  one command per slot of its keys, merged
                            in key order: the values (MGET), the sum (DEL, EXISTS), +OK (MSET)
               FIRST_KEY    the slot of its first argument (SORT: the server checks the rest)
               SCAN_NODES   one primary per call, the cursor carries which (SCAN)
               CONCAT / SUM every primary, the arrays joined (KEYS) / the integers added (DBSIZE)
               FIRST_VALUE  every primary, the first reply that is not nil (RANDOMKEY)
               TX           MULTI / EXEC / DISCARD: the transaction goes to the owner of its keys
               SUBSCRIBE    the SUBSCRIBE family: the connection stays on one node while
                            subscribed (classic channels: any node, messages are cluster-wide;
                            shard channels: the owner of their slot)
  cluster_why  with cluster=NOT_ROUTED: why (shown in the refusal)

Policies (a route's `policy`, see README "Policies"): `tenant` is a fence against code
the operator does not trust, `app` a trusted application moved between keyspaces. On a
route (or a db) without namespace neither changes anything.
"""

from __future__ import annotations

from proxy import handlers as h
from proxy import replies

PLAIN, STATE, PIN, STREAM = "plain", "state", "pin", "stream"
PASS, EMULATE, REFUSE, FENCED = "pass", "emulate", "refuse", "fenced"
# `cluster`: where a request of a spread route over a Redis Cluster goes (see above)
SLOT, ANY, EVERY, FIRST_KEY, TX = "slot", "any", "every", "first-key", "tx"
SPLIT_VALUES, SPLIT_SUM, SPLIT_OK = "split-values", "split-sum", "split-ok"
SCAN_NODES, CONCAT, SUM, FIRST_VALUE = "scan-nodes", "concat", "sum", "first-value"
NOT_ROUTED, SUBSCRIBE = "not-routed", "subscribe"
CLUSTER_CLASSES = (SLOT, ANY, EVERY, FIRST_KEY, TX, SPLIT_VALUES, SPLIT_SUM, SPLIT_OK, SCAN_NODES, CONCAT, SUM,
                   FIRST_VALUE, NOT_ROUTED, STATE, SUBSCRIBE)


def O(**kw) -> dict:  # noqa: E743 - short on purpose: the table below reads as a table
    return kw


_SERVER = "it acts on the whole server, shared by every route"
_REPLICATION = "replication is shared by every route"
_PERSISTENCE = "persistence is shared by every route"
_CONNECTION = "it answers about the upstream connection, which is the proxy's"
_SCRIPT = "a script can reach any key"
_LIBRARY = "function libraries are shared by every route and a function can reach any key"
_KEYS_DECLARED = "its declared keys are rewritten (app: the code is trusted to use only them)"
_SPLIT = "its keys are split per hash slot over the cluster's primaries and the replies merged in key order"
_OWN_WRITES = "it waits for this connection's own writes, which a spread route spreads over several nodes"

# CONFIG GET on a tenant route answers these parameters only (glob patterns are matched
# against this list, never sent): each says nothing about other tenants and is what
# client libraries and job frameworks ask for.
CONFIG_GET_SAFE: dict[str, str] = {
    "maxmemory-policy": "Sidekiq and other job queues warn when keys may be evicted",
    "maxmemory": "how much the server may hold: a limit, not other tenants' data",
    "databases": "how many dbs the server has (client libraries check a db index against it)",
    "timeout": "the server's idle timeout for connections",
    "proto-max-bulk-len": "the largest value a client may send",
    "notify-keyspace-events": "whether keyspace notifications a subscriber waits for are on",
    "lua-time-limit": "how long a script may run (its name in Redis 6)",
    "busy-reply-threshold": "how long a script may run",
    "slowlog-log-slower-than": "a threshold; the slow log itself is refused",
    "hash-max-listpack-entries": "encoding thresholds (OBJECT ENCODING answers are explained by them)",
    "set-max-intset-entries": "encoding thresholds",
    "zset-max-listpack-entries": "encoding thresholds",
    "list-max-listpack-size": "encoding thresholds",
}

OVERLAY: dict[str, dict] = {
    # ---- keyless commands that stay inside a namespace: the allowlist
    "ping": O(policy=PASS, effect=PLAIN, why="no keys"),
    "echo": O(policy=PASS, effect=PLAIN, why="no keys"),
    "time": O(policy=PASS, effect=PLAIN, why="no keys"),
    "lastsave": O(policy=PASS, effect=PLAIN, why="no keys"),
    "role": O(policy=PASS, effect=PLAIN, why="no keys"),
    "lolwut": O(policy=PASS, effect=PLAIN, why="no keys"),
    "info": O(policy=PASS, effect=PLAIN, tenant=EMULATE, session="info", why="server facts; no key names",
              tenant_why="its keyspace section counts every backend db: answered with the route's own "
                         "client dbs and the keys in its namespace"),
    "wait": O(policy=PASS, effect=PIN, cluster=NOT_ROUTED, cluster_why=_OWN_WRITES, why="waits for replicas to take this connection's writes; no keys"),
    "waitaof": O(policy=PASS, effect=PIN, cluster=NOT_ROUTED, cluster_why=_OWN_WRITES, why="waits for the AOF to take this connection's writes; no keys"),
    "command": O(policy=PASS, effect=PLAIN, why="lists the server's commands; no keys"),
    "command|count": O(policy=PASS, effect=PLAIN, why="no keys"),
    "command|docs": O(policy=PASS, effect=PLAIN, why="no keys"),
    "command|info": O(policy=PASS, effect=PLAIN, why="no keys"),
    "command|list": O(policy=PASS, effect=PLAIN, why="no keys"),
    "command|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "command|getkeys": O(rewrite=h.h_command_getkeys, effect=PLAIN,
                         why="the inner command is rewritten; its keys answered in client names"),
    "command|getkeysandflags": O(rewrite=h.h_command_getkeys, effect=PLAIN,
                                 why="the inner command is rewritten; its keys answered in client names"),
    "script": O(why="the script cache is shared by every route"),
    "script|load": O(policy=PASS, effect=PLAIN, cluster=EVERY, tenant=FENCED, tenant_why=_SCRIPT,
                     why="loading a script touches no key"),
    "script|exists": O(policy=PASS, effect=PLAIN, why="no keys"),
    "script|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "function": O(why="function libraries are shared by every route"),
    "function|load": O(policy=PASS, effect=PLAIN, cluster=EVERY, tenant=FENCED, tenant_why=_LIBRARY,
                       why="loading a library touches no key"),
    "function|list": O(policy=PASS, effect=PLAIN, tenant=FENCED, tenant_why=_LIBRARY, why="no keys"),
    "function|stats": O(policy=PASS, effect=PLAIN, tenant=FENCED, tenant_why=_LIBRARY, why="no keys"),
    "function|dump": O(policy=PASS, effect=PLAIN, tenant=FENCED, tenant_why=_LIBRARY, why="no keys"),

    # ---- scripts: their declared keys are rewritten, but the code may call any key
    "eval": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "evalsha": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "eval_ro": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "evalsha_ro": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "fcall": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "fcall_ro": O(tenant=FENCED, tenant_why=_SCRIPT, why=_KEYS_DECLARED),
    "function|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    # script caches and function libraries are per node: on a spread route over a cluster
    # what changes them goes to every primary
    "script|flush": O(cluster=EVERY, why="the script cache is shared by every route"),
    "function|delete": O(cluster=EVERY, why="function libraries are shared by every route"),
    "function|flush": O(cluster=EVERY, why="function libraries are shared by every route"),
    "function|restore": O(cluster=EVERY, why="function libraries are shared by every route"),
    "memory": O(why=_SERVER),
    "memory|doctor": O(policy=PASS, effect=PLAIN, why="no keys"),
    "memory|stats": O(policy=PASS, effect=PLAIN, why="no keys"),
    "memory|malloc-stats": O(policy=PASS, effect=PLAIN, why="no keys"),
    "memory|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "object|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "xinfo|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "xgroup|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "pubsub|numpat": O(policy=PASS, effect=PLAIN, why="a count; no names"),
    "pubsub|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "acl": O(why="ACLs are shared by every route"),
    "acl|whoami": O(policy=PASS, effect=PIN, why=_CONNECTION),
    "acl|cat": O(policy=PASS, effect=PLAIN, why="no keys"),
    "acl|help": O(policy=PASS, effect=PLAIN, why="no keys"),

    # ---- patterns, channels, db indexes: hand-written rewrites (proxy/handlers.py)
    "keys": O(rewrite=h.h_keys, effect=PLAIN, cluster=CONCAT, why="a glob, not a key: the namespace is escaped in front"),
    "scan": O(rewrite=h.h_scan, effect=PLAIN, cluster=SCAN_NODES, why="without MATCH it would list other namespaces"),
    "sort": O(rewrite=h.h_sort, effect=PLAIN, cluster=FIRST_KEY, why="BY/GET patterns and STORE are not in the key specs"),
    "sort_ro": O(rewrite=h.h_sort, effect=PLAIN, cluster=FIRST_KEY, why="BY/GET patterns are not in the key specs"),
    "migrate": O(rewrite=h.h_migrate, effect=PLAIN, cluster=NOT_ROUTED,
                 cluster_why="its keys may follow KEYS, so its node cannot be chosen from its first key",
                 why="the key may follow KEYS; the db is a client index; never to the route's own server "
                     "(Redis would block on itself until the timeout); refused on a tenant route (another "
                     "server is outside the fence, and the same server has many names)"),
    "move": O(rewrite=h.h_move, effect=PLAIN, why="the db is a client index with its own keyspace"),
    "copy": O(rewrite=h.h_copy, effect=PLAIN, why="DB n puts the destination in another keyspace"),
    "swapdb": O(rewrite=h.h_swapdb, effect=PLAIN, why="it would swap other tenants' databases"),
    "flushall": O(rewrite=h.h_flushall, effect=PLAIN, cluster=EVERY, why="it would delete every namespace and every db"),
    "debug": O(rewrite=h.h_debug, effect=PIN, cluster=NOT_ROUTED,
               cluster_why="the key of DEBUG OBJECT is not in the key specs, so its node cannot be chosen",
               why="only DEBUG OBJECT key is allowed; DEBUG PROTOCOL push sends a push to its caller"),
    "publish": O(rewrite=h.h_publish, effect=PLAIN, why="channels are fenced like keys; no key spec"),
    "pubsub|channels": O(rewrite=h.h_pubsub_channels, effect=PLAIN, why="a glob of channel names"),
    "pubsub|shardchannels": O(rewrite=h.h_pubsub_channels, effect=PLAIN, why="a glob of channel names"),
    "pubsub|numsub": O(rewrite=h.h_pubsub_numsub, effect=PLAIN, why="channel names, answered in order"),
    "pubsub|shardnumsub": O(rewrite=h.h_pubsub_numsub, effect=PLAIN, why="channel names, answered in order"),

    # ---- replies that name keys (the key specs say where keys are asked, not answered)
    "blpop": O(reply=replies.first_is_key), "brpop": O(reply=replies.first_is_key),
    "bzpopmin": O(reply=replies.first_is_key), "bzpopmax": O(reply=replies.first_is_key),
    "blmpop": O(reply=replies.first_is_key), "lmpop": O(reply=replies.first_is_key),
    "bzmpop": O(reply=replies.first_is_key), "zmpop": O(reply=replies.first_is_key),
    "xread": O(reply=replies.each_first_is_key), "xreadgroup": O(reply=replies.each_first_is_key),

    # ---- split per hash slot on a spread route over a cluster (proxy/spread.py)
    "mget": O(cluster=SPLIT_VALUES, why=_SPLIT), "mset": O(cluster=SPLIT_OK, why=_SPLIT + " (not atomic then)"),
    "del": O(cluster=SPLIT_SUM, why=_SPLIT), "unlink": O(cluster=SPLIT_SUM, why=_SPLIT),
    "exists": O(cluster=SPLIT_SUM, why=_SPLIT), "touch": O(cluster=SPLIT_SUM, why=_SPLIT),
    "unwatch": O(policy=PASS, effect=PLAIN, cluster=TX,
                 why="WATCH pins its client to a connection of its own, so on a shared "
                     "connection nothing is watched: UNWATCH changes nothing there"),
    "asking": O(why="cluster commands are not routed", cluster=NOT_ROUTED,
                cluster_why="redirections are the proxy's business"),

    # ---- emulated within the namespace (add mode): the server's own would count or
    # delete other tenants' keys (proxy/emulate.py)
    "flushdb": O(policy=EMULATE, session="emulated", effect=PLAIN, cluster=EVERY,
                 why="emulated with SCAN MATCH + DEL; each step is one request, one reply"),
    "dbsize": O(policy=EMULATE, session="emulated", effect=PLAIN, cluster=SUM,
                why="emulated with SCAN MATCH; each step is one request, one reply"),
    "randomkey": O(policy=EMULATE, session="emulated", rewrite=h.h_randomkey_passthrough, effect=PLAIN,
                   cluster=FIRST_VALUE,
                   why="emulated with SCAN MATCH; each step is one request, one reply"),

    # ---- connection state: carried out by the session, on the server's confirmation
    "select": O(policy=PASS, effect=STATE, session="select",
                why="the client's db index is mapped to a backend db and keyspace"),
    "hello": O(policy=PASS, effect=STATE, session="hello", why="changes the protocol (and may AUTH, SETNAME)"),
    "reset": O(policy=PASS, effect=STATE, session="reset", cluster=NOT_ROUTED,
               cluster_why="not built on a spread route (it would log out every node connection)",
               why="the proxy restores what it set up on the connection (AUTH, db)"),
    "auth": O(policy=PASS, effect=STATE,
              why="changes the connection's user; on a listener with users the proxy checks it and never "
                  "forwards it (Session._login, proxy/auth.py)"),
    "quit": O(policy=PASS, effect=STATE, session="quit", why="answered by the proxy, which closes the client"),
    "readonly": O(policy=PASS, effect=STATE, why="cluster read mode of the connection"),
    "readwrite": O(policy=PASS, effect=STATE, why="cluster read mode of the connection"),
    "multi": O(policy=PASS, effect=PIN, session="multi", cluster=TX, why="a transaction lives on one connection"),
    "exec": O(policy=PASS, effect=PIN, session="exec", cluster=TX, why="a transaction lives on one connection"),
    "discard": O(policy=PASS, effect=PIN, session="discard", cluster=TX, why="a transaction lives on one connection"),
    "watch": O(effect=PIN, cluster=TX, why="watched keys live on the connection"),
    "client": O(why="it reaches other clients' connections"),
    "client|reply": O(policy=PASS, effect=STATE, session="client_reply",
                      why="carried out by the proxy, never sent: every upstream request gets exactly one reply"),
    "client|setinfo": O(policy=PASS, effect=PLAIN,
                        why="names the client library in CLIENT LIST; no later reply depends on it "
                            "(client libraries send it on connect, so it must not cost a connection)"),
    "client|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "client|id": O(policy=PASS, effect=PIN, why=_CONNECTION),
    "client|info": O(policy=PASS, effect=PIN, tenant=EMULATE, session="client_info", why=_CONNECTION,
                     tenant_why="answered by the proxy in client terms (client db, the proxy's client id)"),
    "client|list": O(app=PASS, effect=PLAIN, tenant=EMULATE, session="client_list", why="it lists other routes' clients",
                     tenant_why="answered by the proxy: the route's own clients, in client terms"),
    "client|getname": O(policy=PASS, effect=STATE, session="client_getname",
                        why="on a shared link the proxy holds the name and answers (a named client keeps "
                            "the shared link); on a connection of its own the server does"),
    "client|setname": O(policy=PASS, effect=STATE, session="client_setname",
                        why="names the connection; held by the proxy on a shared link, set again on the "
                            "client's own connection if it moves to one"),
    "client|no-evict": O(policy=PASS, effect=STATE, why="a flag of the connection"),
    "client|no-touch": O(policy=PASS, effect=STATE, why="a flag of the connection"),
    "client|getredir": O(policy=PASS, effect=PIN, why=_CONNECTION),
    "client|caching": O(policy=PASS, effect=STATE, why="client-side caching state of the connection"),
    "client|capa": O(policy=PASS, effect=STATE, why="capabilities of the connection"),
    "client|tracking": O(rewrite=h.h_client_tracking, effect=STATE, cluster=NOT_ROUTED,
                         cluster_why="invalidations come from every node; not built on a spread route",
                         why="PREFIX arguments are key prefixes; BCAST gets the namespace as prefix"),
    "client|trackinginfo": O(rewrite=h.h_client_trackinginfo, effect=PIN, why="lists key prefixes"),
    "subscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("channel", True),
                   why="channels are fenced like keys; messages arrive on the connection"),
    "unsubscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("channel", False),
                     why="channels are fenced like keys"),
    "psubscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("pattern", True),
                    why="patterns are fenced like key globs"),
    "punsubscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("pattern", False),
                      why="patterns are fenced like key globs"),
    "ssubscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("shard", True),
                    why="shard channels are fenced like keys"),
    "sunsubscribe": O(policy=PASS, effect=PIN, session="subscribe", cluster=SUBSCRIBE, subscribe=("shard", False),
                      why="shard channels are fenced like keys"),

    # ---- streams of replies, or none
    "monitor": O(policy=REFUSE, app=PASS, tenant=EMULATE, effect=STREAM, session="monitor", cluster=NOT_ROUTED,
                 cluster_why="each node monitors its own traffic; not built on a spread route",
                 why="it shows every client's commands and keys",
                 tenant_why="answered by the proxy: the route's own traffic, in client terms"),
    "replconf": O(everywhere=True, effect=STREAM,
                  why="a proxy client is not a replica (REPLCONF ACK gets no reply)"),
    "sync": O(everywhere=True, effect=STREAM, why="a proxy client is not a replica (SYNC streams the dataset)"),
    "psync": O(everywhere=True, effect=STREAM, why="a proxy client is not a replica (PSYNC streams the dataset)"),
    "shutdown": O(effect=PIN, why="the server is shared by every route"),

    # ---- refused on namespaced routes (pinned elsewhere: they are rare and some block)
    "config": O(why="server configuration is shared by every route"),
    "config|get": O(app=PASS, tenant=EMULATE, session="config_get", effect=PLAIN,
                    why="server configuration is shared by every route",
                    tenant_why="answered for a safe list of parameters (overlay.CONFIG_GET_SAFE)"),
    "save": O(why=_PERSISTENCE), "bgsave": O(why=_PERSISTENCE), "bgrewriteaof": O(why=_PERSISTENCE),
    "replicaof": O(why=_REPLICATION), "slaveof": O(why=_REPLICATION), "failover": O(why=_REPLICATION),
    "module": O(why="modules are shared by every route"),
    "cluster": O(why="cluster commands are not routed"),
    "slowlog": O(why="it shows other clients' keys"), "commandlog": O(why="it shows other clients' keys"),
    "latency": O(why=_SERVER), "pfselftest": O(why="it is a server self-test"),

    # ---- read-only server commands: passed on app routes (a trusted application)
    "slowlog|get": O(app=PASS, effect=PLAIN, why="it shows other clients' keys"),
    "slowlog|len": O(app=PASS, effect=PLAIN, why="it counts other clients' commands"),
    "slowlog|help": O(policy=PASS, effect=PLAIN, why="no keys"),
    "commandlog|get": O(app=PASS, effect=PLAIN, why="it shows other clients' keys"),
    "commandlog|len": O(app=PASS, effect=PLAIN, why="it counts other clients' commands"),
    "latency|latest": O(app=PASS, effect=PLAIN, why=_SERVER), "latency|history": O(app=PASS, effect=PLAIN, why=_SERVER),
    "latency|doctor": O(app=PASS, effect=PLAIN, why=_SERVER), "latency|histogram": O(app=PASS, effect=PLAIN, why=_SERVER),
    "latency|graph": O(app=PASS, effect=PLAIN, why=_SERVER),
    "module|list": O(app=PASS, effect=PLAIN, why="modules are shared by every route"),
}
