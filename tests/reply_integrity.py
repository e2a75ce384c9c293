"""Concurrent reply-integrity engine (issue 11: a reply must never reach the wrong client).

Used by tests/test_reply_integrity.py (bounded, in CI) and scripts/integrity_soak.py
(long runs, shrinking a failure to a minimal sequence).

Setup
-----
* The proxy's server S (the suite's `server`) and a SEPARATE reference server R of
  the same kind. Nothing here mocks Redis.
* One proxy with two listeners in front of S (TOML, see `proxy_config`):
    - route `ns`:    client db 0 -> S db 12, namespace `ia` (add mode);
                     client db 1 -> S db 13, namespace `ib`  (`[listener.databases]`)
    - route `plain`: client db 0 -> S db 14, client db 1 -> S db 15, no namespace.
  Every other client db is unmapped (SELECT 7 is refused by the proxy).
* R mirrors the client's view: client db n is R db n, keys unprefixed. So for the
  same sequence, a proxy connection and a direct connection to R must give the same
  reply bytes, in the client's terms.

Clients
-------
N clients run at once (threads), each with one proxy connection and one private
reference connection; client `c<i>` is on route `plain` when i % 3 == 2, else `ns`.
Every name a client uses carries its id and the client db it is written in
(`c4:d1:b`, channels `c4:ch1`), so its replies never depend on how the clients
interleave: any difference from the reference is the proxy's doing, and a reply
that went to the wrong client shows up as a mismatch on some client.

Sequences
---------
Deterministic per (seed, client id): `random.Random(f"integrity:{seed}:{cid}")`.
A sequence is a list of segments from the command families (FAMILIES):
plain reads/writes, erroring (arity, syntax, WRONGTYPE arising naturally, unknown
command), refused (what the namespaced route fences: FLUSHALL, CONFIG, SWAPDB, DEBUG,
CLIENT LIST, ...; SELECT of an unmapped db on both routes), replication (REPLCONF,
SYNC, PSYNC: refused on every route once issue 11 is fixed), no-reply (CLIENT REPLY
OFF ... ON, CLIENT REPLY SKIP before any other command, refused ones included),
state (SELECT 0/1, HELLO 2/3 with or without SETNAME, CLIENT SETNAME/GETNAME, RESET),
transactions (MULTI/EXEC, DISCARD, queue-time errors -> EXECABORT, WATCH with a
self-modification -> nil EXEC, RESET inside MULTI; SELECT queued inside each),
blocking (BLPOP/BRPOP/BLMOVE/BZPOPMIN on own keys, 50 ms timeouts), pub/sub
(SUBSCRIBE/PSUBSCRIBE own channels, PING while subscribed, PUBLISH to itself in
RESP3, UNSUBSCRIBE all or RESET) and shape-only commands (TIME, CLIENT ID).
Segments are sent in pipelined batches of 1-6 steps (the batch split is part of the
seed's sequence too).

The generator models just enough to know, for every step, how many reply frames
the reference sends (0 under CLIENT REPLY OFF/SKIP, one per channel for SUBSCRIBE,
...) and which client db the connection is on (SELECT inside an EXEC that runs,
not inside an aborted one). The runner reads that many frames from R and the same
number from the proxy (a missing one is a failure after REPLY_TIMEOUT), and after
the last batch checks that the proxy sent nothing more.

Comparison
----------
Raw RESP bytes, framed by integration_helpers.frame_end (independent of proxy.resp),
RESP2 and RESP3 alike. Exceptions, each per command and documented in `CHECKS`:
  sorted  KEYS, SMEMBERS, HKEYS: order is undefined, items compared sorted
  scan    SCAN 0 MATCH own* COUNT 100000: the cursor and sorted keys
  ttl     a positive TTL is normalised
  hello   the HELLO reply's connection `id` is normalised
  shape   TIME, CLIENT ID: only the reply type (nondeterministic values)
  unsub   UNSUBSCRIBE/PUNSUBSCRIBE without arguments: the server confirms in its hash
          order of the (prefixed) names, so names are compared as a set, counts in order
  refused the proxy must answer with an error naming the command (`token`); R is
          sent a stand-in unknown command instead, which R rejects with an error,
          so R stays in step (CLIENT REPLY SKIP consumed, EXECABORT inside MULTI).

Afterwards (`check_locations`) every key on S's four dbs must be exactly where R says
its writer put it: R's db n keys of client c, prefixed with the namespace of client
db n on c's route, in the backend db of that route's client db n, with the same
type; anything else on S (a key in another namespace or db, a missing key) is
reported naming the client that wrote it. The `d<n>` in each name must match R's db
(a check of the generator's own model).

Failures name the seed, client, route, step, command, expected and received bytes,
and the client's last steps; `format_failure` prints how to reproduce.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from integration_helpers import Raw, frame_end

REPLY_TIMEOUT = 5.0        # seconds to wait for a reply the reference gave
REF_TIMEOUT = 10.0         # the reference must answer what the model predicts
STANDIN = b"INTEGRITY-REFUSED-STANDIN"

# Backend dbs on the proxy's server, per route and client db: (db, namespace prefix)
NS_DB0, NS_DB1, PLAIN_DB0, PLAIN_DB1 = 12, 13, 14, 15
ROUTES = {
    "ns": {0: (NS_DB0, b"ia:"), 1: (NS_DB1, b"ib:")},
    "plain": {0: (PLAIN_DB0, b""), 1: (PLAIN_DB1, b"")},
}
BACKEND_DBS = (NS_DB0, NS_DB1, PLAIN_DB0, PLAIN_DB1)
REF_DBS = (0, 1)

FAMILIES = ("plain", "error", "refused", "replication", "noreply", "state", "multi",
            "blocking", "pubsub", "shape")
WEIGHTS = {"plain": 40, "error": 8, "refused": 6, "replication": 3, "noreply": 9, "state": 9,
           "multi": 11, "blocking": 5, "pubsub": 5, "shape": 2}

CHECKS = ("exact", "sorted", "scan", "ttl", "hello", "shape", "refused", "unsub")


def route_of(cid: int) -> str:
    return "plain" if cid % 3 == 2 else "ns"


def proxy_config(server_host: str, server_port: int, port_ns: int, port_plain: int) -> list[dict]:
    """Listener dicts for integration_helpers.proxy_toml."""
    up = f"redis://{server_host}:{server_port}"
    return [
        {"name": "ns", "listen": f"127.0.0.1:{port_ns}", "upstream": f"{up}/{NS_DB0}", "namespace": "ia",
         "databases": {"1": {"db": NS_DB1, "namespace": "ib"}}},
        {"name": "plain", "listen": f"127.0.0.1:{port_plain}", "upstream": f"{up}/{PLAIN_DB0}",
         "databases": {"1": {"db": PLAIN_DB1}}},
    ]


# ---------------------------------------------------------------- sequences


@dataclass
class Step:
    args: list[bytes]            # what the client sends (to the proxy)
    frames: int = 1              # reply frames the reference sends for it
    check: str = "exact"
    ref: list[bytes] | None = None   # what the reference gets instead (refused commands)
    token: bytes = b""           # a refused reply must name this
    family: str = ""
    seg: int = 0                 # index of the segment the step belongs to

    def show(self) -> str:
        return " ".join(a.decode("latin-1") for a in self.args)


@dataclass
class Sequence:
    seed: int
    cid: int
    route: str
    steps: list[Step]
    batches: list[int]           # sizes, in steps; sum == len(steps)

    def segments(self) -> list[list[Step]]:
        out: dict[int, list[Step]] = {}
        for s in self.steps:
            out.setdefault(s.seg, []).append(s)
        return list(out.values())


def b(*xs) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode() for x in xs]


NAMES = ["a", "b", "c", "d"]   # few names, so types collide (WRONGTYPE) and reads hit writes
VALUES = ["1", "2", "10", "-3", "x", "y z", ""]
REFUSED_NS = [
    (["FLUSHALL"], "FLUSHALL"), (["CONFIG", "GET", "maxmemory"], "CONFIG"), (["SWAPDB", "0", "1"], "SWAPDB"),
    (["DEBUG", "SLEEP", "0"], "DEBUG"), (["SLOWLOG", "GET"], "SLOWLOG"), (["CLIENT", "LIST"], "CLIENT"),
    (["LATENCY", "LATEST"], "LATENCY"), (["SCRIPT", "FLUSH"], "SCRIPT"), (["MONITOR"], "MONITOR"),
    (["NOSUCHCMD", "x"], "NOSUCHCMD"),
]
REPLICATION = [
    (["REPLCONF", "ACK", "0"], "REPLCONF"), (["REPLCONF", "LISTENING-PORT", "7777"], "REPLCONF"),
    (["REPLCONF", "GETACK", "*"], "REPLCONF"), (["REPLCONF", "CAPA", "eof"], "REPLCONF"),
]
REPLICATION_STREAM = [(["SYNC"], "SYNC"), (["PSYNC", "?", "-1"], "PSYNC")]


class Gen:
    """Builds one client's sequence, tracking what the reply count and key names depend on."""

    def __init__(self, seed: int, cid: int, families=FAMILIES):
        self.rng = random.Random(f"integrity:{seed}:{cid}")
        self.seed, self.cid, self.route = seed, cid, route_of(cid)
        self.families = [f for f in FAMILIES if f in families]
        self.weights = [WEIGHTS[f] for f in self.families]
        self.steps: list[Step] = []
        self.db = 0
        self.proto = 2
        self.reply = "on"       # on | off | skip
        self.family = ""
        self.seg = 0

    # ---- naming
    def key(self, name: str | None = None, db: int | None = None) -> bytes:
        name = name or self.rng.choice(NAMES)
        return f"c{self.cid}:d{self.db if db is None else db}:{name}".encode()

    def chan(self, n: int) -> bytes:
        return f"c{self.cid}:ch{n}".encode()

    def val(self) -> bytes:
        return self.rng.choice(VALUES).encode()

    # ---- emitting
    def emit(self, args, check="exact", frames=1, ref=None, token=b"") -> None:
        if self.reply == "off":
            frames = 0
        elif self.reply == "skip":
            frames, self.reply = 0, "on"
        self.raw(args, frames, check, ref, token)

    def raw(self, args, frames, check="exact", ref=None, token=b"") -> None:
        self.steps.append(Step(b(*args), frames, check, ref, token, self.family, self.seg))

    def refused(self, args, token) -> None:
        self.emit(args, "refused", ref=[STANDIN] + b(*args)[:1], token=token.encode())

    # ---- families
    def build(self, n_steps: int) -> Sequence:
        while len(self.steps) < n_steps:
            self.family = self.rng.choices(self.families, self.weights)[0]
            getattr(self, "fam_" + self.family)()
            self.seg += 1
        batches, i, rng = [], 0, self.rng
        while i < len(self.steps):
            n = min(rng.choice([1, 1, 2, 2, 3, 4, 6]), len(self.steps) - i)
            batches.append(n)
            i += n
        return Sequence(self.seed, self.cid, self.route, self.steps, batches)

    def plain_cmd(self, in_multi: bool = False, db: int | None = None):
        """(args, check) of a well-formed data command on own keys (runtime errors possible)."""
        r, k, v = self.rng, (lambda: self.key(db=db)), self.val
        choices = [
            lambda: (["SET", k(), v()], "exact"),
            lambda: (["SET", k(), v(), r.choice(["NX", "XX", "GET"])], "exact"),
            lambda: (["GET", k()], "exact"),
            lambda: (["INCR", k()], "exact"),
            lambda: (["INCRBY", k(), r.choice(["2", "-5"])], "exact"),
            lambda: (["APPEND", k(), v()], "exact"),
            lambda: (["STRLEN", k()], "exact"),
            lambda: (["MSET", k(), v(), k(), v()], "exact"),
            lambda: (["MGET", k(), k(), k()], "exact"),
            lambda: (["DEL", k()], "exact"),
            lambda: (["EXISTS", k(), k()], "exact"),
            lambda: (["TYPE", k()], "exact"),
            lambda: (["EXPIRE", k(), "100"], "exact"),
            lambda: (["PERSIST", k()], "exact"),
            lambda: (["RENAME", k(), k()], "exact"),
            lambda: (["LPUSH", k(), v(), v()], "exact"),
            lambda: (["RPUSH", k(), v()], "exact"),
            lambda: (["LPOP", k()], "exact"),
            lambda: (["LRANGE", k(), "0", "-1"], "exact"),
            lambda: (["LLEN", k()], "exact"),
            lambda: (["LMOVE", k(), k(), "LEFT", "RIGHT"], "exact"),
            lambda: (["HSET", k(), r.choice(["f", "g"]), v()], "exact"),
            lambda: (["HGET", k(), "f"], "exact"),
            lambda: (["HGETALL", k()], "exact"),
            lambda: (["HINCRBY", k(), "f", "3"], "exact"),
            lambda: (["SADD", k(), v(), v()], "exact"),
            lambda: (["SISMEMBER", k(), v()], "exact"),
            lambda: (["ZADD", k(), r.choice(["1", "2.5", "-1"]), v()], "exact"),
            lambda: (["ZRANGE", k(), "0", "-1", "WITHSCORES"], "exact"),
            lambda: (["ZINCRBY", k(), "1.5", v()], "exact"),
            lambda: (["ZSCORE", k(), v()], "exact"),
            lambda: (["XADD", k(), f"{r.randint(1, 5)}-1", "f", v()], "exact"),
            lambda: (["XLEN", k()], "exact"),
            lambda: (["PING"], "exact"),
            lambda: (["ECHO", v()], "exact"),
            lambda: (["PUBLISH", self.chan(1), v()], "exact"),
        ]
        if not in_multi:  # replies whose order or value varies: not inside an EXEC array
            choices += [
                lambda: (["TTL", k()], "ttl"),
                lambda: (["SMEMBERS", k()], "sorted"),
                lambda: (["HKEYS", k()], "sorted"),
                lambda: (["KEYS", f"c{self.cid}:*"], "sorted"),
                lambda: (["SCAN", "0", "MATCH", f"c{self.cid}:*", "COUNT", "100000"], "scan"),
            ]
        return r.choice(choices)()

    def fam_plain(self):
        for _ in range(self.rng.randint(1, 4)):
            self.emit(*self.plain_cmd())

    def fam_error(self):
        r, k = self.rng, self.key
        pick = r.randrange(5)
        if pick == 0:
            self.emit(["GET"])
        elif pick == 1:
            self.emit(["SET", k()])
        elif pick == 2:
            self.emit(["SET", k(), "v", "BADOPT"])
        elif pick == 3:
            self.emit(["LPUSH", k("a"), "x"])  # WRONGTYPE whenever a is not a list
            self.emit(["INCR", k("a")])
        else:
            self.unknown()

    def unknown(self):
        if self.route == "ns":
            self.refused(["NOSUCHCMD", self.key()], "NOSUCHCMD")
        else:
            self.emit(["NOSUCHCMD", self.key()])  # passes through: the server's own error

    def refusal(self):
        """One command the proxy refuses on this route (SELECT of an unmapped db everywhere)."""
        if self.route == "ns" and self.rng.random() < 0.75:
            args, token = self.rng.choice(REFUSED_NS)
            return self.refused(args, token)
        return self.refused(["SELECT", "7"], "7")

    def fam_refused(self):
        self.refusal()

    def fam_replication(self):
        if self.rng.random() < 0.15:
            args, token = self.rng.choice(REPLICATION_STREAM)
        else:
            args, token = self.rng.choice(REPLICATION)
        self.refused(args, token)

    def any_cmd(self):
        """Something for inside CLIENT REPLY OFF/SKIP: data, erroring, refused, SELECT."""
        x = self.rng.random()
        if x < 0.5:
            self.emit(*self.plain_cmd())
        elif x < 0.6:
            self.emit(["GET"])
        elif x < 0.75 and "refused" in self.families:
            self.refusal()
        elif x < 0.85 and "replication" in self.families:
            self.fam_replication()
        else:
            self.select(self.rng.choice([0, 1]))

    def select(self, n: int):
        self.emit(["SELECT", n])
        self.db = n

    def fam_noreply(self):
        r = self.rng
        v = r.randrange(3)
        if v == 0:
            self.raw(["CLIENT", "REPLY", "OFF"], 0)
            self.reply = "off"
            for _ in range(r.randint(1, 5)):
                self.any_cmd()
            self.raw(["CLIENT", "REPLY", "ON"], 1)
            self.reply = "on"
        elif v == 1:
            self.raw(["CLIENT", "REPLY", "SKIP"], 0)
            self.reply = "skip"
            self.any_cmd()
            self.reply = "on"
            self.emit(["GET", self.key()])
        else:
            self.raw(["CLIENT", "REPLY", "SKIP"], 0)
            self.raw(["CLIENT", "REPLY", "ON"], 1)  # ON answers even right after SKIP
            self.reply = "on"

    def reset_state(self):
        self.db, self.proto, self.reply = 0, 2, "on"

    def fam_state(self):
        r = self.rng
        v = r.randrange(7)
        if v <= 1:
            self.select(r.choice([0, 1]))
        elif v == 2:
            p = r.choice([2, 3])
            self.emit(["HELLO", p], "hello")
            self.proto = p
        elif v == 3:
            p = r.choice([2, 3])
            self.emit(["HELLO", p, "SETNAME", f"c{self.cid}-hello"], "hello")
            self.proto = p
        elif v == 4:
            self.emit(["CLIENT", "SETNAME", f"c{self.cid}-n{r.randint(1, 9)}"])
            self.emit(["CLIENT", "GETNAME"])
        elif v == 5:
            self.emit(["CLIENT", "GETNAME"])
        else:
            self.emit(["RESET"])
            self.reset_state()
        if r.random() < 0.5:
            self.emit(["GET", self.key()])

    def fam_multi(self):
        r = self.rng
        variant = r.choice(["exec", "exec", "discard", "queue_error", "watch_abort", "watch_abort",
                            "watch_ok", "reset"])
        if variant.startswith("watch"):
            wk = self.key()
            self.emit(["WATCH", wk])
            if variant == "watch_abort":
                self.emit(["SET", wk, "touched"])  # a watched key modified: EXEC gives nil
        self.emit(["MULTI"])
        inner = self.db
        n = r.randint(0, 4)
        error_at = r.randint(0, n) if variant == "queue_error" else -1
        for i in range(n + 1):
            if i == error_at:
                e = r.randrange(4)
                if e == 0:
                    self.emit(["GET"])            # arity: rejected while queueing
                elif e == 1:
                    self.unknown()
                else:
                    self.refusal()
            if i == n:
                break
            if r.random() < 0.3:
                inner = r.choice([0, 1])
                self.emit(["SELECT", inner])
            else:
                self.emit(*self.plain_cmd(in_multi=True, db=inner))
        if variant == "reset":
            self.emit(["RESET"])
            self.reset_state()
            return
        if variant == "discard" or (variant == "queue_error" and r.random() < 0.3):
            self.emit(["DISCARD"])
        else:
            self.emit(["EXEC"])
            if variant in ("exec", "watch_ok"):
                self.db = inner
        self.emit(["GET", self.key()])

    def fam_blocking(self):
        r, k = self.rng, self.key
        if r.random() < 0.5:
            self.emit(["RPUSH", k("a"), self.val()])
        v = r.randrange(4)
        if v == 0:
            self.emit(["BLPOP", k("a"), "0.05"])
        elif v == 1:
            self.emit(["BRPOP", k(), k("a"), "0.05"])
        elif v == 2:
            self.emit(["BLMOVE", k("a"), k(), "LEFT", "RIGHT", "0.05"])
        else:
            self.emit(["BZPOPMIN", k(), "0.05"])

    def fam_pubsub(self):
        r = self.rng
        chans = [self.chan(1), self.chan(2)]
        pattern = f"c{self.cid}:ch*".encode()
        subs: set = set()
        pats: set = set()
        first = r.sample(chans, r.randint(1, 2))
        self.raw(["SUBSCRIBE", *first], len(first))
        subs |= set(first)
        if r.random() < 0.4:
            self.raw(["PSUBSCRIBE", pattern], 1)
            pats.add(pattern)
        for _ in range(r.randint(0, 3)):
            x = r.random()
            if x < 0.3:
                self.raw(["PING"], 1)
            elif x < 0.45:
                ch = r.choice(chans)
                self.raw(["SUBSCRIBE", ch], 1)
                subs.add(ch)
            elif x < 0.6:
                ch = r.choice(chans)
                self.raw(["UNSUBSCRIBE", ch], 1)
                subs.discard(ch)
                if not subs and not pats and self.proto == 2:
                    return self.pubsub_done(subs, pats)
            elif self.proto == 3:
                if x < 0.85:
                    ch = r.choice(chans)
                    self.raw(["PUBLISH", ch, self.val()], 1 + (ch in subs) + len(pats))
                else:
                    args, check = self.plain_cmd()
                    while args[0] == "PUBLISH":  # to itself: more frames; covered above
                        args, check = self.plain_cmd()
                    self.raw(args, 1, check)
            else:
                self.raw(["PING", "hi"], 1)
        if r.random() < 0.25:
            self.raw(["RESET"], 1)
            self.reset_state()
            return
        self.pubsub_done(subs, pats)

    def pubsub_done(self, subs, pats):
        self.raw(["UNSUBSCRIBE"], max(1, len(subs)), "unsub")
        self.raw(["PUNSUBSCRIBE"], max(1, len(pats)), "unsub")
        self.emit(["GET", self.key()])

    def fam_shape(self):
        self.emit(self.rng.choice([["TIME"], ["CLIENT", "ID"]]), "shape")


