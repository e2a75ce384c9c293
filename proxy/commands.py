"""Command knowledge: the generated key-spec table plus the proxy's policy for keyless commands.

`data/commands.json` is generated from real servers' COMMAND INFO / COMMAND DOCS
by `scripts/gen_command_table.py`; nothing here lists key positions by hand.
What the specs cannot say is policy: which keyless commands are safe inside a
namespace fence. A keyless command not listed in KEYLESS_SAFE is refused on a
namespaced route (fail closed), so a new server command never slips through.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from proxy import keyspecs

DATA = os.path.join(os.path.dirname(__file__), "data", "commands.json")

# Keyless commands (or subcommands) that touch only the caller's own connection or
# server-wide facts that name no key. Everything keyless that is not here, has no
# handler in rewrite.py and is not emulated is refused on a namespaced route.
KEYLESS_SAFE = frozenset("""
ping echo time quit auth hello multi exec discard unwatch info lastsave wait waitaof
role lolwut readonly readwrite
command|count command|docs command|info command|list command|help
client|id client|getname client|setname client|info client|no-evict client|no-touch
client|reply client|getredir client|caching client|help client|setinfo client|capa
script|load script|exists script|help
function|load function|list function|stats function|dump function|help
memory|doctor memory|stats memory|malloc-stats memory|help
object|help xinfo|help xgroup|help pubsub|numpat pubsub|help
acl|whoami acl|cat acl|help
""".split())

# Why the rest of the keyless commands are refused on a namespaced route, for the error message.
REFUSED_WHY = {
    "flushall": "it would delete every namespace; FLUSHDB is emulated within the namespace",
    "swapdb": "it would swap other tenants' databases",
    "monitor": "it shows every client's commands and keys",
    "debug": "only DEBUG OBJECT key is allowed",
    "config": "server configuration is shared by every route",
    "shutdown": "the server is shared by every route",
    "save": "persistence is shared by every route", "bgsave": "persistence is shared by every route",
    "bgrewriteaof": "persistence is shared by every route",
    "replicaof": "replication is shared by every route", "slaveof": "replication is shared by every route",
    "failover": "replication is shared by every route",
    "module": "modules are shared by every route", "acl": "ACLs are shared by every route",
    "cluster": "cluster commands are not routed", "slowlog": "it shows other clients' keys",
    "latency": "it is server-wide", "commandlog": "it shows other clients' keys",
    "client": "it reaches other clients' connections",
    "script": "the script cache is shared by every route", "function": "function libraries are shared by every route",
    "memory": "it acts on the whole server", "asking": "cluster commands are not routed",
    "pfselftest": "it is a server self-test", "psync": "replication is shared by every route",
    "sync": "replication is shared by every route", "replconf": "replication is shared by every route",
}


@dataclass(frozen=True)
class Command:
    name: str                 # "get" or "object|encoding"
    arity: int
    flags: frozenset
    keyed: bool               # has key specs the generic interpreter understands
    incomplete: bool          # some key positions need a hand-written handler
    positions: Callable[[list], list]  # args -> indexes of keys (shard channels included: fenced alike)


class CommandTable:
    def __init__(self, path: str = DATA):
        with open(path) as f:
            data = json.load(f)
        self.servers = data.get("servers", [])
        self.commands: dict[str, Command] = {}
        self.containers: set[str] = set()
        for name, e in data["commands"].items():
            if e.get("subcommands"):
                self.containers.add(name)
            specs = e.get("key_specs") or []
            self.commands[name] = Command(
                name=name, arity=e["arity"], flags=frozenset(e.get("flags", ())),
                keyed=bool(specs), incomplete=keyspecs.is_incomplete(specs),
                positions=keyspecs.compile_specs(specs, include_not_keys=True))

    def lookup(self, args: list[bytes]) -> tuple[str, Command | None]:
        """(lowercase name, table entry or None); container commands resolve their subcommand."""
        name = args[0].lower().decode("latin-1")
        if name in self.containers and len(args) > 1:
            sub = name + "|" + args[1].lower().decode("latin-1")
            return sub, self.commands.get(sub)
        return name, self.commands.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.commands


_default: CommandTable | None = None


def default_table() -> CommandTable:
    global _default
    if _default is None:
        _default = CommandTable()
    return _default
