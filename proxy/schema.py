"""Every setting of the proxy, in one place: its type and range, its default, and the
TOML path, command-line flag and environment variable that set it.

config.py validates TOML with it, cli.py builds its flags, its environment fallbacks
and the --help text from it, `keyspace-proxy check` prints the effective configuration
in its terms, and README's configuration reference is generated from it
(`python -m proxy.schema`; tests/test_schema.py keeps the two equal).

A value that does not fit raises Invalid with what is allowed; the caller prefixes
the name the user wrote it under (`--max-bulk-len`, `PROXY_UPSTREAM_MODE`,
`limits.max_bulk`, `listener[0].upstream`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
UPSTREAM_MODES = ("shared", "dedicated")
POLICIES = ("tenant", "app")
SLOT_MODES = ("spread", "pinned")   # listener[].slot
DEFAULT_UPSTREAM = "redis://127.0.0.1:6379/0"
_SSIZE_MAX = 2 ** 63 - 1   # the C hot path reads max_bulk as a Py_ssize_t


class Invalid(ValueError):
    """A value that does not fit its field; the message says what is allowed."""


def show(value, text: bool) -> str:
    """A value as the user wrote it: a flag or variable as a quoted string, a TOML value
    in TOML syntax (`"lots"`, `true`, `1.5`)."""
    if text:
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


# -- kinds of value: each parses a flag/variable string (text=True) or a TOML value

class Kind:
    doc = ""

    def parse(self, value, text: bool):
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Kind):
    lo: int
    hi: int | None = None
    unit: str = ""

    @property
    def doc(self) -> str:
        r = f"integer {self.lo} to {self.hi}" if self.hi is not None else f"integer >= {self.lo}"
        return r + (f" ({self.unit})" if self.unit else "")

    def parse(self, value, text: bool) -> int:
        wanted = f"expected an {self.doc}"
        if text:
            try:
                n = int(value.strip())
            except ValueError:
                raise Invalid(f"{wanted}, got {show(value, text)}") from None
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise Invalid(f"{wanted}, got {show(value, text)}")
            n = value
        if n < self.lo or n > (self.hi if self.hi is not None else _SSIZE_MAX):
            raise Invalid(f"{wanted}, got {show(value, text)}")
        return n


@dataclass(frozen=True)
class Seconds(Kind):
    lo: float = 0.0
    inclusive: bool = True

    @property
    def doc(self) -> str:
        return f"seconds {'>=' if self.inclusive else '>'} {self.lo:g}"

    def parse(self, value, text: bool) -> float:
        wanted = f"expected a number of {self.doc}"
        if text:
            try:
                x = float(value.strip())
            except ValueError:
                raise Invalid(f"{wanted}, got {show(value, text)}") from None
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Invalid(f"{wanted}, got {show(value, text)}")
            x = float(value)
        if not math.isfinite(x) or x < self.lo or (x == self.lo and not self.inclusive):
            raise Invalid(f"{wanted}, got {show(value, text)}")
        return x


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]

    @property
    def doc(self) -> str:
        return ", ".join(f"`{c}`" for c in self.choices[:-1]) + f" or `{self.choices[-1]}`"

    def parse(self, value, text: bool) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise Invalid(f"expected one of {', '.join(self.choices)}, got {show(value, text)}")
        return value


class Text(Kind):
    doc = "string"

    def __init__(self, nonempty: bool = False):
        self.nonempty = nonempty

    def parse(self, value, text: bool) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {show(value, text)}")
        if self.nonempty and not value:
            raise Invalid("must not be empty")
        return value


class Secret(Text):
    """A password: an error never shows the value (a password of digits written without
    quotes is still the password)."""

    def parse(self, value, text: bool) -> str:
        if not isinstance(value, str):
            what = ("true or false" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
                    else "a table" if isinstance(value, dict) else "an array" if isinstance(value, list)
                    else "a " + type(value).__name__)
            raise Invalid(f"expected a string (quoted), got {what} (not shown: a password)")
        return super().parse(value, text)


class Bool(Kind):
    doc = "`true` or `false`"
    TRUE = ("true", "yes", "on", "1")
    FALSE = ("false", "no", "off", "0")

    def parse(self, value, text: bool) -> bool:
        if text and isinstance(value, str):
            v = value.strip().lower()
            if v in self.TRUE or v in self.FALSE:
                return v in self.TRUE
            raise Invalid(f"expected true or false, got {show(value, text)}")
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {show(value, text)}")
        return value


class Namespace(Kind):
    """A namespace: no `*` (Redis substitutes the first `*` of a SORT BY/GET pattern, so a
    prefixed pattern would break) and no control characters. Empty in TOML means none;
    a flag must not be empty (leave it out instead)."""
    doc = "string without `*`, CR, LF"

    def parse(self, value, text: bool) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected a string, got {show(value, text)}")
        if text and not value:
            raise Invalid("must not be empty (leave it out for no namespace)")
        if "*" in value:
            raise Invalid(f"{show(value, text)} must not contain '*': it breaks SORT BY/GET patterns, "
                          "where Redis substitutes the first '*'")
        if "\r" in value or "\n" in value:
            raise Invalid(f"{show(value, text)} must not contain control characters (CR, LF)")
        return value


class Separator(Text):
    doc = "string without `*`"

    def parse(self, value, text: bool) -> str:
        value = super().parse(value, text)
        if "*" in value:
            raise Invalid(f"{show(value, text)} must not contain '*'")
        return value


class Address(Kind):
    """HOST:PORT; [::1]:PORT for IPv6 (a bare ::1:PORT is read the same way); an empty
    HOST is 0.0.0.0; port 0 lets the system choose."""
    doc = "`HOST:PORT`"

    def parse(self, value, text: bool) -> tuple[str, int]:
        if not isinstance(value, str):
            raise Invalid(f'expected "HOST:PORT" as a string, e.g. "127.0.0.1:6380", got {show(value, text)}')
        s = value.strip()
        if s.isdigit():
            raise Invalid(f"expected HOST:PORT, got a port alone ({show(value, text)}): give the host too, "
                          f"e.g. 127.0.0.1:{s} (this machine only) or 0.0.0.0:{s} (every interface)")
        host, sep, port = s.rpartition(":")
        if not sep:
            raise Invalid(f"expected HOST:PORT, e.g. 127.0.0.1:6380, got {show(value, text)}")
        if not port.isdigit():
            raise Invalid(f"expected HOST:PORT with a numeric port, got {show(value, text)}")
        if int(port) > 65535:
            raise Invalid(f"port {int(port)} is out of range (0 to 65535) in {show(value, text)}")
        if host.startswith("[") != host.endswith("]"):
            raise Invalid(f"unbalanced brackets in {show(value, text)}: write IPv6 as [::1]:6380")
        host = host[1:-1] if host.startswith("[") else host
        if any(c.isspace() for c in host):
            raise Invalid(f"expected HOST:PORT, got {show(value, text)}")
        return (host or "0.0.0.0"), int(port)


class Url(Kind):
    doc = ("`redis[s]://[USER:PASSWORD@]HOST[:PORT][/DB]`, `redis[s]+sentinel://[USER:PASSWORD@]HOST:PORT[,...]/MASTER[/DB]` "
           "or `redis[s]+cluster://[USER:PASSWORD@]HOST:PORT[,...]` (db 0; see Cluster)")

    def parse(self, value, text: bool):
        from proxy.config import parse_upstream
        if not isinstance(value, str):
            raise Invalid(f"expected a URL string, redis://HOST:PORT/DB or rediss://..., got {show(value, text)}")
        return parse_upstream(value)


class Seeds(Kind):
    """A cluster's seed nodes: an array of `"HOST:PORT"` strings (IPv6 as `"[::1]:7000"`,
    port 6379 when left out), at least one; as a flag or variable, comma-separated."""
    doc = 'array of `"HOST:PORT"`'

    def parse(self, value, text: bool) -> tuple[tuple[str, int], ...]:
        from proxy.config import parse_seed
        if text and isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, list) or not value:
            raise Invalid(f'expected an array of "HOST:PORT" strings, e.g. ["10.0.0.1:6379", "10.0.0.2:6379"], '
                          f"got {'an empty array' if value == [] else show(value, text)}")
        out = []
        for v in value:
            if not isinstance(v, str):
                raise Invalid(f'expected "HOST:PORT" strings, got {show(v, text)} in the array')
            out.append(parse_seed(v))
        return tuple(out)


class Path(Text):
    doc = "file path"


class DirPath(Text):
    doc = "directory path"


class Sha256(Kind):
    """A SHA-256 digest as 64 hex digits (`echo -n PASSWORD | sha256sum`), as Redis's
    ACL takes `#<hash>`; parsed to its 32 bytes."""
    doc = "64 hex digits"

    def parse(self, value, text: bool) -> bytes:
        if not isinstance(value, str):
            raise Invalid(f"expected a SHA-256 digest as 64 hex digits, got {show(value, text)}")
        v = value.strip()
        if len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v):
            # the value may be a password put in the wrong field: never shown
            raise Invalid(f"expected a SHA-256 digest as 64 hex digits (echo -n PASSWORD | sha256sum), "
                          f"got {len(v)} characters{'' if len(v) != 64 else ' that are not all hex digits'}")
        return bytes.fromhex(v)


# -- the fields

@dataclass(frozen=True)
class Field:
    key: str                  # TOML path ("limits.max_bulk", "listener[].listen"), or a name for flag-only
    kind: Kind
    default: object = None    # None: no default (or described in `default_doc`)
    flag: str | None = None
    env: str | None = None
    help: str = ""
    default_doc: str | None = None
    toml: bool = True         # False: flag and variable only
    metavar: str | None = None

    @property
    def attr(self) -> str:
        """The argparse destination of its flag."""
        return self.flag[2:].replace("-", "_") if self.flag else self.key.rsplit(".", 1)[-1]

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    def default_text(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, str):
            return f'"{self.default}"'
        if isinstance(self.default, float):
            return f"{self.default:g}"
        if isinstance(self.default, int) and self.default >= 1024 * 1024:
            return f"{self.default} ({_human(self.default)})"
        return str(self.default)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


MiB = 1 << 20


def _upstream_tls(prefix: str, top: bool) -> tuple[Field, ...]:
    """TLS to rediss:// upstreams: top-level [upstream_tls] (flags, variables) and each
    listener's [listener.upstream_tls] (field by field over the top-level one)."""
    def f(name, kind, default, metavar, help, default_doc=None):
        if top:
            return Field(f"{prefix}.{name}", kind, default, f"--upstream-tls-{name.replace('_', '-')}",
                         f"PROXY_UPSTREAM_TLS_{name.upper()}", metavar=metavar, help=help, default_doc=default_doc)
        return Field(f"{prefix}.{name}", kind, None, help=help, default_doc=f"top-level `upstream_tls.{name}`")
    return (
        f("ca_file", Path(nonempty=True), None, "FILE",
          "rediss:// upstreams: CA certificates (PEM) to verify the server with, instead of the system's",
          "the system's CAs"),
        f("ca_dir", DirPath(nonempty=True), None, "DIR",
          "rediss://: a directory of CA certificates (c_rehash layout), instead of the system's"),
        f("cert_file", Path(nonempty=True), None, "FILE",
          "rediss://: client certificate (PEM, may hold the key too) for servers that require one (mutual TLS)",
          "none"),
        f("key_file", Path(nonempty=True), None, "FILE", "rediss://: the client certificate's private key (PEM)",
          "in cert_file"),
        f("server_name", Text(nonempty=True), None, "NAME",
          "rediss://: the name sent as SNI and verified against the server's certificate", "the URL's host"),
        f("verify", Bool(), True, "BOOL",
          "rediss://: verify the server's certificate and name; false is logged as a warning at start"),
    )