def generate(seed: int, cid: int, n_steps: int, families=FAMILIES) -> Sequence:
    return Gen(seed, cid, families).build(n_steps)


# ---------------------------------------------------------------- raw connections


class Timeout(Exception):
    pass


class Conn(Raw):
    """A socket speaking RESP; reads whole frames with a deadline (independent framer)."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        super().__init__(host, port, REF_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.deadline = 0.0

    def send(self, cmds: list[list[bytes]]) -> None:
        super().send(*cmds)

    def frames(self, n: int, timeout: float) -> list[bytes]:
        self.deadline = time.monotonic() + timeout
        return self.read(n)

    def receive(self, out: list[bytes], n: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(out)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise Timeout(out) from None
        except OSError as e:
            raise ConnectionError(f"{e}; {len(out)} of {n} frames read") from None
        if not data:
            raise ConnectionError(f"connection closed; {len(out)} of {n} frames read, "
                                  f"unframed bytes {self.buf[:200]!r}")
        return data

    def leftover(self, wait: float) -> bytes:
        """Whatever arrives within `wait` seconds beyond what was read."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self.buf
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, BlockingIOError):
                return self.buf
            except OSError:
                return self.buf
            if not data:
                return self.buf
            self.buf += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- comparison


def items(frame: bytes) -> tuple[bytes, list[bytes]]:
    """Header and elements of an aggregate frame (empty list for other frames)."""
    if frame[:1] not in b"*~>%" or frame.startswith((b"*-1", b"%-1")):
        return frame, []
    nl = frame.index(b"\r\n")
    head, pos, out = frame[:nl + 2], nl + 2, []
    while pos < len(frame):
        end = frame_end(frame, pos)
        out.append(frame[pos:end])
        pos = end
    return head, out


