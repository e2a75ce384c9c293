"""Command line: `keyspace-proxy [options]` runs the proxy; `demo`, `migrate` and `check`
are subcommands. Flags, their environment variables and the TOML fields they match
are proxy/schema.py's."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy import __version__
from proxy.config import (Config, ConfigError, apply_sentinel_auth, build_route, check_upstream_tls_used,
                          format_addr, load_toml, parse_url, read_token)
from proxy.logs import mask_credentials, setup_logging
from proxy.schema import (BY_ATTR, DEFAULT_UPSTREAM, FIELDS, SUBCOMMANDS, Invalid, env_help,
                          section_fields)

# Flags fall back to these environment variables (containers); a flag given wins.
# REDIS_URL is the fallback of --upstream.
ENV_FALLBACKS = {f.attr: f.env for f in FIELDS if f.flag and f.env and f.env.startswith("PROXY_")}
# Variables that shape the single route of the flags; with a config file they do not apply
# (the image sets PROXY_LISTEN; the listeners come from the file).
ROUTE_ONLY = ("listen", "namespace", "strip_namespace", "separator", "slot", "policy", "tls_cert_file",
              "tls_key_file", "tls_ca_file", "password_sha256", "password_file", "password_env")
# the `default` user of the flags' single route: flag attribute -> [[listener.user]] field
PASSWORD = {"password_sha256": "password_sha256", "password_file": "password_file", "password_env": "password_env"}
# [listener.tls] of the flags' single route: flag attribute -> field
LISTENER_TLS = {"tls_cert_file": "cert_file", "tls_key_file": "key_file", "tls_ca_file": "ca_file"}
# top-level [upstream_tls]: flag attribute -> field (flags and variables win over the file's)
UPSTREAM_TLS = {f.attr: f.name for f in FIELDS if f.key.startswith("upstream_tls.")}
# top-level [sentinel]: the sentinels' credentials (flags and variables win over the file's)
SENTINEL = {f.attr: f.name for f in FIELDS if f.key.startswith("sentinel.")}

log = logging.getLogger("keyspace-proxy")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, credentials masked (argparse repeats what it could not use)
        self.exit(2, f"{self.prog}: error: {mask_credentials(message)} (see {self.prog} --help)\n")


def build_parser(prog: str = "keyspace-proxy", subcommands: bool = True) -> argparse.ArgumentParser:
    epilog = ""
    if subcommands:
        width = max(len(s) for s, _ in SUBCOMMANDS)
        epilog += "subcommands (each has --help):\n" + "\n".join(
            f"  {prog} {s:<{width}}  {what}" for s, what in SUBCOMMANDS) + "\n\n"
    epilog += ("environment variables (a flag given wins; an empty variable counts as unset; with a config\n"
               "file, PROXY_LISTEN, PROXY_NAMESPACE, PROXY_STRIP_NAMESPACE, PROXY_SEPARATOR, PROXY_SLOT,\n"
               "PROXY_POLICY and the listener's TLS and password variables (PROXY_TLS_*, PROXY_PASSWORD*)\n"
               "do not apply, and the others override the file):\n" + env_help() + "\n\n"
               "Configuration errors exit 2 with one line naming the flag, variable or TOML field.")
    p = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
               description="A RESP proxy that adds or strips a key namespace and routes client dbs "
                           "to backend dbs." if subcommands else
               "Validate the configuration given as to the proxy (flags, variables or --config), "
               "connect to every route's upstream and db, print the effective configuration with "
               "credentials masked; exit 0 if all is well, else 2.")
    ns = p.add_mutually_exclusive_group()
    for f in FIELDS:
        if not f.flag:
            continue
        d = f.default_text()
        default = "" if d in ("", "required") else f" (default {d})"
        where = f"; env {f.env}" + (f", TOML {f.key}" if f.toml else "")
        (ns if f.attr in ("namespace", "strip_namespace") else p).add_argument(
            f.flag, metavar=f.metavar, default=None, help=f"{f.help}{default}{where}".replace("%", "%%"))
    p.add_argument("--version", action="version", version=f"keyspace-proxy {__version__}")
    return p


def _source(a: argparse.Namespace, attr: str) -> str:
    """How the user gave `attr`: its flag, or the variable it came from."""
    return getattr(a, "_sources", {}).get(attr) or BY_ATTR[attr].flag


def _parse(a: argparse.Namespace, attr: str):
    """The value of `attr` (a flag or variable string) checked by the schema, or None."""
    value = getattr(a, attr)
    if value is None:
        return None
    try:
        return BY_ATTR[attr].kind.parse(value, True)
    except Invalid as e:
        raise ConfigError(f"{_source(a, attr)}: {e}") from None


def apply_env(a: argparse.Namespace, environ=None) -> argparse.Namespace:
    """Fill flags not given from PROXY_* variables; empty variables count as unset.
    Checks the settings needed before logging (level, format, workers).

    PROXY_LISTEN (and the other route-shaping variables) yield to a config file, while
    the flags --listen, --namespace, --strip-namespace, --separator and --policy with a config
    file are errors."""
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    env = {attr: environ.get(var) or None for attr, var in ENV_FALLBACKS.items()}
    if a.namespace is None and a.strip_namespace is None:
        if env["namespace"] and env["strip_namespace"]:
            raise ConfigError("PROXY_NAMESPACE, PROXY_STRIP_NAMESPACE: give one of them, not both")
    else:
        env["namespace"] = env["strip_namespace"] = None  # a flag chose the mode
    if a.config is None and env["config"] is not None:
        a.config, sources["config"] = env["config"], "PROXY_CONFIG"
    for attr, value in env.items():
        if getattr(a, attr) is None and value is not None and not (a.config and attr in ROUTE_ONLY):
            setattr(a, attr, value)
            sources[attr] = ENV_FALLBACKS[attr]
    a._sources = sources
    a.log_level, a.log_format, a.workers = _parse(a, "log_level"), _parse(a, "log_format"), _parse(a, "workers")
    return a


def config_from_args(a: argparse.Namespace, environ=None) -> Config:
    environ = os.environ if environ is None else environ
    if a.upstream is not None:
        upstream, upstream_label = a.upstream, "--upstream"
    else:
        upstream, upstream_label = environ.get("REDIS_URL") or None, "REDIS_URL"
    if a.config:
        for attr in ROUTE_ONLY:
            if getattr(a, attr) is not None and _source(a, attr).startswith("--"):
                raise ConfigError(f"{_source(a, attr)}: give `{attr}` in the config file's listeners, "
                                  "or flags without --config")
        tls_override = {name: (getattr(a, attr), _source(a, attr)) for attr, name in UPSTREAM_TLS.items()
                        if getattr(a, attr) is not None}
        cfg = load_toml(a.config, upstream_override=upstream, upstream_label=upstream_label, environ=environ,
                        upstream_tls_override=tls_override)
    else:
        if a.listen is None:
            raise ConfigError("--listen: required (or --config FILE); HOST:PORT, e.g. 127.0.0.1:6380")
        entry = {k: getattr(a, k) for k in ("listen", "namespace", "strip_namespace", "slot", "policy")
                 if getattr(a, k) is not None}
        labels = {k: _source(a, k) for k in entry}
        labels.setdefault("policy", "--policy")  # named in refusals: the setting that would allow it
        tls = {name: getattr(a, attr) for attr, name in LISTENER_TLS.items() if getattr(a, attr) is not None}
        if tls:
            entry["tls"] = tls
            labels.update({f"tls.{name}": _source(a, attr) for attr, name in LISTENER_TLS.items()})
        pw = {name: getattr(a, attr) for attr, name in PASSWORD.items() if getattr(a, attr) is not None}
        if pw:
            labels.update({f"user.{name}": _source(a, attr) for attr, name in PASSWORD.items()})
        elif environ.get("PROXY_PASSWORD"):  # the password itself in a variable (never a flag: ps shows flags)
            pw = {"password_env": "PROXY_PASSWORD"}
            labels["user.password_env"] = "PROXY_PASSWORD"
        if pw:
            entry["user"] = [{"name": "default", **pw}]
        up_tls = {name: (_parse(a, attr), _source(a, attr)) for attr, name in UPSTREAM_TLS.items()
                  if getattr(a, attr) is not None}
        default_upstream = parse_url(upstream, upstream_label) if upstream else DEFAULT_UPSTREAM
        sep = _parse(a, "separator")
        route = build_route(entry, default_upstream, ":" if sep is None else sep, 0, labels=labels, text=True,
                            upstream_tls=up_tls, environ=environ)
        check_upstream_tls_used([route], up_tls)
        cfg = Config([route])
    apply_sentinel_auth(cfg.routes, {name: (_parse(a, attr), _source(a, attr)) for attr, name in SENTINEL.items()
                                     if getattr(a, attr) is not None})
    metrics = _parse(a, "metrics_listen")
    if metrics is not None:
        cfg.metrics_listen = metrics
    admin = _parse(a, "admin_listen")
    if admin is not None:
        cfg.admin_listen = admin
    token_file, token = _parse(a, "admin_token_file"), _parse(a, "admin_token")
    if token_file is not None and token is not None:
        raise ConfigError(f"{_source(a, 'admin_token')}, {_source(a, 'admin_token_file')}: give the token "
                          "or a file holding it, not both")
    if token_file is not None:  # flags and variables win over the file's [admin] token_file
        cfg.admin_token_file = token_file
        cfg.admin_token = read_token(token_file, _source(a, "admin_token_file"))
    if token is not None:
        cfg.admin_token, cfg.admin_token_file = token, None
    for name in section_fields("limits"):
        attr = next(f.attr for f in FIELDS if f.key == f"limits.{name}")
        value = _parse(a, attr)
        if value is not None:
            setattr(cfg.limits, name, value)
    return cfg


def _config_error(e: Exception) -> int:
    log.error("configuration error: %s", e, extra={"event": "config_error"})
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from proxy.demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] == ["migrate"]:
        from proxy.migrate import main as migrate_main
        return migrate_main(argv[1:])
    if argv[:1] == ["check"]:
        from proxy.check import main as check_main
        return check_main(argv[1:])
    a = build_parser().parse_args(argv)
    try:
        apply_env(a)
    except ConfigError as e:
        # the log settings themselves may be what is wrong: this one line is plain text
        setup_logging("info", a.log_format if a.log_format in ("text", "json") else "text")
        return _config_error(e)
    setup_logging(a.log_level or "info", a.log_format or "text")
    try:
        cfg = config_from_args(a)
    except ConfigError as e:
        return _config_error(e)
    if (a.log_level is None and cfg.log_level) or (a.log_format is None and cfg.log_format):
        setup_logging(a.log_level or cfg.log_level or "info", a.log_format or cfg.log_format or "text")
    from proxy.workers import WORKER_ENV, run_workers
    worker = WORKER_ENV in os.environ
    if (a.workers or 1) > 1 and not worker:
        try:
            return run_workers(cfg, a.workers, argv, load_config=lambda: config_from_args(a))
        except ConfigError as e:
            return _config_error(e)
        except OSError as e:
            log.error("%s", bind_error(e, cfg), extra={"event": "start_error"})
            return 2
    from proxy.commands import default_table
    default_table()  # load the command table before accepting anyone
    from proxy.server import run
    try:
        run(cfg, load_config=lambda: config_from_args(a), worker=worker)  # SIGHUP, POST /-/reload re-read it
    except OSError as e:  # an address that cannot be had: taken, not local, not resolvable
        log.error("%s", bind_error(e, cfg), extra={"event": "start_error"})
        return 2
    return 0


def bind_error(e: OSError, cfg: Config) -> str:
    """An OSError from opening the listeners, as one line naming the address."""
    import re
    text = e.strerror or str(e)
    if text.startswith(("cannot listen on metrics port", "cannot listen on admin port")):
        return text
    m = re.search(r"bind on address \('([^']*)', (\d+)[^)]*\): (.*)", text)
    if m:  # asyncio and uvloop: 'error while attempting to bind on address ('h', 1): address already in use'
        return f"cannot listen on {format_addr(m.group(1), int(m.group(2)))}: {m.group(3)}"
    addrs = ", ".join(format_addr(*r.listen) for r in cfg.routes)
    return f"cannot listen on {addrs}: {text[:1].lower() + text[1:]}"