def _cluster(prefix: str, top: bool) -> tuple[Field, ...]:
    """A Redis Cluster upstream written as a seed-list table instead of a
    `redis+cluster://` URL: top-level [cluster] (instead of `upstream`) and a listener's
    [listener.cluster] (instead of its `upstream`); the same upstream as the URL."""
    instead = "`upstream = \"redis+cluster://...\"`" + ("" if top else " in the listener")
    return (
        Field(f"{prefix}.seeds", Seeds(), default_doc="required in the table",
              help=f"a Redis Cluster upstream as a table, instead of {instead} (not both; the same upstream): "
                   "the nodes asked for the slot map, in order; pinned or spread routes (see Cluster)"
                   + ("; `--upstream` and REDIS_URL win over it as over `upstream`" if top else "")),
        Field(f"{prefix}.tls", Bool(), False,
              help="connect with TLS, as rediss+cluster:// (settings from [upstream_tls]"
                   + ("" if top else " / [listener.upstream_tls]") + ")"),
        Field(f"{prefix}.username", Text(nonempty=True), None, default_doc="none",
              help="the nodes' ACL user, as USER in the URL (needs password)"),
        Field(f"{prefix}.password", Secret(nonempty=True), None, default_doc="none",
              help="the nodes' password or AUTH token, as PASSWORD in the URL"),
    )