_HELLO_ID = re.compile(rb"(\$2\r\nid\r\n):\d+\r\n")


def normalise(check: str, frame: bytes) -> bytes:
    if check == "sorted":
        head, its = items(frame)
        return head + b"".join(sorted(its))
    if check == "scan":
        head, its = items(frame)
        if len(its) == 2:
            h2, keys = items(its[1])
            return head + its[0] + h2 + b"".join(sorted(keys))
        return frame
    if check == "ttl":
        if frame[:1] == b":" and int(frame[1:-2]) > 0:
            return b":<positive ttl>\r\n"
        return frame
    if check == "unsub":
        # UNSUBSCRIBE/PUNSUBSCRIBE without arguments: the server walks its own hash table
        # of channels, whose order depends on the full (prefixed) names, so the
        # confirmations are compared as a set of names and, in order, the counts.
        frames, pos = [], 0
        while pos < len(frame):
            end = frame_end(frame, pos)
            frames.append(items(frame[pos:end]))
            pos = end
        names = sorted(head + b"".join(its[:2]) for head, its in frames)
        counts = [b"".join(its[2:]) for _, its in frames]
        return b"".join(names) + b"|" + b"".join(counts)
    if check == "hello":
        return _HELLO_ID.sub(rb"\1:<id>\r\n", frame)
    if check == "shape":
        return frame[:1]
    return frame


