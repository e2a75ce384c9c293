"""The fence checked against Redis's own ACLs (issue 13, item 5): a generator and an oracle.

The generator reads COMMAND DOCS from the server under test and builds, for every
command and subcommand, invocations from the documented argument structure: the
documented arity with keys inside the namespace, wrong arities, numkeys that do not
match the keys given, patterns and channels, and scripts (EVAL/FCALL bodies that
call KEYS, SCAN, GET/SET on keys outside the namespace). It is deterministic for a
seed.

The oracle is a server holding keys, channels, a function library and a script
inside and outside the namespace, every outside value carrying the marker
`OUTSIDE`. Each invocation is run
  (a) through the proxy on a namespaced route with `policy = "tenant"`, whose
      upstream user is the server's unrestricted default user, client names as the
      client would send them, and
  (b) directly as Redis ACL users restricted to `~NS:* &NS:*` with @admin and
      @dangerous removed (`base`), and the same user also denied the keyless
      commands ACL key patterns do not cover (`tight`: KEYS, SCAN, RANDOMKEY,
      FLUSHDB, FLUSHALL, DBSIZE; valkey issue #370), each once with the names
      rendered inside the namespace (`NS:k`, what a well-behaved tenant sends) and
      once with the proxy client's bytes unchanged (`k`, outside).
After each run the outside state is compared with the state before: values,
existence and TTLs of outside keys (DEBUG DIGEST-VALUE, PTTL, per-db counts),
messages on outside channels, function libraries, the script cache, CONFIG and
ACL users. A reply that holds the marker (an outside name or value) or the
db's whole key count (DBSIZE, INFO keyspace, MEMORY STATS) has read outside.

A leak through the proxy that neither rendering leaks as the `tight` ACL user is
a failure. Refusals by the proxy of what the ACL user may run are collected:
README's "The fence, checked against Redis ACLs" lists them.

Used by tests/test_fence.py (bounded, in CI) and scripts/fence_fuzz.py (long runs).
Nothing here mocks Redis: every run goes to a real server started for it.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
from dataclasses import dataclass, field

from integration_helpers import Err, decode, encode, frame_end

NS = "t"
PREFIX = NS + ":"
MARK = b"OUTSIDE"
PASSWORD = "fence-pw"
FILLERS = 300                 # outside keys no invocation names: they make whole-db counts stand out
BASE_ACL = f"on >{PASSWORD} ~{NS}:* &{NS}:* +@all -@admin -@dangerous"
KEYLESS_370 = ("keys", "scan", "randomkey", "flushdb", "flushall", "dbsize")
TIGHT_ACL = BASE_ACL + "".join(f" -{c}" for c in KEYLESS_370)
REPLY_TIMEOUT = 5.0

# ---------------------------------------------------------------- the data set

# Each name exists inside (NS:name, plain values) and outside (name, values marked
# OUTSIDE), so a key the proxy fails to prefix lands on marked data.
KEY_NAMES = ("str", "list", "hash", "set", "zset", "stream", "geo", "hll", "k1")
NEW_NAMES = ("new1", "new2")  # absent inside; present (marked) outside
GROUP_KEYS = {"string": ("str", "k1"), "list": ("list",), "hash": ("hash",), "set": ("set",),
              "sorted-set": ("zset",), "stream": ("stream",), "geo": ("geo",),
              "hyperloglog": ("hll",), "bitmap": ("str",)}
CHANNELS = ("ch", "k1")
OUT_CHANNEL = "OUTSIDE-chan"   # an outside subscriber listens here: PUBSUB CHANNELS must not show it
OUT_LIB = "OUTSIDE_lib"
GEN_LIB = "fence_gen"
OUT_LIB_CODE = (f"#!lua name={OUT_LIB}\n"
                "redis.register_function('fence_keys', function(keys, args) return redis.call('KEYS', '*') end)\n"
                "redis.register_function('fence_get_arg', function(keys, args) "
                "return redis.call('GET', args[1]) end)\n"
                "redis.register_function('fence_get_key', function(keys, args) "
                "return redis.call('GET', keys[1]) end)\n"
                "redis.register_function{function_name='fence_one', "
                "callback=function(keys, args) return 1 end, flags={'no-writes'}}\n"
                "redis.register_function{function_name='fence_ro', "
                "callback=function(keys, args) return redis.call('SCAN', '0', 'COUNT', '1000') end, "
                "flags={'no-writes'}}\n")
GEN_LIB_CODE = (f"#!lua name={GEN_LIB}\n"
                "redis.register_function('fence_gen', function(keys, args) return redis.call('KEYS', '*') end)\n")
FUNCTIONS = ("fence_keys", "fence_get_arg", "fence_get_key", "fence_ro", "fence_one", "fence_gen")

# Script bodies: each either stays inside (keys through KEYS) or reaches outside.
SCRIPTS = (
    "return redis.call('KEYS', '*')",
    "return redis.call('SCAN', '0', 'COUNT', '1000')",
    "return redis.call('GET', 'k1')",
    "return redis.call('SET', 'k1', 'x')",
    "return redis.call('GET', KEYS[1])",
    "return redis.call('GET', ARGV[1])",
    "return redis.call('SET', ARGV[1], 'x')",
    "return redis.call('DBSIZE')",
    "return redis.call('RANDOMKEY')",
    "return redis.call('PUBLISH', 'ch', 'x')",
    "return redis.call('FLUSHDB')",
    "return 1",
)
OUT_SCRIPT = "return 'OUTSIDE script'"  # loaded by the admin: SCRIPT FLUSH would drop it


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# ---------------------------------------------------------------- invocations

class Key(str):
    """A key name in client terms (the proxy adds NS:)."""


class Pat(str):
    """A key or channel glob in client terms."""


class Chan(str):
    """A channel in client terms."""


class Timeout(str):
    """A timeout argument: never made huge (MIGRATE to the server itself blocks the
    whole server for its timeout)."""


@dataclass
class Invocation:
    command: str               # "get", "client|list"
    kind: str                  # valid, wrong-arity, script, sequence, regression
    tokens: list
    before: list = field(default_factory=list)   # commands sent first on the same connection
    after: list = field(default_factory=list)    # and after (MULTI ... EXEC)

    def requests(self, inside: bool) -> list[list[bytes]]:
        """Every command sent, in order; render(inside) is the one under test."""
        enc = [[t.encode() for t in c] for c in self.before]
        return enc + [self.render(inside)] + [[t.encode() for t in c] for c in self.after]

    def render(self, inside: bool) -> list[bytes]:
        """The request: as the proxy's client sends it, or (inside) as a well-behaved
        ACL user names the same keys on the server (NS:name)."""
        out = []
        for t in self.tokens:
            if inside and isinstance(t, (Key, Pat, Chan)):
                t = PREFIX + t
            out.append(t if isinstance(t, bytes) else str(t).encode())
        return out

    def has_names(self) -> bool:
        return any(isinstance(t, (Key, Pat, Chan)) for t in self.tokens)

    def text(self) -> str:
        return " ; ".join(" ".join(_show(t) for t in c) for c in self.requests(False))


def _show(b: bytes) -> str:
    s = b.decode("latin-1")
    return repr(s) if (not s or any(c in s for c in " '\"\n\\")) else s


def _pairs(x):
    """RESP2 flat [k, v, k, v] (or a RESP3 map) as a dict with str keys."""
    if isinstance(x, dict):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in x.items()}
    return {x[i].decode(): x[i + 1] for i in range(0, len(x) - 1, 2)}


def load_docs(conn: "Conn") -> dict[str, dict]:
    """COMMAND DOCS as {name: doc}, subcommands as "parent|sub" (lowercase)."""
    raw = conn.call("COMMAND", "DOCS")
    docs: dict[str, dict] = {}

    def add(name: bytes, doc):
        d = _pairs(doc)
        subs = d.pop("subcommands", None)
        d["arguments"] = [_arg(a) for a in d.get("arguments") or []]
        docs[name.decode().lower()] = d
        if subs:
            d["container"] = True
            sub = _pairs(subs)
            for sname, sdoc in sub.items():
                add(sname.encode(), sdoc)

    flat = raw.items() if isinstance(raw, dict) else zip(raw[0::2], raw[1::2])
    for name, doc in flat:
        add(name, doc)
    return docs


def _arg(a) -> dict:
    d = _pairs(a)
    d["name"] = d["name"].decode()
    d["type"] = d["type"].decode()
    d["flags"] = [f.decode() for f in d.get("flags") or []]
    if "token" in d:
        d["token"] = d["token"].decode()
    d["arguments"] = [_arg(x) for x in d.get("arguments") or []]
    return d


class Generator:
    """Invocations from COMMAND DOCS, deterministic for a seed."""

    def __init__(self, docs: dict[str, dict], seed: int, server_port: int):
        self.docs = docs
        self.rng = random.Random(seed)
        self.port = server_port
        self.names = sorted(n for n, d in docs.items() if not d.get("container"))
        self.variant = -1  # >= 0: documented-arity calls take the variant-th choice of each oneof

    # -- argument values by type and name

    def key(self, group: str) -> Key:
        r = self.rng.random()
        if r < 0.15:
            return Key(self.rng.choice(NEW_NAMES))
        if r < 0.3:
            return Key(self.rng.choice(KEY_NAMES))
        return Key(self.rng.choice(GROUP_KEYS.get(group, KEY_NAMES)))

    def value(self, a: dict, group: str):
        name, typ, rng = a["name"].lower(), a["type"], self.rng
        if typ == "key":
            return self.key(group)
        if typ == "pattern" or "pattern" in name:
            return Pat(rng.choice(("*", "k*", "*1", "[sk]*")))
        if "channel" in name:
            return Chan(rng.choice(CHANNELS))
        if name in ("timeout", "milliseconds", "ms"):
            return Timeout("0.01" if typ == "double" else "1")
        if name == "port":
            return str(self.port)
        if name == "host":
            return "127.0.0.1"
        if name == "script":
            return rng.choice(SCRIPTS)
        if name == "sha1":
            return sha1(rng.choice(SCRIPTS + (OUT_SCRIPT,)))
        if name == "function":
            return rng.choice(FUNCTIONS)
        if name == "function-code":
            return rng.choice((GEN_LIB_CODE, "x"))
        if name == "library-name":
            return rng.choice((GEN_LIB, "nolib"))
        if name in ("username", "password"):
            return "nobody"
        if name == "cursor":
            return "0"
        if typ == "integer":
            if name in ("index", "db", "destination-db"):
                return rng.choice(("0", "1"))
            return rng.choice(("1", "0", "2", "-1"))
        if typ == "double":
            return rng.choice(("1.5", "0", "2"))
        if typ == "unix-time":
            return "4102444800"
        if group == "stream" and name in ("id", "start", "end", "last-id", "min-idle-time"):
            return rng.choice(("0-1", "$", "-", "+", "*", "0")) if name == "id" else \
                {"start": "-", "end": "+"}.get(name, "0")
        return rng.choice(("v", "k1", "str", "1", "ch"))

    # -- the argument tree

    def args(self, args: list[dict], group: str, exact: bool, out: list) -> None:
        i = 0
        while i < len(args):
            a = args[i]
            flags = a["flags"]
            if "optional" in flags and not exact and self.rng.random() < 0.5:
                i += 1
                continue
            if a["name"] == "numkeys" and a["type"] == "integer":
                # numkeys and the keys it counts (EVAL, FCALL, ZUNIONSTORE, LMPOP, ...)
                n = self.rng.randint(1, 3)
                out.append(str(n))
                j = i + 1
                while j < len(args) and args[j]["type"] != "key":
                    self.one(args[j], group, exact, out)
                    j += 1
                if j < len(args):
                    for _ in range(n):
                        out.append(self.key(group))
                    i = j + 1
                else:
                    i = j
                continue
            if a["type"] == "block" and a["name"] == "streams":
                # XREAD/XREADGROUP STREAMS key... id...: as many ids as keys
                n = self.rng.randint(1, 2)
                out.append(a.get("token", "STREAMS"))
                out.extend(self.key("stream") for _ in range(n))
                out.extend(self.rng.choice(("0", "$", ">")) for _ in range(n))
                i += 1
                continue
            reps = 1
            if "multiple" in flags:
                reps = 1 if exact else self.rng.randint(1, 3)
            for r in range(reps):
                if "token" in a and (r == 0 or "multiple_token" in flags) and a["type"] != "pure-token":
                    out.append(a["token"])
                self.one(a, group, exact, out, token_done=True)
            i += 1

    def one(self, a: dict, group: str, exact: bool, out: list, token_done: bool = False) -> None:
        typ = a["type"]
        if "token" in a and not token_done and typ != "pure-token":
            out.append(a["token"])
        if typ == "pure-token":
            out.append(a["token"])
        elif typ == "oneof":
            opts = a["arguments"]
            pick = opts[self.variant % len(opts)] if exact and self.variant >= 0 else self.rng.choice(opts)
            self.one(pick, group, exact, out)
        elif typ == "block":
            self.args(a["arguments"], group, exact, out)
        else:
            out.append(self.value(a, group))

    def valid(self, name: str, exact: bool = False) -> Invocation:
        doc = self.docs[name]
        out: list = [p.upper() for p in name.split("|")]
        if name == "client|reply":  # OFF and SKIP answer nothing: a read would wait for the timeout
            return Invocation(name, "valid", out + ["ON"])
        self.args(doc["arguments"], doc.get("group", b"").decode() if isinstance(doc.get("group"), bytes)
                  else str(doc.get("group", "")), exact, out)
        return Invocation(name, "valid", out)

    def wrong_arity(self, name: str) -> Invocation:
        inv = self.valid(name)
        head = len(name.split("|"))
        toks = inv.tokens
        r = self.rng.random()
        if r < 0.4 and len(toks) > head:
            toks = toks[:self.rng.randint(head, len(toks) - 1)]
        elif r < 0.7:
            toks = toks + [Key("k1") if self.rng.random() < 0.5 else "k1"] * self.rng.randint(1, 3)
        else:
            # numkeys / counts that do not match what follows (redis PR #14847's family)
            ints = [i for i, t in enumerate(toks) if type(t) in (str, Timeout) and re.fullmatch(r"-?\d+", t)]
            if ints:
                i = self.rng.choice(ints)
                big = () if isinstance(toks[i], Timeout) else ("2147483648",)
                toks = toks[:i] + [self.rng.choice(("0", "5", "-1", "100") + big)] + toks[i + 1:]
            else:
                toks = toks + ["k1"]
        return Invocation(name, "wrong-arity", toks)

    def script(self) -> Invocation:
        rng = self.rng
        cmd = rng.choice(("eval", "eval_ro", "evalsha", "evalsha_ro", "fcall", "fcall_ro"))
        cmd = cmd if cmd in self.docs else "eval"
        if cmd.startswith("fcall"):
            body = rng.choice(FUNCTIONS)
        else:
            body = rng.choice(SCRIPTS)
            if cmd.startswith("evalsha"):
                body = sha1(body)
        nk = rng.choice((0, 1, 2))
        keys = [Key(rng.choice(KEY_NAMES)) for _ in range(nk)]
        argv = [rng.choice(("k1", "str", "new1")) for _ in range(rng.choice((0, 1, 2)))]
        given = rng.choice((nk, nk, nk, nk + 1, nk + 3, -1)) if rng.random() < 0.3 else nk
        return Invocation(cmd, "script", [cmd.upper(), body, str(given), *keys, *argv])

    def sequence(self) -> Invocation:
        """A command after SELECT 1 (another backend db, the same namespace) or HELLO 3
        (RESP3 replies), or queued in MULTI (its reply inside EXEC's array)."""
        inv = self.valid(self.rng.choice(self.names))
        r = self.rng.random()
        if r < 0.35:
            inv.before = [["SELECT", "1"]]
        elif r < 0.6:
            inv.before = [["HELLO", "3"]]
        else:
            inv.before, inv.after = [["MULTI"]], [["EXEC"]]
        inv.kind = "sequence"
        return inv

    def invocations(self, count: int, per_command: int = 1) -> list[Invocation]:
        """Regression cases, `per_command` documented-arity calls of every command and
        subcommand (the n-th takes the n-th choice of each oneof), then random variants
        (valid, wrong arity, scripts) up to `count` in all."""
        out = regression_cases(self.docs, self.port)
        for n in range(per_command):
            self.variant = n
            for name in self.names:
                out.append(self.valid(name, exact=True))
        self.variant = -1
        while len(out) < count:
            r = self.rng.random()
            name = self.rng.choice(self.names)
            if r < 0.3:
                out.append(self.valid(name))
            elif r < 0.6:
                out.append(self.wrong_arity(name))
            elif r < 0.85:
                out.append(self.script())
            else:
                out.append(self.sequence())
        return out


def regression_cases(docs: dict, port: int) -> list[Invocation]:
    """The fence breaks Redis's ACL code itself had, and the keyless commands ACL key
    patterns do not cover (valkey #370)."""
    K = Key
    cases = [
        # redis PR #14659: MSETEX counts keys from an argument with a step of 2 between them.
        Invocation("msetex", "regression", ["MSETEX", "2", K("k1"), "v", K("new1"), "v"]),
        Invocation("msetex", "regression", ["MSETEX", "1", K("k1"), "v", "new1", "v"]),
        Invocation("msetex", "regression", ["MSETEX", "3", K("k1"), "v", "new1", "v"]),
        # redis PR #14847: EVAL whose numkeys does not match its arguments.
        Invocation("eval", "regression", ["EVAL", "return redis.call('GET', ARGV[1])", "0", "k1"]),
        Invocation("eval", "regression", ["EVAL", "return redis.call('GET', KEYS[1])", "2", K("k1")]),
        Invocation("eval", "regression", ["EVAL", "return redis.call('GET', KEYS[2])", "1", K("k1"), "k1"]),
        Invocation("eval", "regression", ["EVAL", "return 1", "-1", "k1"]),
        Invocation("eval", "regression", ["EVAL", "return 1", "100"]),
        Invocation("eval", "regression", ["EVAL", "return redis.call('KEYS', '*')"]),
        Invocation("evalsha", "regression", ["EVALSHA", sha1("return redis.call('GET', ARGV[1])"), "0", "k1"]),
        Invocation("fcall", "regression", ["FCALL", "fence_get_arg", "0", "k1"]),
        Invocation("fcall", "regression", ["FCALL", "fence_get_key", "3", K("k1")]),
        Invocation("fcall", "regression", ["FCALL", "fence_keys", "0"]),
        # valkey #370: keyless commands that ACL key patterns do not cover.
        Invocation("scan", "regression", ["SCAN", "0", "COUNT", "1000"]),
        Invocation("scan", "regression", ["SCAN", "0", "MATCH", Pat("*"), "COUNT", "1000"]),
        Invocation("keys", "regression", ["KEYS", Pat("*")]),
        Invocation("keys", "regression", ["KEYS", "*"]),
        Invocation("randomkey", "regression", ["RANDOMKEY"]),
        Invocation("dbsize", "regression", ["DBSIZE"]),
        Invocation("flushdb", "regression", ["FLUSHDB"]),
        Invocation("flushdb", "regression", ["FLUSHDB", "ASYNC"]),
        Invocation("flushall", "regression", ["FLUSHALL"]),
        Invocation("flushall", "regression", ["FLUSHALL", "SYNC"]),
        Invocation("info", "regression", ["INFO", "keyspace"]),
        Invocation("pubsub|channels", "regression", ["PUBSUB", "CHANNELS"]),
        Invocation("publish", "regression", ["PUBLISH", Chan("ch"), "x"]),
        Invocation("sort", "regression", ["SORT", K("list"), "BY", "nosort", "GET", "k*"]),
        Invocation("migrate", "regression",
                   ["MIGRATE", "127.0.0.1", str(port), K("k1"), "1", "10", "COPY"]),
    ]
    return cases


# ---------------------------------------------------------------- the oracle

class Conn:
    """One RESP connection with its own framer (integration_helpers'), replies decoded."""

    def __init__(self, port: int, user: str | None = None, timeout: float = REPLY_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if user:
            reply = self.call("AUTH", user, PASSWORD)
            assert reply == b"OK", reply

    def send(self, args) -> None:
        self.sock.sendall(encode(*args))

    def read_raw(self) -> bytes:
        while True:
            end = frame_end(self.buf) if self.buf else -1
            if end > 0:
                raw, self.buf = self.buf[:end], self.buf[end:]
                return raw
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.buf += data

    def call(self, *args):
        self.send(args)
        return decode(self.read_raw())

    def pipeline(self, cmds: list) -> list:
        self.sock.sendall(b"".join(encode(*c) for c in cmds))
        return [decode(self.read_raw()) for _ in cmds]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Outcome:
    reply: bytes               # raw frame, or b"" (closed) / b"<timeout>"
    read: list = field(default_factory=list)     # what the reply showed of the outside
    changed: list = field(default_factory=list)  # what changed outside

    @property
    def leaked(self) -> bool:
        return bool(self.read or self.changed)

    @property
    def error(self) -> bool:
        return self.reply[:1] in (b"-", b"!") or self.reply in (b"", b"<timeout>")

    @property
    def refused_by_proxy(self) -> bool:
        return self.reply.startswith(b"-") and b" is refused on " in self.reply

    def short(self) -> str:
        r = self.reply[:160].decode("latin-1").replace("\r\n", " ")
        return f"{r!r} read={self.read} changed={self.changed}"


class Oracle:
    """A server seeded inside and outside the namespace, its ACL users, and the
    outside-state snapshot taken around every run."""

    def __init__(self, server_port: int):
        self.port = server_port
        self.admin = Conn(server_port)
        self.sub: Conn | None = None
        self.config = self.config_now()  # the baseline, put back after a run changed it
        self.set_users()
        self.rebuild()

    def set_users(self) -> None:
        # only here and after a run changed them: a proxy may be connected as `tight`
        for user, rules in (("base", BASE_ACL), ("tight", TIGHT_ACL)):
            self.admin.call("ACL", "SETUSER", user, "reset", *rules.split())

    # -- data

    def outside_keys(self) -> list[str]:
        return list(KEY_NAMES) + list(NEW_NAMES) + ["tx:k1", "t", "T:k1"]

    def rebuild(self) -> None:
        a = self.admin
        a.call("FLUSHALL")
        a.call("SCRIPT", "FLUSH")
        a.call("FUNCTION", "FLUSH")
        a.call("FUNCTION", "LOAD", OUT_LIB_CODE)
        a.call("SCRIPT", "LOAD", OUT_SCRIPT)
        for s in SCRIPTS:
            a.call("SCRIPT", "LOAD", s)
        cmds = []
        for db in (0, 1):
            cmds.append(("SELECT", db))
            for k in self.outside_keys():
                cmds += _seed(k, "OUTSIDE-" + k.replace(":", "-"))
            if db == 0:
                cmds += [("SET", f"OUTSIDE-fill-{i}", "OUTSIDE") for i in range(FILLERS)]
        cmds.append(("SELECT", 0))
        for r in a.pipeline(cmds):
            assert not isinstance(r, Err), r
        self.seed_inside()
        now = self.config_now()
        for k in now:
            if now[k] != self.config.get(k):
                a.call("CONFIG", "SET", k, self.config[k])
        if self.sub is None:
            self.sub = Conn(self.port)
            self.sub.send(("PSUBSCRIBE", "*"))
            self.sub.read_raw()
            self.sub.send(("SUBSCRIBE", OUT_CHANNEL))
            self.sub.read_raw()
        self.baseline = self.snapshot()

    def seed_inside(self) -> None:
        """The namespace back as it was, in dbs 0 and 1 (a run may write there)."""
        cmds = []
        for db in (0, 1):
            cmds.append(("SELECT", db))
            cmds.append(("EVAL", "local ks = redis.call('KEYS', ARGV[1]) for i = 1, #ks do "
                         "redis.call('DEL', ks[i]) end return #ks", "0", PREFIX + "*"))
            for k in KEY_NAMES:
                cmds += _seed(PREFIX + k, "in-" + k)
        cmds.append(("SELECT", 0))
        for r in self.admin.pipeline(cmds):
            assert not isinstance(r, Err), r

    def config_now(self) -> dict:
        c = self.admin.call("CONFIG", "GET", "*")
        return _pairs(c) if not isinstance(c, dict) else c

    def snapshot(self) -> dict:
        a = self.admin
        names = self.outside_keys()
        cmds = []
        for db in (0, 1):
            # counted with KEYS on both sides: DBSIZE also counts keys expired but not yet reclaimed
            cmds += [("SELECT", db), ("DBSIZE",), ("KEYS", "*"), ("KEYS", PREFIX + "*"),
                     ("DEBUG", "DIGEST-VALUE", *names), *[("PTTL", k) for k in names]]
        cmds += [("SELECT", 0), ("FUNCTION", "LIST", "WITHCODE"),
                 ("SCRIPT", "EXISTS", sha1(OUT_SCRIPT)), ("ACL", "LIST")]
        r = a.pipeline(cmds)
        snap = {}
        per = 5 + len(names)
        for db in (0, 1):
            part = r[db * per:(db + 1) * per]
            snap[f"db{db} total"] = part[1]
            snap[f"db{db} outside count"] = len(part[2]) - len(part[3])
            snap[f"db{db} digests"] = part[4]
            snap[f"db{db} ttls"] = part[5:]
        snap["functions"] = r[-3]
        snap["outside script"] = r[-2]
        snap["acl"] = r[-1]
        return snap

    def diff(self) -> list[str]:
        now = self.snapshot()
        out = [k for k in now if not k.endswith(" total") and now[k] != self.baseline[k]]
        cfg = self.config_now()
        out += [f"config {k}" for k in cfg if cfg[k] != self.config.get(k)]
        out += self.outside_messages()
        return out

    def outside_messages(self) -> list[str]:
        """Messages the outside subscriber got on channels outside the namespace."""
        token = b"fence-sync-%d" % random.getrandbits(32)
        self.admin.call("PUBLISH", "fence-sync", token)
        got = []
        while True:
            msg = decode(self.sub.read_raw())
            if msg[0] == b"pmessage":
                chan, data = msg[2], msg[3]
            else:
                chan, data = msg[1], msg[2]
            if chan == b"fence-sync":
                if data == token:
                    return got
                continue
            if not chan.startswith(PREFIX.encode()):
                got.append(f"message on outside channel {chan!r}")

    # -- runs

    def run(self, port: int, user: str | None, args, main: int = 0) -> Outcome:
        """Send one command (a list of bytes) or several (a list of them) on a fresh
        connection, read a reply to each, and see what of the outside they read or
        changed. The outcome's reply is that of command `main`."""
        totals = {self.baseline["db0 total"], self.baseline["db1 total"]}  # restored before each run
        cmds = args if args and isinstance(args[0], list) else [args]
        try:
            c = Conn(port, user)
        except (OSError, AssertionError) as e:
            raise AssertionError(f"cannot connect to {port} as {user}: {e}")
        frames = []
        try:
            c.sock.sendall(b"".join(encode(*a) for a in cmds))
            try:
                for _ in cmds:
                    frames.append(c.read_raw())
            except socket.timeout:
                frames.append(b"<timeout>")
            except (ConnectionError, OSError):
                frames.append(b"")
        finally:
            c.close()
        # the reply under test: the one after the `before` commands (the last for a single command)
        out = Outcome(frames[main] if main < len(frames) else frames[-1])
        reply = b"".join(frames)
        sent = b"".join(b"".join(a) for a in cmds)
        if MARK not in sent:  # case-sensitive: refusals say "outside" in lower case
            if MARK in reply:
                out.read.append("an outside name or value")
        out.read += _counts(reply, totals)
        try:
            changed = self.diff()
        except TimeoutError:
            raise AssertionError(f"the server did not answer its admin within {REPLY_TIMEOUT}s after "
                                 f"{b' ; '.join(b' '.join(a) for a in cmds)!r} was sent to port {port}") from None
        if changed:
            out.changed = changed
            if "acl" in changed:
                self.set_users()
            self.rebuild()
        else:
            self.seed_inside()
        return out


def _counts(reply: bytes, totals: set[int]) -> list[str]:
    """Whole-db key counts in a reply (DBSIZE, INFO keyspace, MEMORY STATS keys.count)."""
    found = []
    for m in re.finditer(rb"(?:^|[\r\n,:])(?::|keys=)(\d+)", reply):
        if int(m.group(1)) in totals and int(m.group(1)) >= FILLERS:
            found.append(f"the db's whole key count ({int(m.group(1))})")
            break
    return found


def _seed(k: str, v: str) -> list[tuple]:
    """Commands that create key `k` with values built from `v`, its type from its name."""
    base = k.rsplit(":", 1)[-1]
    if base == "list":
        return [("RPUSH", k, v + "-a", v + "-b")]
    if base == "hash":
        return [("HSET", k, v + "-f", v + "-v")]
    if base == "set":
        return [("SADD", k, v + "-a", v + "-b")]
    if base == "zset":
        return [("ZADD", k, "1", v + "-a", "2", v + "-b")]
    if base == "stream":
        return [("XADD", k, "1-1", v + "-f", v + "-v"), ("XGROUP", "CREATE", k, "g", "0")]
    if base == "geo":
        return [("GEOADD", k, "13.361389", "38.115556", v + "-a")]
    if base == "hll":
        return [("PFADD", k, v + "-a", v + "-b")]
    return [("SET", k, v)]


# ---------------------------------------------------------------- comparing

@dataclass
class Report:
    failures: list[str] = field(default_factory=list)        # proxy leaks the tight ACL user does not
    shared: list[str] = field(default_factory=list)          # leaks the tight ACL user has too
    stricter: dict[str, str] = field(default_factory=dict)   # command -> proxy refusal; the ACL user ran it
    looser: dict[str, str] = field(default_factory=dict)     # command -> invocation: ACL denies it, proxy runs it, no leak
    acl_370: dict[str, str] = field(default_factory=dict)    # base ACL user leaks, tight does not
    timeouts: list[str] = field(default_factory=list)        # no reply within REPLY_TIMEOUT through the proxy
    runs: int = 0


def check(oracle: Oracle, proxy_port: int, inv: Invocation, report: Report) -> None:
    """Run one invocation through the proxy and as both ACL users; record the result."""
    raw = inv.render(False)
    inside = inv.requests(True)
    m = len(inv.before)
    p = oracle.run(proxy_port, None, inv.requests(False), m)
    tight_in = oracle.run(oracle.port, "tight", inside, m)
    tight_raw = oracle.run(oracle.port, "tight", inv.requests(False), m) if inv.has_names() else tight_in
    base_in = oracle.run(oracle.port, "base", inside, m)
    base_raw = oracle.run(oracle.port, "base", inv.requests(False), m) if inv.has_names() else base_in
    report.runs += 1
    if p.reply == b"<timeout>":
        report.timeouts.append(inv.text())
    if p.leaked:
        if tight_in.leaked or tight_raw.leaked:
            report.shared.append(f"{inv.text()}: proxy {p.short()}")
        else:
            report.failures.append(
                f"{inv.text()} [{inv.kind}]: through the proxy {p.short()}; as the ACL user "
                f"{tight_in.short()} / {tight_raw.short()}")
    if (base_in.leaked or base_raw.leaked) and not (tight_in.leaked or tight_raw.leaked):
        report.acl_370.setdefault(inv.command, inv.text())
    if inv.command == "debug" and not (len(raw) > 1 and raw[1].upper() == b"OBJECT"):
        # never let DEBUG (but OBJECT) run unrefused on the admin's upstream connection
        if not p.refused_by_proxy:
            report.failures.append(f"{inv.text()}: DEBUG reached the server through the proxy: {p.short()}")
    if inv.kind == "sequence":
        return  # the lists below are of single commands
    if p.refused_by_proxy and not tight_in.error:
        report.stricter.setdefault(inv.command, p.reply.decode("latin-1").strip())
    if not p.error and not p.leaked and base_in.reply.startswith(b"-NOPERM") and b"command" in base_in.reply:
        report.looser.setdefault(inv.command, inv.text())


def proxy_config(listen_port: int, server_port: int, user: str | None = None) -> str:
    """A namespaced route to db 0 with policy "tenant", upstream as the server's default
    user (unfenced: the proxy refuses scripts) or as one of the oracle's ACL users."""
    auth = f"{user}:{PASSWORD}@" if user else ""
    lines = ["[[listener]]", 'name = "fence"', f'listen = "127.0.0.1:{listen_port}"',
             f'upstream = "redis://{auth}127.0.0.1:{server_port}/0"', f'namespace = "{NS}"',
             'policy = "tenant"']
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- README

README_START = "<!-- fence: generated by scripts/fence_fuzz.py --write-readme -->"
README_END = "<!-- /fence -->"


def readme_block(reports: dict[str, Report], seed: int, count: int) -> str:
    """The README's lists, from runs on each server kind: where the proxy is stricter
    than the ACL user (with the proxy's reason), what the tight user adds (valkey #370),
    and what the ACL user may not run that the proxy runs without a leak."""
    def kinds(attr: str, name: str) -> str:
        return ", ".join(k for k, r in sorted(reports.items()) if name in getattr(r, attr))

    def names(attr: str) -> list[str]:
        return sorted({n for r in reports.values() for n in getattr(r, attr)})

    out = [README_START, "",
           f"From `python scripts/fence_fuzz.py --seed {seed} --count {count} --write-readme` "
           f"({', '.join(f'{k}: {r.runs} invocations' for k, r in sorted(reports.items()))}).", "",
           "Refused by the proxy, allowed to the ACL user (`+@all -@admin -@dangerous`):", "",
           "| command | servers | the proxy's reason |", "|---|---|---|"]
    for n in names("stricter"):
        msg = next(r.stricter[n] for r in reports.values() if n in r.stricter)
        out.append(f"| `{n.replace('|', ' ').upper()}` | {kinds('stricter', n)} | {refusal_reason(msg)} |")
    out += ["", "Leaks of the plain ACL user that only denying the keyless commands closes "
            "(valkey #370; scripts included, since a script's calls are checked as the user's): "
            + ", ".join(f"`{n.replace('|', ' ').upper()}`" for n in names("acl_370")) + ".", "",
            "Denied to the ACL user by category (@admin, @dangerous), run by the proxy inside the "
            "namespace with nothing outside read or changed: "
            + ", ".join(f"`{n.replace('|', ' ').upper()}`" for n in names("looser")) + ".", "",
            README_END]
    return "\n".join(out)


def refusal_reason(message: str) -> str:
    """The reason in a proxy refusal ("... of route R: why (a route ...)" or
    "... of route R (policy "tenant": why); set ...")."""
    m = re.search(r' of route \S+ \((policy "[^"]+": [^)]*)\)', message) or \
        re.search(r" of route \S+: (.*?)(?: \(a route without namespace passes it\))?$", message)
    return (m.group(1) if m else message).replace("|", "\\|")


def readme_listed(readme_text: str) -> set[str]:
    """The commands the README's generated block lists as refused by the proxy."""
    start, end = readme_text.find(README_START), readme_text.find(README_END)
    if start < 0 or end < 0:
        return set()
    block = readme_text[start:end]
    return {m.group(1).lower().replace(" ", "|") for m in re.finditer(r"^\| `([^`]+)` \|", block, re.M)}
