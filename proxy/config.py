"""Configuration: upstream URLs, routes (listener -> upstream, db, keyspace), TOML files.

Everything is validated at start; errors name the field they come from."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from proxy.keyspace import Keyspace
from proxy.resp import DEFAULT_MAX_BULK, DEFAULT_MAX_QUERY

DEFAULT_UPSTREAM = "redis://127.0.0.1:6379/0"
UPSTREAM_MODES = ("shared", "dedicated")


class ConfigError(ValueError):
    pass


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
        return f"redis://{auth}{self.host}:{self.port}/{self.db}"

    def handshake(self, db: int | None = None, proto: int = 2) -> list[list[bytes]]:
        """The commands that set up one upstream connection, in order: AUTH with the URL's
        credentials, HELLO 3 for a RESP3 connection, SELECT the db. Every connection the
        proxy opens (client traffic, shared links, health checks, migrate) uses this."""
        cmds = []
        if self.password:
            cmds.append([b"AUTH"] + ([self.username.encode()] if self.username else []) + [self.password.encode()])
        if proto == 3:
            cmds.append([b"HELLO", b"3"])
        db = self.db if db is None else db
        if db:
            cmds.append([b"SELECT", str(db).encode()])
        return cmds


def parse_url(url: str, field_name: str = "upstream") -> Upstream:
    try:
        u = urlsplit(url)
        port = u.port or 6379
    except ValueError as e:
        raise ConfigError(f"{field_name}: invalid URL ({e})") from None
    if u.scheme != "redis":
        raise ConfigError(f"{field_name}: scheme must be redis:// (got {u.scheme or 'none'}://)"
                          + ("; TLS (rediss://) is not supported yet" if u.scheme == "rediss" else ""))
    if not u.hostname:
        raise ConfigError(f"{field_name}: missing host in {_mask(url)}")
    path = u.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ConfigError(f"{field_name}: db must be a number, got {path!r}") from None
    if db < 0:
        raise ConfigError(f"{field_name}: db must be >= 0")
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    return Upstream(u.hostname, port, db, user or None, password)


def _mask(url: str) -> str:
    u = urlsplit(url)
    if u.password:
        return url.replace(u.password, "***")
    return url


def parse_listen(text: str, field_name: str = "listen") -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ConfigError(f"{field_name}: expected HOST:PORT, got {text!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def make_keyspace(namespace: str | None, strip: str | None, separator: str, route: str,
                  field_name: str) -> Keyspace:
    if namespace is not None and strip is not None:
        raise ConfigError(f"{field_name}: give either namespace or strip_namespace, not both")
    ns = namespace if namespace is not None else strip
    if not ns:
        return Keyspace("none", b"", separator.encode(), route)
    for bad, why in (("*", "'*' breaks SORT BY/GET patterns, where Redis substitutes the first '*'"),
                     ("\r", "control characters"), ("\n", "control characters")):
        if bad in ns:
            raise ConfigError(f"{field_name}: namespace {ns!r} must not contain {why}")
    if "*" in separator:
        raise ConfigError(f"{field_name}: separator must not contain '*'")
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

    def describe(self) -> str:
        ks = self.default.keyspace
        mode = {"add": f"namespace '{ks.namespace.decode()}' added",
                "strip": f"namespace '{ks.namespace.decode()}' stripped", "none": "no namespace"}[ks.mode]
        extra = f", client dbs {sorted(set(self.databases) | {0})} mapped" if self.databases else ""
        return f"{self.listen[0]}:{self.listen[1]} -> {self.upstream.masked()} ({mode}{extra})"


@dataclass
class Limits:
    max_bulk: int = DEFAULT_MAX_BULK
    max_query: int = DEFAULT_MAX_QUERY
    connect_timeout: float = 5.0
    upstream_mode: str = "shared"   # shared: plain clients share a connection; dedicated: one each
    reload_grace: float = 30.0      # seconds a changed route's connections may finish after a reload
    drain_timeout: float = 10.0
    # What the proxy holds for one client that does not read its replies, in bytes, as
    # Redis's client-output-buffer-limit does per class (0: no limit). Past it the
    # client is disconnected; the other clients of its shared link are not delayed.
    output_limit: int = 64 * 1024 * 1024          # normal clients
    pubsub_output_limit: int = 32 * 1024 * 1024   # subscribed clients (Redis: 32mb)
    # All such clients together: past this, the one holding the most is disconnected,
    # so twenty non-readers cannot add up to twenty limits (a sidecar has 256Mi).
    output_total_limit: int = 256 * 1024 * 1024


@dataclass
class Config:
    routes: list[Route]
    metrics_listen: tuple[str, int] | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str | None = None          # [log] level; flags and env win
    log_format: str | None = None         # [log] format: text or json


def build_route(entry: dict, default_upstream: str, default_sep: str, index: int) -> Route:
    where = f"listener[{index}]"
    known = {"name", "listen", "upstream", "namespace", "strip_namespace", "separator", "databases"}
    for k in entry:
        if k not in known:
            raise ConfigError(f"{where}.{k}: unknown field (known: {', '.join(sorted(known))})")
    if "listen" not in entry:
        raise ConfigError(f"{where}.listen: required")
    listen = parse_listen(entry["listen"], f"{where}.listen")
    name = str(entry.get("name") or f"{listen[0]}:{listen[1]}")
    upstream = parse_url(str(entry.get("upstream") or default_upstream), f"{where}.upstream")
    sep = str(entry.get("separator", default_sep))
    ns, strip = entry.get("namespace"), entry.get("strip_namespace")
    ks = make_keyspace(ns, strip, sep, name, where)
    databases: dict[int, DbTarget] = {}
    for cdb, spec in (entry.get("databases") or {}).items():
        f = f"{where}.databases.{cdb}"
        try:
            c = int(cdb)
        except ValueError:
            raise ConfigError(f"{f}: client db must be a number") from None
        if isinstance(spec, int):
            spec = {"db": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("db"), int) or spec["db"] < 0:
            raise ConfigError(f"{f}: expected {{ db = N, namespace = \"...\" }} with N >= 0")
        for k in spec:
            if k not in ("db", "namespace", "strip_namespace", "separator"):
                raise ConfigError(f"{f}.{k}: unknown field")
        if "namespace" in spec or "strip_namespace" in spec:
            dks = make_keyspace(spec.get("namespace"), spec.get("strip_namespace"),
                                str(spec.get("separator", sep)), name, f)
        else:
            dks = ks  # the listener's fence holds in every db unless a db says otherwise
        databases[c] = DbTarget(spec["db"], dks)
    return Route(name, listen, upstream, DbTarget(upstream.db, ks), databases)


def load_toml(path: str, upstream_override: str | None = None) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return from_dict(data, upstream_override)


def from_dict(data: dict, upstream_override: str | None = None) -> Config:
    known = {"upstream", "separator", "listener", "metrics", "limits", "log"}
    for k in data:
        if k not in known:
            raise ConfigError(f"{k}: unknown top-level field (known: {', '.join(sorted(known))})")
    default_upstream = upstream_override or os.environ.get("REDIS_URL") or data.get("upstream") or DEFAULT_UPSTREAM
    sep = str(data.get("separator", ":"))
    listeners = data.get("listener") or []
    if not isinstance(listeners, list) or not listeners:
        raise ConfigError("listener: at least one [[listener]] table is required")
    routes = [build_route(e, default_upstream, sep, i) for i, e in enumerate(listeners)]
    seen = {}
    for r in routes:
        if r.listen in seen:
            raise ConfigError(f"listener {r.name}: address {r.listen[0]}:{r.listen[1]} used twice")
        seen[r.listen] = r
    metrics = None
    if "metrics" in data:
        if "listen" in data["metrics"]:
            metrics = parse_listen(data["metrics"]["listen"], "metrics.listen")
    limits = Limits()
    for k, v in (data.get("limits") or {}).items():
        if not hasattr(limits, k):
            raise ConfigError(f"limits.{k}: unknown field")
        setattr(limits, k, type(getattr(limits, k))(v))
    if limits.upstream_mode not in UPSTREAM_MODES:
        raise ConfigError(f"limits.upstream_mode: expected one of {', '.join(UPSTREAM_MODES)}, "
                          f"got {limits.upstream_mode!r}")
    log_level, log_format = _log_section(data.get("log") or {})
    return Config(routes, metrics, limits, log_level, log_format)


def _log_section(section: dict) -> tuple[str | None, str | None]:
    from proxy.logs import FORMATS, LEVELS
    for k in section:
        if k not in ("level", "format"):
            raise ConfigError(f"log.{k}: unknown field (known: format, level)")
    level, fmt = section.get("level"), section.get("format")
    if level is not None and level not in LEVELS:
        raise ConfigError(f"log.level: expected one of {', '.join(LEVELS)}, got {level!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"log.format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return level, fmt