def is_error(frame: bytes) -> bool:
    return frame[:1] in (b"-", b"!")


def mismatch(step: Step, want: bytes, got: bytes) -> str | None:
    """Why `got` (proxy) is not acceptable given `want` (reference), or None."""
    if step.check == "refused":
        if not is_error(want):
            return "harness: the reference's stand-in did not give an error"
        if not is_error(got):
            return "expected an error refusing the command"
        if step.token.lower() not in got.lower():
            return f"the refusal does not name {step.token.decode()!r}"
        return None
    if normalise(step.check, got) != normalise(step.check, want):
        return "reply differs" + (f" (compared as {step.check})" if step.check != "exact" else "")
    return None


# ---------------------------------------------------------------- running


@dataclass
class Failure:
    seq: Sequence
    step: int | None            # index of the step in seq.steps (None: after the end / setup)
    what: str
    want: bytes = b""
    got: bytes = b""
    history: list = field(default_factory=list)   # (index, step, want, got) of recent steps
    mode: str = ""

    def title(self) -> str:
        s = self.seq
        where = f"step {self.step}" if self.step is not None else "after the last step"
        cmd = s.steps[self.step].show() if self.step is not None and self.step < len(s.steps) else "-"
        return f"seed {s.seed} client c{s.cid} (route {s.route}) {where}: {cmd!r}: {self.what}"