FIELDS: tuple[Field, ...] = (
    Field("config", Path(nonempty=True), flag="--config", env="PROXY_CONFIG", toml=False, metavar="FILE",
          help="TOML file with one `[[listener]]` per route; listeners then come from the file only"),
    Field("upstream", Url(), DEFAULT_UPSTREAM, "--upstream", "REDIS_URL", metavar="URL",
          help="where routes without their own `upstream` forward; the path is the backend db "
               "(`?db=N` works too); a flag or REDIS_URL wins over the file"),
    Field("separator", Separator(), ":", "--separator", "PROXY_SEPARATOR", metavar="SEP",
          help="between namespace and key"),
    *_upstream_tls("upstream_tls", top=True),
    Field("sentinel.username", Text(nonempty=True), None, "--sentinel-username", "PROXY_SENTINEL_USERNAME",
          metavar="USER", default_doc="none",
          help="redis+sentinel:// upstreams: the sentinels' ACL user (the URL's credentials are the data nodes')"),
    Field("sentinel.password", Secret(nonempty=True), None, "--sentinel-password", "PROXY_SENTINEL_PASSWORD",
          metavar="PASSWORD", default_doc="none",
          help="redis+sentinel://: the sentinels' password (their `requirepass`), not the data nodes'; "
               "prefer the variable to the flag (ps shows flags)"),
    *_cluster("cluster", top=True),
    Field("listener[].name", Text(nonempty=True), default_doc="the address",
          help="the route's name in logs, metrics and errors; unique"),
    Field("listener[].listen", Address(), None, "--listen", "PROXY_LISTEN", default_doc="required",
          metavar="HOST:PORT",
          help="where clients connect (port 0: any free port, logged); PROXY_LISTEN is ignored with a config file"),
    Field("listener[].upstream", Url(), default_doc="top-level `upstream`",
          help="this route's server and db"),
    Field("listener[].namespace", Namespace(), None, "--namespace", "PROXY_NAMESPACE", metavar="NS",
          help="add mode: client `foo` <-> server `NS:foo`"),
    Field("listener[].strip_namespace", Namespace(), None, "--strip-namespace", "PROXY_STRIP_NAMESPACE",
          metavar="NS", help="strip mode: client `NS:foo` <-> server `foo` (not with namespace)"),
    Field("listener[].separator", Separator(), default_doc="top-level `separator`",
          help="this route's separator"),
    Field("listener[].policy", Choice(POLICIES), None, "--policy", "PROXY_POLICY", metavar="POLICY",
          default_doc="`tenant` with a namespace, else `app`",
          help="tenant: a fence for code you do not trust (scripts only with an upstream user fenced by "
               "a Redis ACL; INFO keyspace, CLIENT LIST/INFO, MONITOR, CONFIG GET emulated for the route); "
               "app: a trusted application (scripts and read-only server commands pass); see Policies"),
    Field("listener[].slot", Choice(SLOT_MODES), "spread", "--slot", "PROXY_SLOT", metavar="MODE",
          help="pinned: keys stored as `{NS}:key`, so the namespace is one cluster hash slot (MULTI, "
               "Lua, BRPOP across its keys); a client's own `{tag}` then no longer chooses the slot; "
               "needs `namespace`; spread on a `redis+cluster://` upstream: each key on the owner of its "
               "own slot (see Cluster)"),
    Field("listener[].tls.cert_file", Path(nonempty=True), None, "--tls-cert-file", "PROXY_TLS_CERT_FILE",
          metavar="FILE", default_doc="no TLS",
          help="clients must connect with TLS: the proxy's certificate (PEM, may hold the key too); "
               "re-read on reload"),
    Field("listener[].tls.key_file", Path(nonempty=True), None, "--tls-key-file", "PROXY_TLS_KEY_FILE",
          metavar="FILE", default_doc="in cert_file", help="its private key (PEM); re-read on reload"),
    Field("listener[].tls.ca_file", Path(nonempty=True), None, "--tls-ca-file", "PROXY_TLS_CA_FILE",
          metavar="FILE", default_doc="not asked for",
          help="clients must present a certificate signed by one of these CAs (PEM): mutual TLS"),
    *_upstream_tls("listener[].upstream_tls", top=False),
    *_cluster("listener[].cluster", top=False),
    Field("listener[].user[].name", Text(nonempty=True), default_doc="required",
          help="`[[listener.user]]`: clients must authenticate (AUTH name password, HELLO 3 AUTH name "
               "password) and the user selects the route; `default` is the user of a one-argument "
               "AUTH password; exactly one of password_sha256, password_file, password_env. The table may also "
               "set the listener's route fields for this user: namespace, strip_namespace, separator, upstream "
               "(its own credentials) or cluster, databases, upstream_tls"),
    Field("listener[].user[].password_sha256", Sha256(), None, "--password-sha256", "PROXY_PASSWORD_SHA256",
          metavar="HEX",
          help="the user's password as its SHA-256 (the flag and variable: the `default` user of the flags' "
               "listener)"),
    Field("listener[].user[].password_file", Path(nonempty=True), None, "--password-file", "PROXY_PASSWORD_FILE",
          metavar="FILE",
          help="a file holding the password (one trailing newline stripped); read at start and on reload"),
    Field("listener[].user[].password_env", Text(nonempty=True), None, "--password-env", "PROXY_PASSWORD_ENV",
          metavar="VAR",
          help="the name of an environment variable holding the password; with flags, PROXY_PASSWORD "
               "is read when no other password is given"),
    Field("listener[].databases.N.db", Int(0), default_doc="required",
          help="client `SELECT N` goes to this backend db (`N = M` is short for `N = { db = M }`)"),
    Field("listener[].databases.N.namespace", Namespace(), default_doc="the listener's",
          help="add mode in this db (`\"\"`: none)"),
    Field("listener[].databases.N.strip_namespace", Namespace(), default_doc="the listener's",
          help="strip mode in this db"),
    Field("listener[].databases.N.separator", Separator(), default_doc="the listener's",
          help="separator in this db"),
    Field("listener[].max_clients", Int(1), default_doc="`limits.max_clients` only",
          help="client connections this listener accepts; past it a new client gets "
               "`-ERR max number of clients reached` and is closed"),
    Field("metrics.listen", Address(), None, "--metrics-listen", "PROXY_METRICS_LISTEN", metavar="HOST:PORT",
          default_doc="off", help="/metrics, /healthz, /readyz; also POST /-/reload when `admin.listen` is not "
                                  "given (and a token is)"),
    Field("admin.listen", Address(), None, "--admin-listen", "PROXY_ADMIN_LISTEN", metavar="HOST:PORT",
          default_doc="`metrics.listen`",
          help="a separate address for POST /-/reload (then not served on the metrics port)"),
    Field("admin.token_file", Path(nonempty=True), None, "--admin-token-file", "PROXY_ADMIN_TOKEN_FILE",
          metavar="FILE", default_doc="reload over HTTP off",
          help="file holding the token POST /-/reload must send as `Authorization: Bearer TOKEN`; "
               "re-read on reload"),
    Field("admin.token", Text(nonempty=True), None, "--admin-token", "PROXY_ADMIN_TOKEN", toml=False,
          metavar="TOKEN", default_doc="reload over HTTP off",
          help="the token itself (prefer the variable or a file: a flag shows in `ps`)"),
    Field("limits.max_bulk", Int(1, unit="bytes"), 512 * MiB, "--max-bulk-len", "PROXY_MAX_BULK_LEN",
          metavar="N", help="largest bulk string a client may send (Redis's proto-max-bulk-len)"),
    Field("limits.max_query", Int(1, unit="bytes"), 1024 * MiB, "--max-query-len", "PROXY_MAX_QUERY_LEN",
          metavar="N", help="largest unfinished request buffered per client (Redis's client-query-buffer-limit)"),
    Field("limits.connect_timeout", Seconds(0.0, inclusive=False), 5.0, "--connect-timeout",
          "PROXY_CONNECT_TIMEOUT", metavar="S", help="to open an upstream connection"),
    Field("limits.drain_timeout", Seconds(0.0), 10.0, "--drain-timeout", "PROXY_DRAIN_TIMEOUT", metavar="S",
          help="on SIGTERM/SIGINT, how long owed replies may take to finish"),
    Field("limits.reload_grace", Seconds(0.0), 30.0, "--reload-grace", "PROXY_RELOAD_GRACE", metavar="S",
          help="after a reload, how long a changed route's busy connections may finish"),
    Field("limits.upstream_mode", Choice(UPSTREAM_MODES), "shared", "--upstream-mode", "PROXY_UPSTREAM_MODE",
          metavar="MODE", help="shared: plain clients share an upstream connection per route and db "
                               "(their own on WATCH, SUBSCRIBE, ...; blocking commands borrow a pooled one, "
                               "see blocking_pool); "
                               "dedicated: one upstream connection per client"),
    Field("limits.output_limit", Int(0, unit="bytes"), 64 * MiB, "--output-limit", "PROXY_OUTPUT_LIMIT",
          metavar="N", help="replies held for a client that does not read them before it is "
                            "disconnected (0: no limit)"),
    Field("limits.pubsub_output_limit", Int(0, unit="bytes"), 32 * MiB, "--pubsub-output-limit",
          "PROXY_PUBSUB_OUTPUT_LIMIT", metavar="N", help="the same for a subscribed client (0: no limit)"),
    Field("limits.output_total_limit", Int(0, unit="bytes"), 256 * MiB, "--output-total-limit",
          "PROXY_OUTPUT_TOTAL_LIMIT", metavar="N", help="all such clients together: past it the one holding "
                                                         "the most is disconnected first (0: no limit)"),
    Field("limits.max_clients", Int(1), None, "--max-clients", "PROXY_MAX_CLIENTS", metavar="N",
          default_doc="10000, or fewer to fit the file-descriptor limit",
          help="client connections of the whole process (Redis's maxclients); the default is "
               "(RLIMIT_NOFILE - 64) / 2 when that is less than 10000, so each client can also "
               "hold an upstream connection"),
    Field("limits.blocking_pool", Int(0), 16, "--blocking-pool", "PROXY_BLOCKING_POOL", metavar="N",
          help="in shared upstream mode, upstream connections per route that serve blocking commands (BRPOP, "
               "BLMOVE, BZPOPMIN, XREAD BLOCK...): a client borrows one for the call and gives it back with the "
               "reply, and stays on its shared link; past N, blocking calls wait for one to come back "
               "(0: each blocking client moves to a connection of its own for life)"),
    Field("limits.blocking_pool_idle", Seconds(0.0, inclusive=False), 30.0, "--blocking-pool-idle",
          "PROXY_BLOCKING_POOL_IDLE", metavar="S",
          help="how long a pooled connection for blocking commands is kept idle before it is closed"),
    Field("limits.idle_timeout", Seconds(0.0), 0.0, "--idle-timeout", "PROXY_IDLE_TIMEOUT", metavar="S",
          help="close a client idle this long (0: never; Redis's timeout); not while it waits on a blocking "
               "command, is subscribed or in MONITOR"),
    Field("limits.tcp_keepalive", Int(0, 32767, unit="seconds"), 300, "--tcp-keepalive",
          "PROXY_TCP_KEEPALIVE", metavar="S",
          help="TCP keepalive on client and upstream sockets: first probe after this idle time "
               "(0: off; Redis's tcp-keepalive)"),
    Field("limits.reply_timeout", Seconds(0.0), 30.0, "--reply-timeout", "PROXY_REPLY_TIMEOUT", metavar="S",
          help="an upstream connection that owes a reply to a non-blocking request and sends nothing for this "
               "long is declared dead: its clients get an error, readiness is false until a new connection "
               "answers (0: wait forever)"),
    Field("limits.reconnect_delay", Seconds(0.0, inclusive=False), 0.1, "--reconnect-delay",
          "PROXY_RECONNECT_DELAY", metavar="S",
          help="an upstream that failed is tried again after this, doubling per failure (with jitter); "
               "until it answers, requests fail at once"),
    Field("limits.reconnect_delay_max", Seconds(0.0, inclusive=False), 2.0, "--reconnect-delay-max",
          "PROXY_RECONNECT_DELAY_MAX", metavar="S", help="the most the reconnect delay grows to"),
    Field("log.level", Choice(LEVELS), "info", "--log-level", "PROXY_LOG_LEVEL", metavar="LEVEL",
          help="least severe level logged"),
    Field("log.format", Choice(FORMATS), "text", "--log-format", "PROXY_LOG_FORMAT", metavar="FORMAT",
          help="text, or json: one JSON object per line"),
    Field("workers", Int(1, 256), 1, "--workers", "PROXY_WORKERS", toml=False, metavar="N",
          help="proxy processes sharing the listeners (SO_REUSEPORT) under one supervisor"),
)

