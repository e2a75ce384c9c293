"""Configuration: upstream URLs, routes (listener -> upstream, db, keyspace), TOML files.

What each setting may be (type, range, default, flag, variable) is in proxy/schema.py.
Everything is validated at start; an error names the field as the user wrote it
(`listener[0].upstream`, `limits.max_bulk`, or the flag or variable given for it)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.keyspace import Keyspace
from proxy.schema import BY_KEY, DEFAULT_UPSTREAM, UPSTREAM_MODES, Invalid, known, section_fields, show  # noqa: F401


class ConfigError(ValueError):
    pass


def format_addr(host: str, port: int) -> str:
    """`127.0.0.1:6380`, `[::1]:6380`: an address as HOST:PORT, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None

    def masked(self) -> str:
        """The URL with credentials hidden, for logs."""
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + ":***@"
        return f"redis://{auth}{format_addr(self.host, self.port)}/{self.db}"

    def handshake(self, db: int | None = None, proto: int = 2) -> list[list[bytes]]:
        """The commands that set up one upstream connection, in order: AUTH with the URL's
        credentials, HELLO 3 for a RESP3 connection, SELECT the db. Every connection the
        proxy opens (client traffic, shared links, health checks, migrate, check) uses this."""
        cmds = []
        if self.password:
            cmds.append([b"AUTH"] + ([self.username.encode()] if self.username else []) + [self.password.encode()])
        if proto == 3:
            cmds.append([b"HELLO", b"3"])
        db = self.db if db is None else db
        if db:
            cmds.append([b"SELECT", str(db).encode()])
        return cmds


def handshake_failure(cmd: list[bytes], error: str) -> str | None:
    """What an error reply to a command of Upstream.handshake() (or the command after it)
    means for the route, or None if it is not about the handshake."""
    name = cmd[0].decode().upper()
    if name == "AUTH":
        return f"authentication failed: {error}"
    if error.startswith("NOAUTH"):
        return f"authentication required and the URL has no password: {error}"
    if name == "SELECT":
        return f"SELECT {cmd[1].decode()} failed: {error}"
    return None


URL_FORM = "redis://HOST:PORT/DB"


def parse_upstream(url: str) -> Upstream:
    """A redis:// URL, strictly: the db in the path or as `?db=N` (as redis-py reads it;
    both must agree), no other query parameters. Raises Invalid (credentials masked)."""
    shown = repr(mask_url(url))
    if "://" not in url:
        hint = f" (e.g. redis://{url}/0)" if ":" in url and url.rpartition(":")[2].isdigit() else ""
        raise Invalid(f"expected a URL, {URL_FORM}{hint}, got {shown}")
    try:
        u = urlsplit(url)
    except ValueError as e:
        raise Invalid(f"invalid URL {shown} ({e})") from None
    if u.scheme != "redis":
        raise Invalid(f"scheme must be redis:// (got {u.scheme or 'none'}://)"
                      + ("; TLS (rediss://) is not supported yet" if u.scheme == "rediss" else ""))
    try:
        port = u.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise Invalid(f"port must be a number from 1 to 65535 in {shown}")
    if not u.hostname:
        raise Invalid(f"missing host in {shown}")
    if u.fragment:
        raise Invalid(f"unexpected '#' in {shown} (percent-encode it in a password: %23)")
    path = u.path[1:] if u.path.startswith("/") else u.path
    if path and not path.isdigit():
        raise Invalid(f"db must be a number, got {path!r} in {shown}")
    db = int(path) if path else None
    try:
        params = parse_qsl(u.query, keep_blank_values=True, strict_parsing=True) if u.query else []
    except ValueError:
        raise Invalid(f"invalid query {u.query!r} in {shown}") from None
    for k, v in params:
        if k != "db":
            raise Invalid(f"query parameter {k!r} is not supported in {shown} (only ?db=N)")
        if not v.isdigit():
            raise Invalid(f"db must be a number, got ?db={v} in {shown}")
        if db is not None and int(v) != db:
            raise Invalid(f"db given twice, /{path} and ?db={v}, in {shown}: give one")
        db = int(v)
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    return Upstream(u.hostname, port or 6379, db or 0, user or None, password)