def format_failure(f: Failure, reproduce: str = "") -> str:
    s = f.seq
    lines = [f"REPLY INTEGRITY FAILURE{' [' + f.mode + ']' if f.mode else ''}: {f.title()}"]
    if f.step is not None and f.step < len(s.steps):
        st = s.steps[f.step]
        lines += [f"  command : {st.show()}   (family {st.family}, check {st.check}"
                  f"{', reference got ' + repr(b' '.join(st.ref)) if st.ref else ''})",
                  f"  expected: {f.want!r}", f"  got     : {f.got!r}"]
    if f.history:
        lines.append("  this client's preceding steps (frames expected -> reference / proxy):")
        for i, st, want, got in f.history:
            mark = "   <-- differs" if st.frames and mismatch(st, want, got) else ""
            lines.append(f"    [{i}] {st.show()}  ({st.frames}) -> {want!r} / {got!r}{mark}")
    lines.append(f"  reproduce: {reproduce or 'INTEGRITY_SEEDS=' + str(s.seed)}")
    return "\n".join(lines)


def run_sequence(seq: Sequence, proxy_port: int, ref_port: int, history: int = 12,
                 reply_timeout: float = REPLY_TIMEOUT, stop: threading.Event | None = None) -> Failure | None:
    """Run one client's sequence on the proxy and on the reference; the first failure or None."""
    try:
        p, r = Conn(proxy_port), Conn(ref_port)
    except OSError as e:
        return Failure(seq, None, f"cannot connect: {e}")
    log: list = []
    try:
        i = 0
        for n in seq.batches:
            if stop is not None and stop.is_set():
                return None
            batch = seq.steps[i:i + n]
            p.send([s.args for s in batch])
            r.send([s.ref or s.args for s in batch])
            total = sum(s.frames for s in batch)
            try:
                want_all = r.frames(total, REF_TIMEOUT)
            except (Timeout, ConnectionError) as e:
                return Failure(seq, i, f"harness: the reference did not give the {total} frames the model "
                                       f"predicts for this batch ({e!r})", history=log[-history:])
            try:
                got_all = p.frames(total, reply_timeout)
                err = None
            except Timeout as e:
                got_all, err = e.args[0], f"no reply from the proxy within {reply_timeout}s"
            except ConnectionError as e:
                got_all, err = [], f"proxy connection: {e}"
            pos = 0
            for j, st in enumerate(batch):
                want = b"".join(want_all[pos:pos + st.frames])
                gotf = got_all[pos:pos + st.frames]
                got = b"".join(gotf)
                pos += st.frames
                if len(gotf) < st.frames:
                    return Failure(seq, i + j, err or "missing reply", want, got, log[-history:])
                why = mismatch(st, want, got) if st.frames else None
                if why:
                    return Failure(seq, i + j, why, want, got, log[-history:])
                log.append((i + j, st, want, got))
            i += n
        extra = p.leftover(0.15)
        if extra:
            return Failure(seq, None, f"the proxy sent bytes nobody asked for: {extra[:300]!r}",
                           history=log[-history:])
        ref_extra = r.leftover(0.0)
        if ref_extra:
            return Failure(seq, None, f"harness: the reference sent more than the model predicts: "
                                      f"{ref_extra[:300]!r}", history=log[-history:])
        return None
    finally:
        p.close()
        r.close()


