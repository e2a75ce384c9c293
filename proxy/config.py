"""Configuration: upstream URLs, routes (listener -> upstream, db, keyspace), TOML files.

What each setting may be (type, range, default, flag, variable) is in proxy/schema.py.
Everything is validated at start; an error names the field as the user wrote it
(`listener[0].upstream`, `limits.max_bulk`, or the flag or variable given for it)."""

from __future__ import annotations

import os
import re
import socket
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, unquote, urlsplit

from proxy.keyspace import Keyspace
from proxy.sentinel import SentinelError, SentinelSpec
from proxy.schema import BY_KEY, DEFAULT_UPSTREAM, UPSTREAM_MODES, Invalid, known, section_fields, show  # noqa: F401


class ConfigError(ValueError):
    pass


def format_addr(host: str, port: int) -> str:
    """`127.0.0.1:6380`, `[::1]:6380`: an address as HOST:PORT, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TLSFileError(ValueError):
    """A certificate, key or CA that cannot be used; `field` names the setting it came from."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def _load(field_name: str, path: str | None, what: str, fn) -> None:
    try:
        fn()
    except FileNotFoundError:
        raise TLSFileError(field_name, f"cannot read {path!r}: no such file") from None
    except PermissionError:
        raise TLSFileError(field_name, f"cannot read {path!r}: permission denied") from None
    except IsADirectoryError:
        raise TLSFileError(field_name, f"{path!r} is a directory, not a file") from None
    except (ssl.SSLError, OSError, ValueError) as e:
        detail = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        detail = re.sub(r"^\[SSL\] |\s*\(_ssl\.c:\d+\)$", "", detail)
        raise TLSFileError(field_name, f"{path!r} is not {what} (OpenSSL: {detail})") from None


@dataclass(frozen=True)
class UpstreamTLS:
    """TLS to a `rediss://` upstream: whom to trust, which certificate to show, which
    name to expect. Equal settings compare equal; the SSLContext is built once per
    object (at configuration load, so unreadable files are configuration errors) and
    is not part of the comparison."""
    ca_file: str | None = None       # PEM bundle of CAs to trust (instead of the system's)
    ca_dir: str | None = None        # a c_rehash'ed directory of CAs (instead of the system's)
    cert_file: str | None = None     # client certificate (mutual TLS), PEM; may hold the key too
    key_file: str | None = None      # its private key, PEM
    server_name: str | None = None   # SNI and the name verified; None: the URL's host
    verify: bool = True              # verify the server's certificate and name
    _ctx: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def context(self) -> ssl.SSLContext:
        """The SSLContext, built on first use and kept. Raises TLSFileError."""
        if not self._ctx:
            self._ctx.append(self.build())
        return self._ctx[0]

    def build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.2+, hostname checked, CERT_REQUIRED
        if self.ca_file or self.ca_dir:
            if self.ca_file:
                _load("ca_file", self.ca_file, "a PEM file of CA certificates",
                      lambda: ctx.load_verify_locations(cafile=self.ca_file))
            if self.ca_dir:
                if not os.path.isdir(self.ca_dir):
                    raise TLSFileError("ca_dir", f"{self.ca_dir!r} is not a directory")
                ctx.load_verify_locations(capath=self.ca_dir)
        else:
            ctx.load_default_certs()  # the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR are honoured)
        if self.cert_file:
            _load("cert_file" if not self.key_file else "cert_file, key_file", self.cert_file,
                  "a PEM certificate with its key", lambda: ctx.load_cert_chain(self.cert_file, self.key_file))
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def server_hostname(self, host: str) -> str:
        return self.server_name or host


