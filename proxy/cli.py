"""Command line: `keyspace-proxy [options]` runs the proxy; `keyspace-proxy demo` tries it out."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy import __version__
from proxy.config import (DEFAULT_UPSTREAM, Config, ConfigError, Limits, build_route, load_toml,
                          parse_listen)

log = logging.getLogger("keyspace-proxy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keyspace-proxy",
        description="A RESP proxy that adds or strips a key namespace and routes client dbs "
                    "to backend dbs. `keyspace-proxy demo` starts an embedded Valkey with a proxy in front.")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to accept clients on (e.g. 127.0.0.1:6380)")
    p.add_argument("--upstream", metavar="URL",
                   help=f"redis://[user:password@]host:port/db (default: $REDIS_URL, else {DEFAULT_UPSTREAM})")
    ns = p.add_mutually_exclusive_group()
    ns.add_argument("--namespace", metavar="NS", help="add mode: client `foo` <-> server `NS:foo`")
    ns.add_argument("--strip-namespace", metavar="NS", help="strip mode: client `NS:foo` <-> server `foo`")
    p.add_argument("--separator", default=None, help="between namespace and key (default ':')")
    p.add_argument("--config", metavar="FILE", help="TOML file with one [[listener]] per route")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="metrics endpoint (see README)")
    p.add_argument("--max-bulk-len", type=int, default=None,
                   help="largest bulk string a client may send (default 512 MB, as Redis)")
    p.add_argument("--max-query-len", type=int, default=None,
                   help="largest unfinished request buffered per client (default 1 GB, as Redis)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to let owed replies finish on SIGTERM (default 10)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"keyspace-proxy {__version__}")
    return p


def config_from_args(a: argparse.Namespace) -> Config:
    if a.config:
        cfg = load_toml(a.config, upstream_override=a.upstream)
        if a.listen:
            raise ConfigError("--listen: give listeners in the config file, or flags without --config")
    else:
        if not a.listen:
            raise ConfigError("--listen: required (or --config FILE)")
        entry = {"listen": a.listen}
        if a.namespace is not None:
            entry["namespace"] = a.namespace
            if not a.namespace:
                raise ConfigError("--namespace: must not be empty")
        if a.strip_namespace is not None:
            entry["strip_namespace"] = a.strip_namespace
            if not a.strip_namespace:
                raise ConfigError("--strip-namespace: must not be empty")
        upstream = a.upstream or os.environ.get("REDIS_URL") or DEFAULT_UPSTREAM
        route = build_route(entry, upstream, a.separator if a.separator is not None else ":", 0)
        route.name = a.listen
        cfg = Config([route], None, Limits())
    if a.separator is not None and a.config:
        raise ConfigError("--separator: set `separator` in the config file when using --config")
    if a.metrics_listen:
        cfg.metrics_listen = parse_listen(a.metrics_listen, "--metrics-listen")
    if a.max_bulk_len is not None:
        cfg.limits.max_bulk = a.max_bulk_len
    if a.max_query_len is not None:
        cfg.limits.max_query = a.max_query_len
    if a.drain_timeout is not None:
        cfg.limits.drain_timeout = a.drain_timeout
    return cfg


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from proxy.demo import main as demo_main
        return demo_main(argv[1:])
    a = build_parser().parse_args(argv)
    setup_logging(a.log_level)
    try:
        cfg = config_from_args(a)
    except ConfigError as e:
        print(f"keyspace-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    from proxy.commands import default_table
    default_table()  # load the command table before accepting anyone
    from proxy.server import run
    try:
        run(cfg)
    except OSError as e:
        print(f"keyspace-proxy: {e}", file=sys.stderr)
        return 1
    return 0