def run_clients(seqs: list[Sequence], ports: dict[str, int], ref_port: int,
                reply_timeout: float = REPLY_TIMEOUT) -> list[Failure]:
    """All sequences at once, one thread each; every client's failure (or none)."""
    failures: list[Failure] = []
    lock = threading.Lock()
    start = threading.Barrier(len(seqs))

    def one(seq: Sequence):
        try:
            start.wait(10)
        except threading.BrokenBarrierError:
            pass
        try:
            f = run_sequence(seq, ports[seq.route], ref_port, reply_timeout=reply_timeout)
        except Exception as e:  # a harness bug must not look like a pass
            f = Failure(seq, None, f"harness exception: {e!r}")
        if f is not None:
            with lock:
                failures.append(f)

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(failures, key=lambda f: f.seq.cid)


# ---------------------------------------------------------------- keys afterwards


def _all_keys(r) -> set[bytes]:
    return set(r.scan_iter(count=1000))


_OWNER = re.compile(rb"^c(\d+):d(\d+):")


def check_locations(server_client, ref_client, cids: list[int]) -> list[str]:
    """Problems with where keys lie on the proxy's server, judged by the reference.

    `server_client(db)` / `ref_client(db)` return redis-py clients of that db."""
    problems: list[str] = []
    expected: dict[int, dict[bytes, bytes]] = {db: {} for db in BACKEND_DBS}   # backend db -> key -> type
    who: dict[int, str] = {}
    for n in REF_DBS:
        rc = ref_client(n)
        for k in _all_keys(rc):
            m = _OWNER.match(k)
            if not m:
                problems.append(f"harness: reference db {n} holds {k!r}, not named by a client")
                continue
            cid, tag = int(m.group(1)), int(m.group(2))
            if cid not in cids:
                continue
            if tag != n:
                problems.append(f"harness: the generator's db model is wrong: {k!r} is in reference db {n}")
            bdb, pfx = ROUTES[route_of(cid)][n]
            expected[bdb][pfx + k] = rc.type(k)
            who[cid] = route_of(cid)
    for bdb in BACKEND_DBS:
        sc = server_client(bdb)
        actual = _all_keys(sc)
        want = expected[bdb]
        for k in sorted(actual - set(want)):
            problems.append(f"S db {bdb}: stray key {k!r}: {describe(k)}")
        for k in sorted(set(want) - actual):
            problems.append(f"S db {bdb}: missing key {k!r} (the reference has it)")
        for k in sorted(actual & set(want)):
            t = sc.type(k)
            if t != want[k]:
                problems.append(f"S db {bdb}: {k!r} is a {t!r}, the reference's is a {want[k]!r}")
    return problems