BY_KEY = {f.key: f for f in FIELDS}
BY_ATTR = {f.attr: f for f in FIELDS if f.flag}


def section_fields(section: str) -> dict[str, Field]:
    """The TOML fields directly under `section` ("" for top level), by key."""
    out = {}
    for f in FIELDS:
        if not f.toml:
            continue
        head, _, name = f.key.rpartition(".")
        if head == section:
            out[name] = f
    return out


def known(section: str, extra: tuple[str, ...] = ()) -> str:
    return ", ".join(sorted(set(section_fields(section)) | set(extra)))


SUBCOMMANDS = (
    ("demo [--listen HOST:PORT] [--namespace NS]", "an embedded Valkey with a proxy in front, to try it out"),
    ("migrate --from URL --to URL [...]", "copy or move one keyspace's keys into another"),
    ("check [--config FILE | flags]", "validate the configuration, connect to every upstream and db, "
                                      "print the effective configuration (credentials masked)"),
)


def env_help() -> str:
    """The environment variables and what they set, for --help."""
    lines = []
    for f in FIELDS:
        if f.env:
            lines.append(f"  {f.env:<27} {f.flag}" + (f" / {f.key}" if f.toml else ""))
    return "\n".join(lines)


# -- README's reference tables (generated; tests/test_schema.py compares)

