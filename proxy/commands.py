"""The generated command table: key specs, arity and flags of every command.

`data/commands.json` is generated from real servers' COMMAND INFO / COMMAND DOCS
by `scripts/gen_command_table.py`; nothing here lists key positions by hand.
What the specs cannot say (policy, connection effects, reply rewriting) is in
proxy/overlay.py; proxy/rules.py joins the two into one Rule per command.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

from proxy import keyspecs

DATA = os.path.join(os.path.dirname(__file__), "data", "commands.json")

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