def describe(k: bytes) -> str:
    """Where a key found on S should have been, from its name."""
    for pfx in (b"ia:", b"ib:", b""):
        if k.startswith(pfx):
            m = _OWNER.match(k[len(pfx):])
            if m:
                cid, n = int(m.group(1)), int(m.group(2))
                route = route_of(cid)
                if n not in ROUTES[route]:
                    return f"written by c{cid} (route {route}) in unmapped client db {n}"
                bdb, want = ROUTES[route][n]
                return (f"written by c{cid} (route {route}) in its client db {n}, which belongs in "
                        f"S db {bdb} as {want + k[len(pfx):]!r}")
    return "not named by any client of this run"


def reset_servers(server_client, ref_client) -> None:
    for db in BACKEND_DBS:
        server_client(db).flushdb()
    for db in REF_DBS:
        ref_client(db).flushdb()


# ---------------------------------------------------------------- shrinking


def cut(seq: Sequence, step: int) -> Sequence:
    """The sequence up to the end of the segment of `step`, batches as they were."""
    last = seq.steps[step].seg
    keep = [s.seg <= last for s in seq.steps]
    return _subset(seq, keep)


def _subset(seq: Sequence, keep: list[bool]) -> Sequence:
    """The steps kept, each still batched with the kept steps of its original batch."""
    steps, batches, i = [], [], 0
    for n in seq.batches:
        m = sum(keep[i:i + n])
        steps += [s for s, k in zip(seq.steps[i:i + n], keep[i:i + n]) if k]
        if m:
            batches.append(m)
        i += n
    return Sequence(seq.seed, seq.cid, seq.route, steps, batches)


