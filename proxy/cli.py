"""Command line: `keyspace-proxy [options]` runs the proxy; `keyspace-proxy demo` tries it out."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy import __version__
from proxy.config import (DEFAULT_UPSTREAM, Config, ConfigError, Limits, build_route, load_toml,
                          parse_listen)
from proxy.logs import FORMATS, LEVELS, setup_logging

# Flags fall back to these environment variables (containers); a flag given wins.
# REDIS_URL is the fallback of --upstream (see config_from_args).
ENV_FALLBACKS = {
    "listen": "PROXY_LISTEN", "namespace": "PROXY_NAMESPACE", "strip_namespace": "PROXY_STRIP_NAMESPACE",
    "separator": "PROXY_SEPARATOR", "config": "PROXY_CONFIG", "metrics_listen": "PROXY_METRICS_LISTEN",
    "log_level": "PROXY_LOG_LEVEL", "log_format": "PROXY_LOG_FORMAT", "upstream_mode": "PROXY_UPSTREAM_MODE",
    "workers": "PROXY_WORKERS",
}

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
    p.add_argument("--upstream-mode", choices=["shared", "dedicated"], default=None,
                   help="shared (default): clients in plain request/reply state share one upstream "
                        "connection per route and db, and move to their own on MULTI, WATCH, SELECT, "
                        "blocking commands, SUBSCRIBE, ...; dedicated: one upstream connection per client")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds to let owed replies finish on SIGTERM (default 10)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N processes sharing the listeners (SO_REUSEPORT) under one supervisor that "
                        "also serves the admin port for all; default 1 (see README)")
    p.add_argument("--log-level", default=None, choices=list(LEVELS), help="default info")
    p.add_argument("--log-format", default=None, choices=list(FORMATS),
                   help="text (default) or json: one JSON object per line")
    p.add_argument("--version", action="version", version=f"keyspace-proxy {__version__}")
    return p


def apply_env(a: argparse.Namespace, environ=None) -> argparse.Namespace:
    """Fill flags not given from PROXY_* variables; empty variables count as unset.

    PROXY_LISTEN yields to a config file (the image sets it by default; listeners come
    from the file), while a --listen flag with a config file is still an error."""
    environ = os.environ if environ is None else environ
    env = {attr: environ.get(var) or None for attr, var in ENV_FALLBACKS.items()}
    if a.namespace is None and a.strip_namespace is None:
        if env["namespace"] and env["strip_namespace"]:
            raise ConfigError("PROXY_NAMESPACE, PROXY_STRIP_NAMESPACE: give one of them, not both")
        a.namespace, a.strip_namespace = env["namespace"], env["strip_namespace"]
    for attr in ("config", "separator", "metrics_listen", "log_level", "log_format", "upstream_mode"):
        if getattr(a, attr) is None and env[attr] is not None:
            setattr(a, attr, env[attr])
    if a.listen is None and not a.config:
        a.listen = env["listen"]
    if a.workers is None and env["workers"] is not None:
        try:
            a.workers = int(env["workers"])
        except ValueError:
            raise ConfigError(f"PROXY_WORKERS: expected a number, got {env['workers']!r}") from None
    if a.workers is not None and not 1 <= a.workers <= 256:
        raise ConfigError(f"--workers: expected 1 to 256, got {a.workers}")
    if a.log_level is not None and a.log_level not in LEVELS:
        raise ConfigError(f"PROXY_LOG_LEVEL: expected one of {', '.join(LEVELS)}, got {a.log_level!r}")
    if a.log_format is not None and a.log_format not in FORMATS:
        raise ConfigError(f"PROXY_LOG_FORMAT: expected one of {', '.join(FORMATS)}, got {a.log_format!r}")
    return a


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
    if a.upstream_mode is not None:
        cfg.limits.upstream_mode = a.upstream_mode
    if a.drain_timeout is not None:
        cfg.limits.drain_timeout = a.drain_timeout
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from proxy.demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] == ["migrate"]:
        from proxy.migrate import main as migrate_main
        return migrate_main(argv[1:])
    a = build_parser().parse_args(argv)
    try:
        apply_env(a)
    except ConfigError as e:
        print(f"keyspace-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(a.log_level or "info", a.log_format or "text")
    try:
        cfg = config_from_args(a)
    except ConfigError as e:
        log.error("configuration error: %s", e, extra={"event": "config_error"})
        return 2
    if (a.log_level is None and cfg.log_level) or (a.log_format is None and cfg.log_format):
        setup_logging(a.log_level or cfg.log_level or "info", a.log_format or cfg.log_format or "text")
    from proxy.workers import WORKER_ENV, run_workers
    worker = WORKER_ENV in os.environ
    if (a.workers or 1) > 1 and not worker:
        try:
            return run_workers(cfg, a.workers, argv, load_config=lambda: config_from_args(a))
        except ConfigError as e:
            log.error("configuration error: %s", e, extra={"event": "config_error"})
            return 2
    from proxy.commands import default_table
    default_table()  # load the command table before accepting anyone
    from proxy.server import run
    try:
        run(cfg, load_config=lambda: config_from_args(a), worker=worker)  # SIGHUP, POST /-/reload re-read it
    except OSError as e:
        print(f"keyspace-proxy: {e}", file=sys.stderr)
        return 1
    return 0