def parse_url(url: str, field_name: str = "upstream") -> Upstream:
    try:
        return parse_upstream(url)
    except Invalid as e:
        raise ConfigError(f"{field_name}: {e}") from None


def mask_url(url: str) -> str:
    """`redis://user:secret@h` -> `redis://user:***@h`, also when the password holds `@#/`."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{rest[at + 1:]}"


def parse_listen(value, field_name: str = "listen", text: bool = True) -> tuple[str, int]:
    return _value("listener[].listen", value, field_name, text)


def _value(key: str, value, label: str, text: bool = False):
    """`value` checked by the schema's field `key`; an error is prefixed with `label`."""
    try:
        return BY_KEY[key].kind.parse(value, text)
    except Invalid as e:
        raise ConfigError(f"{label}: {e}") from None


def make_keyspace(namespace: str | None, strip: str | None, separator: str, route: str,
                  field_name: str) -> Keyspace:
    if namespace is not None and strip is not None:
        raise ConfigError(f"{field_name}: give either namespace or strip_namespace, not both")
    ns = namespace if namespace is not None else strip
    if not ns:
        return Keyspace("none", b"", separator.encode(), route)
    return Keyspace("add" if namespace is not None else "strip", ns.encode(), separator.encode(), route)


@dataclass(frozen=True)
class DbTarget:
    db: int            # backend db index
    keyspace: Keyspace


@dataclass
class Route:
    name: str
    listen: tuple[str, int]
    upstream: Upstream
    default: DbTarget                     # what client db 0 means
    databases: dict[int, DbTarget] = field(default_factory=dict)  # explicit client db map

    def target(self, client_db: int) -> DbTarget | None:
        if client_db in self.databases:
            return self.databases[client_db]
        return self.default if client_db == 0 else None

    def reverse(self, backend_db: int) -> list[tuple[int, DbTarget]]:
        """Client dbs whose target is `backend_db` (for keyspace notifications)."""
        out = [(0, self.default)] if 0 not in self.databases and self.default.db == backend_db else []
        out += [(c, t) for c, t in sorted(self.databases.items()) if t.db == backend_db]
        return out

    def describe(self, bound: tuple | None = None) -> str:
        """`127.0.0.1:6380 -> redis://...`; `bound`: the address the socket got (port 0)."""
        ks = self.default.keyspace
        mode = {"add": f"namespace '{ks.namespace.decode()}' added",
                "strip": f"namespace '{ks.namespace.decode()}' stripped", "none": "no namespace"}[ks.mode]
        extra = f", client dbs {sorted(set(self.databases) | {0})} mapped" if self.databases else ""
        host, port = (bound or self.listen)[:2]
        return f"{format_addr(host, port)} -> {self.upstream.masked()} ({mode}{extra})"

    def dbs(self) -> list[tuple[int, int]]:
        """(client db, backend db) for every client db this route serves."""
        out = {} if 0 in self.databases else {0: self.default.db}
        out.update({c: t.db for c, t in self.databases.items()})
        return sorted(out.items())


def _default(key: str):
    return BY_KEY[key].default


@dataclass
class Limits:
    """[limits]; the types, ranges and defaults are the schema's (proxy/schema.py)."""
    max_bulk: int = _default("limits.max_bulk")
    max_query: int = _default("limits.max_query")
    connect_timeout: float = _default("limits.connect_timeout")
    upstream_mode: str = _default("limits.upstream_mode")  # shared: plain clients share a connection
    reload_grace: float = _default("limits.reload_grace")  # seconds a changed route's connections may finish
    drain_timeout: float = _default("limits.drain_timeout")
    # What the proxy holds for one client that does not read its replies, in bytes, as
    # Redis's client-output-buffer-limit does per class (0: no limit). Past it the
    # client is disconnected; the other clients of its shared link are not delayed.
    output_limit: int = _default("limits.output_limit")                # normal clients
    pubsub_output_limit: int = _default("limits.pubsub_output_limit")  # subscribed clients (Redis: 32mb)
    # All such clients together: past this, the one holding the most is disconnected,
    # so twenty non-readers cannot add up to twenty limits (a sidecar has 256Mi).
    output_total_limit: int = _default("limits.output_total_limit")


