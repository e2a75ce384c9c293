"""`keyspace-proxy check [--config FILE | the proxy's flags]`: is this configuration right?

Reads the flags, variables and file exactly as the proxy would and validates them;
then, for every route, connects to its upstream with the proxy's own handshake
(Upstream.handshake: AUTH with the URL's credentials, SELECT the db) once per db the
route serves (the URL's, and each of [listener.databases]) and sends PING. Prints the
effective configuration as TOML (every default spelled out, passwords as ***), one
line per route and db, and exits 0 when every check passed, else 2.
"""

from __future__ import annotations

import socket
import ssl
import sys

import hiredis

from proxy.config import (Config, ConfigError, Upstream, connect_failure, format_addr, handshake_failure,
                          render_toml)
from proxy.resp import encode_command
from proxy.sentinel import SentinelError

PROG = "keyspace-proxy check"


def probe(up: Upstream, db: int, timeout: float) -> str | None:
    """None if `up` accepts the handshake for backend `db` and answers PING, else what failed."""
    cmds = up.handshake(db) + [[b"PING"]]
    replies: list = []
    host, port = up.host, up.port
    try:
        host, port = up.address(timeout)  # a sentinel upstream: its primary now
        with up.open_socket(timeout, (host, port)) as s:  # TLS for rediss://
            s.settimeout(timeout)
            s.sendall(b"".join(encode_command(c) for c in cmds))
            reader = hiredis.Reader()
            while len(replies) < len(cmds):
                data = s.recv(65536)
                if not data:
                    return "unreachable: the server closed the connection"
                reader.feed(data)
                while (r := reader.gets()) is not False:
                    replies.append(r)
    except hiredis.ProtocolError:
        return "not a Redis server: its reply is not RESP"
    except SentinelError as e:
        return f"unreachable: {e}"
    except socket.gaierror as e:
        return f"unreachable: cannot resolve {host!r} ({e.strerror})"
    except ssl.SSLError as e:
        return connect_failure(host, port, e, up.tls)
    except ConnectionResetError as e:
        return connect_failure(host, port, e, up.tls) if up.tls else f"unreachable: {e.strerror.lower()}"
    except (socket.timeout, TimeoutError):
        return f"unreachable: no answer within {timeout:g} s" + (
            " (a TLS handshake: is the server speaking TLS on that port?)" if up.tls else "")
    except OSError as e:
        return f"unreachable: {(e.strerror or str(e)).lower()}"
    for cmd, reply in zip(cmds, replies):
        if isinstance(reply, hiredis.ReplyError):
            return handshake_failure(cmd, str(reply)) or f"{cmd[0].decode()} failed: {reply}"
    if replies[-1] != b"PONG":
        return f"unexpected reply to PING: {replies[-1]!r}"
    return None


def _cluster_node(up: Upstream, timeout: float) -> str:
    """Which node serves a pinned route on a cluster (the owner of its slot, now)."""
    from proxy.cluster_route import ClusterRouteError, resolve
    try:
        addr, m = resolve(up, up.slot if up.slot is not None else 0, timeout)
    except ClusterRouteError as e:
        return f" (no owner: {e})"
    if up.slot is None:  # a spread route: every primary serves some of its keys
        gaps = m.uncovered()
        return f", spread over {len(m.primaries())} primaries" + (f" (slots without a primary: {gaps[:3]})"
                                                                  if gaps else "")
    return f", pinned hash slot {up.slot} served by {format_addr(*addr)}"


def check_routes(cfg: Config, out=sys.stdout) -> int:
    """One line per route and client db; the number of problems."""
    problems = 0
    cache: dict[tuple[Upstream, int], str | None] = {}
    for r in cfg.traffic_routes():
        for client_db, db in r.dbs():
            key = (r.upstream, db)
            if key not in cache:
                cache[key] = probe(r.upstream, db, cfg.limits.connect_timeout)
            err = cache[key]
            addr = format_addr(*r.listen)
            where = (f"route {r.name}{'' if r.name == addr else f' ({addr})'}: upstream "
                     f"{r.upstream.masked().rsplit('/', 1)[0]}, client db {client_db} -> db {db}")
            if err is None and r.upstream.cluster is not None:
                where += _cluster_node(r.upstream, cfg.limits.connect_timeout)
            print(f"{where}: {'ok' if err is None else err}", file=out)
            problems += err is not None
    return problems


def main(argv: list[str]) -> int:
    from proxy.cli import apply_env, build_parser, config_from_args
    a = build_parser(PROG, subcommands=False).parse_args(argv)
    try:
        apply_env(a)
        cfg = config_from_args(a)
        if (a.workers or 1) > 1:
            from proxy.workers import check_config
            check_config(cfg)
    except ConfigError as e:
        print(f"{PROG}: configuration error: {e}", file=sys.stderr)
        return 2
    cfg.log_level, cfg.log_format = a.log_level or cfg.log_level, a.log_format or cfg.log_format
    print("# effective configuration (credentials masked)")
    if a.config:
        print(f"# from {a.config}")
    if a.workers:
        print(f"# workers = {a.workers} (--workers / PROXY_WORKERS)")
    print(render_toml(cfg))
    problems = check_routes(cfg)
    print(f"{PROG}: " + ("ok" if not problems else f"{problems} problem(s)"), flush=True)
    return 2 if problems else 0