@dataclass(frozen=True)
class ListenerTLS:
    """TLS for a listener's clients: the proxy's certificate and key, and optionally the
    CAs whose client certificates it requires (mutual TLS). Re-read on reload."""
    cert_file: str
    key_file: str | None = None
    ca_file: str | None = None       # given: clients must present a certificate signed by one of these
    _ctx: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def context(self) -> ssl.SSLContext:
        """The SSLContext built from the files when the configuration was loaded."""
        if not self._ctx:
            self._ctx.append(self.build())
        return self._ctx[0]

    def build(self) -> ssl.SSLContext:
        """A new SSLContext from the files as they are now. Raises TLSFileError."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load("cert_file" if not self.key_file else "cert_file, key_file", self.cert_file,
              "a PEM certificate with its key", lambda: ctx.load_cert_chain(self.cert_file, self.key_file))
        if self.ca_file:
            _load("ca_file", self.ca_file, "a PEM file of CA certificates",
                  lambda: ctx.load_verify_locations(cafile=self.ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def connect_failure(host: str, port: int, e: BaseException, tls: UpstreamTLS | None = None) -> str:
    """Why a connection to an upstream could not be opened, as one line for the log and
    the client: a TLS verification failure names what failed and the settings to look at."""
    if isinstance(e, SentinelError) or type(e).__name__ == "ClusterRouteError":
        return str(e)
    addr = format_addr(host, port)
    if isinstance(e, ssl.SSLCertVerificationError):
        why = (e.verify_message or e.reason or str(e)).rstrip(".")
        if "ostname" in why or "IP address" in why:
            name = tls.server_hostname(host) if tls is not None else host
            hint = f"the name checked is {name!r}: see upstream_tls.server_name"
        elif "issuer" in why or "self-signed" in why or "self signed" in why:
            hint = "is the CA that signed it in upstream_tls.ca_file / ca_dir?"
        else:
            hint = "see [upstream_tls]"
        return f"TLS handshake with {addr} failed: certificate verify failed: {why} ({hint})"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with {addr} failed: {e.reason or e}" + (
            " (is the server speaking TLS on that port?)" if e.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE")
            else "")
    if tls is not None and isinstance(e, TimeoutError):  # asyncio's too (3.11)
        return (f"no TLS handshake with {addr} within the connect timeout (unreachable, or not speaking TLS "
                "on that port?)")
    if tls is not None and isinstance(e, ConnectionResetError):
        return f"TLS handshake with {addr} failed: connection reset (is the server speaking TLS on that port?)"
    return f"cannot connect to {addr}: {e.__class__.__name__}{': ' + str(e) if str(e) else ''}"


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: UpstreamTLS | None = None   # rediss://
    # redis+sentinel://: the primary is found through these sentinels (proxy/sentinel.py);
    # host and port are then the first sentinel's, and the data node is address()
    sentinel: SentinelSpec | None = None
    # redis+cluster://: a pinned route's node is the primary owning its namespace's slot
    # (proxy/cluster_route.py); host and port are then the first seed's
    cluster: "ClusterUpstream | None" = None
    slot: int | None = None   # ... and the hash slot of the route's pinned namespace (check_cluster_route)

    @property
    def scheme(self) -> str:
        return ("rediss" if self.tls is not None else "redis") + (
            "+sentinel" if self.sentinel else "+cluster" if self.cluster else "")

    def masked(self) -> str:
        """The URL with credentials hidden, for logs."""
        auth = ""
        if self.username or self.password:
            auth = (self.username or "") + ":***@"
        if self.sentinel is not None:
            return f"{self.scheme}://{auth}{self.sentinel.nodes_text()}/{self.sentinel.master}/{self.db}"
        if self.cluster is not None:
            return self.cluster.masked()
        return f"{self.scheme}://{auth}{format_addr(self.host, self.port)}/{self.db}"

    def address(self, timeout: float = 5.0) -> tuple[str, int]:
        """The data node: the URL's, or the primary the sentinels name now (asked with
        blocking sockets: for `check` and `migrate`; the proxy asks through its Watcher)."""
        if self.cluster is not None:
            from proxy.cluster_route import resolve as owner
            return owner(self, self.slot if self.slot is not None else 0, timeout)[0]
        if self.sentinel is None:
            return self.host, self.port
        from proxy.sentinel import resolve
        return resolve(self, timeout)

    def ssl_args(self, host: str | None = None) -> dict:
        """Keyword arguments for loop.create_connection / asyncio.open_connection;
        `host`: the node connected to (a sentinel upstream's primary), for SNI."""
        if self.tls is None:
            return {}
        return {"ssl": self.tls.context(), "server_hostname": self.tls.server_hostname(host or self.host)}

    def open_socket(self, timeout: float, addr: tuple[str, int] | None = None) -> socket.socket:
        """A blocking socket to the upstream (or to `addr`), TLS when rediss:// (handshake
        done, within `timeout`). For the readiness check, `check` and `migrate`."""
        host, port = addr or self.address(timeout)
        s = socket.create_connection((host, port), timeout=timeout)
        if self.tls is None:
            return s
        try:
            s.settimeout(timeout)
            return self.tls.context().wrap_socket(s, server_hostname=self.tls.server_hostname(host))
        except BaseException:
            s.close()
            raise

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
    """A redis:// URL (rediss:// for TLS), strictly: the db in the path or as `?db=N` (as
    redis-py reads it; both must agree), no other query parameters. Raises Invalid
    (credentials masked). A rediss:// upstream gets the default TLS settings (the
    system's CAs, verification on); [upstream_tls] settings are applied by the caller."""
    shown = repr(mask_url(url))
    if url.partition("://")[0] in CLUSTER_SCHEMES:
        c = parse_cluster_url(url)  # routes on it are checked by check_cluster_route
        return Upstream(c.seeds[0][0], c.seeds[0][1], 0, c.username, c.password, c.tls, cluster=c)
    if url.partition("://")[0] in ("redis+sentinel", "rediss+sentinel"):
        return parse_sentinel_url(url, shown)
    if "://" not in url:
        hint = f" (e.g. redis://{url}/0)" if ":" in url and url.rpartition(":")[2].isdigit() else ""
        raise Invalid(f"expected a URL, {URL_FORM}{hint}, got {shown}")
    try:
        u = urlsplit(url)
    except ValueError as e:
        raise Invalid(f"invalid URL {shown} ({e})") from None
    if u.scheme not in ("redis", "rediss"):
        raise Invalid("scheme must be redis:// or rediss:// (TLS), or redis+sentinel:// / rediss+sentinel:// "
                      f"(Sentinel) (got {u.scheme or 'none'}://)")
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
    return Upstream(u.hostname, port or 6379, db or 0, user or None, password,
                    UpstreamTLS() if u.scheme == "rediss" else None)


SENTINEL_FORM = "redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]"


def parse_sentinel_url(url: str, shown: str) -> Upstream:
    """`redis+sentinel://[USER:PASSWORD@]h1:p1,h2:p2/MASTER[/DB]` (rediss+ for TLS to the
    sentinels and the data nodes). The credentials are the data nodes' (redis-py's
    `master_for(password=...)`, Sidekiq's `password:`); the sentinels' own are
    [sentinel] username / password. A port left out is 26379, Sentinel's."""
    from proxy.schema import Address
    scheme, _, rest = url.partition("://")
    if "?" in rest or "#" in rest:
        raise Invalid(f"a sentinel URL takes no query or fragment ({SENTINEL_FORM}) in {shown} "
                      "(percent-encode '?' or '#' in a password: %3F, %23)")
    userinfo, at, rest = rest.rpartition("@")  # the last '@': a password may hold '/' or '@' (as mask_url)
    hosts, _, path = rest.partition("/")
    nodes = []
    for part in hosts.split(","):
        if not part:
            raise Invalid(f"missing sentinel address in {shown} ({SENTINEL_FORM})")
        bare = part.rsplit("]", 1)[-1]
        if ":" not in bare:
            part += ":26379"
        try:
            host, port = Address().parse(part, True)
        except Invalid as e:
            raise Invalid(f"sentinel address {part!r} in {shown}: {e}") from None
        if not 1 <= port <= 65535:
            raise Invalid(f"port must be a number from 1 to 65535 in {shown}")
        nodes.append((host, port))
    master, _, db = path.partition("/")
    if not master:
        raise Invalid(f"missing the master's name (as in sentinel.conf's `sentinel monitor NAME ...`) in {shown} "
                      f"({SENTINEL_FORM})")
    if db and not db.isdigit():
        raise Invalid(f"db must be a number, got {db!r} in {shown} ({SENTINEL_FORM})")
    user, _, password = userinfo.partition(":")
    user, password = unquote(user) or None, unquote(password) or None
    spec = SentinelSpec(unquote(master), tuple(dict.fromkeys(nodes)))
    return Upstream(nodes[0][0], nodes[0][1], int(db or 0), user, password,
                    UpstreamTLS() if scheme == "rediss+sentinel" else None, spec)


def apply_sentinel_auth(routes: list, vals: dict[str, tuple]) -> None:
    """[sentinel] username / password: the sentinels' credentials, for every
    redis+sentinel:// upstream (some route must have one)."""
    if not vals:
        return
    routes = [rr for r in routes for rr in r.with_users()]  # a user's route may have its own upstream
    if not any(r.upstream.sentinel is not None for r in routes):
        first = next(iter(vals.values()))[1]
        raise ConfigError(f"{first}: no upstream is redis+sentinel:// (these are the sentinels' credentials)")
    for r in routes:
        up = r.upstream
        if up.sentinel is not None:
            spec = replace(up.sentinel, **{k: v for k, (v, _) in vals.items()})
            if spec.username and not spec.password:
                raise ConfigError(f"{vals['username'][1]}: given without sentinel.password")
            r.upstream = replace(up, sentinel=spec)


# -- Redis Cluster upstreams: pinned routes (one slot, its owner) and spread routes (each
# request to the owner of its keys' slot, proxy/spread.py); check_cluster_route; docs/cluster.md
# says what is built and what is designed only.

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class ClusterUpstream:
    seeds: tuple[tuple[str, int], ...]   # where to ask for the slot map, in the URL's order
    username: str | None = None
    password: str | None = None
    tls: UpstreamTLS | None = None       # rediss+cluster://

    def masked(self) -> str:
        auth = (self.username or "") + ":***@" if (self.username or self.password) else ""
        scheme = "rediss+cluster" if self.tls is not None else "redis+cluster"
        return f"{scheme}://{auth}{','.join(format_addr(h, p) for h, p in self.seeds)}"


def parse_cluster_url(url: str) -> ClusterUpstream:
    """`redis+cluster://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/0]` (rediss+cluster://
    for TLS): seed nodes, IPv6 in brackets, port 6379 when left out. A cluster has db 0
    only, so a path is `/0` or nothing; no query. Raises Invalid (credentials masked)."""
    shown = repr(mask_url(url))
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        raise Invalid(f"scheme must be redis+cluster:// or rediss+cluster:// (got {scheme}://)")
    at = rest.rfind("@")
    auth, rest = (rest[:at], rest[at + 1:]) if at >= 0 else ("", rest)
    hosts, slash, path = rest.partition("/")
    if "?" in hosts or "?" in path or "#" in rest:
        raise Invalid(f"unexpected query or fragment in {shown} (a cluster URL takes none)")
    if slash and path not in ("", "0"):
        raise Invalid(f"a cluster has db 0 only, got /{path} in {shown}")
    seeds = [parse_seed(part, f" in {shown}", f" of {shown}") for part in hosts.split(",")]
    user, _, password = auth.partition(":")
    return ClusterUpstream(tuple(seeds), unquote(user) or None, unquote(password) or None,
                           UpstreamTLS() if scheme == "rediss+cluster" else None)


def parse_seed(part: str, in_: str = "", of: str = "") -> tuple[str, int]:
    """One seed node, `HOST[:PORT]` (IPv6 in brackets; 6379 when left out), of a cluster
    URL or of a [cluster] seeds list. Raises Invalid (`in_`/`of`: where, for the message)."""
    host, port = part, "6379"
    if part.startswith("["):
        end = part.find("]")
        host, tail = part[1:end], part[end + 1:]
        if end < 0 or (tail and not tail.startswith(":")):
            raise Invalid(f"bad seed {part!r}{in_}: write IPv6 as [::1]:7000")
        port = tail[1:] or port
    elif ":" in part:
        host, _, port = part.rpartition(":")
    if not host or ":" in host and not part.startswith("[") or any(c.isspace() for c in host):
        raise Invalid(f"bad seed {part!r}{in_}: expected HOST:PORT (IPv6 as [::1]:7000)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Invalid(f"port must be a number from 1 to 65535 in seed {part!r}{of}")
    return host, int(port)


def cluster_table(vals: dict[str, tuple], where: str) -> Upstream:
    """A `[cluster]` / `[listener.cluster]` table (fields checked by the schema, as
    {name: (value, label)}): the same Upstream as the redis+cluster:// URL of those seeds
    and credentials (rediss+cluster:// with `tls = true`), so both spellings are one cluster."""
    if "seeds" not in vals:
        raise ConfigError(f"{where}.seeds: required (the nodes asked for the slot map, e.g. "
                          "seeds = [\"10.0.0.1:6379\", \"10.0.0.2:6379\"])")
    seeds = vals["seeds"][0]
    user = vals.get("username", (None,))[0]
    password = vals.get("password", (None,))[0]
    if user is not None and password is None:
        raise ConfigError(f"{vals['username'][1]}: given without {where}.password")
    c = ClusterUpstream(tuple(seeds), user, password, UpstreamTLS() if vals.get("tls", (False,))[0] else None)
    return Upstream(c.seeds[0][0], c.seeds[0][1], 0, c.username, c.password, c.tls, cluster=c)


def choose_upstream(entry: dict, where: str, label, section: str, labels: dict | None = None,
                    text: bool = False) -> Upstream | None:
    """The upstream a table gives: its `upstream` URL, or its seed-list `cluster` table
    (never both), or None."""
    if "cluster" not in entry:
        return _value(f"{section}upstream", entry["upstream"], label("upstream"), text) if "upstream" in entry \
            else None
    table = f"{where}cluster" if where else "cluster"
    if "upstream" in entry:
        toml = section.replace("[]", "") + "cluster"  # the table as TOML spells it: [listener.cluster]
        raise ConfigError(f"{label('upstream')}, {table}: give the upstream either as a URL or as a [{toml}] "
                          "seed list, not both")
    return cluster_table(sub_table(entry, "cluster", f"{section}cluster", where, labels, text), table)


def check_cluster_route(route: "Route", label: str, where: str) -> "Route":
    """Fail closed: a route on a cluster is pinned (every key of the route in one slot,
    served by that slot's primary) or spread (no db pinned: each request to the owner of
    its keys' slot, proxy/spread.py); docs/cluster.md. A client db mapped to a backend db
    other than 0 (a cluster has db 0 only), pinned and unpinned dbs in one route, or
    pinned dbs whose namespaces are in different slots are configuration errors."""
    up = route.upstream
    if up.cluster is None:
        return route
    targets = [("", route.default)] + [(f" (client db {c})", t) for c, t in sorted(route.databases.items())]
    pinned = [t.keyspace.mode == "add" and t.keyspace.pinned for _, t in targets]
    if not any(pinned):
        # a spread route: every request to the owner of its keys' slot (proxy/spread.py)
        for c, t in sorted(route.databases.items()):
            if t.db != 0:
                raise ConfigError(f"{where}.databases.{c}.db: a Redis Cluster has db 0 only (route {route.name} is "
                                  f"on {up.masked()}); map client db {c} to db = 0 with a namespace of its own")
        return route
    for w, t in targets:
        if t.keyspace.mode != "add" or not t.keyspace.pinned:
            raise ConfigError(f"{label}: route {route.name}{w} is on a Redis Cluster ({up.masked()}) and is not "
                              "pinned while another client db of it is: a route is pinned (slot = \"pinned\", "
                              "every db) or spread (no db pinned); per-db nodes are not built (docs/cluster.md)")
    for c, t in sorted(route.databases.items()):
        if t.db != 0:
            raise ConfigError(f"{where}.databases.{c}.db: a Redis Cluster has db 0 only (route {route.name} is on "
                              f"{up.masked()}); map client db {c} to db = 0 with a namespace of its own")
    from proxy.cluster import key_slot
    slots = {key_slot(t.keyspace.namespace) for _, t in targets}
    if len(slots) > 1:
        raise ConfigError(f"{where}.databases: on a Redis Cluster the namespaces of all client dbs of route "
                          f"{route.name} must be in one hash slot (the same namespace, or namespaces with the same "
                          "key_slot): a route's connections go to one node; per-db nodes are not built "
                          "(docs/cluster.md)")
    # the slot travels with the upstream, so everything keyed by upstream (health,
    # readiness, the node to connect to) is per (cluster, slot)
    return replace(route, upstream=replace(up, slot=slots.pop()))


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
    # tenant: a fence for code the operator does not trust; app: a trusted application
    # (proxy/overlay.py says what each changes). Only namespaced dbs are affected.
    policy: str = "tenant"
    # TLS for clients. Not part of the comparison: new certificates (or new paths) are
    # taken by new connections on reload, and existing connections need not be drained.
    tls: ListenerTLS | None = field(default=None, compare=False)
    policy_label: str = field(default="listener[].policy", compare=False)  # named in refusals
    # [[listener.user]]: clients must authenticate, and each user has a route of its own
    # (proxy/auth.py). None: no authentication. By user name.
    users: dict | None = None
    # Not part of the comparison either: a new limit applies to new connections and
    # needs no drain.
    max_clients: int | None = field(default=None, compare=False)

    def with_users(self) -> list["Route"]:
        """This route and, for a listener with users, each user's route."""
        return [self] + [u.route for u in (self.users or {}).values()]

    @property
    def slot(self) -> str:
        """`pinned` when the route's namespaces are hash tags (pin_route), else `spread`."""
        ks = [self.default.keyspace] + [t.keyspace for t in self.databases.values()]
        return "pinned" if any(k.pinned for k in ks) else "spread"

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
        mode = {"add": f"namespace '{ks.namespace.decode()}' added" + (
                    f" as the hash tag {{{ks.namespace.decode()}}} (pinned to one slot)" if ks.pinned else ""),
                "strip": f"namespace '{ks.namespace.decode()}' stripped", "none": "no namespace"}[ks.mode]
        extra = f", client dbs {sorted(set(self.databases) | {0})} mapped" if self.databases else ""
        host, port = (bound or self.listen)[:2]
        tls = ""
        if self.tls is not None:
            tls = ", TLS" + (" with client certificates" if self.tls.ca_file else "")
        if self.users is not None:  # its clients take their user's route (logged under it)
            return f"{format_addr(host, port)}{tls}, {len(self.users)} user(s): clients must authenticate"
        policy = f", policy {self.policy}" if self.namespaced else ""  # it changes nothing without a namespace
        return f"{format_addr(host, port)}{tls} -> {self.upstream.masked()} ({mode}{extra}{policy})"

    @property
    def namespaced(self) -> bool:
        """Does some client db of this route have a namespace? (where the policy applies)"""
        return self.default.keyspace.mode != "none" or any(t.keyspace.mode != "none" for t in self.databases.values())

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
    max_clients: int | None = _default("limits.max_clients")   # None: derived from RLIMIT_NOFILE at start
    blocking_pool: int = _default("limits.blocking_pool")      # 0: blocking clients get dedicated connections
    blocking_pool_idle: float = _default("limits.blocking_pool_idle")  # seconds an idle pooled connection is kept
    idle_timeout: float = _default("limits.idle_timeout")      # 0: clients are never closed for idleness
    tcp_keepalive: int = _default("limits.tcp_keepalive")      # 0: off
    reply_timeout: float = _default("limits.reply_timeout")    # 0: an upstream may owe a reply forever
    reconnect_delay: float = _default("limits.reconnect_delay")
    reconnect_delay_max: float = _default("limits.reconnect_delay_max")


@dataclass
class Config:
    routes: list[Route]
    metrics_listen: tuple[str, int] | None = None
    limits: Limits = field(default_factory=Limits)
    log_level: str | None = None          # [log] level; flags and env win
    log_format: str | None = None         # [log] format: text or json
    admin_listen: tuple[str, int] | None = None   # POST /-/reload apart from /metrics
    admin_token_file: str | None = None
    # the reload token (from admin.token_file or PROXY_ADMIN_TOKEN); None: reload over HTTP is off
    admin_token: str | None = field(default=None, repr=False)

    @property
    def reload_listen(self) -> tuple[str, int] | None:
        """Where POST /-/reload is served: the admin address, else the metrics port."""
        return self.admin_listen or self.metrics_listen

    def all_routes(self) -> list[Route]:
        """Every route: the listeners' and their users' (each has its stats)."""
        return [rr for r in self.routes for rr in r.with_users()]

    def traffic_routes(self) -> list[Route]:
        """The routes clients' commands take: a listener with users sends nothing upstream
        itself (its clients take their user's route), so only its users' routes count."""
        return [rr for r in self.routes for rr in (r.with_users()[1:] if r.users is not None else [r])]


def read_token(path: str, label: str) -> str:
    """The admin token from a file (a trailing newline is not part of it)."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"{label}: cannot read {path!r}: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path!r} is not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{label}: {path!r} is empty (an empty token would let anyone reload)")
    if "\n" in token:
        raise ConfigError(f"{label}: {path!r} holds more than one line; put the token alone in it")
    return token


SUBTABLES = ("databases", "tls", "upstream_tls", "user", "cluster")  # [listener.X] tables
# What a [[listener.user]] may set of its listener's route (any route field, so a field
# added to [[listener]] works per user too): all but the listener's address, name, TLS.
NOT_PER_USER = ("listen", "name", "tls", "user", "max_clients")  # max_clients: counted per listener


def sub_table(entry: dict, key: str, section: str, where: str, labels: dict[str, str] | None = None,
              text: bool = False) -> dict[str, tuple]:
    """The fields of the table `entry[key]` checked by the schema's `section`, as
    {name: (value, label)}; {} when absent."""
    labels = labels or {}
    t = entry.get(key)
    if t is None:
        return {}
    if not isinstance(t, dict):
        raise ConfigError(f"{where}{key}: expected a table of settings, got {show(t, text)}")
    fields = section_fields(section)
    out = {}
    for k, v in t.items():
        lab = labels.get(f"{key}.{k}", f"{where}{key}.{k}")
        if k not in fields:
            raise ConfigError(f"{lab}: unknown field (known: {known(section)})")
        out[k] = (_value(f"{section}.{k}", v, lab, text), lab)
    return out


def _tls_error(vals: dict[str, tuple], e: TLSFileError) -> ConfigError:
    names = [n for n in e.field.split(", ") if n in vals] or list(vals)[:1]
    return ConfigError(f"{', '.join(vals[n][1] for n in names)}: {e}")


def make_upstream_tls(vals: dict[str, tuple], cache: dict | None = None) -> UpstreamTLS:
    """UpstreamTLS from {name: (value, label)}, its context built now (so an unreadable
    file is a configuration error naming the setting). `cache`: equal settings share one
    object, hence one SSLContext."""
    if "key_file" in vals and "cert_file" not in vals:
        raise ConfigError(f"{vals['key_file'][1]}: given without cert_file (the client certificate)")
    tls = UpstreamTLS(**{k: v for k, (v, _) in vals.items()})
    if cache is not None:
        tls = cache.setdefault(tls, tls)
    try:
        tls.context()
    except TLSFileError as e:
        raise _tls_error(vals, e) from None
    return tls


def make_listener_tls(vals: dict[str, tuple], cert_label: str) -> ListenerTLS | None:
    if not vals:
        return None
    if "cert_file" not in vals:
        raise ConfigError(f"{cert_label}: required for TLS (the proxy's certificate, PEM)")
    tls = ListenerTLS(**{k: v for k, (v, _) in vals.items()})
    try:
        tls.context()
    except TLSFileError as e:
        raise _tls_error(vals, e) from None
    return tls


def check_upstream_tls_used(routes: list, vals: dict[str, tuple]) -> None:
    """Top-level upstream TLS settings apply to rediss:// upstreams: some route must have one."""
    if vals and not any(r.upstream.tls is not None for r in routes):
        first = next(iter(vals.values()))[1]
        raise ConfigError(f"{first}: no upstream is rediss:// (TLS settings apply to rediss:// upstreams; "
                          "redis:// stays plain TCP)")


def build_route(entry: dict, default_upstream, default_sep: str, index: int,
                labels: dict[str, str] | None = None, text: bool = False,
                upstream_tls: dict[str, tuple] | None = None, tls_cache: dict | None = None,
                environ=None, where: str | None = None) -> Route:
    """One route from a [[listener]] table (or from flags: `labels` names each key as the
    user gave it, `text` says the values are strings from flags or variables).
    `default_upstream`: a URL string or an Upstream, for a listener without its own.
    `upstream_tls`: the top-level [upstream_tls] as {name: (value, label)}, for a
    rediss:// upstream; the listener's own [listener.upstream_tls] fields win over it.
    `environ`: where password_env variables are read ([[listener.user]])."""
    where = where or f"listener[{index}]"
    labels = labels or {}

    def label(k: str) -> str:
        return labels.get(k, f"{where}.{k}")

    fields = section_fields("listener[]")
    for k in entry:
        if k not in fields and k not in SUBTABLES:
            raise ConfigError(f"{label(k)}: unknown field (known: {known('listener[]', SUBTABLES)})")
    if "listen" not in entry:
        raise ConfigError(f"{label('listen')}: required")
    vals = {k: _value(f"listener[].{k}", v, label(k), text) for k, v in entry.items() if k not in SUBTABLES}
    listen = vals["listen"]
    name = vals.get("name") or format_addr(*listen)
    own = choose_upstream(entry, f"{where}.", label, "listener[].", labels, text)
    if own is not None:
        upstream = own
    elif isinstance(default_upstream, Upstream):
        upstream = default_upstream
    else:
        upstream = parse_url(str(default_upstream or DEFAULT_UPSTREAM), "upstream")
    own_tls = sub_table(entry, "upstream_tls", "listener[].upstream_tls", f"{where}.", labels, text)
    if own_tls and upstream.tls is None:
        raise ConfigError(f"{where}.upstream_tls: the upstream is {upstream.masked()}, plain TCP; "
                          + ("set tls = true in its cluster table" if "cluster" in entry else "write rediss://")
                          + " to connect with TLS")
    if upstream.tls is not None:
        upstream = replace(upstream, tls=make_upstream_tls({**(upstream_tls or {}), **own_tls}, tls_cache))
    listener_tls = make_listener_tls(sub_table(entry, "tls", "listener[].tls", f"{where}.", labels, text),
                                     labels.get("tls.cert_file", f"{where}.tls.cert_file"))
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
    # Fail closed: a namespace is a fence unless the operator says the code is trusted.
    namespaced = ks.mode != "none" or any(t.keyspace.mode != "none" for t in databases.values())
    policy = vals.get("policy") or ("tenant" if namespaced else "app")  # (Route.namespaced)
    route = Route(name, listen, upstream, DbTarget(upstream.db, ks), databases, policy, listener_tls,
                  label("policy"), max_clients=vals.get("max_clients"))
    route = pin_route(route, vals.get("slot", "spread"), label("slot"))
    route = check_cluster_route(route, label("slot"), where)
    if "user" in entry:
        route.users = build_users(entry, route, default_upstream, default_sep, index, labels, text,
                                  upstream_tls, tls_cache, environ)
    return route


def build_users(entry: dict, listener: Route, default_upstream, default_sep: str, index: int,
                labels: dict[str, str], text: bool, upstream_tls, tls_cache, environ) -> dict:
    """The [[listener.user]] tables of a listener: each user's password (as its SHA-256)
    and its route, built by build_route from the listener's table with the user's
    route fields over it (so every route field works per user)."""
    from proxy.auth import User, digest
    where = f"listener[{index}]"
    tables = entry["user"]
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{labels.get('user', where + '.user')}: expected [[listener.user]] tables "
                          f"(two brackets), got {show(tables, text)}")
    fields = section_fields("listener[].user[]")
    route_keys = [k for k in list(section_fields("listener[]")) + list(SUBTABLES) if k not in NOT_PER_USER]
    users: dict = {}
    for j, t in enumerate(tables):
        uw = f"{where}.user[{j}]"

        def label(k: str) -> str:
            return labels.get(f"user.{k}", f"{uw}.{k}")
        if not isinstance(t, dict):
            raise ConfigError(f"{uw}: expected a [[listener.user]] table, got {show(t, text)}")
        for k in t:
            if k not in fields and k not in route_keys:
                raise ConfigError(f"{label(k)}: unknown field (known: {', '.join(sorted(set(fields) | set(route_keys)))})")
        if "name" not in t:
            raise ConfigError(f"{label('name')}: required (the user name clients give; `default` for "
                              "one-argument AUTH)")
        name = _value("listener[].user[].name", t["name"], label("name"), text)
        if name in users:
            raise ConfigError(f"{label('name')}: user {name!r} is already listener {listener.name}'s user "
                              f"(user names are unique per listener)")
        given = [k for k in ("password_sha256", "password_file", "password_env") if k in t]
        if len(given) != 1:
            raise ConfigError(f"{', '.join(label(k) for k in given) if given else label('password_sha256')}: "
                              f"give exactly one of password_sha256, password_file, password_env"
                              f"{' (got ' + str(len(given)) + ')' if given else ''}")
        how = given[0]
        value = _value(f"listener[].user[].{how}", t[how], label(how), text)
        if how == "password_sha256":
            dig, source = value, (how, "***")
        elif how == "password_file":
            dig, source = digest(_password_file(value, label(how))), (how, value)
        else:
            env = os.environ if environ is None else environ
            pw = env.get(value)
            if not pw:
                raise ConfigError(f"{label(how)}: the environment variable {value} is "
                                  f"{'empty' if pw is not None else 'not set'} (it should hold the password)")
            dig, source = digest(pw.encode("utf-8", "surrogateescape")), (how, value)
        merged = {k: v for k, v in entry.items() if k not in NOT_PER_USER or k == "listen"}
        if "namespace" in t or "strip_namespace" in t:  # the user chooses the mode
            merged.pop("namespace", None)
            merged.pop("strip_namespace", None)
        if "upstream" in t or "cluster" in t:  # ... and its server, as a URL or a seed list
            merged.pop("upstream", None)
            merged.pop("cluster", None)
        if "upstream_tls" in t and isinstance(t["upstream_tls"], dict) and isinstance(entry.get("upstream_tls"), dict):
            merged["upstream_tls"] = {**entry["upstream_tls"], **t["upstream_tls"]}
            t = {k: v for k, v in t.items() if k != "upstream_tls"}
        merged.update({k: v for k, v in t.items() if k in route_keys})
        merged["name"] = f"{listener.name}/{name}"
        ulabels = {k: label(k) for k in t if k in route_keys}
        ulabels.update({k: v for k, v in labels.items() if k in merged and k not in t and not k.startswith("user.")})
        route = build_route(merged, default_upstream, default_sep, index, ulabels, text, upstream_tls, tls_cache,
                            environ, where=uw)
        users[name] = User(name, dig, route, source)
    return users


def _password_file(path: str, label: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{label}: cannot read {path!r}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{label}: cannot read {path!r}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: {path!r} is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read {path!r}: {(e.strerror or str(e)).lower()}") from None
    if data.endswith(b"\n"):  # one trailing newline, as `echo secret > file` writes it
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise ConfigError(f"{label}: {path!r} is empty (it should hold the password)")
    return data


def pin_route(route: Route, slot: str, label: str) -> Route:
    """`slot = "pinned"`: every add-mode keyspace of the route writes its namespace as the
    keys' hash tag, `{NS}:key` (proxy/keyspace.py), so a namespace is one cluster slot.
    Refused where that cannot hold: no namespace to pin, strip mode (the client's names
    are the server's), a namespace with `}` (the tag would end inside it)."""
    if slot != "pinned":
        return route
    targets = [("", route.default)] + [(f" (client db {c})", t) for c, t in sorted(route.databases.items())]
    for where, t in targets:
        ks = t.keyspace
        if ks.mode == "strip":
            raise ConfigError(f"{label}: pinned works with namespace (add mode), not strip_namespace "
                              f"'{ks.namespace.decode()}'{where}")
        if ks.mode == "add" and b"}" in ks.namespace:
            raise ConfigError(f"{label}: namespace '{ks.namespace.decode()}'{where} contains '}}': pinned "
                              "writes it as the hash tag {NS}, which would end at that brace")
    if not any(t.keyspace.mode == "add" for _, t in targets):
        raise ConfigError(f"{label}: pinned needs a namespace (it becomes every key's hash tag, {{NS}}:key)")

    def pin(t: DbTarget) -> DbTarget:
        return DbTarget(t.db, replace(t.keyspace, pinned=True)) if t.keyspace.mode == "add" else t
    return replace(route, default=pin(route.default), databases={c: pin(t) for c, t in route.databases.items()})


def load_toml(path: str, upstream_override: str | None = None, upstream_label: str = "--upstream",
              environ=None, upstream_tls_override: dict[str, tuple] | None = None) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return from_dict(data, upstream_override, upstream_label, environ, upstream_tls_override)


def _table(data: dict, key: str) -> dict:
    v = data.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a [{key}] table, got {show(v, False)}")
    return v


TOP_TABLES = ("listener", "metrics", "admin", "limits", "log", "upstream_tls", "sentinel", "cluster")


def from_dict(data: dict, upstream_override: str | None = None, upstream_label: str = "--upstream",
              environ=None, upstream_tls_override: dict[str, tuple] | None = None) -> Config:
    """A Config from a parsed TOML document. The default upstream is, first to last:
    `upstream_override` (named `upstream_label` in errors), $REDIS_URL, the file's.
    `upstream_tls_override`: [upstream_tls] fields from flags or variables, as
    {name: (string, label)}; they win over the file's."""
    environ = os.environ if environ is None else environ
    top = section_fields("")
    for k in data:
        if k not in top and k not in TOP_TABLES:
            raise ConfigError(f"{k}: unknown top-level field (known: {known('', TOP_TABLES)})")
    up_tls = sub_table(data, "upstream_tls", "upstream_tls", "")
    for k, (raw, lab) in (upstream_tls_override or {}).items():
        up_tls[k] = (_value(f"upstream_tls.{k}", raw, lab, True), lab)
    tls_cache: dict = {}
    default_upstream = choose_upstream(data, "", lambda k: k, "") or parse_url(DEFAULT_UPSTREAM)
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
        routes.append(build_route(e, default_upstream, sep, i, upstream_tls=up_tls, tls_cache=tls_cache,
                                  environ=environ))
    check_upstream_tls_used(routes, up_tls)
    apply_sentinel_auth(routes, sub_table(data, "sentinel", "sentinel", ""))
    addresses: dict[tuple, int] = {}
    names: dict[str, int] = {}
    for i, r in enumerate(routes):
        if r.listen in addresses:
            raise ConfigError(f"listener[{i}].listen: {format_addr(*r.listen)} is already "
                              f"listener[{addresses[r.listen]}]'s address (each listener needs its own)")
        for rr in r.with_users():
            if rr.name in names:
                raise ConfigError(f"listener[{i}].name: {rr.name!r} is already listener[{names[rr.name]}]'s "
                                  "name (names must be unique: logs and metrics tell routes apart by them"
                                  f"{'' if rr is r else '; a user route is named LISTENER/USER'})")
            names[rr.name] = i
        addresses[r.listen] = i
    metrics = None
    section = _table(data, "metrics")
    for k, v in section.items():
        if k not in section_fields("metrics"):
            raise ConfigError(f"metrics.{k}: unknown field (known: {known('metrics')})")
    if "listen" in section:
        metrics = _value("metrics.listen", section["listen"], "metrics.listen")
    admin = {}
    for k, v in _table(data, "admin").items():
        if k not in section_fields("admin"):
            raise ConfigError(f"admin.{k}: unknown field (known: {known('admin')}; the token itself goes in "
                              "PROXY_ADMIN_TOKEN or a file, not in this file)")
        admin[k] = _value(f"admin.{k}", v, f"admin.{k}")
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
    cfg = Config(routes, metrics, limits, log.get("level"), log.get("format"), admin.get("listen"),
                 admin.get("token_file"))
    if cfg.admin_token_file:
        cfg.admin_token = read_token(cfg.admin_token_file, "admin.token_file")
    return cfg


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


def _route_toml(r: Route, table: str) -> tuple[list[str], list[str]]:
    """A route's upstream, keyspace and slot (its table's own lines), and its upstream TLS
    and db map sub-tables, which go after every line of the table (passwords as ***)."""
    scalars = [f"upstream = {_toml_str(r.upstream.masked())}"] + _keyspace_toml(r.default.keyspace)
    scalars.append(f"policy = {_toml_str(r.policy)}")
    scalars.append(f"slot = {_toml_str(r.slot)}")
    lines = []
    t = r.upstream.tls
    if t is not None:
        lines.append(f"[{table}.upstream_tls]")
        lines += [f"{k} = {_toml_str(getattr(t, k))}" for k in ("ca_file", "ca_dir", "cert_file", "key_file")
                  if getattr(t, k) is not None]
        if t.server_name or (r.upstream.sentinel is None and r.upstream.cluster is None):
            # (a sentinel's or a cluster's nodes: each its own host)
            lines.append(f"server_name = {_toml_str(t.server_hostname(r.upstream.host))}")
        lines.append(f"verify = {'true' if t.verify else 'false'}")
    if r.databases:
        lines.append(f"[{table}.databases]")
        for c, t in sorted(r.databases.items()):
            parts = [f"db = {t.db}"] + _keyspace_toml(t.keyspace)
            lines.append(f"{c} = {{ {', '.join(parts)} }}")
    return scalars, lines


def render_toml(cfg: Config) -> str:
    """The configuration as a TOML file that would give it, every default spelled out and
    passwords shown as ***."""
    lines = []
    for r in cfg.routes:
        lines += ["[[listener]]", f"name = {_toml_str(r.name)}", f"listen = {_toml_str(format_addr(*r.listen))}"]
        scalars, subtables = _route_toml(r, "listener")
        lines += scalars
        if r.max_clients is not None:
            lines.append(f"max_clients = {r.max_clients}")
        if r.tls is not None:
            lines.append("[listener.tls]")
            lines += [f"{k} = {_toml_str(getattr(r.tls, k))}" for k in ("cert_file", "key_file", "ca_file")
                      if getattr(r.tls, k) is not None]
        lines += subtables
        for u in (r.users or {}).values():
            how, value = u.source
            lines += ["[[listener.user]]", f"name = {_toml_str(u.name)}", f"{how} = {_toml_str(value)}"]
            scalars, subtables = _route_toml(u.route, "listener.user")
            lines += scalars + subtables
        lines.append("")
    spec = next((rr.upstream.sentinel for r in cfg.routes for rr in r.with_users()
                 if rr.upstream.sentinel is not None), None)
    if spec is not None and spec.password:
        lines += ["[sentinel]"] + ([f"username = {_toml_str(spec.username)}"] if spec.username else []) + \
            ['password = "***"', ""]
    if cfg.metrics_listen:
        lines += ["[metrics]", f"listen = {_toml_str(format_addr(*cfg.metrics_listen))}", ""]
    if cfg.admin_listen or cfg.admin_token_file or cfg.admin_token:
        lines.append("[admin]")
        if cfg.admin_listen:
            lines.append(f"listen = {_toml_str(format_addr(*cfg.admin_listen))}")
        if cfg.admin_token_file:
            lines.append(f"token_file = {_toml_str(cfg.admin_token_file)}")
        elif cfg.admin_token:
            lines.append("# token: from PROXY_ADMIN_TOKEN (or --admin-token), not shown")
        lines.append("")
    lines.append("[limits]")
    for k in section_fields("limits"):
        v = getattr(cfg.limits, k)
        if v is None:
            lines.append(f"# {k}: derived from the file-descriptor limit at start")
            continue
        lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else repr(v)}")
    lines += ["", "[log]", f"level = {_toml_str(cfg.log_level or 'info')}",
              f"format = {_toml_str(cfg.log_format or 'text')}"]
    return "\n".join(lines) + "\n"