@dataclass
class Config:
    routes: list[Route]
    metrics_listen: tuple[str, int] | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str | None = None          # [log] level; flags and env win
    log_format: str | None = None         # [log] format: text or json


def build_route(entry: dict, default_upstream, default_sep: str, index: int,
                labels: dict[str, str] | None = None, text: bool = False) -> Route:
    """One route from a [[listener]] table (or from flags: `labels` names each key as the
    user gave it, `text` says the values are strings from flags or variables).
    `default_upstream`: a URL string or an Upstream, for a listener without its own."""
    where = f"listener[{index}]"
    labels = labels or {}

    def label(k: str) -> str:
        return labels.get(k, f"{where}.{k}")

    fields = section_fields("listener[]")
    for k in entry:
        if k not in fields and k != "databases":
            raise ConfigError(f"{label(k)}: unknown field (known: {known('listener[]', ('databases',))})")
    if "listen" not in entry:
        raise ConfigError(f"{label('listen')}: required")
    vals = {k: _value(f"listener[].{k}", v, label(k), text) for k, v in entry.items() if k != "databases"}
    listen = vals["listen"]
    name = vals.get("name") or format_addr(*listen)
    if "upstream" in vals:
        upstream = vals["upstream"]
    elif isinstance(default_upstream, Upstream):
        upstream = default_upstream
    else:
        upstream = parse_url(str(default_upstream or DEFAULT_UPSTREAM), "upstream")
    sep = vals.get("separator", default_sep)
    ns, strip = vals.get("namespace"), vals.get("strip_namespace")
    if ns is not None and strip is not None:
        raise ConfigError(f"{where}: give either namespace or strip_namespace, not both")
    ks = make_keyspace(ns, strip, sep, name, where)
    databases: dict[int, DbTarget] = {}
    dbs = entry.get("databases")
    if dbs is not None and not isinstance(dbs, dict):
        raise ConfigError(f"{where}.databases: expected a table of client db = {{ db = N }}, "
                          f"got {show(dbs, text)}")
    dbfields = section_fields("listener[].databases.N")
    for cdb, spec in (dbs or {}).items():
        f = f"{where}.databases.{cdb}"
        if not cdb.isdigit():
            raise ConfigError(f"{f}: client db must be a number >= 0, got {cdb!r}")
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = {"db": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"{f}: expected {{ db = N, namespace = \"...\" }} or a db number, "
                              f"got {show(spec, text)}")
        for k in spec:
            if k not in dbfields:
                raise ConfigError(f"{f}.{k}: unknown field (known: {known('listener[].databases.N')})")
        if "db" not in spec:
            raise ConfigError(f"{f}.db: required")
        dvals = {k: _value(f"listener[].databases.N.{k}", v, f"{f}.{k}", text) for k, v in spec.items()}
        if "namespace" in dvals or "strip_namespace" in dvals:
            if "namespace" in dvals and "strip_namespace" in dvals:
                raise ConfigError(f"{f}: give either namespace or strip_namespace, not both")
            dks = make_keyspace(dvals.get("namespace"), dvals.get("strip_namespace"),
                                dvals.get("separator", sep), name, f)
        else:
            dks = ks  # the listener's fence holds in every db unless a db says otherwise
        databases[int(cdb)] = DbTarget(dvals["db"], dks)
    return Route(name, listen, upstream, DbTarget(upstream.db, ks), databases)


def load_toml(path: str, upstream_override: str | None = None, upstream_label: str = "--upstream",
              environ=None) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return from_dict(data, upstream_override, upstream_label, environ)


def _table(data: dict, key: str) -> dict:
    v = data.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a [{key}] table, got {show(v, False)}")
    return v