def shrink(seq: Sequence, still_fails, max_trials: int = 300) -> Sequence:
    """A smaller sequence for which `still_fails(seq)` holds (greedy delta debugging):
    whole segments first, then single steps; pipelined batches are kept together.
    A candidate the generator's model no longer fits fails only as "harness", which
    `still_fails` must not count, so such candidates are rejected."""
    trials = 0

    def reduce(seq, units):
        nonlocal trials
        chunk = max(1, len(units) // 2)
        while chunk >= 1 and trials < max_trials:
            i, changed = 0, False
            while i < len(units) and trials < max_trials:
                drop = set(x for u in units[i:i + chunk] for x in u)
                if len(drop) == len(seq.steps):
                    i += chunk
                    continue
                cand = _subset(seq, [j not in drop for j in range(len(seq.steps))])
                trials += 1
                if still_fails(cand):
                    seq, units, changed = cand, units[:i] + units[i + chunk:], True
                    units = _renumber(seq, units, drop)
                else:
                    i += chunk
            if not changed:
                chunk //= 2
        return seq

    segs: dict[int, list[int]] = {}
    for j, st in enumerate(seq.steps):
        segs.setdefault(st.seg, []).append(j)
    seq = reduce(seq, list(segs.values()))
    # single steps, but none the reply-count model of its segment depends on
    seq = reduce(seq, [[j] for j, st in enumerate(seq.steps)
                       if st.family != "pubsub" and st.args[0].upper() not in CONTROL])
    return seq


CONTROL = {b"CLIENT", b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"RESET", b"HELLO"}


def _renumber(seq: Sequence, units: list[list[int]], dropped: set[int]) -> list[list[int]]:
    """Unit step indexes after removing `dropped` (indexes into the old step list)."""
    new_index = {}
    k = 0
    for j in range(len(seq.steps) + len(dropped)):
        if j in dropped:
            continue
        new_index[j] = k
        k += 1
    return [[new_index[x] for x in u] for u in units]