def markdown_flags() -> str:
    rows = ["| flag | environment | TOML | type | default | meaning |", "|---|---|---|---|---|---|"]
    for f in FIELDS:
        if not f.flag:
            continue
        rows.append(f"| `{f.flag} {f.metavar}` | `{f.env}` | {f'`{f.key}`' if f.toml else ''} | "
                    f"{f.kind.doc} | {_md_default(f)} | {f.help} |")
    rows.append("| `--version` | | | | | print the version and exit |")
    rows.append("| `-h`, `--help` | | | | | flags, subcommands and environment variables |")
    return "\n".join(rows)


def markdown_toml() -> str:
    rows = ["| TOML | type | default | flag / environment | meaning |", "|---|---|---|---|---|"]
    for f in FIELDS:
        if not f.toml:
            continue
        via = f"`{f.flag}` / `{f.env}`" if f.flag else ""
        rows.append(f"| `{f.key}` | {f.kind.doc} | {_md_default(f)} | {via} | {f.help} |")
    return "\n".join(rows)


def _md_default(f: Field) -> str:
    d = f.default_text()
    if not d:
        return ""
    return d if f.default_doc is not None else f"`{d.split(' (')[0]}`" + (
        f" ({d.split(' (')[1]}" if " (" in d else "")


if __name__ == "__main__":  # python -m proxy.schema: the README tables
    print("<!-- flags: generated by python -m proxy.schema -->")
    print(markdown_flags())
    print()
    print("<!-- toml: generated by python -m proxy.schema -->")
    print(markdown_toml())
    sys.exit(0)