def from_dict(data: dict, upstream_override: str | None = None, upstream_label: str = "--upstream",
              environ=None) -> Config:
    """A Config from a parsed TOML document. The default upstream is, first to last:
    `upstream_override` (named `upstream_label` in errors), $REDIS_URL, the file's."""
    environ = os.environ if environ is None else environ
    top = section_fields("")
    for k in data:
        if k not in top and k not in ("listener", "metrics", "limits", "log"):
            raise ConfigError(f"{k}: unknown top-level field "
                              f"(known: {known('', ('listener', 'metrics', 'limits', 'log'))})")
    default_upstream = parse_url(DEFAULT_UPSTREAM)
    if "upstream" in data:
        default_upstream = _value("upstream", data["upstream"], "upstream")
    if upstream_override:
        default_upstream = parse_url(upstream_override, upstream_label)
    elif environ.get("REDIS_URL"):
        default_upstream = parse_url(environ["REDIS_URL"], "REDIS_URL")
    sep = _value("separator", data["separator"], "separator") if "separator" in data else ":"
    listeners = data.get("listener")
    if isinstance(listeners, dict):
        raise ConfigError("listener: expected [[listener]] tables (two brackets), got [listener]")
    if not isinstance(listeners, list) or not listeners:
        raise ConfigError("listener: at least one [[listener]] table is required")
    routes = []
    for i, e in enumerate(listeners):
        if not isinstance(e, dict):
            raise ConfigError(f"listener[{i}]: expected a [[listener]] table, got {show(e, False)}")
        routes.append(build_route(e, default_upstream, sep, i))
    addresses: dict[tuple, int] = {}
    names: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.listen in addresses:
            raise ConfigError(f"listener[{i}].listen: {format_addr(*r.listen)} is already "
                              f"listener[{addresses[r.listen]}]'s address (each listener needs its own)")
        if r.name in names:
            raise ConfigError(f"listener[{i}].name: {r.name!r} is already listener[{names[r.name]}]'s name "
                              "(names must be unique: logs and metrics tell routes apart by them)")
        addresses[r.listen], names[r.name] = i, i
    metrics = None
    section = _table(data, "metrics")
    for k, v in section.items():
        if k not in section_fields("metrics"):
            raise ConfigError(f"metrics.{k}: unknown field (known: {known('metrics')})")
    if "listen" in section:
        metrics = _value("metrics.listen", section["listen"], "metrics.listen")
    limits = Limits()
    for k, v in _table(data, "limits").items():
        if k not in section_fields("limits"):
            raise ConfigError(f"limits.{k}: unknown field (known: {known('limits')})")
        setattr(limits, k, _value(f"limits.{k}", v, f"limits.{k}"))
    log = {}
    for k, v in _table(data, "log").items():
        if k not in section_fields("log"):
            raise ConfigError(f"log.{k}: unknown field (known: {known('log')})")
        log[k] = _value(f"log.{k}", v, f"log.{k}")
    return Config(routes, metrics, limits, log.get("level"), log.get("format"))


# -- the effective configuration, as TOML (credentials masked), for `keyspace-proxy check`

def _toml_str(s: str) -> str:
    import json
    return json.dumps(s, ensure_ascii=False)


def _keyspace_toml(ks: Keyspace) -> list[str]:
    out = []
    if ks.mode == "add":
        out.append(f"namespace = {_toml_str(ks.namespace.decode())}")
    elif ks.mode == "strip":
        out.append(f"strip_namespace = {_toml_str(ks.namespace.decode())}")
    else:
        out.append('namespace = ""')
    out.append(f"separator = {_toml_str(ks.separator.decode())}")
    return out


def render_toml(cfg: Config) -> str:
    """The configuration as a TOML file that would give it, every default spelled out and
    passwords shown as ***."""
    lines = []
    for r in cfg.routes:
        lines += ["[[listener]]", f"name = {_toml_str(r.name)}", f"listen = {_toml_str(format_addr(*r.listen))}",
                  f"upstream = {_toml_str(r.upstream.masked())}"]
        lines += _keyspace_toml(r.default.keyspace)
        if r.databases:
            lines.append("[listener.databases]")
            for c, t in sorted(r.databases.items()):
                parts = [f"db = {t.db}"] + _keyspace_toml(t.keyspace)
                lines.append(f"{c} = {{ {', '.join(parts)} }}")
        lines.append("")
    if cfg.metrics_listen:
        lines += ["[metrics]", f"listen = {_toml_str(format_addr(*cfg.metrics_listen))}", ""]
    lines.append("[limits]")
    for k in section_fields("limits"):
        v = getattr(cfg.limits, k)
        lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else repr(v)}")
    lines += ["", "[log]", f"level = {_toml_str(cfg.log_level or 'info')}",
              f"format = {_toml_str(cfg.log_format or 'text')}"]
    return "\n".join(lines) + "\n"
